"""The reference's data as build_shards and the loader give it: its split layouts (train/ + test/ folders, split
files), its class order, images kept as encoded, and its transforms run in the loader, seeded per sample so that
one and two ranks, and a resumed loader, see the same pixels. Hand-built folders of small PNG and JPEG files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from trainer_runs import CONFIG, LLM_CONFIG, tiny_shards, train

from inflora_dist.config import load_run_config
from inflora_dist.data.build_shards import FASHION_MNIST_DIR, ImageFolder, main, split_classes
from inflora_dist.data.reader import TaskLoader, open_task
from inflora_dist.data.transforms import build_transform


def _images(folder, count: int, seed: int, size=(40, 30)) -> None:
    """`count` random RGB JPEGs of `size` in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def _build(root, out, *extra: str, tasks: int = 2, per_task: int = 2):
    return main(["imagefolder", "--root", str(root), "--out", str(out), "--tasks", str(tasks), "--classes-per-task",
                 str(per_task), "--quiet", *extra])  # fmt: skip


def test_train_and_test_folders_are_the_split_in_the_datasets_class_order(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for c, name in enumerate("abcd"):
            _images(tmp_path / "src" / split / name, count, seed=c)
    config = _build(tmp_path / "src", tmp_path / "out")
    assert [t.classes for t in config.tasks] == [[0, 1], [2, 3]]  # sorted folders, not shuffled
    assert [t.class_names for t in config.tasks] == [["a", "b"], ["c", "d"]]
    assert [(t.train.samples, t.eval.samples) for t in config.tasks] == [(6, 4), (6, 4)]


def test_a_class_folder_missing_from_one_split_is_named(tmp_path):
    for c, name in enumerate("abcd"):
        _images(tmp_path / "src" / "train" / name, 2, seed=c)
    for c, name in enumerate("abc"):
        _images(tmp_path / "src" / "test" / name, 2, seed=c)
    with pytest.raises(ValueError, match=r"only in the training split \['d'\], only in the eval split none"):
        _build(tmp_path / "src", tmp_path / "out")


def test_split_files_list_the_images_and_their_classes(tmp_path):
    """The reference's DomainNet layout: YAML `{data, targets}` with paths under --root; a missing image names
    the split file and the image."""
    for c, name in enumerate(["cat", "dog"]):
        _images(tmp_path / "src" / "clipart" / name, 4, seed=c)
    files = sorted((tmp_path / "src").rglob("*.jpg"))
    entries = [(str(f.relative_to(tmp_path / "src")), 0 if f.parent.name == "cat" else 1) for f in files]
    for name, part in (("train.yaml", entries[::2]), ("test.yaml", entries[1::2])):
        (tmp_path / name).write_text(yaml.safe_dump({"data": [p for p, _ in part], "targets": [t for _, t in part]}))
    config = _build(tmp_path / "src", tmp_path / "out", "--train-split", str(tmp_path / "train.yaml"),
                    "--eval-split", str(tmp_path / "test.yaml"), tasks=1)  # fmt: skip
    assert config.tasks[0].class_names == ["cat", "dog"] and config.tasks[0].train.samples == 4
    (tmp_path / "src" / entries[2][0]).unlink()
    with pytest.raises(FileNotFoundError, match=f"split file {tmp_path / 'train.yaml'} names 1 image"):
        _build(tmp_path / "src", tmp_path / "out2", "--train-split", str(tmp_path / "train.yaml"),
               "--eval-split", str(tmp_path / "test.yaml"), tasks=1)  # fmt: skip


def test_class_orders(tmp_path):
    assert split_classes(range(6), 3, 2, seed=0, order="dataset") == [[0, 1], [2, 3], [4, 5]]
    shuffled = split_classes(range(6), 3, 2, seed=1993, order="shuffled")
    assert sorted(c for t in shuffled for c in t) == list(range(6)) and shuffled != [[0, 1], [2, 3], [4, 5]]
    names = ["cat", "ant", "bee", "cow", "eel", "dog"]
    order = tmp_path / "order.txt"
    order.write_text("dog\n4\ncat\n1\n")  # names or ids, one a line; kept as listed within a task
    assert split_classes(range(6), 2, 2, 0, str(order), names) == [[5, 4], [0, 1]]
    order.write_text("dog\n4\ncat\n0\n")
    with pytest.raises(ValueError, match=rf"class order file {order}: ids not in the data \[\], listed twice \[0\]"):
        split_classes(range(6), 2, 2, 0, str(order), names)
    order.write_text("[5, 4, 7]")
    with pytest.raises(ValueError, match=r"ids not in the data \[7\]"):
        split_classes(range(6), 1, 2, 0, str(order))
    order.write_text("zebra\n")
    with pytest.raises(ValueError, match=f"class order file {order}: 'zebra' is neither a class id nor a class name"):
        split_classes(range(6), 1, 1, 0, str(order), ["cat"])


def test_images_are_kept_as_encoded_unless_a_side_bound_shrinks_them(tmp_path):
    _images(tmp_path / "src" / "a", 1, seed=0, size=(64, 48))
    path = tmp_path / "src" / "a" / "0.jpg"
    assert ImageFolder(tmp_path / "src")[0] == ("jpg", path.read_bytes())
    shrunk = ImageFolder(tmp_path / "src", max_side=32)[0]
    assert shrunk.field == "jpg" and Image.open(io.BytesIO(shrunk.data)).size == (32, 24)


def _pixels_by_key(config, rank: int, world: int, epoch: int = 0) -> dict[str, np.ndarray]:
    stream = open_task(config, 0, "train", batch_size=2, mode="train", seed=7, rank=rank, world_size=world,
                       transform=build_transform("imagenet_r_train", 16), channels=3)  # fmt: skip
    stream.set_epoch(epoch)
    out = {}
    for batch in TaskLoader(stream):
        for key, image, weight in zip(batch["__key__"], batch["jpg"], batch["weight"], strict=True):
            if weight > 0:
                out[key] = image.numpy()
    return out


def test_augmentation_is_the_same_on_one_and_two_ranks_and_after_a_resume(tmp_path):
    """Each sample's random crop and flip come from (seed, epoch, its key): rank 0 of 1 and ranks 0 and 1 of 2
    see the same pixels for every sample; another epoch draws other crops; a resumed loader continues with the
    pixels the uninterrupted one gives."""
    for c, name in enumerate("ab"):
        _images(tmp_path / "src" / name, 6, seed=c)
    config = _build(tmp_path / "src", tmp_path / "out", "--eval-fraction", "0.2", tasks=1)
    one = _pixels_by_key(config, 0, 1)
    two = {**_pixels_by_key(config, 0, 2), **_pixels_by_key(config, 1, 2)}
    assert sorted(one) == sorted(two) and len(one) == config.tasks[0].train.samples
    assert all(np.array_equal(one[k], two[k]) and one[k].shape == (16, 16, 3) for k in one)
    later = _pixels_by_key(config, 0, 1, epoch=1)
    assert any(not np.array_equal(one[k], later[k]) for k in one)

    def loader() -> TaskLoader:
        return TaskLoader(open_task(config, 0, "train", batch_size=2, mode="train", seed=7, rank=0, world_size=1,
                                    transform=build_transform("imagenet_r_train", 16), channels=3))  # fmt: skip

    whole = [b["jpg"] for b in loader()]
    first = loader()
    it = iter(first)
    next(it)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(whole[1:], [b["jpg"] for b in resumed], strict=True))


