"""`python -m inflora_dist.bench gpu`: every section at toy sizes on the host, and the refusal without a GPU.

No assertion on the speed itself: timings on a shared test machine are not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inflora_dist.bench import gpu
from inflora_dist.bench.__main__ import main

REPO = Path(__file__).resolve().parents[1]
PAIRS = ("vit_fp32", "vit_bf16", "llm_bf16")


def test_small_run_on_the_host_measures_every_section(capsys):
    figures = main(["gpu", "--device", "cpu", "--small", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(figures))
    assert printed["errors"] == {}
    assert printed["device"] == "cpu" and printed["device_name"] and printed["torch"] == torch.__version__
    assert printed["wall_s"] > 0
    for name in PAIRS:
        f = printed[name]
        for key in ("inflora_step_s", "peft_step_s", "step_ratio", "cov_pass_s", "plain_forward_s", "cov_pass_ratio"):
            assert isinstance(f[key], float) and f[key] > 0, (name, key, f[key])
        assert f["peak_step_memory_mb"] == {"inflora": None, "peft": None}  # no allocator statistics on the host
        n = f["trainable_params"]
        assert 0 < n["inflora"] < n["peft"]  # InfLoRA trains B only, PEFT A and B
    assert printed["vit_bf16"]["config"]["dtype"] == "bfloat16" and printed["vit_fp32"]["config"]["dtype"] == "float32"
    assert printed["vit_fp32"]["trainable_params"] == {"inflora": 2 * 2 * 64 * 10, "peft": 2 * 2 * 2 * 64 * 10}
    rows = printed["eigh"]["decompositions"]
    assert [r["d"] for r in rows] == [32, 64, 96] and all(r["eigh_s"] > 0 for r in rows)
    assert rows[-1]["svd_s"] is None  # above svd_max_d: eigh alone
    batched = printed["eigh"]["batched"]
    assert (batched["d"], batched["count"], batched["max_difference"]) == (32, 8, 0.0) and batched["batched_s"] > 0
    seven = printed["llama7b_zero3"]
    assert seven["zero_stage"] == 3 and seven["model"]["hidden_size"] == 64 and seven["parameters"] > 0
    assert seven["phases_s"]["train_s"] > 0 and seven["wall_s"] > 0 and seven["peak_rss_mb"] > 0
    assert seven["peak_device_mb"] is None  # metrics.json has no device memory on the host


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_small_run_on_a_gpu_reports_device_memory():
    figures = main(["gpu", "--small"])
    assert figures["errors"] == {} and figures["device"] == "cuda"
    for name in PAIRS:
        assert all(mb > 0 for mb in figures[name]["peak_step_memory_mb"].values())
    assert figures["llama7b_zero3"]["peak_device_mb"] > 0  # metrics.json's peak_device_mb_per_rank


def test_a_failed_section_is_recorded_and_the_others_run(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("the node ran out of memory")

    monkeypatch.setattr(gpu, "measure_llama7b", broken)
    figures = main(["gpu", "--device", "cpu", "--small", "--sections", "llama7b_zero3", "eigh"])
    assert figures["errors"] == {"llama7b_zero3": "RuntimeError: the node ran out of memory"}
    assert "llama7b_zero3" not in figures and len(figures["eigh"]["decompositions"]) == 3
    assert "llama7b_zero3: FAILED" in capsys.readouterr().out


def test_without_cuda_it_refuses_in_one_line_before_any_work():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "inflora_dist.bench", "gpu", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""  # nothing measured, nothing printed
    last = proc.stderr.strip().splitlines()[-1]
    assert "NoCudaDevice: no CUDA device" in last and "--device cpu" in last


def test_an_explicit_cuda_device_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu.NoCudaDevice, match="no CUDA device"):
        main(["gpu", "--device", "cuda", "--small"])
