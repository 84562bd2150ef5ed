"""The batch scripts in slurm/ on a real two-node SLURM cluster (munged, slurmctld, two slurmd on this machine).

Each test submits a script as a user would and checks what the job left behind against an
uninterrupted run: the A matrices of a 2-node job against a 1-process run (1e-5, as the trainer
tests compare 2 processes with 1), a pre-empted and requeued job against the uninterrupted job of
the same world size (1e-6: the same result).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster
from trainer_runs import REPO, results

from inflora_dist.config import load_run_config

pytestmark = pytest.mark.slurm

TRAIN = REPO / "slurm" / "train.sbatch"
SWEEP = REPO / "slurm" / "sweep.sbatch"
CHAIN = REPO / "slurm" / "chain.sh"
CONFIG = "configs/tiny_vit.yaml"  # as a user passes it: relative to the repository root, where the job runs
# A checkpoint every 3 steps (none pruned) to time the pre-emption by; they do not change the result.
STEP_CHECKPOINTS = ("checkpoint.every_steps=3", "checkpoint.keep=50")


def assert_same_a(out: Path, ref: Path, atol: float = 1e-5) -> None:
    """Same A matrices (to atol) and the same accuracy matrices as the reference run."""
    metrics, state = results(out)
    ref_metrics, ref_state = results(ref)
    assert sorted(state) == sorted(ref_state)
    names = [n for n in state if ".A." in n]
    assert names
    for name in names:
        torch.testing.assert_close(state[name], ref_state[name], rtol=0, atol=atol, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
    assert metrics["task_incremental_accuracy_matrix"] == ref_metrics["task_incremental_accuracy_matrix"]


def assert_same_result(out: Path, ref: Path) -> None:
    """Every exported tensor (A, B, heads, memories) to 1e-6 and the same accuracy matrices."""
    assert_same_a(out, ref, atol=1e-6)
    state, ref_state = results(out)[1], results(ref)[1]
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-6, msg=name)


def wait_for_checkpoint(cluster: SlurmCluster, job: str, out: Path, pattern: str, timeout: float = 300) -> None:
    """Wait until a checkpoint matching `pattern` is in place while the job runs."""
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob(pattern)):
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state}\n{cluster.log(job)[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern} checkpoint after {timeout} s\n{cluster.log(job)[-4000:]}"
        time.sleep(0.1)


def preempt(cluster: SlurmCluster, job: str) -> None:
    """What slurm does ahead of a time limit (--signal=B:USR1@T), now: SIGUSR1 to the batch shell only."""
    cluster.run("scancel", "--signal=USR1", "--batch", job)


@pytest.fixture(scope="module")
def two_node_job(cluster, shards, tmp_path_factory) -> tuple[str, dict[str, str], Path]:
    """train.sbatch on the tiny config, 2 nodes x 1 process, torchrun, uninterrupted: (job id, job info, output)."""
    out = tmp_path_factory.mktemp("slurm") / "two-nodes"
    job = cluster.submit(TRAIN, CONFIG, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", cwd=REPO)
    info = cluster.wait(job, log=cluster.jobs / f"inflora-{job}.out")
    return job, info, out


def test_two_node_job_reproduces_one_process(cluster, two_node_job, reference):
    """The job completes on both nodes, writes metrics.json, and its A matrices are the 1-process run's."""
    job, info, out = two_node_job
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-4000:]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    port = 20000 + int(job) % 20000
    # n1 and n2 do not resolve: the rendezvous address is the NodeAddr slurm has for n1.
    assert f"2 node(s) (n1 n2) x 1 process(es), torchrun, rendezvous 127.0.0.1:{port}" in log
    assert "micro batch 16 x 2 ranks" in log  # one process on each node, one process group
    assert (out / "metrics.json").exists()
    assert load_run_config(str(out / "config.yaml")).resume == "auto"
    assert_same_a(out, reference)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, shards, two_node_job, tmp_path):
    """USR1 to the batch shell mid-run: the processes checkpoint, the job requeues, resumes, same result."""
    out = tmp_path / "run"
    job = cluster.submit(TRAIN, CONFIG, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", *STEP_CHECKPOINTS,
                         cwd=REPO)  # fmt: skip
    wait_for_checkpoint(cluster, job, out, "*-task0-step3")  # signalled with most of the run still to go
    preempt(cluster, job)
    info = cluster.wait(job, log=cluster.jobs / f"inflora-{job}.out")
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    preempted = [n for n in names if n.endswith("-preempted")]
    assert len(preempted) == 1 and "-step" in preempted[0], names  # stopped mid-task, at a step boundary
    for line in ("pre-emption signal", f"requeueing job {job}", f"job {job} restart 1:", f"resumed from {out}"):
        assert line in log, line
    assert log.index("restart 0:") < log.index("pre-emption signal") < log.index("restart 1:")  # one log, appended
    assert_same_result(out, two_node_job[2])


