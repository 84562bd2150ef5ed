"""Open-ended sequences: a finished run extended with more tasks is the run that had them all along.

Real runs of the tiny config on a 5-task Fashion-MNIST sequence: 5 tasks in one go against 3 tasks, then
a resume with the 5-task file, at 1 process (ZeRO 0) and 2 processes (ZeRO-3, every parameter
partitioned). The extension runs on a copy of the data without the first tasks' training shards, so any
pass over old training data would fail.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_runs import REPO, command, env, heads_and_statistics, results, train

from inflora_dist.data.build_shards import FASHION_MNIST_DIR
from inflora_dist.data.build_shards import main as build_shards

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed")

MATRICES = ("accuracy_matrix", "task_incremental_accuracy_matrix", "ncm_accuracy_matrix")
PLANNED = "inflora.planned_tasks=5"
ZERO = {1: ["deepspeed.zero_stage=0"],
        2: ["deepspeed.zero_stage=3",
            "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]}  # fmt: skip


def _sequence_file(source: Path, target: Path, tasks: int, root: Path, **change) -> Path:
    spec = yaml.safe_load(source.read_text())
    spec["root"], spec["tasks"] = str(root), spec["tasks"][:tasks]
    for key, value in change.items():  # e.g. task1_classes=[...]
        task, field = key.split("_", 1)
        next(t for t in spec["tasks"] if t["name"] == task)[field] = value
    target.write_text(yaml.safe_dump(spec))
    return target


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The 5-task shards, a 3-task file over them, and a copy for the extension without tasks 0-2's train shards."""
    root = tmp_path_factory.mktemp("extend")
    five = root / "shards"
    build_shards(["fashion-mnist", "--out", str(five), "--tasks", "5", "--classes-per-task", "2",
                  "--train-per-class", "48", "--eval-per-class", "16", "--shard-size", "40", "--quiet"])  # fmt: skip
    later = root / "later"
    shutil.copytree(five, later)
    for task in range(3):
        for shard in (later / "train").glob(f"task{task}-*.tar"):
            shard.unlink()
    return {
        "five": five / "tasks.yaml",
        "three": _sequence_file(five / "tasks.yaml", root / "three.yaml", 3, five),
        "later": _sequence_file(five / "tasks.yaml", root / "later.yaml", 5, later),
        "root": root,
    }


def _run(nproc: int, out: Path, tasks: Path, *overrides: str) -> None:
    train(nproc, out, PLANNED, *ZERO[nproc], *overrides, shards=tasks.parent, tasks_file=tasks)


def _branches(out: Path) -> dict[str, torch.Tensor]:
    last = sorted((out / "checkpoints").iterdir())[-1]
    return {k: v for k, v in load_file(str(last / "state.safetensors")).items() if "lora_" in k or "memory." in k}


@pytest.mark.timeout(1200)  # three runs, each under the suite's 600 s; on 2 busy cores the sum can pass it
@pytest.mark.parametrize("nproc", [1, 2])
def test_three_tasks_extended_by_two_equal_five_in_one_go(data, tmp_path, nproc):
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    _run(nproc, whole, data["five"])
    _run(nproc, grown, data["three"])
    assert len(results(grown)[0]["accuracy_matrix"]) == 3
    _run(nproc, grown, data["later"], "resume=auto")  # tasks 0-2's training shards are gone: no pass over them

    metrics, state = results(grown)
    ref_metrics, ref_state = results(whole)
    for key in MATRICES:
        assert [len(r) for r in metrics[key]] == [1, 2, 3, 4, 5], key
        for row, ref_row in zip(metrics[key], ref_metrics[key], strict=True):
            torch.testing.assert_close(torch.tensor(row), torch.tensor(ref_row), rtol=0, atol=1e-6, msg=key)
    assert metrics["task_names"] == ref_metrics["task_names"] and len(metrics["timings"]) == 5
    assert sorted(state) == sorted(ref_state)
    for name, tensor in state.items():  # A and the memories, by group
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-6, msg=name)
    for ours, ref in ((_branches(grown), _branches(whole)), (heads_and_statistics(grown), heads_and_statistics(whole))):
        assert sorted(ours) == sorted(ref) and ours
        for name, tensor in ours.items():  # every B, A, task status and memory; heads and class statistics
            torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6, msg=name)
    assert any(k.endswith("lora_B_4") for k in _branches(grown)) and "heads.4.weight" in heads_and_statistics(grown)


def test_a_continuation_that_changes_a_task_names_the_first_difference(data, tmp_path):
    out = tmp_path / "run"
    _run(1, out, data["three"], "train.epochs=1", "ca.enabled=false")
    first = yaml.safe_load(data["three"].read_text())["tasks"][1]["classes"]
    changed = _sequence_file(data["five"], data["root"] / "changed.yaml", 5, data["five"].parent,
                             task1_classes=first[::-1], task2_name="renamed")  # fmt: skip
    proc = _launch(out, changed, "train.epochs=1", "ca.enabled=false")
    assert proc.returncode != 0
    assert f"the task sequence {changed} does not continue the run of checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert f"task 1 ('task1') differs in classes: {first!r} -> {first[::-1]!r}" in proc.stderr
    assert "renamed" not in proc.stderr  # the first difference only

    shorter = _sequence_file(data["five"], data["root"] / "two.yaml", 2, data["five"].parent)
    proc = _launch(out, shorter, "train.epochs=1", "ca.enabled=false")
    assert "it has 2 tasks, the run has 3: a continuation keeps every task of the run, the first missing one " \
           "is task 2 ('task2')" in proc.stderr, proc.stderr[-3000:]  # fmt: skip

    proc = _launch(out, data["five"], "train.epochs=1", "ca.enabled=false", "inflora.planned_tasks=8")
    assert "inflora.planned_tasks: the run's threshold horizon is 5 -> 8" in proc.stderr, proc.stderr[-3000:]


def _launch(out: Path, tasks: Path, *overrides: str):
    args = command(1, f"output_dir={out}", f"data.tasks={tasks}", *ZERO[1], *overrides)
    return subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
