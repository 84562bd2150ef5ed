"""Fixtures of the cluster tests: a real two-node SLURM cluster, the tiny task sequence, a 1-process reference run."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
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
