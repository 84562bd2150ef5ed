"""A measured scaling model of InfLoRA's per-task overhead: `python -m inflora_dist.bench scale [--json]`.

Measured on this machine, side by side in one run:

  * worlds 1..4 (real gloo processes on loopback, one thread each): a ViT-B-shaped
    model (transformers ViTModel from a config) with InfLoRA on k/v; each rank
    runs the covariance pass over its share of the same images, then the
    reduction twice on the same sums: bucketed upper triangles (ours) and one
    full-matrix all-reduce per group plus one for the counts (before) -- bytes,
    collectives and seconds of each; and a training step (forward, backward,
    all-reduce of B's gradients) on the rank's share of the batch;
  * the float64 decompositions of a d x d covariance (eigh, the task-0 and
    symmetric path; svd, the projected products) for each --dims, on the host
    and, when one is present, on the GPU;
  * the precision of the sums (bench/precision.py): float32 per-batch products
    summed in float64 against an all-float32 sum, on massive activations.

It then projects InfLoRA's per-task overhead (two covariance passes, two
reductions, two decompositions per input group) as a share of the task's
training time for ViT-B/16 on ImageNet-R and LLaMA-2-7B on O-LoRA's long
benchmark on --nodes x --gpus-per-node GPUs, from assumed device figures that
are flags (dense bf16 TFLOPS and MFU, NCCL bus bandwidth, float64 decomposition
rate). docs/scaling.md explains the model. The billion-parameter run is its
own command, `bench large`.

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
from inflora_dist.bench.step import build_vit, covariance_batch, forward, make_batches
from inflora_dist.continual import InfLoRA
from inflora_dist.covariance import assign_owners, traffic_bytes
from inflora_dist.inject import inject_inflora

SUMMARY = "covariance traffic, decompositions and step per world size, and a projection to 8 x 8 GPUs"
GOALS = {"reduce_bytes_ratio": 0.51, "precision_fp32_gemm_fp64_sum": 1e-6}
#: Nominal float64 flop counts of the decompositions with vectors (for the effective rates printed).
FLOPS_PER_D3 = {"eigh": 9.0, "svd": 22.0}


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
    # Projection inputs: assumptions a user replaces with their cluster's figures.
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=989.0, help="dense bf16 TFLOPS per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of training and passes")
    p.add_argument("--bus-gbps", type=float, default=100.0, help="NCCL all-reduce bus bandwidth, GB/s")
    p.add_argument("--decomp-tflops", type=float, default=5.0, help="effective float64 eigh/svd rate per GPU")
    p.add_argument("--llm-tokens", type=int, default=256, help="mean tokens per O-LoRA long record (assumed)")
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_decompositions(dims: list[int], device: torch.device, seed: int = 0) -> list[dict[str, float]]:
    """Seconds of float64 eigh and svd (with vectors) of a random PSD d x d matrix, per d, on `device`."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for d in dims:
        x = torch.randn(d, d + 8, generator=g, dtype=torch.float64)
        c = (x @ x.T / d).to(device)
        if device.type == "cuda":  # the first call loads cuSOLVER
            torch.linalg.eigh(c[:8, :8])
        row = {"d": d, "device": device.type}
        row["eigh_s"] = _timed(lambda c=c: torch.linalg.eigh(c), device)
        row["svd_s"] = _timed(lambda c=c: torch.linalg.svd(c, full_matrices=False), device)
        for kind in ("eigh", "svd"):
            row[f"{kind}_gflops"] = FLOPS_PER_D3[kind] * d**3 / row[f"{kind}_s"] / 1e9
        rows.append(row)
    return rows


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


def llama2_7b_long(tokens_per_sample: int) -> dict[str, Any]:
    """LLaMA-2-7B on O-LoRA's long benchmark (configs/olora/llama2_7b_long.yaml): 15 tasks of 1,000 records."""
    dims = {}
    for i in range(32):
        dims.update({f"{i}.qkv": 4096, f"{i}.o": 4096, f"{i}.gate_up": 4096, f"{i}.down": 11008})
    return {
        "name": "LLaMA-2-7B, O-LoRA long (15 tasks)",
        "params": 6.74e9,
        "samples_per_task": 1000,
        "tokens_per_sample": tokens_per_sample,
        "epochs": 1,
        "dims": dims,
    }