def test_transform_names_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match=r"data.train_transform: unknown transform 'imagenet_r'; valid: cifar100_eval"):
        load_run_config(str(CONFIG), ["data.train_transform=imagenet_r"])
    with pytest.raises(ValueError, match=r"data.eval_transform='resize' transforms images; model.kind causal_lm"):
        load_run_config(str(LLM_CONFIG), ["data.eval_transform=resize"])
    cfg = load_run_config(str(CONFIG), ["data.train_transform=imagenet_r_train", "data.eval_transform=imagenet_r_eval"])
    assert (cfg.data.train_transform, cfg.data.eval_transform) == ("imagenet_r_train", "imagenet_r_eval")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed")
def test_a_run_with_the_reference_transforms(tmp_path):
    """A tiny run with the ImageNet-R recipes: training and the covariance passes read augmented images, the
    evaluation and the class statistics the eval recipe's (a pass feeding both is then two passes)."""
    shards = tiny_shards(tmp_path / "shards", train_per_class=32, eval_per_class=16)
    proc = train(1, tmp_path / "run", "data.train_transform=imagenet_r_train", "data.eval_transform=imagenet_r_eval",
                 "train.epochs=1", shards=shards)  # fmt: skip
    assert "stage 1 covariance (class statistics)" in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 3
