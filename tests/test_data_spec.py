"""Task-sequence spec validation: clear errors naming the bad key or value."""

from __future__ import annotations

import copy

import pytest

from inflora_dist.data.spec import load_task_sequence

BASE = {
    "kind": "classification",
    "root": "/data/seq",
    "tasks": [
        {"name": "a", "classes": [0, 1], "train": {"shards": "train/a-{000000..000006}.tar", "samples": 70},
         "eval": {"shards": ["eval/a-000000.tar"], "samples": 10}},
        {"name": "b", "classes": [2, 3], "train": {"shards": ["train/b-000000.tar", "s3://x/b-1.tar"], "samples": 20},
         "eval": {"shards": "eval/b-000000.tar", "samples": 10}},
    ],
}  # fmt: skip


def spec(**changes):
    s = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = s
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    return s


def test_valid_spec_expands_brace_patterns_and_joins_root():
    seq = load_task_sequence(BASE)
    assert seq.shard_urls(0, "train") == [f"/data/seq/train/a-{i:06d}.tar" for i in range(7)]
    assert seq.shard_urls(1, "train") == ["/data/seq/train/b-000000.tar", "s3://x/b-1.tar"]
    assert seq.class_ids == [0, 1, 2, 3]


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key 'clases'.*valid keys: \['class_names', 'classes', 'eval'"):
        load_task_sequence(spec(tasks__0__clases=[1]))
    with pytest.raises(ValueError, match=r"unknown key 'storage'"):
        load_task_sequence(spec(storage={}))


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match=r"'train.samples'"):
        load_task_sequence(spec(tasks__0__train__samples="many"))
    with pytest.raises(ValueError, match=r"kind must be one of .* got 'regression'"):
        load_task_sequence(spec(kind="regression"))


def test_overlapping_classes_are_rejected_in_class_incremental_only():
    with pytest.raises(ValueError, match=r"class 1 appears in task 'a' and task 'b'"):
        load_task_sequence(spec(tasks__1__classes=[1, 4]))
    seq = load_task_sequence(spec(tasks__1__classes=[1, 4], scenario="domain_incremental"))
    assert seq.tasks[1].classes == [1, 4]


def test_empty_tasks_are_rejected():
    with pytest.raises(ValueError, match=r"tasks\[1\] \('b'\)\.train is empty"):
        load_task_sequence(spec(tasks__1__train={"shards": [], "samples": 0}))
    with pytest.raises(ValueError, match=r"tasks\[0\] \('a'\)\.classes is empty"):
        load_task_sequence(spec(tasks__0__classes=[]))
    with pytest.raises(ValueError, match="no tasks"):
        load_task_sequence(spec(tasks=[]))


def test_instruction_tasks_need_a_format():
    with pytest.raises(ValueError, match=r"instruction is missing"):
        load_task_sequence(spec(kind="instruction", scenario="task_incremental", tasks__0__classes=None))


def test_missing_file_and_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_task_sequence(str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match=r"10 shard\(s\) missing: \['/data/seq/train/a-000000.tar'"):
        load_task_sequence(spec(tasks__1__train__shards=["train/b-000000.tar"]), check_shards=True)


def test_dotlist_overrides_apply():
    seq = load_task_sequence(BASE, overrides=["root=s3://bucket/seq", "tasks.0.train.samples=7"])
    assert seq.shard_urls(0, "eval") == ["s3://bucket/seq/eval/a-000000.tar"]
    assert seq.tasks[0].train.samples == 7


def test_unknown_override_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key 'trian' in TaskSpec \(at 'tasks\[0\].trian'\)"):
        load_task_sequence(BASE, overrides=["tasks.0.trian=1"])


def test_class_names_name_each_class():
    seq = load_task_sequence(spec(tasks__0__class_names=["cat", "dog"]))
    assert seq.tasks[0].class_names == ["cat", "dog"] and seq.tasks[1].class_names is None
    with pytest.raises(
        ValueError, match=r"tasks\[0\] \('a'\)\.class_names must name each of its 2 classes, got \['cat'\]"
    ):
        load_task_sequence(spec(tasks__0__class_names=["cat"]))


def test_a_continuation_keeps_the_runs_tasks_first():
    """The check of an extended run's sequence file (pure): the first difference, or a missing task."""
    from inflora_dist.data.spec import continuation_error

    run = [{"name": "a", "classes": [0, 1], "class_names": None}, {"name": "b", "classes": [2, 3]}]
    assert continuation_error(run, [*run, {"name": "c", "classes": [4]}]) == ""
    renamed = [{**run[0], "class_names": ["cat", "dog"]}, run[1]]  # names are labels: they may be added
    assert continuation_error(run, renamed) == ""
    changed = [run[0], {"name": "b", "classes": [3, 2]}, {"name": "c"}]
    assert continuation_error(run, changed) == "task 1 ('b') differs in classes: [2, 3] -> [3, 2]"
    assert "it has 1 tasks, the run has 2" in continuation_error(run, run[:1])
