"""The task-sequence spec: a YAML section (OmegaConf structured config) describing the tasks.

    kind: classification            # or: instruction
    scenario: class_incremental     # classes of different tasks must not overlap
    root: s3://bucket/fmnist        # relative shard paths are joined to this
    index: index.json               # per-shard sample counts (written by build_shards)
    storage_options: {endpoint_url: http://127.0.0.1:9000}
    tasks:
      - name: task0
        classes: [3, 7]
        class_names: [Dress, Sneaker]   # optional: what predict prints
        train: {shards: "train/task0-{000000..000003}.tar", samples: 2400}
        eval: {shards: [eval/task0-000000.tar], samples: 400}

Class order and task split are data, not code: they live here.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import braceexpand
import fsspec
from omegaconf import DictConfig, OmegaConf

from inflora_dist.config import merge_structured, read_yaml

KINDS = ("classification", "instruction")
SCENARIOS = ("class_incremental", "domain_incremental", "task_incremental")
METRICS = ("exact_match", "rouge_l")


@dataclass
class SplitSpec:
    """The shards of one split of one task. `shards`: URLs or brace patterns, absolute or relative to root."""

    shards: list[str] = field(default_factory=list)
    samples: int = 0


@dataclass
class InstructionSpec:
    """How an instruction task is scored; `labels` lists the answers of a classification-style task."""

    metric: str = "exact_match"
    labels: list[str] = field(default_factory=list)
    system_prompt: str | None = None


@dataclass
class TaskSpec:
    """One task: its splits, and either the classes it introduces or its instruction format."""

    name: str = ""
    train: SplitSpec = field(default_factory=SplitSpec)
    eval: SplitSpec = field(default_factory=SplitSpec)
    classes: list[int] | None = None
    class_names: list[str] | None = None  # optional, one per class: what predictions print
    instruction: InstructionSpec | None = None


@dataclass
class TaskSequenceConfig:
    """A continual-learning task sequence stored as webdataset shards."""

    kind: str = "classification"
    scenario: str = "class_incremental"
    root: str = ""
    index: str = "index.json"
    storage_options: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskSpec] = field(default_factory=list)

    def url(self, path: str) -> str:
        """`path` joined to `root` unless it is already absolute (a scheme or a leading /)."""
        if "://" in path or path.startswith("/") or not self.root:
            return path
        return posixpath.join(self.root, path)

    def shard_paths(self, task_index: int, split: str) -> list[str]:
        """The expanded shard paths of one split of one task, as written (relative to `root`: the index's keys)."""
        spec: SplitSpec = getattr(self.tasks[task_index], split)
        return [u for pattern in spec.shards for u in braceexpand.braceexpand(pattern)]

    def shard_urls(self, task_index: int, split: str) -> list[str]:
        """The expanded shard URLs of one split of one task."""
        return [self.url(u) for u in self.shard_paths(task_index, split)]

    @property
    def class_ids(self) -> list[int]:
        """All class ids in task order (classification)."""
        return [c for t in self.tasks for c in (t.classes or [])]

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and path for `url`, with this sequence's storage options."""
        return fsspec.core.url_to_fs(url, **self.storage_options)

    def load_index(self) -> dict:
        """The JSON index (per-shard sample counts and checksums) written by the shard builder."""
        url = self.url(self.index)
        fs, path = self.filesystem(url)
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard index {url} not found: build the shards with `python -m inflora_dist.data.build_shards`, "
                "which writes it"
            ) from None


