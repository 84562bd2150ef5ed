"""Fixtures of the cluster tests: a real two-node SLURM cluster, two "hosts" (network namespaces joined by a
veth pair), the tiny task sequence, a 1-process reference run."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, make_root, unavailable
from trainer_runs import env, tiny_shards, train

from inflora_dist.data.build_shards import FASHION_MNIST_DIR

VENV = Path(sys.executable).parent.parent


@pytest.fixture(scope="session")
def job_env() -> dict[str, str]:
    """The environment of the processes the cluster tests start (batch jobs and launchers).

    The trainer tests' environment (the venv's bin first on PATH, as the batch script sets it)
    without the SLURM_ variables of any allocation pytest itself may run in.
    """
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    e["VENV"] = str(VENV)
    return e


@pytest.fixture(scope="session")
def cluster(job_env) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd n1, n2 running on this machine for the session; all stopped at the end."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    root = make_root()
    slurm = SlurmCluster(root)
    slurm.env.update(job_env)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The tiny config's task sequence (3 Fashion-MNIST tasks of 2 classes), built once."""
    if not Path(FASHION_MNIST_DIR).exists():
        pytest.skip("Fashion-MNIST is not installed (make test installs Debian's dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("cluster-tiny") / "shards"
    return tiny_shards(out)


@pytest.fixture(scope="session")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 1-process run of the tiny config (what every multi-node run must reproduce)."""
    out = tmp_path_factory.mktemp("cluster-reference") / "run"
    train(1, out, shards=shards)
    return out


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip args...`; raise with its stderr on failure when `check`."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


Hosts = list[tuple[str, str, str]]  # [(namespace, interface, address)] x 2


@contextlib.contextmanager
def network_namespaces(subnet: str, interfaces: tuple[str, str]) -> Iterator[Hosts]:
    """Two namespaces joined by a veth pair, `<subnet>.1` and `<subnet>.2`; removed afterwards.

    The two ends may have the same name (each lives in its own namespace), as the interfaces of a
    cluster's nodes usually do.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (scripts/install_cluster_deps.sh, run by make test, installs it)")
    tag = f"{os.getpid()}-{subnet.rsplit('.', 1)[-1]}"  # unique per session and subnet
    hosts = [(f"inflora-{tag}-{i}", interface, f"{subnet}.{i}") for i, interface in enumerate(interfaces, 1)]
    made: list[str] = []
    try:
        for ns, _, _ in hosts:
            proc = ip("netns", "add", ns, check=False)
            if proc.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()}")
            made.append(ns)
        (ns1, if1, _), (ns2, if2, _) = hosts
        # Both ends are created inside the namespaces: no interface or address appears on this host.
        ip("link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2, "netns", ns2)
        for ns, interface, address in hosts:
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", ns, "link", "set", interface, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            ip("netns", "del", ns, check=False)


@pytest.fixture
def netns_pair() -> Iterator[Callable[[str, tuple[str, str]], Hosts]]:
    """`make(subnet, interfaces)`: two namespaces joined by a veth pair (network_namespaces), removed after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda subnet, interfaces: stack.enter_context(network_namespaces(subnet, interfaces))


@pytest.fixture
def two_hosts(netns_pair) -> Hosts:
    """10.77.0.1 (veth1) and 10.77.0.2 (veth2): [(namespace, interface, address)] x 2; removed afterwards."""
    return netns_pair("10.77.0", ("veth1", "veth2"))
