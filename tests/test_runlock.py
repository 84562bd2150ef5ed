"""One writer per run directory: the lock, its stale cases, a race for a stale lock, and two real runs at once."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inflora_dist.runlock import LOCK_NAME, RunDirectoryLocked, RunLock


def _write_holder(directory: Path, **fields) -> None:
    now = time.time()
    record = {"host": "node-a", "pid": 12345, "started": now, "heartbeat": now, "token": "theirs"}
    record.update(fields)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunDirectoryLocked, match=rf"{tmp_path}/run is in use by another run \(host "
                       rf"{socket.gethostname()}, pid {os.getpid()}, started 20"):  # fmt: skip
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    second = RunLock(tmp_path / "run")
    second.acquire()  # free again
    second.release()
    second.release()  # idempotent


@pytest.mark.parametrize(
    "case",
    ["dead_pid_here", "slurm_requeue", "old_heartbeat"],
)
def test_stale_locks_are_broken(tmp_path, monkeypatch, caplog, case):
    run = tmp_path / "run"
    if case == "dead_pid_here":
        _write_holder(run, host=socket.gethostname(), pid=_dead_pid())
        reason = "on this host is gone"
    elif case == "slurm_requeue":  # another node, fresh heartbeat, but an earlier incarnation of this job
        _write_holder(run, slurm_job_id="4242", slurm_restart_count=0)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        reason = "earlier run of this SLURM job 4242"
    else:  # another node that stopped beating
        _write_holder(run, heartbeat=time.time() - 1000)
        reason = "heartbeat is 1000 s old"
    lock = RunLock(run, stale_after_s=300)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "breaking the stale lock" in caplog.text and reason in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["token"] == lock.token
    lock.release()


def test_a_live_holder_elsewhere_is_not_broken(tmp_path, monkeypatch):
    _write_holder(tmp_path, slurm_job_id="4242", slurm_restart_count=1)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same restart: a second copy of the same job, not a requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunDirectoryLocked, match=r"host node-a, pid 12345.*SLURM job 4242.*stale 300 s after"):
        RunLock(tmp_path, stale_after_s=300).acquire()


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=4.0)  # heartbeat every second
    lock.acquire()
    try:
        time.sleep(2.5)
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["heartbeat"] > record["started"] + 0.5 and time.time() - record["heartbeat"] < 4.0
        with pytest.raises(RunDirectoryLocked):  # so it never looks stale while alive
            RunLock(tmp_path, stale_after_s=4.0).acquire()
    finally:
        lock.release()


def _contend(directory: str, barrier, results) -> None:
    barrier.wait()
    lock = RunLock(directory, stale_after_s=300)
    try:
        lock.acquire()
        results.put("won")
        time.sleep(0.5)  # hold it while the others look
    except RunDirectoryLocked:
        results.put("refused")


def test_of_reruns_racing_for_a_stale_lock_one_wins(tmp_path):
    _write_holder(tmp_path, heartbeat=0.0)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in procs) == ["refused"] * 3 + ["won"]


def test_a_rerun_that_judged_a_lock_stale_leaves_the_fresh_lock_another_rerun_made(tmp_path):
    # The interleaving that once gave two winners: B judged the old record stale, A broke it and took the
    # directory, then B breaks: it must see that the file is no longer the record it judged.
    _write_holder(tmp_path, heartbeat=0.0)
    stale = json.loads((tmp_path / LOCK_NAME).read_text())
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    try:
        b._break(stale)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == a.token
        assert not (tmp_path / f"{LOCK_NAME}.break").exists()
        with pytest.raises(RunDirectoryLocked, match="in use by another run"):
            b.acquire()
    finally:
        a.release()


def test_a_breaker_file_left_by_a_dead_process_is_removed(tmp_path, monkeypatch, caplog):
    import inflora_dist.runlock as runlock

    monkeypatch.setattr(runlock, "BREAKER_STALE_S", 0.3)
    _write_holder(tmp_path, heartbeat=0.0)
    (tmp_path / f"{LOCK_NAME}.break").write_text("")
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "died while breaking a stale lock" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    lock.release()
