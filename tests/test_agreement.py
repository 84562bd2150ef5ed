"""Ranks that agree: fingerprints all-gathered before each stage; a mismatch stops every rank, naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from trainer_runs import CONFIG, REPO, env, tiny_shards

from inflora_dist.agreement import RanksDisagree, check_ranks_agree, digest, tensors_digest
from inflora_dist.data.build_shards import FASHION_MNIST_DIR
from inflora_dist.dist import free_port


def agree_or_report(rank: int, world_size: int) -> dict:
    same = {"config": {"lr": 0.1}, "torch version": "2.13.0"}
    check_ranks_agree(same, "in a test")  # equal everywhere: no error
    differing = {**same, "shard index entries": {"a.tar": rank}, "deepspeed version": f"0.19.{8 + rank}",
                 "resolved config": {"train": {"lr": [0.005, 0.01][rank], "epochs": 2}, "seed": 0}}  # fmt: skip
    try:
        check_ranks_agree(differing, "before stage 1 (task1)")
    except RanksDisagree as err:
        return {"message": str(err)}
    return {"message": ""}


def test_a_mismatch_is_raised_on_every_rank_naming_item_and_sides(tmp_path):
    results = run_distributed(agree_or_report, 2, tmp_path)
    for rank, res in enumerate(results):
        message = res["message"]
        assert "the ranks disagree before stage 1 (task1)" in message
        assert "shard index entries differs: rank 0: " in message and "; rank 1: " in message
        assert "deepspeed version differs" in message and f"(this rank, {rank}, has 0.19.{8 + rank})" in message
        assert "torch version" not in message and "\n  config" not in message
        # The values themselves, key by key, for items that are not digests.
        assert "\n  resolved config: train.lr: 0.005 (rank 0) vs 0.01 (rank 1)" in message, message
        assert "train.epochs" not in message and "seed" not in message
        assert "shard index entries: a.tar: 0 (rank 0) vs 1 (rank 1)" in message, message
        assert 'deepspeed version: (value): "0.19.8" (rank 0) vs "0.19.9" (rank 1)' in message, message


def test_digests_see_content_not_identity():
    a = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    assert tensors_digest([("w", a)]) == tensors_digest([("w", a.clone())])
    b = a.clone()
    b[1, 2] += 1
    assert tensors_digest([("w", a)]) != tensors_digest([("w", b)])
    assert tensors_digest([("w", a)]) != tensors_digest([("w", a.float())])  # dtype counts
    assert digest({"x": 1, "y": 2}) == digest({"y": 2, "x": 1})


@pytest.fixture(scope="module")
def two_copies(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny sequence, and a second copy whose index has another checksum for one task-1 shard."""
    if not Path(FASHION_MNIST_DIR).exists():
        pytest.skip("Fashion-MNIST is not installed (make test installs Debian's dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("agreement")
    first = tiny_shards(root / "a")
    second = root / "b"
    shutil.copytree(first, second)
    tasks = second / "tasks.yaml"
    tasks.write_text(tasks.read_text().replace(f"root: {first}", f"root: {second}"))
    index = json.loads((second / "index.json").read_text())
    index["shards"]["train/task1-000000.tar"]["sha256"] = "0" * 64  # a stale copy of the index
    (second / "index.json").write_text(json.dumps(index))
    return first, second


def two_nodes(cwds: list[Path], overrides: list[list[str]]) -> list[tuple[int, str]]:
    """(exit status, output) of two torchrun nodes on loopback, one process each, node i started in `cwds[i]`
    with `overrides[i]`."""
    port = str(free_port())
    torchrun = str(Path(env()["PATH"].split(":")[0]) / "torchrun")
    procs = []
    for node, (cwd, extra) in enumerate(zip(cwds, overrides, strict=True)):
        args = [torchrun, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", port,
                str(REPO / "launch" / "train.py"), "--config", str(CONFIG), *extra]  # fmt: skip
        procs.append(
            subprocess.Popen(args, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, output) for proc, output in zip(procs, outputs, strict=True)]


def test_two_nodes_reading_different_shard_indexes_stop_cleanly(two_copies, tmp_path):
    """Two torchrun nodes on loopback, each in its own copy's directory with the same relative `data.tasks`:
    the config strings agree, task 0's data agrees, task 1's index differs; both stop before stage 1's work."""
    same = [f"output_dir={tmp_path / 'run'}", "data.tasks=tasks.yaml", "train.epochs=1"]
    for status, output in two_nodes(list(two_copies), [same, same]):
        assert status != 0, output[-3000:]
        assert "RanksDisagree: the ranks disagree before stage 1 (task1)" in output, output[-3000:]
        assert "shard index entries differs: rank 0: " in output and "; rank 1: " in output
        assert "resolved config differs" not in output and "task spec differs" not in output
    # Task 0 (same data everywhere) was trained and checkpointed before the check stopped stage 1.
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["000000-task0-done"]
    # The index entries differ in their checksum: named key by key.
    assert "shard index entries: task1.shards.train/task1-000000.tar.sha256: " in output, output[-3000:]


def test_ranks_started_with_different_configs_name_the_keys(two_copies, tmp_path):
    """Two ranks given different `train.lr` stop before any training, naming the key and both values."""
    first = two_copies[0]
    common = [f"output_dir={tmp_path / 'run'}", f"data.tasks={first}/tasks.yaml"]
    results = two_nodes([first, first], [[*common, "train.lr=0.005"], [*common, "train.lr=0.01"]])
    for status, output in results:
        assert status != 0, output[-3000:]
        assert "resolved config: train.lr: 0.005 (rank 0) vs 0.01 (rank 1)" in output, output[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
