"""What a run directory records of its config: the config it started with, and each change a resume made.

    <run>/config.yaml            the resolved config the run started with; written once, when it starts afresh
    <run>/config_changes.json    [{key, old, new, task, step}]: each key a resume changed (one allowed to change
                                 on resume, config.RESUME_FIXED_KEYS being refused), in force from stage `task`,
                                 step `step` on (step 0: from the stage's start)

A resume compares the config of the checkpoint it resumes (the one in force
when that checkpoint was written) with its own. It records the differences only
when it has work left: re-running a finished run with other keys writes
nothing. Changes recorded at or after the resumed position are dropped first:
the work they applied to is being redone. `recorded_config` gives the config
in force at a checkpoint: config.yaml with the changes before its position
(what `evaluate`, `predict` and `export_model` build the model from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from inflora_dist.config import (
    RunConfig,
    flatten,
    merge_structured,
    read_yaml,
    to_yaml,
    validate_run_config,
    with_defaults,
)
from inflora_dist.writes import write_json, write_text

CONFIG_NAME = "config.yaml"
CHANGES_NAME = "config_changes.json"
#: Keys that say how a process was started, not what the run computes: not recorded as changes.
UNRECORDED_KEYS = ("resume", "output_dir")


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{key, old, new}] for every leaf key (lists are leaves) on which two config dicts differ, sorted by key;
    UNRECORDED_KEYS are left out, and a key `saved` lacks counts at its default (config.with_defaults)."""
    old, new = with_defaults(saved), flatten(current)
    keys = sorted(k for k in set(old) | set(new) if k not in UNRECORDED_KEYS and old.get(k) != new.get(k))
    return [{"key": k, "old": old.get(k), "new": new.get(k)} for k in keys]


def read_changes(run: str | Path) -> list[dict[str, Any]]:
    """The run's recorded config changes, oldest first ([] when it has none)."""
    path = Path(run) / CHANGES_NAME
    if not path.exists():
        return []
    try:
        changes = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: unreadable config change record ({err})") from None
    if not isinstance(changes, list) or not all(isinstance(c, dict) and {"key", "new", "task", "step"} <= set(c)
                                                for c in changes):  # fmt: skip
        raise ValueError(f"{path}: not a config change record (a list of {{key, old, new, task, step}})")
    return changes


def record_start(run: str | Path, cfg: RunConfig) -> None:
    """A run starting afresh: its config.yaml, and no change record. Main process only."""
    write_text(Path(run) / CONFIG_NAME, to_yaml(cfg))
    (Path(run) / CHANGES_NAME).unlink(missing_ok=True)


def record_resume(
    run: str | Path, saved: Mapping[str, Any], cfg: RunConfig, current: Mapping[str, Any], position: Sequence[int]
) -> list[dict[str, Any]]:
    """A run resuming at `position` (stage, step) from a checkpoint written with config `saved`, now running
    with `current` (= `cfg` as a dict): the changes from `position` on replace those recorded at or after it.
    Returns the new changes. config.yaml is written (from `saved`) only when the run lacks one. Main process
    only."""
    run = Path(run)
    if not (run / CONFIG_NAME).exists():
        write_text(run / CONFIG_NAME, to_yaml(merge_structured(RunConfig, saved)))
    task, step = position
    kept = [c for c in read_changes(run) if (c["task"], c["step"]) < (task, step)]
    new = [{**c, "task": task, "step": step} for c in config_changes(saved, current)]
    if kept + new != read_changes(run):
        write_json(run / CHANGES_NAME, kept + new)
    return new


def recorded_config(
    run: str | Path, position: Sequence[int] | None = None, overrides: Sequence[str] = ()
) -> tuple[RunConfig, list[dict[str, Any]]]:
    """The config in force at `position` (stage, step) of a run: config.yaml with the recorded changes made
    before it (all of them when None), then `overrides`, validated; and the changes applied."""
    run = Path(run)
    path = run / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --run must be a run's output_dir")
    conf = read_yaml(str(path))
    applied = [c for c in read_changes(run) if position is None or (c["task"], c["step"]) < tuple(position)]
    for change in applied:
        OmegaConf.update(conf, change["key"], change["new"], merge=False)
    cfg = merge_structured(RunConfig, conf, overrides=overrides)
    validate_run_config(cfg)
    return cfg, applied


def describe(changes: Sequence[Mapping[str, Any]]) -> str:
    """'key: old -> new (from stage T, step S); ...' for a log line."""
    return "; ".join(f"{c['key']}: {c.get('old')!r} -> {c['new']!r} (from stage {c['task']}, step {c['step']})"
                     for c in changes)  # fmt: skip