def project(workload: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Per-task seconds of training and of InfLoRA's overhead on args.nodes x args.gpus_per_node GPUs.

    training: epochs x tokens x 4N flops (forward 2N, backward 2N: the frozen
    weights need no weight gradients); covariance passes: 2 x tokens x (2N +
    sum over groups of 2 d^2, the hooks' x^T x); both at tflops x mfu over all
    GPUs. Reduction (owner mode): 2 passes of triangles (d(d+1)/2 + 1) x 8 bytes,
    (n-1)/n of them through each link at bus bandwidth. Decompositions: 2 per
    group (design, update), 22 d^3 flops (svd, the worst case) at decomp_tflops,
    spread over the ranks as `assign_owners` does (the slowest rank counts).
    """
    n = args.nodes * args.gpus_per_node
    rate = n * args.tflops * 1e12 * args.mfu
    tokens = workload["samples_per_task"] * workload["tokens_per_sample"]
    dims = workload["dims"]
    train_s = workload["epochs"] * tokens * 4 * workload["params"] / rate
    hook_flops = sum(2 * d * d for d in dims.values())
    passes_s = 2 * tokens * (2 * workload["params"] + hook_flops) / rate
    traffic = sum(traffic_bytes(d, 8) for d in dims.values())
    reduce_s = 2 * traffic * (n - 1) / n / (args.bus_gbps * 1e9)
    owners = assign_owners(dims, n)
    load = [0.0] * n
    for g, d in dims.items():
        load[owners[g]] += 2 * FLOPS_PER_D3["svd"] * d**3 / (args.decomp_tflops * 1e12)
    decomp_s = max(load)
    overhead = passes_s + reduce_s + decomp_s
    return {
        "workload": workload["name"],
        "gpus": n,
        "train_s": train_s,
        "passes_s": passes_s,
        "reduce_s": reduce_s,
        "reduce_bytes_per_pass": traffic,
        "decompositions_s": decomp_s,
        "overhead_share": overhead / train_s,
    }


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    figures: dict[str, Any] = {"worlds": measure_worlds(args)}
    figures["decompositions"] = time_decompositions(args.dims, torch.device("cpu"))
    if torch.cuda.is_available():
        figures["decompositions"] += time_decompositions(args.dims, torch.device("cuda"))
    figures["precision"] = projector_errors(batches=args.precision_batches)
    figures["projection"] = [project(vit_b_imagenet_r(), args), project(llama2_7b_long(args.llm_tokens), args)]
    figures["assumptions"] = {
        k: getattr(args, k) for k in ("nodes", "gpus_per_node", "tflops", "mfu", "bus_gbps", "decomp_tflops")
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
    p = f["precision"]
    print(
        f"\nprojector error vs all-float64: fp32 GEMM + fp64 sum {p['fp32_gemm_fp64_sum']:.2e} "
        f"(goal <= {GOALS['precision_fp32_gemm_fp64_sum']:.0e}), all fp32 {p['fp32_all']:.2e}"
    )
    a = f["assumptions"]
    print(
        f"\nprojection on {a['nodes']} x {a['gpus_per_node']} GPUs ({a['tflops']} TFLOPS x MFU {a['mfu']}, "
        f"bus {a['bus_gbps']} GB/s, decompositions {a['decomp_tflops']} TFLOPS float64): per task"
    )
    for r in f["projection"]:
        print(
            f"  {r['workload']}: training {r['train_s']:.1f} s; passes {r['passes_s']:.2f} s, reduction "
            f"{r['reduce_s']:.2f} s ({r['reduce_bytes_per_pass'] / 1e9:.3f} GB/pass), decompositions "
            f"{r['decompositions_s']:.2f} s -> overhead {100 * r['overhead_share']:.1f}% of training"
        )