def test_deepspeed_launcher_job_reproduces_one_process(cluster, shards, reference, tmp_path):
    """LAUNCHER=deepspeed: deepspeed's launcher on each node (--no_ssh --node_rank), same A as 1 process."""
    out = tmp_path / "ds"
    job = cluster.submit(TRAIN, CONFIG, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml",
                         env={"LAUNCHER": "deepspeed"}, cwd=REPO)  # fmt: skip
    info = cluster.wait(job, log=cluster.jobs / f"inflora-{job}.out")
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "x 1 process(es), deepspeed," in log and "--node_rank=1" in log
    assert_same_a(out, reference)


def test_sweep_runs_one_array_task_per_line(cluster, shards, tmp_path):
    """sweep.sbatch: array task i trains with line i's overrides (quotes kept), in <output_dir>/<i>."""
    lines = tmp_path / "sweep.txt"
    lines.write_text("# seeds\nseed=1\n\n'train.lr=0.001' seed=2\n")
    base = tmp_path / "sweep"
    common = [CONFIG, f"data.tasks={shards}/tasks.yaml", f"output_dir={base}", "train.epochs=1"]
    options = ("--array=0-1", f"--output={cluster.jobs}/%x-%A_%a.out")  # the script's log name, in the test's dir
    array = cluster.submit(SWEEP, str(lines), *common, options=options, cwd=REPO)
    for i in (0, 1):
        info = cluster.wait(f"{array}_{i}", log=cluster.jobs / f"inflora-sweep-{array}_{i}.out")
        log = cluster.log(f"{array}_{i}", "inflora-sweep")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
        assert f"sweep task {i} of array job {array}" in log
    first, second = (load_run_config(str(base / str(i) / "config.yaml")) for i in (0, 1))
    assert (first.seed, first.train.lr, first.train.epochs) == (1, 0.005, 1)
    assert (second.seed, second.train.lr, second.train.epochs) == (2, 0.001, 1)
    for i in (0, 1):
        assert (base / str(i) / "metrics.json").exists()


def test_chain_of_dependent_jobs_continues_one_run(cluster, shards, reference, tmp_path):
    """chain.sh 2: job 1 pre-empted (not requeued: REQUEUE=0), job 2 (afterany) resumes: the uninterrupted result."""
    out = tmp_path / "chain"
    sbatch_options = ["--nodes=1", f"--output={cluster.jobs}/%x-%j.out"]
    args = [*sbatch_options, "--", CONFIG, f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", *STEP_CHECKPOINTS]
    proc = subprocess.run([str(CHAIN), "2", *args], cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    first, second = proc.stdout.split()
    assert cluster.job(second)["Dependency"] == f"afterany:{first}(unfulfilled)"
    wait_for_checkpoint(cluster, first, out, "*-task0-step3")
    preempt(cluster, first)
    info = cluster.wait(first)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", cluster.log(first)[-4000:]  # stopped, not done
    assert "requeueing" not in cluster.log(first)
    info = cluster.wait(second, log=cluster.jobs / f"inflora-{second}.out")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.log(second)[-4000:]
    assert f"resumed from {out}/checkpoints/" in cluster.log(second)
    # Mid-task (a *-preempted checkpoint), or, had the signal come as the task's training ended, at its boundary.
    stopped_at_boundary = "pre-empted before stage" in cluster.log(first)
    assert stopped_at_boundary or any(p.name.endswith("-preempted") for p in (out / "checkpoints").iterdir())
    assert_same_result(out, reference)  # 1 node x 1 process: the 1-process run's result exactly
