"""DeepSpeed's own multi-node launcher: `deepspeed --hostfile H launch/train.py ...`, pdsh over ssh, two hosts.

The two hosts are two network namespaces joined by a veth pair (10.78.0.1 <-> 10.78.0.2, the
interface named ds0 on both, as a cluster's nodes usually name theirs alike), each running an sshd
of the test's own (its host key, an authorized key the test generated). `deepspeed` starts in the
first namespace and does what it does on a cluster: its pdsh runner ssh-es to every host of the
hostfile (the launching one included) and starts deepspeed.launcher.launch there with
--node_rank=%n. sshd gives each session a clean environment; what the ranks need (the venv's bin on
PATH, DS_ACCELERATOR, GLOO_SOCKET_IFNAME, ...) reaches them only through the `.deepspeed_env` file of
the directory deepspeed is started from. Both namespaces see this machine's filesystem, so the
checkout and its venv are on "both hosts", as on a cluster's shared file system.

The run must give what one process gives: the same A matrices and subspace memories (1e-6; they
differ by about 1e-7: the covariance is summed over two ranks instead of one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from trainer_runs import CONFIG, REPO, results

from inflora_dist.dist import free_port

pytestmark = pytest.mark.netns

Hosts = list[tuple[str, str, str]]  # [(namespace, interface, address)] x 2, as the netns_pair fixture makes them
SUBNET = "10.78.0"  # test_multihost.py's two hosts are 10.77.0
INTERFACE = "ds0"  # the same name on both hosts: one .deepspeed_env names it for all
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it must be started by its absolute path
# What the ranks need from the test's environment (an sshd session has none of it).
RANK_ENV = ("PATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "WANDB_SILENT", "WANDB_MODE",
            "HF_HOME", "HF_HUB_OFFLINE")  # fmt: skip
TIMEOUT = 420  # s for the whole run (about 20 s on 2 cores; a first JIT build of the CPU op adds about 30 s)


def namespace_pids(ns: str) -> list[int]:
    """The processes whose network namespace is `ns` (`ip netns pids`)."""
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split()]


def kill_namespace_processes(ns: str, timeout: float = 30) -> None:
    """SIGKILL every process in namespace `ns` (sshd, its sessions, launchers, ranks) by pid; wait until none."""
    deadline = time.monotonic() + timeout
    while (pids := [p for p in namespace_pids(ns) if p != os.getpid()]) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def ssh_options(key: Path) -> list[str]:
    """The client options: the test's key only, no host-key prompts or records, never a password prompt."""
    return ["-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10"]  # fmt: skip


@pytest.fixture
def ssh_hosts(netns_pair, tmp_path) -> Iterator[tuple[Hosts, Path]]:
    """The two hosts, an sshd on each accepting root with the test's key: (hosts, the client's private key)."""
    tools = {SSHD: "openssh-server", "pdsh": "pdsh", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed ({package}: scripts/install_cluster_deps.sh, run by make test)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces and an sshd accepting root need root")
    hosts = netns_pair(SUBNET, (INTERFACE, INTERFACE))
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    subprocess.run([*keygen, "-f", str(ssh / "host_key")], check=True, capture_output=True, timeout=30)
    subprocess.run([*keygen, "-f", str(ssh / "id")], check=True, capture_output=True, timeout=30)
    shutil.copy(ssh / "id.pub", ssh / "authorized_keys")
    # Privilege separation directory, normally made by the package's service unit.
    made_run_sshd = not Path("/run/sshd").exists()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    daemons: list[tuple[subprocess.Popen, object]] = []
    try:
        for i, (ns, _, address) in enumerate(hosts, 1):
            config = ssh / f"sshd{i}.conf"
            config.write_text(
                f"ListenAddress {address}\nHostKey {ssh / 'host_key'}\n"
                f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPidFile {ssh / f'sshd{i}.pid'}\n"
                "PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nX11Forwarding no\nPrintMotd no\n"
            )
            log = open(ssh / f"sshd{i}.log", "w")  # closed below
            # -D: stays in the foreground (its pid is ours to stop); -e: its log to the file.
            proc = subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(config)],
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            daemons.append((proc, log))
        # Ready when the first host can log in to both (as deepspeed will, from there).
        for _, _, address in hosts:
            deadline = time.monotonic() + 20
            login = ["ip", "netns", "exec", hosts[0][0], "ssh", *ssh_options(ssh / "id"), f"root@{address}", "true"]
            while True:
                check = subprocess.run(login, capture_output=True, text=True, timeout=30)
                if check.returncode == 0:
                    break
                logs = "\n".join((ssh / f"sshd{i}.log").read_text(errors="replace") for i in (1, 2))
                assert time.monotonic() < deadline, f"no ssh login to {address}: {check.stderr}\n{logs}"
                time.sleep(0.2)
        yield hosts, ssh / "id"
    finally:
        for ns, _, _ in hosts:  # the sshds, their sessions and whatever those started
            kill_namespace_processes(ns)
        for proc, log in daemons:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=30)
            log.close()
        if made_run_sshd:
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()


