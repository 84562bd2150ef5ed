"""A measured scaling model of InfLoRA's per-task overhead: `python -m inflora_dist.bench scale [--json]`.

Measured on this machine, side by side in one run:

  * worlds 1..4 (real gloo processes on loopback, one thread each): a ViT-B-shaped
    model (transformers ViTModel from a config) with InfLoRA on k/v; each rank
    runs the covariance pass over its share of the same images, then the
    reduction twice on the same sums: bucketed upper triangles (ours) and one
    full-matrix all-reduce per group plus one for the counts (before) -- bytes,
    collectives and seconds of each; and a training step (forward, backward,
    all-reduce of B's gradients) on the rank's share of the batch;
  * the float64 decompositions of a d x d covariance (eigh and svd) for each
    --dims, on the host and on --device (default: the GPU when there is one),
    timed after torch.cuda.synchronize();
  * the projected decomposition of a --projected-dim covariance with a quarter
    of its directions protected, by the SVD path of before (F @ svd(F^T C)) and
    the eigh path of now (eigh of the Gram matrix), side by side:
    projected_decomp_s, projected_decomp_ratio and projected_decomp_angle (the
    largest principal angle between their subspaces);
  * --batched-count eigh of d = --batched-dim one at a time and in one batched
    call (batched_eigh: how InfLoRA now decomposes a task's groups), on the host
    and on --device: batched_ratio and the largest difference of the results;
  * the precision of the sums (bench/precision.py): float32 per-batch products
    summed in float64 against an all-float32 sum, on massive activations.

It then projects InfLoRA's per-task overhead (two covariance passes, two
reductions, two decompositions per input group) as a share of the task's
training time on --nodes x --gpus-per-node GPUs (default 1 x 8) for ViT-B/16
on ImageNet-R, LLaMA-2-7B on O-LoRA's long benchmark with q/v branches (as
O-LoRA and GainLoRA adapt it) and passes capped at --covariance-max-tokens, and
the same with all seven projections and uncapped passes, for comparison. Its
device figures are flags: dense bf16 TFLOPS and MFU, NCCL bus bandwidth
(assumed), and float64 eigh seconds per d (measured on an H200 by default).
docs/scaling.md explains the model. The billion-parameter runs are their own
command, `bench large`.

With 2 cores here, worlds 3 and 4 oversubscribe the CPU: their seconds show
contention, not scaling; their bytes and collectives are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from inflora_dist import dist
from inflora_dist.bench.precision import projector_errors
from inflora_dist.bench.step import build_vit, covariance_batch, forward, make_batches, synchronize
from inflora_dist.continual import InfLoRA
from inflora_dist.covariance import assign_owners, traffic_bytes
from inflora_dist.inject import inject_inflora
from inflora_dist.subspace import RETAIN, SubspaceMemory, complement_basis, principal_angle, stacked_eigh

SUMMARY = "covariance traffic, decompositions and step per world size, and a projection to a GPU cluster"
GOALS = {"reduce_bytes_ratio": 0.51, "precision_fp32_gemm_fp64_sum": 1e-6}
#: Nominal float64 flop counts of the decompositions with vectors (for the effective rates printed).
FLOPS_PER_D3 = {"eigh": 9.0, "svd": 22.0}
#: float64 eigh with vectors of one d x d matrix on one H200 (cuSOLVER, torch 2.11; measured 2026-12-04 with
#: this bench's time_decompositions: ../shared/gpu/README.md). Small sizes are latency-bound, hence 768 > 1024.
H200_EIGH_S = {768: 0.13, 1024: 0.09, 4096: 0.18, 5632: 0.36, 11008: 1.19}
#: One InfLoRA training step of ViT-B/16 at 224 px, k/v rank 10, fp32, on one H200: (images, seconds) (`bench
#: step` at commit 70d1f8a, ../shared/gpu/README.md).
H200_VIT_STEP = (64, 0.1249)


def _measured_point(text: str) -> tuple[int, float]:
    d, sep, seconds = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected SIZE:SECONDS (e.g. 4096:0.18), got {text!r}")
    return int(d), float(seconds)


def eigh_seconds(d: int, measured: list[tuple[int, float]]) -> float:
    """Seconds of one float64 eigh at `d` from measured (d, seconds) points: the time of the smallest measured
    size >= d (a smaller matrix is not slower; small sizes are latency-bound, so no d^3 scaling down), or the
    largest measured one scaled by (d / d_max)^3 beyond it."""
    points = sorted(measured)
    for size, seconds in points:
        if size >= d:
            return seconds
    size, seconds = points[-1]
    return seconds * (d / size) ** 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--hidden", type=int, default=768, help="ViT hidden size (default: ViT-B)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--image-size", type=int, default=112, help="small images keep the passes short on CPU")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over the ranks")
    p.add_argument("--batches", type=int, default=3, help="batches of the covariance pass")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden // 64)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 4 * hidden)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="+", default=["k_proj", "v_proj"])
    p.add_argument("--bucket-mib", type=float, default=1.0, help="reduction bucket cap for the sweep (MiB)")
    p.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1024, 2048, 4096])
    p.add_argument("--precision-batches", type=int, default=400)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the decompositions are timed besides the host (default: cuda when available)",
    )
    p.add_argument(
        "--projected-dim",
        type=int,
        default=4096,
        help="d of the projected decomposition timed by both paths (svd before, eigh now)",
    )
    # Projection inputs: a user replaces them with their cluster's figures.
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=989.0, help="dense bf16 TFLOPS per GPU (H100/H200 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of training and passes")
    p.add_argument("--bus-gbps", type=float, default=100.0, help="NCCL all-reduce bus bandwidth, GB/s")
    p.add_argument(
        "--decomp-seconds",
        type=_measured_point,
        nargs="+",
        default=sorted(H200_EIGH_S.items()),
        metavar="D:SECONDS",
        help="measured float64 eigh seconds per d on one GPU (default: an H200, see H200_EIGH_S)",
    )
    p.add_argument("--llm-tokens", type=int, default=256, help="mean tokens per O-LoRA long record (assumed)")
    p.add_argument(
        "--covariance-max-tokens",
        type=int,
        default=65536,
        help="inflora.covariance_max_tokens of the LLaMA projection (the vision tasks read every token)",
    )
    p.add_argument("--batched-dim", type=int, default=768, help="d of the batched-decomposition timing")
    p.add_argument("--batched-count", type=int, default=24, help="matrices of the batched-decomposition timing")
    p.add_argument(
        "--batched-ratio",
        type=float,
        default=None,
        help="seconds of a stacked eigh / one at a time on the GPU, for the projection (default: this run's own "
        "figure on --device when it is a GPU, else 1: no gain assumed)",
    )
    p.add_argument(
        "--vit-step",
        type=_measured_point,
        default=H200_VIT_STEP,
        metavar="IMAGES:SECONDS",
        help="a measured ViT-B/16 224 px training step on one GPU: images per step and seconds (default: the "
        "H200's fp32 InfLoRA step, 64:0.1249); the ViT projection's second row takes its throughput",
    )
    p.add_argument("--fp64-tflops", type=float, default=67.0, help="float64 TFLOPS per GPU (H100/H200 SXM: 67)")
    p.add_argument("--gate-hidden", type=int, default=50, help="GainLoRA's gate width (its LLaMA scripts: 50)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


# ---------------------------------------------------------------------- worlds
def _full_matrix_reduction(collector: Any, sums: dict[str, torch.Tensor], counts: torch.Tensor) -> tuple[int, int]:
    """The reduction before bucketing: one all-reduce for the counts, one per group's full matrix."""
    dist.all_reduce_sum_(counts.clone())
    for g in collector.groups:
        dist.all_reduce_sum_(sums[g].clone())
    return sum(sums[g].numel() + 1 for g in collector.groups) * 8, len(collector.groups) + 1


