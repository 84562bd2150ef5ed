"""Faults a user meets, each asserting the exit status and the message: real runs of the tiny config.

Two runs into one output_dir at once; a resume with a config that changes the saved state's shapes; a
corrupt newest checkpoint under resume=auto (and named by resume=<dir>); a diverging run; a rank killed
mid-task; a full disk (a real tmpfs); a half-written checkpoint (its on-disk traces, simulated); SIGTERM
during a covariance pass.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file
from trainer_runs import REPO, command, env, tiny_shards, train

from inflora_dist.checkpoint import Checkpointer
from inflora_dist.data.build_shards import FASHION_MNIST_DIR
from inflora_dist.loop import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, ContinualTrainer
from inflora_dist.runlock import LOCK_NAME

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "shards"
    return tiny_shards(out, train_per_class=48, eval_per_class=16)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shards) -> Path:
    """One finished 3-task run (checkpoints of tasks 1 and 2 kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(1, out, shards=shards)
    return out


def _run(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(1, *overrides), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def _run_until(when: str, act: Callable[[subprocess.Popen], None], *overrides: str) -> tuple[int, str]:
    """Run one process; at its first output line containing `when`, call `act(process)`; (exit status, output)."""
    proc = subprocess.Popen(command(1, *overrides), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if when in line:
            act(proc)
            break
    log = "".join(lines) + proc.communicate(timeout=300)[0]
    return proc.returncode, log


def _own_copy(shards: Path, tmp_path: Path, edit: Callable[[dict], None] = lambda spec: None) -> tuple[Path, dict]:
    """A copy of the shards whose tasks.yaml points at it, edited by `edit`; (its folder, the task spec)."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    spec = yaml.safe_load((copy / "tasks.yaml").read_text())
    spec["root"] = str(copy)
    edit(spec)
    (copy / "tasks.yaml").write_text(yaml.safe_dump(spec))
    return copy, spec


def test_a_second_run_into_the_same_directory_stops_at_once(shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(command(1, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml"), cwd=REPO,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run took no lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # held mid-run: the tiny run would otherwise finish before the second starts
    try:
        second = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0
    assert f"run directory {out} is in use by another run (host " in second.stderr, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    assert not (out / LOCK_NAME).exists()  # released on exit
    assert len(json.loads((out / "metrics.json").read_text())["accuracy_matrix"]) == 3  # the first run's, whole


def test_resume_with_a_changed_rank_names_every_changed_key(finished, shards):
    proc = _run(f"output_dir={finished}", f"data.tasks={shards}/tasks.yaml", "inflora.rank=8", "ca.epochs=2",
                "train.lr=0.001")  # fmt: skip
    assert proc.returncode != 0
    assert "was written with another config" in proc.stderr, proc.stderr[-3000:]
    assert "inflora.rank: 4 -> 8" in proc.stderr and "ca.epochs: 5 -> 2" in proc.stderr
    assert "train.lr" not in proc.stderr and "size mismatch" not in proc.stderr  # lr may change; no torch page
    # The refused config did not replace the run's own (evaluate, predict and export_model read it).
    assert yaml.safe_load((finished / "config.yaml").read_text())["inflora"]["rank"] == 4


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(finished, shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    newest, older = sorted((out / "checkpoints").iterdir())[::-1]
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-8] + b"corrupt!")
    named = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", f"resume={newest}")
    assert named.returncode != 0 and f"{newest}: state.safetensors does not match its manifest" in named.stderr
    proc = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping a corrupt checkpoint: checkpoint {newest}: state.safetensors" in proc.stderr
    assert f"resumed from {older}" in proc.stderr
    redone, original = (json.loads((p / "metrics.json").read_text()) for p in (out, finished))
    assert redone["accuracy_matrix"] == original["accuracy_matrix"]  # task 2 trained again, to the same result


def test_a_diverging_run_stops_at_the_step_naming_the_cause(shards, tmp_path):
    """SGD at lr 1e35: step 1 is finite, its update blows the branch up, step 2's loss is not: both ranks stop
    there together, before the update, and nothing of task 0 is checkpointed or exported."""
    out = tmp_path / "run"
    args = command(2, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "train.optimizer=sgd", "train.lr=1e35")
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "NonFiniteLoss: task 0 (task0), step 2 of " in log, log[-3000:]
    assert "the last finite step loss was" in log and "(step 1)" in log and "train.lr=1e+35" in log
    assert "covariance contains NaN" not in log
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "metrics.json").exists() and not (out / "continual_state.safetensors").exists()


def test_a_rank_dying_mid_task_ends_the_run_in_bounded_time(shards, tmp_path):
    """kill -9 of rank 1 while training: rank 0's next collective fails (its peer's connection closed; a hung
    peer would hit deepspeed.collective_timeout_s), torchrun ends the job non-zero, nothing hangs."""
    out = tmp_path / "run"
    args = command(2, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "deepspeed.collective_timeout_s=60")
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "stage 0: training" in line:
            break
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
    start = time.monotonic()
    rank1.kill()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_a_full_disk_fails_the_checkpoint_and_keeps_the_last_complete_one(finished, shards, tmp_path):
    """The checkpoints on a 160 KiB tmpfs: tasks 0 and 1 fit, task 2's does not (ENOSPC). The run stops with an
    error naming the checkpoint, the partial one is gone, task 1's still verifies; with space, resume=auto ends
    the run as the uninterrupted one."""
    out = tmp_path / "run"
    if not _mount_tmpfs(out / "checkpoints", "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        proc = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "checkpoint.keep=5")
        assert proc.returncode != 0
        assert "CheckpointWriteError: writing checkpoint 000002-task2-done into" in proc.stderr, proc.stderr[-3000:]
        assert "No space left on device" in proc.stderr and "000001-task1-done, is untouched" in proc.stderr
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["000000-task0-done", "000001-task1-done"], names  # no partial one left
        Checkpointer.verify(out / "checkpoints" / names[-1])
        assert subprocess.run(["mount", "-o", "remount,size=10m", str(out / "checkpoints")]).returncode == 0
        proc = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "checkpoint.keep=5")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stderr and "000001-task1-done" in proc.stderr
        redone, original = (json.loads((p / "metrics.json").read_text()) for p in (out, finished))
        assert redone["accuracy_matrix"] == original["accuracy_matrix"]
    finally:
        subprocess.run(["umount", str(out / "checkpoints")])


def test_a_checkpoint_left_half_written_is_never_picked(finished, shards, tmp_path):
    """What kill -9 during a write leaves (simulated on disk: the hidden temp directory of an unfinished write,
    and a directory without its manifest) is skipped by resume=auto and cleared by the next write."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    root = out / "checkpoints"
    last, newest = sorted(root.iterdir())  # task 1's and task 2's: drop task 2's, so task 2 trains again
    shutil.rmtree(newest)
    (root / ".tmp-000003-task2-step5").mkdir()
    (root / ".tmp-000003-task2-step5" / "rng.0.json").write_text("{")
    half = root / "000004-task2-step9"
    shutil.copytree(last, half)
    (half / "manifest.json").unlink()
    proc = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {last}" in proc.stderr
    assert not list(root.glob(".tmp-*"))  # cleared by the next write
    redone, original = (json.loads((p / "metrics.json").read_text()) for p in (out, finished))
    assert redone["accuracy_matrix"] == original["accuracy_matrix"]


@pytest.mark.parametrize(
    ("sig", "when", "status"),
    [(signal.SIGTERM, "stage 1 (task1): the branches", PREEMPTED_EXIT_CODE),
     (signal.SIGINT, "stage 1: training", INTERRUPTED_EXIT_CODE)],
    ids=["sigterm-covariance-pass", "ctrl-c-training"],
)  # fmt: skip
def test_a_signal_mid_task_checkpoints_and_resumes_exactly(finished, shards, tmp_path, sig, when, status):
    """SIGTERM as task 1's covariance pass (its A's design) starts, or Ctrl-C (SIGINT) as its training starts:
    the work under way completes to the next step boundary, the run checkpoints and exits 75 (130 after Ctrl-C);
    the rerun ends as the uninterrupted run."""
    out = tmp_path / "run"
    code, log = _run_until(when, lambda proc: proc.send_signal(sig), f"output_dir={out}",
                           f"data.tasks={shards}/tasks.yaml")  # fmt: skip
    assert code == status, log[-3000:]
    assert any(p.name.endswith("-preempted") for p in (out / "checkpoints").iterdir())
    again = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    redone, original = (json.loads((p / "metrics.json").read_text()) for p in (out, finished))
    assert redone["accuracy_matrix"] == original["accuracy_matrix"]


def _export(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "inflora_dist.export_model", "--run", str(run), "--out", str(out), *extra]
    return subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def test_a_second_export_into_a_folder_replaces_the_first_whole(finished, tmp_path):
    """Export task 1's model, then the finished run's, sharded, into the same folder: nothing of the first
    survives (before, its model.safetensors stayed beside the new shards and transformers loaded it)."""
    out = tmp_path / "model"
    first = _export(finished, out, "--checkpoint", str(finished / "checkpoints" / "000001-task1-done"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    second = _export(finished, out, "--max-shard-size", "20KB")
    assert second.returncode == 0, second.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names, names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left beside it
    heads = load_file(str(out / "heads.safetensors"))
    assert sorted({k.split(".")[0] for k in heads}) == ["0", "1", "2"]  # the finished run's three heads


def test_a_full_disk_during_an_export_leaves_no_partial_model(finished, tmp_path):
    """Exports onto a 160 KiB tmpfs: task 1's model (about 100 KiB) fits; the finished run's, sharded, does not
    fit beside it. That export fails naming the folder and the cause, leaves no partial model or temporary
    folder, and the earlier export is untouched."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        first = _export(finished, disk / "model", "--checkpoint", str(finished / "checkpoints" / "000001-task1-done"))
        assert first.returncode == 0, first.stderr[-3000:]
        before = {p.name: p.read_bytes() for p in (disk / "model").iterdir()}
        proc = _export(finished, disk / "model", "--max-shard-size", "20KB")
        assert proc.returncode != 0
        assert f"ExportWriteError: writing the export {disk / 'model'} failed" in proc.stderr, proc.stderr[-3000:]
        assert "No space left on device" in proc.stderr and "is as it was" in proc.stderr, proc.stderr[-3000:]
        assert sorted(p.name for p in disk.iterdir()) == ["model"]  # no temporary folder left
        assert {p.name: p.read_bytes() for p in (disk / "model").iterdir()} == before
    finally:
        subprocess.run(["umount", str(disk)])


def test_declared_classes_that_miss_the_shard_labels_stop_before_training(shards, tmp_path):
    """tasks.yaml naming other classes for task 2 than its shards hold stops the run before task 0 trains,
    naming the task, the shard and the labels; before, two tasks trained and then the loss failed with
    'IndexError: Target -5 is out of bounds'."""

    def other_classes(spec: dict) -> None:
        used = {c for task in spec["tasks"] for c in task["classes"]}
        spec["tasks"][2]["classes"] = sorted(set(range(10)) - used)[:2]  # valid, unused: not its shards' labels

    copy, _ = _own_copy(shards, tmp_path, other_classes)
    out = tmp_path / "run"
    proc = _run(f"output_dir={out}", f"data.tasks={copy}/tasks.yaml")
    assert proc.returncode != 0
    assert "task 'task2': shard " in proc.stderr, proc.stderr[-3000:]
    assert "that the task does not declare" in proc.stderr
    assert not (out / "checkpoints").exists()


def test_a_shard_changed_under_a_run_stops_it_before_training_on_it(shards, tmp_path):
    """Task 1's first training shard replaced by task 0's (a valid shard, other bytes) under its index: task 0
    trains and checkpoints; task 1's first read of it (its covariance pass, before training) stops the run
    with ShardError naming the task, the shard and the sample, exit 2; no checkpoint of task 1 is written."""
    copy, spec = _own_copy(shards, tmp_path)
    task0, task1 = (copy / spec["tasks"][t]["train"]["shards"][0] for t in (0, 1))
    out = tmp_path / "run"
    # Replaced while the run is under way (task 0 training).
    code, log = _run_until("stage 0: training", lambda proc: shutil.copyfile(task0, task1), f"output_dir={out}",
                           f"data.tasks={copy}/tasks.yaml")  # fmt: skip
    assert code == 2, log[-3000:]
    assert f"ShardError: stage 1 covariance: cannot read shard {task1}: sample 0 does not match the index" in log
    assert "Traceback" not in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000-task0-done"]


@pytest.mark.parametrize(("method", "read_by"), [("inflora", "stage 1 covariance"), ("seq_lora", "stage 1 training")])
def test_a_changed_shard_stops_every_rank(shards, tmp_path, method, read_by):
    """Two ranks: the rank(s) reading a changed shard name it, and every rank stops with exit 2 (no hang), in
    InfLoRA's covariance pass or, for seq-LoRA (no pass before training), in training before the step."""
    copy, spec = _own_copy(shards, tmp_path)
    shutil.copyfile(copy / spec["tasks"][0]["train"]["shards"][0], copy / spec["tasks"][1]["train"]["shards"][-1])
    out = tmp_path / "run"
    args = command(2, f"output_dir={out}", f"data.tasks={copy}/tasks.yaml", "train.epochs=1", f"method={method}")
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] train.py: error: ShardError: " in proc.stderr, proc.stderr[-3000:]
    assert "does not match the index" in proc.stderr and "exitcode  : 2" in proc.stderr
    assert f": {read_by}: cannot read shard " in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000-task0-done"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes (the run lock left out: it comes and goes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != LOCK_NAME}  # fmt: skip


@pytest.mark.parametrize("case", ["file", "other files", "run directory", "parent of runs", "export plus a file"])
def test_an_export_never_replaces_what_is_not_an_export(finished, tmp_path, case):
    """`export_model --out` naming a file, a folder of other files, the run directory, the folder holding runs, or
    an earlier export beside which a user put a file: refused before anything is built or written, one line
    naming the path and why (before, each was deleted and replaced by the model, exit 0)."""
    if case == "file":
        out = tmp_path / "notes.txt"
        out.write_text("mine")
    elif case == "other files":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "data.csv").write_text("1,2")
    elif case in ("run directory", "parent of runs"):
        copy = tmp_path / "runs" / "run"
        shutil.copytree(finished, copy)
        out = copy if case == "run directory" else copy.parent
    else:
        out = tmp_path / "model"
        first = _export(finished, out)
        assert first.returncode == 0, first.stderr[-3000:]
        assert json.loads((out / "inflora_export.json").read_text())["entries"]  # the mark of an export
        (out / "README.md").write_text("my notes")
    before = _files(tmp_path)
    proc = _export(finished, out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"export_model.py: error: ExportTargetRefused: export target {out} "), proc.stderr[-3000:]
    reason = {"file": "is a file", "other files": "it holds data.csv and no inflora_export.json",
              "run directory": "is a run directory", "parent of runs": "it holds run and no inflora_export.json",
              "export plus a file": "also holds README.md"}[case]  # fmt: skip
    assert reason in error and "Traceback" not in proc.stderr
    assert "TrainedRun" not in proc.stderr and "learned tasks" not in proc.stderr  # refused before the model
    assert _files(tmp_path) == before


def test_a_run_refuses_export_folders_that_are_not_exports_before_writing(shards, tmp_path):
    """A run whose output_dir holds a peft_adapter folder of the user's stops before anything is written."""
    out = tmp_path / "run"
    (out / "peft_adapter").mkdir(parents=True)
    (out / "peft_adapter" / "adapter_model.bin").write_bytes(b"someone else's")
    proc = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"export target {out / 'peft_adapter'} is not an export: it holds adapter_model.bin" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["peft_adapter"]  # no config, checkpoint or lock left


def test_a_full_disk_mid_task_fails_in_one_line_and_a_changed_resume_is_recorded(finished, shards, tmp_path):
    """Checkpoints every 4 steps on a 320 KiB tmpfs: task 0's step-4 (with DeepSpeed's engine files) and done
    checkpoints fit, task 1's step-4 does not. torch.save inside DeepSpeed reports ENOSPC as a RuntimeError: the
    run still stops with CheckpointWriteError in one line (exit 2), the partial checkpoint gone, task 0's intact.
    With space, resume=auto with checkpoint.every_steps changed ends as the uninterrupted run; config.yaml keeps
    the run's start, config_changes.json records the change from stage 1, step 0."""
    out = tmp_path / "run"
    if not _mount_tmpfs(out / "checkpoints", "320k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        args = (f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "checkpoint.every_steps=4")
        proc = _run(*args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("train.py: error: CheckpointWriteError: writing checkpoint 000002-task1-step4 into")
        assert "000001-task0-done, is untouched" in error
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["000000-task0-step4", "000001-task0-done"], names
        Checkpointer.verify(out / "checkpoints" / names[-1])
        assert subprocess.run(["mount", "-o", "remount,size=10m", str(out / "checkpoints")]).returncode == 0
        proc = _run(*args[:2], "checkpoint.every_steps=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        redone, original = (json.loads((p / "metrics.json").read_text()) for p in (out, finished))
        assert redone["accuracy_matrix"] == original["accuracy_matrix"]
        assert yaml.safe_load((out / "config.yaml").read_text())["checkpoint"]["every_steps"] == 4
        changes = json.loads((out / "config_changes.json").read_text())
        assert changes == [{"key": "checkpoint.every_steps", "old": 4, "new": 0, "task": 1, "step": 0}]
    finally:
        subprocess.run(["umount", str(out / "checkpoints")])


def test_a_full_disk_while_the_plots_are_written_fails_in_one_line(finished, shards, tmp_path):
    """The output_dir on a 44 KiB tmpfs (its checkpoints on a roomy one): task 0's metrics.json and accuracy matrix
    fit, its accuracy curve does not. The run stops with WriteError naming the plot (exit 2, no traceback, no
    temporary file left); with space, resume=auto ends as the uninterrupted run."""
    out = tmp_path / "run"
    if not _mount_tmpfs(out, "44k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        assert _mount_tmpfs(out / "checkpoints", "10m")
        args = (f"output_dir={out}", f"data.tasks={shards}/tasks.yaml")
        proc = _run(*args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith(f"train.py: error: WriteError: writing {out / 'accuracy_curve.png'} failed"), error
        assert "No space left on device" in error
        assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
        assert subprocess.run(["mount", "-o", "remount,size=10m", str(out)]).returncode == 0
        proc = _run(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        redone, original = (json.loads((p / "metrics.json").read_text()) for p in (out, finished))
        assert redone["accuracy_matrix"] == original["accuracy_matrix"]
    finally:
        subprocess.run(["umount", str(out / "checkpoints")])
        subprocess.run(["umount", str(out)])


def test_a_full_disk_while_building_shards_fails_naming_the_shard(tmp_path):
    """Shards built onto a 64 KiB tmpfs: WriteError naming the shard and the cause; the partial shard removed."""
    from inflora_dist.data.build_shards import main as build_shards
    from inflora_dist.errors import WriteError

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        with pytest.raises(WriteError, match=r"writing shard .*/train/task\d-\d{6}\.tar failed .*No space left"):
            build_shards(["fashion-mnist", "--out", str(disk / "shards"), "--tasks", "3", "--classes-per-task", "2",
                          "--train-per-class", "48", "--shard-size", "20", "--quiet"])  # fmt: skip
        written = sorted(p for p in (disk / "shards").rglob("*.tar"))
        assert written and all(p.stat().st_size % 10240 == 0 for p in written)  # whole tar files only
    finally:
        subprocess.run(["umount", str(disk)])


def test_rerunning_a_finished_run_with_changed_keys_writes_nothing(finished, shards, tmp_path):
    """A finished, exported run started again with keys that may change on resume trains nothing and changes no
    file (before, config.yaml was rewritten with a value no task used)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _files(out)
    proc = _run(f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "inflora.covariance_max_tokens=5",
                "export.merged_model=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is finished and exported (exports.json): nothing to train or write" in proc.stderr
    assert _files(out) == before


def test_a_ctrl_c_that_stops_at_once_ends_in_one_line(shards, tmp_path):
    """A Ctrl-C that reaches the command (here while the run starts, before its handler is set; the second Ctrl-C
    raises the same KeyboardInterrupt, below) ends the run at once: exit 130, one line, no traceback, the run
    directory's lock released."""
    out = tmp_path / "run"
    code, log = _run_until("frozen weights of the targeted layers hashed", lambda proc: proc.send_signal(signal.SIGINT),
                           f"output_dir={out}", f"data.tasks={shards}/tasks.yaml")  # fmt: skip
    assert code == INTERRUPTED_EXIT_CODE, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == "train.py: interrupted"
    assert not (out / LOCK_NAME).exists()


def test_the_second_ctrl_c_raises_at_once():
    """The trainer's SIGINT handler: the first Ctrl-C asks for a checkpoint at the next step boundary, the second
    raises KeyboardInterrupt (what the command then reports in one line, above)."""
    trainer = types.SimpleNamespace(_interrupted=False, _stop=False)
    ContinualTrainer._request_stop(trainer, signal.SIGINT, None)
    assert trainer._stop and trainer._interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            ContinualTrainer._request_stop(trainer, signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
