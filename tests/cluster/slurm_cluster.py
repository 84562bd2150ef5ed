"""A real SLURM cluster of two nodes on this machine: munged, slurmctld and two slurmd, started and stopped by pid.

Debian's slurmd is built with multiple-slurmd support, so nodes `n1` and `n2` are two slurmd
processes on 127.0.0.1 with their own ports. Everything (munge key and socket, slurm.conf, state,
spool, logs) lives in one temporary directory; the client commands find the cluster through
SLURM_CONF, which `env` carries (the config names the munge socket).
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from inflora_dist.dist import free_port

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
#: Job states after which a job runs no more (a requeued job passes through REQUEUED and PENDING instead).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def binary(name: str) -> str | None:
    """The path of a slurm/munge binary (daemons live in /usr/sbin, not always on a user's PATH)."""
    found = shutil.which(name)
    if found is None and Path("/usr/sbin", name).exists():
        found = f"/usr/sbin/{name}"
    return found


def unavailable() -> str | None:
    """Why the cluster cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd runs the jobs, munged runs as user munge)"
    missing = [name for name in DAEMONS + CLIENTS if binary(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed: scripts/install_cluster_deps.sh (run by make test) installs them"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user munge (Debian's munge package creates it)"
    return None


def _slurm_conf(root: Path, munge_socket: Path, ports: list[int]) -> str:
    host = socket.gethostname()
    ctld, *node_ports = ports
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
        "Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 CPUs=2 State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    # A random first job id: MASTER_PORT is derived from the job id, so two test sessions at once
    # (or a session right after another) do not reuse each other's rendezvous ports.
    first_job = random.randint(1000, 4_000_000)
    return f"""\
ClusterName=inflora-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again 5 s after the end of its last run (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=5
CommunicationParameters=NoInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
FirstJobId={first_job}
# Schedule every second: a requeued or dependent job starts at once, not at the next 60 s pass.
SchedulerParameters=sched_interval=1,bf_interval=1
InactiveLimit=0
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Two slurmd nodes, one slurmctld and a munged of its own, all under `root`; `start()`, then `stop()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.jobs = root / "jobs"  # batch logs
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.daemons: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ daemons
    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and the slurmd of every node; return once `sinfo` shows them idle."""
        munge = self.root / "munge"  # owned by munge; 0755: munged wants its socket's directory searchable
        for d in (munge, self.root / "state", self.root / "log", self.jobs, *(self.root / "spool" / n for n in NODES)):
            d.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam("munge")
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for path in (munge, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        munge_socket = munge / "munge.socket"
        self.conf.write_text(_slurm_conf(self.root, munge_socket, [free_port() for _ in range(1 + len(NODES))]))

        files = {"socket": munge_socket, "key-file": key, "pid-file": munge / "munged.pid",
                 "seed-file": munge / "munged.seed", "log-file": munge / "munged.log"}  # fmt: skip
        munged = [binary("munged"), "--foreground", *(f"--{option}={path}" for option, path in files.items())]
        self._spawn("munged", munged, user="munge", group="munge", extra_groups=[])
        self._until(lambda: munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [binary("slurmctld"), "-D", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", [binary("slurmd"), "-D", "-N", node, "-f", str(self.conf)])

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return out[1::2] == ["idle"] * len(NODES)

        self._until(idle, timeout, "the nodes did not become idle")

    def _spawn(self, name: str, args: list, **kwargs) -> None:
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            self.daemons[name] = subprocess.Popen(
                [str(a) for a in args], env=self.env, stdout=out, stderr=subprocess.STDOUT, **kwargs
            )

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = {n: p.returncode for n, p in self.daemons.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited daemons: {dead})\n{self.daemon_logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop each daemon this cluster started, by pid."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(list(self.daemons)):  # slurmd, slurmctld, munged last (the others authenticate)
            proc = self.daemons[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    def daemon_logs(self, lines: int = 30) -> str:
        """The last lines of every daemon's log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients
    def run(self, command: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a slurm client command against this cluster."""
        proc = subprocess.run(
            [binary(command) or command, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{command} {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def submit(self, script: Path, *args: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None,
               cwd: Path | None = None) -> str:  # fmt: skip
        """`sbatch [options] script args...` with its log under `jobs/`; returns the job id."""
        sbatch = [binary("sbatch"), "--parsable", f"--output={self.jobs}/%x-%j.out", *options, str(script), *args]
        proc = subprocess.run(sbatch, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch exited {proc.returncode}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout.splitlines()[0]
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(?:^|\s)([A-Za-z:/]+)=(\S*)", line):
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 300, log: Path | None = None) -> dict[str, str]:
        """Wait until the job has finished for good; fail with its log and the daemons' logs after `timeout` s."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in FINISHED:
            if time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-6000:] if log and log.exists() else ""
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s\n{text}\n"
                                     f"{self.daemon_logs()}")  # fmt: skip
            time.sleep(0.5)
        return info

    def log(self, job_id: str, name: str = "inflora") -> str:
        """The batch log of a job (its default name; `%x-%j.out`)."""
        path = self.jobs / f"{name}-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""


def make_root() -> Path:
    """A fresh directory for one cluster; 0755 so that munged (user munge) reaches its socket directory."""
    root = Path(tempfile.mkdtemp(prefix="inflora-slurm-"))
    root.chmod(0o755)
    return root
