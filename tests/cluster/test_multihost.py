"""A process group across two hosts: two network namespaces joined by a veth pair, one torchrun in each.

Each namespace has its own network stack (only its veth end and loopback), so the ranks can reach
each other only through 10.77.0.1 <-> 10.77.0.2: the rendezvous (torchrun's c10d backend) and gloo
both go over that link, as between two machines. The covariance pass all-reduces over it; the A
matrices designed from the covariance must equal a 1-host, 1-process run's.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch
from trainer_runs import REPO, results

from inflora_dist.dist import free_port

pytestmark = pytest.mark.netns


def test_two_hosts_covariance_equals_one_host(two_hosts, shards, reference, job_env, tmp_path):
    """torchrun in each namespace, c10d rendezvous over the veth link: the 2-host A equal the 1-host A (1e-5)."""
    out = tmp_path / "two-hosts"
    (_, _, host_address), _ = two_hosts
    port = str(free_port())  # free here; nothing listens in the fresh namespaces
    torchrun = str(Path(job_env["VENV"]) / "bin" / "torchrun")
    procs = []
    for i, (ns, interface, address) in enumerate(two_hosts):
        args = ["ip", "netns", "exec", ns, torchrun, "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host_address}:{port}", "--rdzv-id", f"netns-{port}",
                # The host cannot tell that the endpoint is its own address (it checks its host name):
                # say so. --local-addr: the address the other host reaches this one at.
                "--rdzv-conf", f"is_host={int(i == 0)}", "--local-addr", address,
                str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny_vit.yaml"),
                f"output_dir={out}", f"data.tasks={shards}/tasks.yaml"]  # fmt: skip
        # gloo binds to the address of the interface it is told; the host name would resolve to loopback.
        env = {**job_env, "GLOO_SOCKET_IFNAME": interface}
        log = open(tmp_path / f"host{i + 1}.log", "w")  # closed below
        procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=400) for proc, _ in procs]
    finally:
        for proc, log in procs:
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
            log.close()
    logs = [(tmp_path / f"host{i}.log").read_text(errors="replace") for i in (1, 2)]
    assert codes == [0, 0], "\n".join(text[-4000:] for text in logs)
    assert "micro batch 16 x 2 ranks" in "".join(logs)
    metrics, state = results(out)
    ref_metrics, ref_state = results(reference)
    names = [n for n in state if ".A." in n]
    assert names and sorted(state) == sorted(ref_state)
    for name in names:
        torch.testing.assert_close(state[name], ref_state[name], rtol=0, atol=1e-5, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
