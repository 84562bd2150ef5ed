"""build_shards refuses input that would be silently wrong later: names from data that are not safe path
components, text that is not UTF-8, arrays holding NaN or inf. Each error names the file and the record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inflora_dist.data.build_shards import main, read_records


@pytest.mark.parametrize("task", ["../escape", "a/b", "..", "", " padded"])
def test_task_names_from_records_must_be_safe_path_components(tmp_path, task):
    """A record whose task field would climb out of (or into another) split folder is refused, naming the
    record's line and the value; before, `../escape` wrote its eval shard over the train shard, exit 0."""
    src = tmp_path / "data.jsonl"
    rows = [{"prompt": "p", "response": "r", "category": "ok"}] * 3 + [{"prompt": "p", "response": "r",
                                                                        "category": task}]  # fmt: skip
    src.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=f"data.jsonl:4: field 'category': {task!r} cannot name a task's shards"):
        main(["records", str(src), "--task-field", "category", "--out", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    src = tmp_path / "data.jsonl"
    src.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xff", "response": "r"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: not UTF-8 text \(invalid start byte at byte 15\)"):
        read_records([src])
    csv = tmp_path / "data.csv"
    csv.write_bytes(b"prompt,response\np,r\np,r\ncaf\xff,r\n")
    with pytest.raises(ValueError, match=r"data.csv:\d+: not UTF-8 text"):
        read_records([csv])


def test_arrays_with_nan_are_refused_at_build_time(tmp_path):
    """A NaN pixel in .npy input is named with its file and sample; before, it built fine and training failed
    with 'covariance contains NaN or inf' naming no input."""
    rng = np.random.default_rng(0)
    images = rng.random((8, 4, 4), dtype=np.float32)
    images[5, 1, 2] = np.nan
    labels = np.array([0, 1] * 4)
    paths = {}
    for name, array in (("train_images", images), ("train_labels", labels), ("eval_images", images[:4] * 0),
                        ("eval_labels", labels[:4])):  # fmt: skip
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    args = ["arrays", *(a for k, p in paths.items() for a in (f"--{k.replace('_', '-')}", str(p)))]
    with pytest.raises(ValueError, match=r"train_images.npy: sample 5 holds NaN or inf \(1 such samples of 8\)"):
        main([*args, "--tasks", "1", "--classes-per-task", "2", "--out", str(tmp_path / "out"), "--quiet"])


def test_a_broken_yaml_names_its_file_and_line(tmp_path):
    """A run config or task sequence that is not YAML (or not a mapping) is named, with the line."""
    from inflora_dist.config import load_run_config
    from inflora_dist.data import load_task_sequence

    broken = tmp_path / "tasks.yaml"
    broken.write_text("kind: classification\ntasks: [\n  - name: a\n")
    with pytest.raises(ValueError, match=f"{broken}: not valid YAML at line 3"):
        load_task_sequence(str(broken))
    run = tmp_path / "run.yaml"
    run.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match=f"{run}: expected a mapping of keys"):
        load_run_config(str(run))


def test_a_folder_being_built_is_locked(tmp_path):
    """A second build into a folder another live build holds stops at once, naming the folder and the holder;
    the folder is free again once the first build ends."""
    from inflora_dist.runlock import RunDirectoryLocked, RunLock

    out = tmp_path / "shards"
    first = RunLock(out, what="shard folder", holder="another build", advice="use another --out")
    first.acquire()  # a live build (this process) holds it
    try:
        with pytest.raises(RunDirectoryLocked, match=f"shard folder {out} is in use by another build \\(host "):
            main(["llm-demo", "--out", str(out), "--per-label", "4", "--quiet"])
        assert not (out / "tasks.yaml").exists()
    finally:
        first.release()
    main(["llm-demo", "--out", str(out), "--per-label", "4", "--quiet"])
    assert (out / "tasks.yaml").exists() and not (out / ".run.lock").exists()


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    """The entry points print an error in their input as one line naming the cause, exit 2, no traceback;
    INFLORA_DEBUG=1 adds the traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n')
    cases = [
        ([sys.executable, str(repo / "launch" / "train.py"), "--config", str(repo / "configs" / "tiny_vit.yaml"),
          "train.lr=-1"], "train.py: error: ValueError: train.lr must be >= 0, got -1.0"),
        ([sys.executable, "-m", "inflora_dist.data.build_shards", "records", str(bad), "--out", str(tmp_path / "o")],
         f"build_shards.py: error: ValueError: {bad}:2: not UTF-8 text"),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for args, line in cases:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert line in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(cases[1][0], cwd=repo, env={**env, "INFLORA_DEBUG": "1"}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" in proc.stderr and cases[1][1] in proc.stderr