def _world_worker(rank: int, world: int, workdir: str, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world)
    try:
        figures = _measure_world(rank, world, args)
        if rank == 0:
            (Path(workdir) / "result.json").write_text(json.dumps(figures))
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def _measure_world(rank: int, world: int, args: argparse.Namespace) -> dict[str, float]:
    model = build_vit(args)
    model.requires_grad_(False)
    report = inject_inflora(model, args.targets, rank=args.rank, num_tasks=1, fold="merge")
    inflora = InfLoRA(report, 0.95, 0.99, bucket_bytes=int(args.bucket_mib * 2**20))
    batches = [b[rank::world] for b in make_batches(args, args.batches, args.seed)]
    collector = inflora.collector

    dist.barrier()
    start = time.perf_counter()
    for pixels in batches:
        covariance_batch(model, inflora, pixels)
    pass_s = time.perf_counter() - start
    sums = {g: collector.sums[g].clone() for g in collector.groups}
    counts = torch.stack([collector.counts[g] for g in collector.groups])

    dist.barrier()
    start = time.perf_counter()
    full_bytes, full_collectives = _full_matrix_reduction(collector, sums, counts)
    full_s = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    covs = collector.all_reduce()  # collective
    bucketed_s = time.perf_counter() - start
    stats = dict(collector.last_reduction)

    inflora.on_task_start(0, covs)
    b_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(b_params, lr=1e-4)
    step_times = []
    for i in range(3):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        forward(model, batches[i % len(batches)]).square().mean().backward()
        flat = torch.cat([p.grad.reshape(-1) for p in b_params])
        dist.all_reduce_sum_(flat)
        opt.step()
        step_times.append(time.perf_counter() - start)
    times = torch.tensor([pass_s, full_s, bucketed_s, statistics.median(step_times)], dtype=torch.float64)
    slowest = dist.all_gather(times).max(dim=0).values.tolist()  # the slowest rank sets the pace
    return {
        "world": world,
        "groups": len(collector.groups),
        "covariance_pass_s": slowest[0],
        "full_reduce_s": slowest[1],
        "bucketed_reduce_s": slowest[2],
        "step_s": slowest[3],
        "full_reduce_bytes": full_bytes,
        "bucketed_reduce_bytes": stats["bytes"],
        "full_collectives": full_collectives,
        "bucketed_collectives": stats["collectives"],
    }


