"""The run directory's config record (run_record): config.yaml as the run started, and the changes its resumes made
(key, old, new, from which stage and step), read back as the config in force at a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from inflora_dist.config import RunConfig, load_run_config, to_dict
from inflora_dist.run_record import (
    CHANGES_NAME,
    CONFIG_NAME,
    config_changes,
    read_changes,
    record_resume,
    record_start,
    recorded_config,
)


def _cfg(**train) -> RunConfig:
    cfg = load_run_config(str(Path(__file__).parents[1] / "configs" / "tiny_vit.yaml"))
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_changes_name_each_differing_key_but_not_where_the_process_was_started():
    saved, current = to_dict(_cfg(lr=0.01)), to_dict(_cfg(lr=0.02, epochs=3))
    current.update(resume="auto", output_dir="elsewhere")
    assert config_changes(saved, current) == [
        {"key": "train.epochs", "old": saved["train"]["epochs"], "new": 3},
        {"key": "train.lr", "old": 0.01, "new": 0.02},
    ]


def test_a_resume_records_its_changes_and_replaces_those_of_work_redone(tmp_path):
    start = _cfg(lr=0.01)
    record_start(tmp_path, start)
    assert not (tmp_path / CHANGES_NAME).exists()
    later = _cfg(lr=0.02)
    assert record_resume(tmp_path, to_dict(start), later, to_dict(later), (1, 0))[0]["key"] == "train.lr"
    mid = _cfg(lr=0.02, epochs=7)
    record_resume(tmp_path, to_dict(later), mid, to_dict(mid), (2, 4))
    assert [(c["key"], c["task"], c["step"]) for c in read_changes(tmp_path)] == [("train.lr", 1, 0),
                                                                                  ("train.epochs", 2, 4)]  # fmt: skip
    # Resumed again from stage 2's start (its mid-task checkpoint lost): the change at step 4 is undone.
    record_resume(tmp_path, to_dict(later), later, to_dict(later), (2, 0))
    assert [(c["key"], c["task"], c["step"]) for c in read_changes(tmp_path)] == [("train.lr", 1, 0)]
    assert yaml.safe_load((tmp_path / CONFIG_NAME).read_text())["train"]["lr"] == 0.01  # as the run started


def test_the_config_in_force_at_a_checkpoint_applies_the_changes_made_before_it(tmp_path):
    start, later = _cfg(lr=0.01), _cfg(lr=0.02)
    record_start(tmp_path, start)
    record_resume(tmp_path, to_dict(start), later, to_dict(later), (1, 0))
    assert recorded_config(tmp_path, (1, 0))[0].train.lr == 0.01  # written before the resume that changed it
    cfg, applied = recorded_config(tmp_path, (2, 0))
    assert cfg.train.lr == 0.02 and [c["key"] for c in applied] == ["train.lr"]
    assert recorded_config(tmp_path, (2, 0), ["train.lr=0.5"])[0].train.lr == 0.5  # overrides come last


def test_a_broken_change_record_is_named(tmp_path):
    record_start(tmp_path, _cfg())
    (tmp_path / CHANGES_NAME).write_text(json.dumps({"train.lr": 1}))
    with pytest.raises(ValueError, match=f"{tmp_path / CHANGES_NAME}: not a config change record"):
        recorded_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="--run must be a run's output_dir"):
        recorded_config(tmp_path / "missing")
