"""The smaller edges of the inputs: empty class folders are named, every class of an image folder gets eval
images, empty responses and conflicting duplicate prompts in records are caught, and predict reads folders."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from inflora_dist.data.build_shards import ImageFolder, main, read_records, split_by_class


def image_folder(root, images_per_class: dict[str, int]):
    """`root` with one sub-folder per class holding that many small PNG files."""
    rng = np.random.default_rng(0)
    for name, n in images_per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def build_images(root, out, tasks: int, classes_per_task: int, *extra: str):
    return main(["imagefolder", "--root", str(root), "--out", str(out), "--tasks", str(tasks), "--classes-per-task",
                 str(classes_per_task), "--quiet", *extra])  # fmt: skip


def test_an_empty_class_folder_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    """A class folder without images is not a class (ids stay 0..C-1) and the warning names it; before, it was
    skipped silently."""
    root = image_folder(tmp_path / "src", {"a": 3, "b": 3, "c": 3, "d": 0})
    (root / "d" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        folder = ImageFolder(root)
    assert folder.classes == ["a", "b", "c"] and sorted(set(folder.labels.tolist())) == [0, 1, 2]
    assert folder.empty == [root / "d"]
    assert [r.levelno for r in caplog.records if str(root / "d") in r.getMessage()] == [logging.WARNING]
    config = build_images(root, tmp_path / "out", 1, 3)
    assert config.tasks[0].class_names == ["a", "b", "c"]


def test_too_few_classes_after_skipping_names_the_empty_folders(tmp_path):
    """When the skipped folders leave fewer classes than the tasks need, the error names them; before, it said
    only 'the data has 2'."""
    root = image_folder(tmp_path / "src", {"a": 3, "b": 0, "c": 3, "d": 0})
    message = f"2 tasks x 2 classes need 4 classes, {root} has 2: its class folder(s) {root / 'b'}, {root / 'd'}"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_images(root, tmp_path / "out", 2, 2)
    assert not (tmp_path / "out").exists()


def test_every_class_with_two_images_gets_an_eval_image(tmp_path):
    """10 classes x 3 images at --eval-fraction 0.2: one eval and two train images per class; before, 6 eval
    images were drawn over all 30, so some classes had none."""
    root = image_folder(tmp_path / "src", {f"class{c}": 3 for c in range(10)})
    config = build_images(root, tmp_path / "out", 5, 2, "--eval-fraction", "0.2")
    assert [(t.train.samples, t.eval.samples) for t in config.tasks] == [(4, 2)] * 5
    shards = json.loads((tmp_path / "out" / "index.json").read_text())["shards"]
    for task in config.tasks:  # the index records each shard's class labels
        assert sorted(c for s in task.eval.shards for c in shards[s]["classes"]) == task.classes


def test_the_per_class_split_keeps_the_fraction_and_is_seeded():
    labels = np.repeat(np.arange(4), [1, 2, 10, 25])
    train, held = split_by_class(labels, 0.2, seed=3)
    assert np.bincount(labels[held], minlength=4).tolist() == [0, 1, 2, 5]  # max(1, round(n f)), <= n - 1
    assert np.bincount(labels[train], minlength=4).tolist() == [1, 1, 8, 20]
    assert sorted([*train, *held]) == list(range(len(labels)))
    again = split_by_class(labels, 0.2, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    assert not np.array_equal(split_by_class(labels, 0.2, seed=4)[1], held)


@pytest.mark.parametrize("response", ['"   "', '""', "null"])
def test_an_empty_response_names_the_file_and_line(tmp_path, response):
    src = tmp_path / "data.jsonl"
    src.write_text(f'{{"prompt": "p", "response": "r"}}\n\n{{"prompt": "q", "response": {response}}}\n')
    with pytest.raises(ValueError, match=re.escape(f"{src}:3: empty response (field 'response' is ")):
        read_records([src])
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\np,r\nq,\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:3: empty response")):
        read_records([csv])


def test_conflicting_duplicate_prompts_are_logged_once(tmp_path, caplog):
    """The same prompt twice in a task with different responses is one warning per build, with the count and
    examples; exact duplicates, and the same prompt in another task, are not warned about."""
    rows = [("t0", "p1", "yes"), ("t0", "p1", "yes"), ("t1", "p1", "no"), ("t0", "p2", "a"), ("t0", "p2", "b"),
            ("t0", "p2", "c"), ("t1", "p3", "x"), ("t1", "p3", "y")]  # fmt: skip
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"task": t, "prompt": p, "response": r}) + "\n" for t, p, r in rows))
    with caplog.at_level(logging.WARNING):
        records = read_records([src], task_field="task")
    assert sum(map(len, records.values())) == len(rows)  # all kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("2 prompt(s) appear more than once in a task with different responses")
    assert f"task 't0': {src}:4 'a' vs {src}:5 'b'" in warnings[0]
    assert f"task 't1': {src}:7 'x' vs {src}:8 'y'" in warnings[0]
    caplog.clear()
    src.write_text("".join(json.dumps({"task": t, "prompt": p, "response": r}) + "\n" for t, p, r in rows[:3]))
    with caplog.at_level(logging.WARNING):
        read_records([src], task_field="task")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_predict_reads_the_image_files_of_a_folder(tmp_path, capsys):
    """A folder argument stands for its image files (sorted, not recursive, any case of the suffix); before,
    it failed with 'no such file'. A folder without any image file is an error naming it."""
    from inflora_dist.predict import image_paths, main

    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    for name in ("b.PNG", "a.jpg", "c.tiff", "d.webp", "nested/e.png"):
        Image.new("L", (4, 4)).save(photos / name, format="PNG")
    (photos / "notes.txt").write_text("not an image")
    (photos / "z.gif").mkdir()  # a folder, not a file
    single = tmp_path / "x.png"
    assert image_paths([str(single), str(photos)]) == [
        str(single), *(str(photos / n) for n in ("a.jpg", "b.PNG", "c.tiff", "d.webp"))
    ]  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(f"folder {empty} holds no image file")):
        image_paths([str(photos), str(empty)])
    with pytest.raises(SystemExit) as exit_:
        main(["--run", str(tmp_path / "run"), str(photos), str(empty)])
    assert exit_.value.code == 2 and f"folder {empty} holds no image file" in capsys.readouterr().err
