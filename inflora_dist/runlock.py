"""One writer per run directory: a lock file that a run holds for its whole life.

`<output_dir>/.run.lock` is created by rank 0 before anything else is written,
with `O_CREAT | O_EXCL` (atomic on local file systems, NFSv3+ and Lustre). It
holds JSON naming the holder: host, pid, start time, a random token, the SLURM
job id and restart count when there are, and a heartbeat time that a daemon
thread of the holder rewrites every `heartbeat_s` seconds. `flock` is not
used: on NFS and Lustre it may be local to one node.

A second run on the same directory stops at once with an error naming the
directory and the holder. A lock is *stale*, and is broken, when

* its host is this host and its pid is not running (kill -9, a crash);
* it names this SLURM job with a smaller restart count (SLURM ends a job's
  processes before it requeues it, on whatever node it runs next);
* its heartbeat is older than `stale_after_s` (its node vanished: a live
  holder would have refreshed it). Until then, a rerun from another host is
  refused, and the error says when the lock will be stale.

Breaking is serialised through a second O_EXCL file, `.run.lock.break`: its
holder re-reads the lock, removes it only if it is still the stale record it
judged (a fresh lock made meanwhile by another rerun is left alone), and
creates its own with O_EXCL, so of reruns racing for a stale lock one wins.
A breaker file older than `BREAKER_STALE_S` (its maker died inside those few
milliseconds) is removed. The holder removes the file
on exit (its token must still be the one in the file): normally, on an error,
and after a pre-emption signal; only a killed process leaves it, stale.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from inflora_dist.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
BREAKER_STALE_S = 30.0  # a break takes milliseconds; a breaker file this old was left by a dead process


class RunDirectoryLocked(UserError, RuntimeError):
    """Another live run holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}{job}"


def stale_reason(holder: dict[str, Any], now: float, stale_after_s: float, host: str, env: dict[str, str]) -> str:
    """Why the lock `holder` is stale, or '' while its holder may be alive. Pure."""
    if holder.get("host") == host and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone"
    job, restarts = env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if job and holder.get("slurm_job_id") == job and int(holder.get("slurm_restart_count", 0)) < restarts:
        return f"it was taken by an earlier run of this SLURM job {job} (restart {holder.get('slurm_restart_count')})"
    age = now - float(holder.get("heartbeat", 0))
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old (stale after {stale_after_s:.0f} s)"
    return ""


class RunLock:
    """The lock of one run directory (rank 0 only): `acquire()`, then `release()` (also at interpreter exit).

    `what` names the directory in errors, `holder` what holds it and `advice` how to avoid it (a shard folder
    being built takes the same lock: "shard folder", "another build", "use another --out").
    """

    def __init__(self, directory: str | Path, stale_after_s: float = 300.0, what: str = "run directory",
                 holder: str = "another run", advice: str = "use another output_dir") -> None:  # fmt: skip
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.what, self.holder, self.advice = what, holder, advice
        self.path = Path(directory) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.heartbeat_s = min(30.0, stale_after_s / 4)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        now = time.time()
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
            "token": self.token,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        }

    def _read(self) -> dict[str, Any] | None:
        """The holder's record; None without a lock file; {} (no heartbeat: stale) if unreadable for a while."""
        for _ in range(50):
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.1)  # being written by a holder that just created it
        return {}  # a holder that died between creating and writing it

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def acquire(self) -> None:
        """Take the lock or raise RunDirectoryLocked naming the directory and the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                atexit.register(self.release)
                return
            holder = self._read()
            if holder is None:
                continue  # released between our two calls: try again
            reason = stale_reason(holder, time.time(), self.stale_after_s, self.record["host"], dict(os.environ))
            if not reason:
                raise RunDirectoryLocked(
                    f"{self.what} {self.path.parent} is in use by {self.holder} ({_describe(holder)}); "
                    f"stop it, or {self.advice}. If that process is gone (its node lost), the lock "
                    f"becomes stale {self.stale_after_s:.0f} s after its last heartbeat; or delete {self.path}"
                )
            logger.warning("breaking the stale lock of %s (%s): %s", self.path.parent, _describe(holder), reason)
            self._break(holder)
        raise RunDirectoryLocked(f"{self.what} {self.path.parent}: could not take {self.path} (contended)")

    def _break(self, stale: dict[str, Any]) -> None:
        """Remove the lock if it is still the `stale` record, holding the breaker file; wait while another breaks."""
        breaker = self.path.with_name(f"{LOCK_NAME}.break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._wait_for_breaker(breaker)
            return  # the other breaker made its lock (or left it stale): acquire looks again
        try:
            os.close(fd)
            current = self._read()
            if current is not None and current.get("token") == stale.get("token"):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()

    @staticmethod
    def _wait_for_breaker(breaker: Path) -> None:
        deadline = time.time() + BREAKER_STALE_S
        while time.time() < deadline:
            try:
                made = breaker.stat().st_mtime
            except FileNotFoundError:
                return
            if time.time() - made > BREAKER_STALE_S:
                break
            time.sleep(0.01)
        logger.warning("removing %s, left by a process that died while breaking a stale lock", breaker)
        with contextlib.suppress(FileNotFoundError):
            breaker.unlink()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                if (self._read() or {}).get("token") != self.token:
                    logger.error("the lock of %s was taken by another run", self.path.parent)
                    return
                tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
                tmp.write_text(json.dumps({**self.record, "heartbeat": time.time()}))
                os.replace(tmp, self.path)

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if (self._read() or {}).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        atexit.unregister(self.release)
