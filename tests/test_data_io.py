"""Shards built from real Fashion-MNIST files and JSONL, streamed back locally and through a real S3 API."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from inflora_dist.data import ShardError, TaskLoader, TaskStream, load_task_sequence, open_task
from inflora_dist.data.build_shards import FASHION_MNIST_DIR, build_instruction, load_fashion_mnist, main, read_records

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed (make test installs it)"
)


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def sequence(tmp_path_factory, fmnist):
    """3 tasks x 2 classes, 70 + 10 samples per class, 20 samples per shard: 7 train shards per task."""
    out = tmp_path_factory.mktemp("shards") / "fmnist"
    main(
        ["fashion-mnist", "--out", str(out), "--tasks", "3", "--classes-per-task", "2", "--train-per-class", "70",
         "--eval-per-class", "10", "--shard-size", "20", "--seed", "1", "--quiet"]
    )  # fmt: skip
    return load_task_sequence(str(out / "tasks.yaml"), check_shards=True)


def keys_of(loader) -> list[str]:
    return [k for b in loader for k, w in zip(b["__key__"], b["weight"].tolist(), strict=True) if w > 0]


def test_decoded_samples_equal_the_source(sequence, fmnist):
    assert len(sequence.tasks) == 3 and len(sequence.shard_urls(0, "train")) == 7
    assert sorted(sequence.class_ids) == sorted(set(sequence.class_ids))
    for t, task in enumerate(sequence.tasks):
        for split in ("train", "eval"):
            images, labels = fmnist[f"{split}_images"], fmnist[f"{split}_labels"]
            stream = open_task(sequence, t, split, batch_size=16, mode="exact", rank=0, world_size=1)
            n = 0
            for batch in TaskLoader(stream):
                for key, image, label, w in zip(
                    batch["__key__"], batch["npy"], batch["cls"], batch["weight"], strict=True
                ):
                    if w == 0:
                        continue
                    source = int(key.split("-")[1])
                    assert torch.equal(image, torch.from_numpy(images[source]))
                    assert int(label) == labels[source] and int(label) in task.classes
                    n += 1
            assert n == getattr(task, split).samples == (140 if split == "train" else 20)


def test_jsonl_round_trip(tmp_path):
    lines = [{"prompt": f"q{i} é", "response": ["yes", "no"][i % 2], "task": f"t{i % 3}"} for i in range(30)]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines))
    records = read_records([src], task_field="task")
    config = build_instruction(records, str(tmp_path / "out"), eval_fraction=0.2, shard_size=3, progress=False)
    seq = load_task_sequence(str(tmp_path / "out" / "tasks.yaml"))
    assert [t.name for t in seq.tasks] == ["t0", "t1", "t2"] and config.tasks[0].instruction.labels == ["no", "yes"]
    back = []
    for t in range(3):
        for split in ("train", "eval"):
            for batch in TaskLoader(open_task(seq, t, split, batch_size=4, mode="exact", rank=0, world_size=1)):
                back += [j for j, w in zip(batch["json"], batch["weight"], strict=True) if w > 0]
    assert sorted(map(json.dumps, back), key=str) == sorted(map(json.dumps, lines), key=str)


def test_records_from_datasets_parquet_and_csv(tmp_path):
    """The same records written by `datasets` itself (save_to_disk, to_parquet, to_csv) and as JSONL build the
    same task sequence; custom field names; a DatasetDict needs --split; a missing field is named."""
    datasets = pytest.importorskip("datasets")
    rows = {"question": [f"q{i}, with a comma" for i in range(12)], "answer": ["yes", "no", "maybe"] * 4,
            "kind": [f"t{i % 2}" for i in range(12)]}  # fmt: skip
    data = datasets.Dataset.from_dict(rows)
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "saved_dict"))
    data.to_parquet(str(tmp_path / "data.parquet"))
    data.to_csv(str(tmp_path / "data.csv"), index=False)
    data.to_json(str(tmp_path / "data.jsonl"))
    fields = ["--task-field", "kind", "--prompt-field", "question", "--response-field", "answer"]
    indexes = {}
    for source in ("saved", "data.parquet", "data.csv", "data.jsonl"):
        out = tmp_path / f"out-{source}"
        config = main(["records", str(tmp_path / source), *fields, "--out", str(out), "--quiet"])
        assert [t.name for t in config.tasks] == ["t0", "t1"]
        indexes[source] = json.loads((out / "index.json").read_text())["shards"]
    assert all(index == indexes["data.jsonl"] for index in indexes.values())  # same bytes, same checksums
    main(["records", str(tmp_path / "saved_dict"), *fields, "--split", "train", "--out", str(tmp_path / "dd")])
    with pytest.raises(ValueError, match=r"splits \['train'\]: choose one with --split"):
        read_records([tmp_path / "saved_dict"], "kind", "question", "answer")
    with pytest.raises(ValueError, match=r"data.csv:2: no field 'prompt' \(the record has \['answer', 'kind'"):
        read_records([tmp_path / "data.csv"])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_mode_equal_batches_over_uneven_shards(sequence, workers):
    """7 shards over 2 ranks: both ranks take the same number of steps and together see every sample once."""
    loaders = [
        TaskLoader(
            open_task(sequence, 0, "train", batch_size=16, mode="train", rank=r, world_size=2), num_workers=workers
        )
        for r in range(2)
    ]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == 5  # ceil(70 / 16)
    keys = [k for rank in batches for b in rank for k, w in zip(b["__key__"], b["weight"], strict=True) if w > 0]
    assert len(keys) == len(set(keys)) == 140
    assert all(b["npy"].shape == (16, 28, 28) for rank in batches for b in rank)


def test_exact_mode_three_ranks_reads_every_sample_once(sequence):
    keys, steps = [], set()
    for r in range(3):
        loader = TaskLoader(
            open_task(sequence, 1, "train", batch_size=8, mode="exact", rank=r, world_size=3), num_workers=2
        )
        batches = list(loader)
        steps.add(len(batches))
        keys += keys_of(batches)
        plan = loader.stream.plan()
        padding = sum(int((b["weight"] == 0).sum()) for b in batches)
        assert padding == len(batches) * 8 - sum(len(plan.run(k)) for k in range(plan.num_batches))
    assert len(steps) == 1
    assert Counter(keys) == Counter({k: 1 for k in keys}) and len(keys) == 140


def test_order_is_deterministic_and_epoch_dependent(sequence):
    def epoch_keys(epoch: int, seed: int = 0) -> list[str]:
        stream = open_task(sequence, 0, "train", batch_size=16, mode="train", rank=0, world_size=1, seed=seed)
        stream.set_epoch(epoch)
        return keys_of(TaskLoader(stream))

    assert epoch_keys(0) == epoch_keys(0)
    assert epoch_keys(0) != epoch_keys(1)
    assert sorted(epoch_keys(0)) == sorted(epoch_keys(1))
    assert epoch_keys(0) != epoch_keys(0, seed=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_remaining_samples(sequence, workers):
    def loader() -> TaskLoader:
        stream = open_task(sequence, 2, "train", batch_size=8, mode="train", rank=1, world_size=2)
        return TaskLoader(stream, num_workers=workers)

    full = loader()
    uninterrupted = [keys_of([b]) for _ in range(2) for b in full]  # two epochs
    for stop in (3, 9, 11):  # mid-epoch 0, exactly at the epoch boundary, and in epoch 1
        first = loader()
        seen = []
        for _ in range(2):
            for b in first:
                seen.append(keys_of([b]))
                if len(seen) == stop:
                    break
            if len(seen) == stop:
                break
        state = first.state_dict()
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        rest = []
        while resumed.epoch < 2:
            rest += [keys_of([b]) for b in resumed]
        assert seen + rest == uninterrupted, stop


def test_truncated_and_missing_shards_raise_naming_url_and_member(sequence, tmp_path):
    urls = sequence.shard_urls(0, "train")
    truncated = tmp_path / "truncated.tar"
    data = Path(urls[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    stream = TaskStream([str(truncated)], [20], batch_size=4, mode="exact", rank=0, world_size=1)
    with pytest.raises(ShardError, match=r"truncated\.tar \(member exact-|truncated\.tar \(member train-") as err:
        list(stream)
    assert err.value.url == str(truncated) and err.value.member

    missing = str(tmp_path / "nope.tar")
    with pytest.raises(ShardError, match=r"nope\.tar: file not found"):
        list(TaskStream([missing], [20], batch_size=4, mode="exact", rank=0, world_size=1))


def test_skip_mode_keeps_step_count_and_logs(sequence, tmp_path, caplog):
    urls = sequence.shard_urls(0, "train")
    broken = tmp_path / "broken.tar"
    data = Path(urls[1]).read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    stream = TaskStream([urls[0], str(broken), urls[2]], [20, 20, 20], batch_size=8, mode="exact", rank=0,
                        world_size=1, on_error="skip")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        batches = list(TaskLoader(stream))
    assert len(batches) == 8  # ceil(60 / 8): the planned count, whatever was lost
    real = sum(int(b["weight"].sum()) for b in batches)
    assert 40 <= real < 60
    assert any("broken.tar" in r.getMessage() for r in caplog.records)


def test_s3_through_a_real_s3_api(sequence, fmnist, tmp_path):
    pytest.importorskip("moto")
    from inflora_dist.data.local_s3 import moto_s3

    with moto_s3(bucket="cl-data") as options:
        opts = [a for k, v in options.items() for a in ("-o", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]
        main(
            ["fashion-mnist", "--out", "s3://cl-data/fmnist", "--tasks", "3", "--classes-per-task", "2",
             "--train-per-class", "70", "--eval-per-class", "10", "--shard-size", "20", "--seed", "1", "--quiet",
             *opts]
        )  # fmt: skip
        remote = load_task_sequence("s3://cl-data/fmnist/tasks.yaml", storage_options=options, check_shards=True)
        assert remote.shard_urls(0, "train")[0].startswith("s3://cl-data/fmnist/train/")
        for t in range(3):
            local_batches = list(
                TaskLoader(open_task(sequence, t, "train", batch_size=16, mode="train", rank=0, world_size=1))
            )
            remote_batches = list(
                TaskLoader(open_task(remote, t, "train", batch_size=16, mode="train", rank=0, world_size=1))
            )
            assert len(local_batches) == len(remote_batches)
            for a, b in zip(local_batches, remote_batches, strict=True):
                assert a["__key__"] == b["__key__"]
                assert torch.equal(a["npy"], b["npy"]) and torch.equal(a["cls"], b["cls"])
        index = remote.load_index()
        local_index = sequence.load_index()
        assert index["shards"] == local_index["shards"]  # same bytes, same checksums
        # A shard replaced by another valid one under the index is caught as it streams, naming the object.
        fs = fsspec.filesystem("s3", **options)
        task0, task1 = remote.shard_urls(0, "train")[0], remote.shard_urls(1, "train")[0]
        fs.pipe(task1, fs.cat(task0))
        with pytest.raises(ShardError, match=rf"cannot read shard {task1}: sample 0 does not match the index"):
            list(TaskLoader(open_task(remote, 1, "train", batch_size=16, mode="exact", rank=0, world_size=1)))


def test_cli_help_lists_sources():
    out = subprocess.run([sys.executable, "-m", "inflora_dist.data.build_shards", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for command in ("fashion-mnist", "arrays", "records", "jsonl"):
        assert command in out


def test_arrays_source(tmp_path, fmnist):
    for split in ("train", "eval"):
        np.save(tmp_path / f"{split}_x.npy", fmnist[f"{split}_images"][:400])
        np.save(tmp_path / f"{split}_y.npy", fmnist[f"{split}_labels"][:400])
    config = main(
        ["arrays", "--train-images", str(tmp_path / "train_x.npy"), "--train-labels", str(tmp_path / "train_y.npy"),
         "--eval-images", str(tmp_path / "eval_x.npy"), "--eval-labels", str(tmp_path / "eval_y.npy"),
         "--out", str(tmp_path / "out"), "--tasks", "5", "--classes-per-task", "2", "--quiet"]
    )  # fmt: skip
    assert sum(t.train.samples for t in config.tasks) == 400
    assert asdict(load_task_sequence(str(tmp_path / "out" / "tasks.yaml"))) == asdict(config)
    shutil.rmtree(tmp_path / "out")


def test_seeking_by_index_offsets_reads_what_streaming_reads(sequence):
    """With the index's byte offsets a run is read by seeking; without them by streaming from the start."""
    seeking = open_task(sequence, 1, "train", batch_size=16, mode="train", rank=1, world_size=2)
    assert seeking.offsets is not None
    streaming = TaskStream(seeking.urls, seeking.shard_sizes, batch_size=16, mode="train", rank=1, world_size=2)
    for a, b in zip(TaskLoader(seeking), TaskLoader(streaming), strict=True):
        assert a["__key__"] == b["__key__"] and torch.equal(a["npy"], b["npy"])


