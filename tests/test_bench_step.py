"""`python -m inflora_dist.bench step` runs end to end on a tiny ViT and ends with its JSON figures.

No assertion on the speed itself: timings on a shared test machine are not a test.
"""

from __future__ import annotations

import json

import pytest

from inflora_dist.bench.__main__ import build_parser, main

TINY = ["--hidden", "32", "--layers", "2", "--image-size", "32", "--batch-size", "4"]
QUICK = ["--steps", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--json"]
KEYS = ("step_ratio_task1", "step_ratio_task10", "cov_pass_ratio")


def test_step_benchmark_prints_json_figures_last(capsys):
    figures = main(["step", *TINY, *QUICK])
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-1])
    assert printed == figures
    for key in (*KEYS, "inflora_step_task1_s", "inflora_step_task10_s", "peft_step_s"):
        assert isinstance(printed[key], float) and printed[key] > 0, (key, printed[key])
    assert set(printed["goals_met"]) == set(KEYS)
    # InfLoRA trains B only (d_out x r per target); PEFT trains A and B.
    n = printed["trainable_params"]
    assert n["inflora_task1"] == n["inflora_task10"] == 2 * 2 * 32 * 10
    assert n["peft"] == 2 * n["inflora_task1"]
    # Activation checkpointing: fewer saved activations, the same trainable tensors; no GPU here.
    assert n["inflora_checkpointed"] == n["inflora_task1"]
    assert 0 < printed["checkpointing_memory_ratio"] < 1 and printed["checkpointing_step_ratio"] > 0
    assert printed["peak_step_memory_mb"] == {"inflora_task1": None, "inflora_checkpointed": None}


def test_help_lists_the_step_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["step", "--help"])
    assert "--batch-size" in capsys.readouterr().out