def test_deepspeed_hostfile_launch_reproduces_one_process(ssh_hosts, shards, reference, job_env, tmp_path):
    """deepspeed --hostfile (pdsh, ssh, .deepspeed_env) over two hosts: the A and memories of 1 process (1e-6)."""
    hosts, key = ssh_hosts
    (ns1, _, master), (_, _, second) = hosts
    launch_dir = tmp_path / "launch"  # deepspeed's working directory: its .deepspeed_env, and the ranks' cwd
    launch_dir.mkdir()
    hostfile = launch_dir / "hostfile"
    hostfile.write_text("".join(f"{address} slots=1\n" for _, _, address in hosts))
    # One VAR=value a line (no comments or blank lines: the runner splits every line at '='); the runner
    # prepends `export VAR=value;` to the command it runs on every host.
    rank_env = {k: job_env[k] for k in RANK_ENV if k in job_env} | {"GLOO_SOCKET_IFNAME": INTERFACE}
    (launch_dir / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in rank_env.items()))
    out = tmp_path / "run"
    deepspeed = str(Path(job_env["VENV"]) / "bin" / "deepspeed")
    # --master_addr: else the runner asks the first host for `hostname -I` over a plain `ssh <host>`;
    # --no_ssh_check: its check is a plain `ssh <host> hostname` too, which knows nothing of the test's
    # key (ssh reads ~/.ssh of the user's passwd entry, not $HOME); pdsh gets it from PDSH_SSH_ARGS_APPEND.
    args = [deepspeed, "--hostfile", str(hostfile), "--master_addr", master, "--master_port", str(free_port()),
            "--no_ssh_check", str(REPO / "launch" / "train.py"), "--config", str(CONFIG),
            f"output_dir={out}", f"data.tasks={shards}/tasks.yaml"]  # fmt: skip
    env = {**job_env, "PDSH_SSH_ARGS_APPEND": " ".join(ssh_options(key))}
    log_path = tmp_path / "deepspeed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", ns1, *args], cwd=launch_dir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.poll() is None:  # SIGKILL: its SIGTERM handler would `pdsh pkill -f` on every host
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    assert code == 0, f"deepspeed exited {code} (None: still running after {TIMEOUT} s)\n{text[-6000:]}"
    assert "deepspeed_env file = ./.deepspeed_env" in text, text[-6000:]  # read from the launching directory
    # pdsh prefixes each line with the host it came from: both hosts ran a launcher, one rank each.
    lines = text.splitlines()
    for node_rank, address in enumerate((master, second)):
        launcher = f"{address}: ", f"nnodes=2, num_local_procs=1, node_rank={node_rank}"
        assert any(line.startswith(launcher[0]) and launcher[1] in line for line in lines), text[-6000:]
    assert "micro batch 16 x 2 ranks" in text, text[-6000:]
    metrics, state = results(out)
    ref_metrics, ref_state = results(reference)
    assert sorted(state) == sorted(ref_state)
    # Every exported tensor: the A of each task and each group's memory (the basis of the protected subspace).
    assert any(".A." in n for n in state) and any(n.endswith(".old_basis") for n in state), sorted(state)
    for name in state:
        torch.testing.assert_close(state[name], ref_state[name], rtol=0, atol=1e-6, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