def test_micro_steps_hold_the_same_samples_on_one_and_two_ranks(sequence):
    one = list(TaskLoader(open_task(sequence, 0, "train", batch_size=16, mode="train", rank=0, world_size=1)))
    two = [list(TaskLoader(open_task(sequence, 0, "train", batch_size=8, mode="train", rank=r, world_size=2)))
           for r in range(2)]  # fmt: skip
    assert len(one) == len(two[0]) == len(two[1])
    for k, batch in enumerate(one):
        assert sorted(keys_of([batch])) == sorted(keys_of([two[0][k]]) + keys_of([two[1][k]]))


def test_imagefolder_source(tmp_path, fmnist):
    """One sub-folder of images per class (the layout of ImageNet-R): the files' bytes as they are, a seeded eval
    split; a transform in the loader makes the batch's images (here: squashed to 32 px, RGB)."""
    from PIL import Image

    from inflora_dist.data.transforms import build_transform

    for c in range(4):
        (tmp_path / "src" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(fmnist["train_images"][c * 10 + i]).save(tmp_path / "src" / f"class{c}" / f"{i}.png")
    config = main(["imagefolder", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--tasks", "2",
                   "--classes-per-task", "2", "--eval-fraction", "0.2", "--quiet"])  # fmt: skip
    assert sum(t.train.samples for t in config.tasks) == 32 and sum(t.eval.samples for t in config.tasks) == 8
    stream = open_task(config, 0, "train", batch_size=4, mode="exact", rank=0, world_size=1)
    assert next(iter(TaskLoader(stream)))["png"].shape == (4, 28, 28)  # the files' own pixels
    stream = open_task(config, 0, "train", batch_size=4, mode="exact", rank=0, world_size=1,
                       transform=build_transform("resize", 32), channels=3)  # fmt: skip
    batch = next(iter(TaskLoader(stream)))
    assert batch["png"].shape == (4, 32, 32, 3) and batch["png"].dtype == torch.uint8
    assert set(batch["cls"].tolist()) <= set(config.tasks[0].classes)
    for task in config.tasks:  # the folder names name the classes
        assert task.class_names == [f"class{c}" for c in task.classes]