def measure_worlds(args: argparse.Namespace) -> list[dict[str, float]]:
    """One row per world size, from real gloo processes."""
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory(prefix="inflora-scale-") as workdir:
            mp.spawn(_world_worker, args=(world, workdir, args), nprocs=world, join=True)
            rows.append(json.loads((Path(workdir) / "result.json").read_text()))
    return rows


# ---------------------------------------------------------------------- decompositions
def _timed(fn: Any, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_decompositions(dims: list[int], device: torch.device, seed: int = 0) -> list[dict[str, float]]:
    """Seconds of float64 eigh and svd (with vectors) of a random PSD d x d matrix, per d, on `device` (best of 3
    calls up to d = 2048)."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for d in dims:
        x = torch.randn(d, d + 8, generator=g, dtype=torch.float64)
        c = (x @ x.T / d).to(device)
        if device.type == "cuda":  # the first call loads cuSOLVER
            torch.linalg.eigh(c[:8, :8])
        row = {"d": d, "device": device.type}
        repeats = 3 if d <= 2048 else 1  # small sizes are latency-bound: the best of a few calls
        row["eigh_s"] = min(_timed(lambda c=c: torch.linalg.eigh(c), device) for _ in range(repeats))
        row["svd_s"] = min(_timed(lambda c=c: torch.linalg.svd(c, full_matrices=False), device) for _ in range(repeats))
        for kind in ("eigh", "svd"):
            row[f"{kind}_gflops"] = FLOPS_PER_D3[kind] * d**3 / row[f"{kind}_s"] / 1e9
        rows.append(row)
    return rows


def time_batched_decompositions(d: int, count: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """`count` float64 eigh of random PSD d x d matrices one at a time and in one batched call (batched_eigh, as
    InfLoRA decomposes a task's groups), on `device`: seconds of each (best of 2), their ratio, and the largest
    difference of the results (eigenvalues, and eigenvector columns up to sign)."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(count):
        x = torch.randn(d, d + 8, generator=g, dtype=torch.float64)
        mats.append((x @ x.T / d).to(device))
    if device.type == "cuda":
        torch.linalg.eigh(mats[0][:8, :8])
    sequential = min(_timed(lambda: [torch.linalg.eigh(m) for m in mats], device) for _ in range(2))
    batched = min(_timed(lambda: stacked_eigh(mats), device) for _ in range(2))
    difference = 0.0
    for m, (w, v) in zip(mats, stacked_eigh(mats), strict=True):
        w1, v1 = torch.linalg.eigh(m)
        signs = torch.sign((v * v1).sum(0))
        difference = max(difference, float((w - w1).abs().max()), float((v - v1 * signs).abs().max()))
    return {"d": d, "count": count, "device": device.type, "sequential_s": sequential, "batched_s": batched,
            "batched_ratio": batched / sequential, "max_difference": difference}  # fmt: skip


def svd_projected(memory: SubspaceMemory, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected decomposition of a stored memory as it was before the eigh path: F @ svd(F^T C), F the
    free space's basis (in either mode). What the eigh path is timed and tested against."""
    basis = memory.basis.to(c.device)
    free = basis if memory.mode == RETAIN else complement_basis(basis)
    u, s, _ = torch.linalg.svd(free.T @ c, full_matrices=False)
    return free @ u, s


def _energy_rank(s: torch.Tensor, threshold: float) -> int:
    """Directions DualGPM keeps at `threshold` of the projected energy (the growth rule's count)."""
    energy = torch.cumsum(s.double() ** 2, 0)
    return int((energy / energy[-1] < threshold).sum()) + 1


def time_projected_decomposition(d: int, device: torch.device, seed: int = 0, rank: int = 10,
                                 threshold: float = 0.99) -> dict[str, Any]:  # fmt: skip
    """The projected decomposition of one d x d covariance with d/4 directions protected (remove mode), by
    the SVD path (before) and the eigh path (now), float64 on `device`: seconds of each, their ratio, and the
    largest principal angle between their top-`rank` (the A design) and energy-rule (the growth) subspaces."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, d + 8, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)[:, None]
    c = (x @ x.T / d).to(device)
    memory = SubspaceMemory(d, 0.95, 0.99, 2)
    old, _ = torch.linalg.qr(torch.randn(d, d // 4, generator=g, dtype=torch.float64))
    memory.load_state_dict({**memory.state_dict(), "mode": "remove", "basis": old})
    if device.type == "cuda":  # the first calls load cuSOLVER
        torch.linalg.eigh(c[:8, :8])
        torch.linalg.svd(c[:8, :8])
    results = {}
    for name, fn in (("old", lambda: svd_projected(memory, c)), ("new", lambda: memory._projected_svd(c))):
        synchronize(device)
        start = time.perf_counter()
        results[name] = fn()
        synchronize(device)
        results[f"{name}_s"] = time.perf_counter() - start
    (u_old, s_old), (u_new, s_new) = results["old"], results["new"]
    k_old, k_new = _energy_rank(s_old, threshold), _energy_rank(s_new, threshold)
    angle = max(principal_angle(u_old[:, :rank], u_new[:, :rank]), principal_angle(u_old[:, :k_old], u_new[:, :k_old]))
    return {
        "d": d,
        "device": device.type,
        "projected_decomp_s": {"svd": results["old_s"], "eigh": results["new_s"]},
        "projected_decomp_ratio": results["new_s"] / results["old_s"],
        "projected_decomp_angle": angle,
        "projected_decomp_k": {"svd": k_old, "eigh": k_new},
    }


# ---------------------------------------------------------------------- projection
def vit_b_imagenet_r() -> dict[str, Any]:
    """ViT-B/16 on ImageNet-R, 10 tasks (configs/paper/imagenet_r_10task*.yaml): k/v share one group per block."""
    return {
        "name": "ViT-B/16, ImageNet-R 10 tasks",
        "params": 86e6,
        "samples_per_task": 2400,  # 24,000 training images / 10 tasks
        "tokens_per_sample": 197,
        "epochs": 50,
        "dims": {f"blocks.{i}.kv": 768 for i in range(12)},
    }


def llama2_7b_long(tokens_per_sample: int, all_projections: bool = False,
                   covariance_max_tokens: int | None = None) -> dict[str, Any]:  # fmt: skip
    """LLaMA-2-7B on O-LoRA's long benchmark (configs/olora/llama2_7b_long.yaml): 15 tasks of 1,000 records.

    Branches on q and v, as O-LoRA and GainLoRA adapt LLaMA (32 groups: q and v read one input), or with
    `all_projections` on all seven projections (128 groups: the targets the comments of configs/olora/ give)."""
    dims = {}
    for i in range(32):
        if all_projections:
            dims.update({f"{i}.qkv": 4096, f"{i}.o": 4096, f"{i}.gate_up": 4096, f"{i}.down": 11008})
        else:
            dims[f"{i}.qv"] = 4096
    targets = "all projections" if all_projections else "q, v"
    cap = f", covariance passes capped at {covariance_max_tokens:,} tokens" if covariance_max_tokens else ""
    return {
        "name": f"LLaMA-2-7B, O-LoRA long (15 tasks), {targets}{cap}",
        "params": 6.74e9,
        "samples_per_task": 1000,
        "tokens_per_sample": tokens_per_sample,
        "epochs": 1,
        "dims": dims,
        "covariance_max_tokens": covariance_max_tokens,
    }


def measured_rate(workload: dict[str, Any], samples: int, seconds: float) -> float:
    """Flops per second of one GPU implied by a measured training step of `samples` samples of `workload`
    (4N per token, as `project` counts training)."""
    return 4 * workload["params"] * workload["tokens_per_sample"] * samples / seconds


def project(workload: dict[str, Any], args: argparse.Namespace, gpu_rate: float | None = None) -> dict[str, Any]:
    """Per-task seconds of training and of InfLoRA's overhead on args.nodes x args.gpus_per_node GPUs.

    training: epochs x tokens x 4N flops (forward 2N, backward 2N: the frozen
    weights need no weight gradients); covariance passes: 2 x tokens x (2N +
    sum over groups of 2 d^2, the hooks' x^T x) over at most the workload's
    covariance_max_tokens; both at `gpu_rate` flops per second per GPU (default
    tflops x mfu; `measured_rate` for the rate of a measured step). Reduction
    (owner mode): 2 passes of triangles (d(d+1)/2 + 1) x 8 bytes, (n-1)/n of them
    through each link at bus bandwidth. Decompositions: 2 per group (design,
    update), each one float64 eigh of at most d x d (the eigh path: the Gram
    matrix of the projected product is f x f, f <= d) at the measured
    `decomp_seconds`, spread over the ranks as `assign_owners` does (the slowest
    rank counts); a rank's m > 1 groups of one size take one stacked call of m
    x seconds x `batched_ratio` (1 when not measured: no gain assumed).
    """
    n = args.nodes * args.gpus_per_node
    rate = n * (gpu_rate or args.tflops * 1e12 * args.mfu)
    tokens = workload["samples_per_task"] * workload["tokens_per_sample"]
    pass_tokens = min(tokens, workload.get("covariance_max_tokens") or tokens)
    dims = workload["dims"]
    train_s = workload["epochs"] * tokens * 4 * workload["params"] / rate
    hook_flops = sum(2 * d * d for d in dims.values())
    passes_s = 2 * pass_tokens * (2 * workload["params"] + hook_flops) / rate
    traffic = sum(traffic_bytes(d, 8) for d in dims.values())
    reduce_s = 2 * traffic * (n - 1) / n / (args.bus_gbps * 1e9)
    owners = assign_owners(dims, n)
    calls: dict[tuple[int, int], int] = {}  # (rank, d) -> groups of size d the rank decomposes
    for g, d in dims.items():
        calls[owners[g], d] = calls.get((owners[g], d), 0) + 1
    load = [0.0] * n
    ratio = args.batched_ratio or 1.0
    for (rank, d), m in calls.items():
        load[rank] += 2 * m * eigh_seconds(d, args.decomp_seconds) * (ratio if m > 1 else 1.0)
    decomp_s = max(load)
    overhead = passes_s + reduce_s + decomp_s
    return {
        "workload": workload["name"],
        "gpus": n,
        "tflops_per_gpu": rate / n / 1e12,
        "train_s": train_s,
        "passes_s": passes_s,
        "reduce_s": reduce_s,
        "reduce_bytes_per_pass": traffic,
        "decompositions_s": decomp_s,
        "overhead_share": overhead / train_s,
    }


def gate_cost(workload: dict[str, Any], args: argparse.Namespace, global_batch: int = 32) -> dict[str, float]:
    """GainLoRA's gates on top of `workload` (methods/gainlora.py), per task on args.nodes x args.gpus_per_node GPUs.

    Per optimizer step: every task's gate forward (2 x 2 d h flops per sample; the new one's backward twice
    that, t = the planned tasks, 15), the all-reduce of the new gate's gradient (2 d h + d float32 values) and
    the projection of its update ((h x d)(d x d) + (d x h)(h x h) + (1 x d)(d x d) float64 products, on one GPU:
    every rank repeats it). After the task: the gate activations of a pass over its data (InfLoRA's update pass
    when that reads every token; with `covariance_max_tokens` a forward pass of its own, 2N per token) and three
    decompositions (d, h, d) of the gate subspaces. d is the model's width (the q/v groups' input dimension).
    """
    n = args.nodes * args.gpus_per_node
    rate = n * args.tflops * 1e12 * args.mfu
    d, h, tasks = next(iter(workload["dims"].values())), args.gate_hidden, 15
    tokens = workload["samples_per_task"] * workload["tokens_per_sample"]
    steps = math.ceil(workload["samples_per_task"] / global_batch) * workload["epochs"]
    gate_flops = global_batch * (tasks * 4 * d * h + 8 * d * h)  # all gates forward, the new one's backward
    allreduce_s = 2 * (2 * d * h + d) * 4 * (n - 1) / n / (args.bus_gbps * 1e9)
    projection_s = (2 * h * d * d + 2 * d * h * h + 2 * d * d) / (args.fp64_tflops * 1e12 * args.mfu)
    step_s = gate_flops / rate + allreduce_s + projection_s
    shared = not workload.get("covariance_max_tokens")  # the gates observe InfLoRA's uncapped update pass
    pass_s = 0.0 if shared else tokens * 2 * workload["params"] / rate
    decomp_s = 2 * eigh_seconds(d, args.decomp_seconds) + eigh_seconds(h, args.decomp_seconds)
    train_s = workload["epochs"] * tokens * 4 * workload["params"] / rate
    return {
        "workload": workload["name"],
        "gpus": n,
        "gate_hidden": h,
        "steps_per_task": steps,
        "gate_step_s": step_s,
        "gate_steps_s": step_s * steps,
        "gate_pass_s": pass_s,
        "gate_pass_shared": shared,
        "gate_decompositions_s": decomp_s,
        "train_s": train_s,
        "gate_share": (step_s * steps + pass_s + decomp_s) / train_s,
    }


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    figures: dict[str, Any] = {"worlds": measure_worlds(args)}
    device = torch.device(args.device)
    figures["decompositions"] = time_decompositions(args.dims, torch.device("cpu"))
    if device.type != "cpu":
        figures["decompositions"] += time_decompositions(args.dims, device)
    figures.update(time_projected_decomposition(args.projected_dim, device, seed=args.seed))
    figures["batched"] = [time_batched_decompositions(args.batched_dim, args.batched_count, torch.device("cpu"))]
    if device.type != "cpu":
        figures["batched"].append(time_batched_decompositions(args.batched_dim, args.batched_count, device))
    figures["precision"] = projector_errors(batches=args.precision_batches)
    workloads = [vit_b_imagenet_r(), llama2_7b_long(args.llm_tokens, covariance_max_tokens=args.covariance_max_tokens),
                 llama2_7b_long(args.llm_tokens, all_projections=True)]  # fmt: skip
    if args.batched_ratio is None and device.type != "cpu":
        args.batched_ratio = figures["batched"][-1]["batched_ratio"]  # this GPU's own stacked figure
    images, seconds = args.vit_step
    measured = {**workloads[0], "name": f"{workloads[0]['name']}, throughput of a measured step ({images} "
                f"images in {seconds:g} s per GPU)"}  # fmt: skip
    step_rate = measured_rate(measured, images, seconds)
    figures["projection"] = [project(workloads[0], args), project(measured, args, step_rate),
                             *(project(w, args) for w in workloads[1:])]  # fmt: skip
    figures["gainlora_gates"] = gate_cost(workloads[1], args)
    figures["projection_goals"] = {"vit_overhead_share": 0.03, "llama_overhead_share": 1.0}
    figures["assumptions"] = {
        k: getattr(args, k)
        for k in ("nodes", "gpus_per_node", "tflops", "mfu", "bus_gbps", "decomp_seconds", "batched_ratio", "vit_step")
    }
    widest = max(figures["worlds"], key=lambda r: r["world"])
    figures["reduce_bytes_ratio"] = widest["bucketed_reduce_bytes"] / widest["full_reduce_bytes"]
    figures["collectives_per_pass"] = widest["bucketed_collectives"]
    figures["collectives_expected"] = math.ceil(widest["bucketed_reduce_bytes"] / (args.bucket_mib * 2**20))
    figures["collectives_before"] = widest["full_collectives"]
    report(figures)
    if args.json:
        print(json.dumps(figures), flush=True)
    return figures


def report(f: dict[str, Any]) -> None:
    print("world  groups  pass s  step s  reduce s (full -> bucketed)  bytes (full -> bucketed)  collectives")
    for r in f["worlds"]:
        print(
            f"{r['world']:>5}  {r['groups']:>6}  {r['covariance_pass_s']:6.2f}  {r['step_s']:6.3f}  "
            f"{r['full_reduce_s']:8.4f} -> {r['bucketed_reduce_s']:8.4f}      "
            f"{r['full_reduce_bytes']:>10,} -> {r['bucketed_reduce_bytes']:>10,}  "
            f"{r['full_collectives']:>3} -> {r['bucketed_collectives']}"
        )
    print(
        f"reduce_bytes_ratio {f['reduce_bytes_ratio']:.4f} (goal <= {GOALS['reduce_bytes_ratio']}); "
        f"collectives_per_pass {f['collectives_per_pass']} (ceil(bytes / cap) = {f['collectives_expected']}; "
        f"before: {f['collectives_before']})"
    )
    print("\n     d  device  eigh s  svd s   eigh GFLOPS  svd GFLOPS (nominal 9 d^3 and 22 d^3)")
    for r in f["decompositions"]:
        print(
            f"{r['d']:>6}  {r['device']:>6}  {r['eigh_s']:6.3f}  {r['svd_s']:6.3f}  "
            f"{r['eigh_gflops']:10.1f}  {r['svd_gflops']:10.1f}"
        )
    print(
        f"\nprojected decomposition at d={f['d']} on {f['device']} (d/4 protected): svd path "
        f"{f['projected_decomp_s']['svd']:.3f} s, eigh path {f['projected_decomp_s']['eigh']:.3f} s, "
        f"projected_decomp_ratio {f['projected_decomp_ratio']:.3f} (goal <= 0.6); projected_decomp_angle "
        f"{f['projected_decomp_angle']:.1e} rad; k {f['projected_decomp_k']}"
    )
    for r in f["batched"]:
        print(
            f"{r['count']} eigh of d={r['d']} on {r['device']}: one at a time {r['sequential_s']:.3f} s, batched "
            f"{r['batched_s']:.3f} s, batched_ratio {r['batched_ratio']:.3f}; max difference {r['max_difference']:.1e}"
        )
    p = f["precision"]
    print(
        f"\nprojector error vs all-float64: fp32 GEMM + fp64 sum {p['fp32_gemm_fp64_sum']:.2e} "
        f"(goal <= {GOALS['precision_fp32_gemm_fp64_sum']:.0e}), all fp32 {p['fp32_all']:.2e}"
    )
    a = f["assumptions"]
    print(
        f"\nprojection on {a['nodes']} x {a['gpus_per_node']} GPUs ({a['tflops']} TFLOPS x MFU {a['mfu']}, "
        f"bus {a['bus_gbps']} GB/s, float64 eigh seconds by d {dict(a['decomp_seconds'])}, stacked eigh ratio "
        f"{a['batched_ratio'] or 'not measured: 1'}): per task"
    )
    for r in f["projection"]:
        print(
            f"  {r['workload']}: {r['tflops_per_gpu']:.1f} TFLOPS per GPU; training {r['train_s']:.1f} s; "
            f"passes {r['passes_s']:.2f} s, reduction "
            f"{r['reduce_s']:.2f} s ({r['reduce_bytes_per_pass'] / 1e9:.3f} GB/pass), decompositions "
            f"{r['decompositions_s']:.2f} s -> overhead {100 * r['overhead_share']:.1f}% of training"
        )
    g = f["gainlora_gates"]
    whose = "InfLoRA's update pass" if g["gate_pass_shared"] else "a pass of its own: InfLoRA's is capped"
    print(
        f"  GainLoRA's gates (hidden {g['gate_hidden']}) on {g['workload']}: {1e3 * g['gate_step_s']:.3f} ms per "
        f"step x {g['steps_per_task']} steps, gate pass {g['gate_pass_s']:.2f} s ({whose}), gate decompositions "
        f"{g['gate_decompositions_s']:.2f} s -> {100 * g['gate_share']:.1f}% of training"
    )