def task_records(seq: TaskSequenceConfig, index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What identifies each task in a checkpoint: name, classes, instruction format, sample counts and the
    sha256 of every shard (from the `index`): by content, not location, so a copy elsewhere still matches."""
    shards = index.get("shards", {})
    records = []
    for i, task in enumerate(seq.tasks):
        record = {"name": task.name, "classes": task.classes, "class_names": task.class_names,
                  "instruction": asdict(task.instruction) if task.instruction else None,
                  "train_samples": task.train.samples, "eval_samples": task.eval.samples}  # fmt: skip
        for split in ("train", "eval"):
            record[f"{split}_sha256"] = [shards.get(path, {}).get("sha256") for path in seq.shard_paths(i, split)]
        records.append(record)
    return records


def continuation_error(saved: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> str:
    """'' if the `current` task records start with all of the `saved` ones (the same sequence, or one that
    continues it), else what breaks that: the first differing task and field. Pure.

    Fields a record saved by an older version lacks are not compared, nor the class names (labels for
    display, which a continuation may add or fix).
    """
    for i, old in enumerate(saved):
        if i >= len(current):
            return (
                f"it has {len(current)} tasks, the run has {len(saved)}: a continuation keeps every task of the "
                f"run, the first missing one is task {i} ({old['name']!r})"
            )
        for key, value in old.items():
            if key != "class_names" and current[i].get(key) != value:
                return f"task {i} ({old['name']!r}) differs in {key}: {value!r} -> {current[i].get(key)!r}"
    return ""


def load_task_sequence(
    source: str | Mapping | DictConfig,
    overrides: Sequence[str] = (),
    check_shards: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> TaskSequenceConfig:
    """Read a task sequence from a YAML URL or a mapping, apply dotlist overrides, validate.

    `storage_options` (e.g. an S3 endpoint and keys) are used to read the file
    and replace the file's own: credentials need not live in the YAML.
    Raises ValueError naming the key for unknown keys and bad values, and
    FileNotFoundError naming the file or the missing shard URLs.
    """
    raw = read_yaml(source, storage_options) if isinstance(source, str) else OmegaConf.create(dict(source))
    if storage_options is not None:
        raw.storage_options = dict(storage_options)
    # A single brace pattern may stand where a list of shards is expected.
    for task in raw.get("tasks") or []:
        for split in ("train", "eval"):
            if isinstance(task.get(split), DictConfig) and isinstance(task[split].get("shards"), str):
                task[split].shards = [task[split].shards]
    config = merge_structured(TaskSequenceConfig, raw, overrides=overrides)
    validate(config)
    if check_shards:
        check_shards_exist(config)
    return config


def check_path_component(value: str, where: str) -> str:
    """`value` if it can name a shard file (task names become `<split>/<task>-NNNNNN.tar`): not empty, no path
    separator, not `.` or `..`; else ValueError naming the value and `where` it came from."""
    if not value or value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip():
        raise ValueError(
            f"{where}: {value!r} cannot name a task's shards (it must be non-empty, without '/', '\\', NUL or "
            "surrounding spaces, and not '.' or '..')"
        )
    return value


def check_classes(config: TaskSequenceConfig, index: Mapping[str, Any]) -> list[str]:
    """Every shard's class labels (recorded in the index by the builder) against its task's declared `classes`;
    raises ValueError naming the task, the shard and the labels it holds that the task does not declare.
    Returns the shards whose index entry records no classes (an older index: not checked)."""
    unchecked = []
    for t, task in enumerate(config.tasks):
        if task.classes is None:
            continue
        declared = set(task.classes)
        for split in ("train", "eval"):
            for path in config.shard_paths(t, split):
                entry = index.get("shards", {}).get(path) or {}
                if "classes" not in entry:
                    unchecked.append(path)
                    continue
                stray = sorted(set(entry["classes"]) - declared)
                if stray:
                    raise ValueError(
                        f"task {task.name!r}: shard {config.url(path)} holds classes {stray} that the task does not "
                        f"declare (its classes: {sorted(declared)}): fix the task's classes or rebuild its shards"
                    )
    return unchecked


def validate(config: TaskSequenceConfig) -> None:
    """Check the sequence for empty tasks, bad names and values, and overlapping classes."""
    if config.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {config.kind!r}")
    if config.scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {config.scenario!r}")
    if not config.tasks:
        raise ValueError("the task sequence has no tasks")
    names = [t.name for t in config.tasks]
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}] ({task.name!r})"
        if not task.name:
            raise ValueError(f"tasks[{i}] has no name")
        if names.count(task.name) > 1:
            raise ValueError(f"task name {task.name!r} is used twice")
        for split in ("train", "eval"):
            spec: SplitSpec = getattr(task, split)
            if not spec.shards or spec.samples <= 0:
                raise ValueError(f"{where}.{split} is empty: it needs shards and samples > 0, got {spec}")
        if config.kind == "classification":
            if not task.classes:
                raise ValueError(f"{where}.classes is empty: a classification task introduces classes")
            if task.instruction is not None:
                raise ValueError(f"{where} is a classification task but sets instruction")
            if len(set(task.classes)) != len(task.classes) or min(task.classes) < 0:
                raise ValueError(f"{where}.classes must be distinct ids >= 0, got {task.classes}")
            if task.class_names is not None and len(task.class_names) != len(task.classes):
                raise ValueError(
                    f"{where}.class_names must name each of its {len(task.classes)} classes, got {task.class_names}"
                )
        else:
            if task.instruction is None:
                raise ValueError(f"{where}.instruction is missing: an instruction task needs its format")
            if task.instruction.metric not in METRICS:
                raise ValueError(
                    f"{where}.instruction.metric must be one of {METRICS}, got {task.instruction.metric!r}"
                )
    if config.kind == "classification" and config.scenario == "class_incremental":
        seen: dict[int, str] = {}
        for task in config.tasks:
            for c in task.classes or []:
                if c in seen:
                    raise ValueError(
                        f"class {c} appears in task {seen[c]!r} and task {task.name!r}; "
                        "class_incremental forbids overlapping classes (use scenario: domain_incremental)"
                    )
                seen[c] = task.name


def check_shards_exist(config: TaskSequenceConfig) -> None:
    """Raise FileNotFoundError listing every shard URL that does not exist."""
    missing = []
    for i in range(len(config.tasks)):
        for split in ("train", "eval"):
            for url in config.shard_urls(i, split):
                fs, path = config.filesystem(url)
                if not fs.exists(path):
                    missing.append(url)
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) missing: {missing[:10]}")
