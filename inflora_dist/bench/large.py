"""A large model on this machine: `python -m inflora_dist.bench large [--config C] [--worlds 1 2] [--json]`.

The config's causal LM (default configs/scale/tinyllama_1b.yaml, a TinyLlama-
shaped ~1.1B model; configs/scale/llama2_7b.yaml has LLaMA-2-7B's shapes, which
only fit here partitioned over 2 ranks) is built from its config in bf16 with
random weights, partitioned under ZeRO-3, and learns 2 (--tasks) small instruction tasks
that this command writes (16 records each: arithmetic answers and reversed
words), a few optimizer steps per task, as a real `launch/train.py` run at each
world size (torchrun for 2) on --device (default: cuda when available). It
records, from each run's metrics.json: every rank's resident memory after
training (ZeRO-3's partitioned state) and its peak (evaluation included), the
seconds of each phase (covariance passes, their reduction, subspace design
and update, training), the covariance plan and its bytes, and the float64
decomposition times of the adapted input groups' sizes (this process). On the
host, in bf16, it also times one MLP weight's forward and input gradient with
PyTorch's bf16 GEMM against `host_linear`'s float32 products, side by side. The
peak is compared with the weights' share of a rank, plus the covariance plan's
peak per rank, plus 3 GiB (`peak_budget_mb_per_rank`, its terms in
`budget_terms_mb`, `peak_within_budget`). A config whose covariance plan needs
more than --covariance-gib per rank (default 2: the 32 float64 q/v sums of
LLaMA-2-7B, upper triangles) is refused before any work: cap it with
`inflora.covariance_max_bytes_per_rank`, which splits the pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from inflora_dist.config import ModelConfig
from inflora_dist.data.build_shards import main as build_shards
from inflora_dist.dist import DEFAULT_BUCKET_BYTES, free_port
from inflora_dist.host_linear import HostFloat32Linear
from inflora_dist.inject import inject_inflora
from inflora_dist.models import DTYPES, count_model_parameters, meta_model
from inflora_dist.planner import plan_covariance

SUMMARY = "a 1.1B or 7B causal LM through 2 tasks under ZeRO-3 at each world size: memory and phases"
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "scale" / "tinyllama_1b.yaml"
PHASES = (
    "design_pass_s",
    "design_reduce_s",
    "subspace_design_s",
    "train_s",
    "update_pass_s",
    "update_reduce_s",
    "subspace_update_s",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--records", type=int, default=16, help="records per task (a quarter are held out)")
    p.add_argument("--tasks", type=int, default=2, choices=[1, 2], help="tasks of the run")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs in this directory (default: a temp dir)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="where the runs train (DeepSpeed's accelerator; default: cuda when available)",
    )
    p.add_argument(
        "--covariance-gib",
        type=float,
        default=2.0,
        help="the most covariance state a rank may plan for (GiB; default 2); a config over it is refused",
    )
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


#: Resident memory a rank may use beyond its share of the weights (issue 23's target).
HEADROOM_BYTES = 3 * 2**30


def write_tasks(root: Path, records: int, tasks: int = 2) -> Path:
    """The first `tasks` (1 or 2) of two JSONL tasks and their shards under `root`; returns the tasks.yaml path."""
    if tasks not in (1, 2):
        raise ValueError(f"tasks must be 1 or 2, got {tasks}")
    words = ["cat", "lamp", "river", "stone", "glass", "cloud", "paper", "tiger", "plant", "music", "honey", "chair"]
    rows_by_task = {
        "sums": [{"prompt": f"What is {a} + {a + 3}?", "response": str(2 * a + 3)} for a in range(records)],
        "reverse": [{"prompt": f"Reverse the word: {w}{i}", "response": f"{i}{w[::-1]}"} for i, w in
                    zip(range(records), words * (records // len(words) + 1), strict=False)],
    }  # fmt: skip
    files = []
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in list(rows_by_task.items())[:tasks]:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(path))
    build_shards(["jsonl", *files, "--out", str(root / "shards"), "--eval-fraction", "0.25", "--quiet"])
    return root / "shards" / "tasks.yaml"


def _command(world: int, config: Path, overrides: list[str]) -> list[str]:
    script = [str(REPO / "launch" / "train.py"), "--config", str(config), *overrides]
    if world == 1:
        return [sys.executable, *script]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nproc_per_node", str(world), "--master_port", str(free_port()), *script]


def run_world(world: int, config: Path, tasks: Path, out: Path, timeout: int, device: str = "cpu") -> dict[str, Any]:
    """One real training run; its phases and per-rank memory from metrics.json, and its wall time."""
    env = {**os.environ, "DS_ACCELERATOR": device, "WANDB_MODE": "disabled"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a host run must not pick up a GPU it sees (init_distributed would)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's built CPU ops
    # glibc otherwise raises its mmap threshold to 32 MB after the first large frees and keeps freed weight
    # copies in the heap: the resident figure would show the allocator, not ZeRO-3 (docs/scaling.md).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    args = _command(world, config, [f"output_dir={out}", f"data.tasks={tasks}", "resume=never"])
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    timings = metrics["timings"]
    peaks = zip(*(t["peak_rss_mb_per_rank"] for t in timings), strict=True)  # per rank, over the tasks
    return {
        "world": world,
        "wall_s": wall,
        "timings": timings,
        "avg_acc": metrics.get("avg_acc"),
        "peak_rss_mb_per_rank": [max(rank) for rank in peaks],
        "phases_s": {k: sum(t.get(k, 0.0) for t in timings) for k in PHASES},
    }


def _model_config(config: Path) -> ModelConfig:
    # The data does not exist yet: read the YAML's model fields, not a validated RunConfig.
    return ModelConfig(config=dict(OmegaConf.to_container(OmegaConf.load(config).model.config)))


def model_parameters(config: Path) -> int:
    """Parameters of the config's model, counted on the meta device (nothing allocated)."""
    return count_model_parameters(_model_config(config), AutoModelForCausalLM)


def group_dims(config: Path) -> dict[str, int]:
    """The input groups the config's targets form, and their sizes (injected into the model on the meta device)."""
    cfg = OmegaConf.load(config)  # the data does not exist yet: read the YAML, not a validated RunConfig
    layers = cfg.inflora.get("layers_to_transform")
    model = meta_model(_model_config(config), AutoModelForCausalLM)
    report = inject_inflora(model, list(cfg.inflora.targets), cfg.inflora.rank, 1,
                            layers_to_transform=list(layers) if layers is not None else None)  # fmt: skip
    return report.dims


def time_host_linear(d_in: int, d_out: int, tokens: int = 96, dtype: torch.dtype = torch.bfloat16
                     ) -> dict[str, float]:  # fmt: skip
    """GFLOPS of a frozen d_out x d_in linear layer's forward and input gradient on the host, one thread, with
    PyTorch's GEMM in `dtype` and with HostFloat32Linear's float32 products (one call each, after a small one).
    96 tokens: a micro-batch of 2 sequences of 48, as the 7B configs train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of the runs computes
    try:
        figures = {"d_in": d_in, "d_out": d_out, "tokens": tokens}
        for name, cls in (("native", torch.nn.Linear), ("float32_products", HostFloat32Linear)):
            for size in (8, d_in):  # the first size warms the kernels up
                layer = cls(size, size * d_out // d_in, bias=False, dtype=dtype).requires_grad_(False)
                x = torch.randn(tokens, size, dtype=dtype, requires_grad=True)
                start = time.perf_counter()
                y = layer(x)
                forward = time.perf_counter() - start
                start = time.perf_counter()
                y.backward(torch.ones_like(y))
                backward = time.perf_counter() - start
            flops = 2 * tokens * d_in * d_out
            figures[f"{name}_forward_gflops"] = flops / forward / 1e9
            figures[f"{name}_input_grad_gflops"] = flops / backward / 1e9
        return figures
    finally:
        torch.set_num_threads(threads)


def covariance_plans(config: Path, dims: dict[str, int], worlds: list[int], max_gib: float) -> dict[int, dict]:
    """The config's covariance plan at each world size, as its runs make it; raises ValueError, before any
    work, when one needs more than `max_gib` per rank."""
    inflora = OmegaConf.load(config).inflora
    budget = inflora.get("covariance_max_bytes_per_rank")
    plans = {}
    for w in worlds:
        plan = plan_covariance(
            dims, w, bytes_per_element=8, max_bytes_per_rank=budget, reduce=inflora.get("reduce", "all_reduce"),
            keep_results=budget is None, bucket_bytes=inflora.get("reduce_bucket_bytes", DEFAULT_BUCKET_BYTES),
        )  # fmt: skip
        if plan.peak_bytes > max_gib * 2**30:
            raise ValueError(
                f"{config}: its covariance plan needs {plan.peak_bytes / 2**20:,.0f} MiB per rank at world {w} "
                f"({len(dims)} input groups in {plan.num_passes} pass(es)), over the {max_gib:g} GiB allowed "
                f"(--covariance-gib); set inflora.covariance_max_bytes_per_rank to split the pass"
            )
        plans[w] = {"passes": plan.passes, "peak_bytes_per_rank": plan.peak_bytes_per_rank,
                    "peak_bytes": plan.peak_bytes, "sum_bytes": plan.total_sum_bytes(),
                    "describe": plan.describe()}  # fmt: skip
    return plans


def run_large(worlds: list[int] | None = None, config: Path = CONFIG, records: int = 16, timeout: int = 3600,
              keep: Path | None = None, device: str = "cpu", covariance_gib: float = 2.0,
              tasks: int = 2) -> dict[str, Any]:  # fmt: skip
    """Run the config at each world size; return the figures (see the module docstring)."""
    from inflora_dist.bench.scale import time_decompositions

    worlds = worlds or [1, 2]
    cfg = OmegaConf.load(config)
    dims = group_dims(config)
    parameters = model_parameters(config)
    dtype = DTYPES[cfg.model.get("dtype", "float32")]
    weights = parameters * dtype.itemsize
    figures: dict[str, Any] = {
        "parameters": parameters,
        "weights_bytes": weights,
        "groups": dims,
        "device": device,
        "records": records,
        "tasks": tasks,
    }
    figures["plans"] = covariance_plans(config, dims, worlds, covariance_gib)
    figures["decompositions"] = time_decompositions(sorted(set(dims.values())), torch.device(device))
    if device == "cpu" and dtype == torch.bfloat16:
        widths = cfg.model.config
        figures["host_linear"] = time_host_linear(widths.hidden_size, widths.intermediate_size, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="inflora-large-") as tmp:
        root = (keep or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        sequence = write_tasks(root / "data", records, tasks)
        figures["runs"] = [run_world(w, config, sequence, root / f"world{w}", timeout, device) for w in worlds]
    for run in figures["runs"]:
        # ZeRO-3 keeps a 1/world share of the weights on each rank; other stages all of them.
        share = weights // run["world"] if cfg.deepspeed.get("zero_stage") == 3 else weights
        terms = {"weights_share": share, "covariance_plan": figures["plans"][run["world"]]["peak_bytes"],
                 "headroom": HEADROOM_BYTES}  # fmt: skip
        run["budget_terms_mb"] = {k: v / 2**20 for k, v in terms.items()}
        run["peak_budget_mb_per_rank"] = sum(terms.values()) / 2**20
        run["peak_within_budget"] = max(run["peak_rss_mb_per_rank"]) <= run["peak_budget_mb_per_rank"]
    return figures


def report(f: dict[str, Any]) -> None:
    print(f"\nlarge model: {f['parameters'] / 1e9:.3f}B parameters ({f['weights_bytes'] / 2**30:.2f} GiB of "
          f"weights), {len(f['groups'])} input groups, on {f['device']}")  # fmt: skip
    for w, plan in f["plans"].items():
        print(f"covariance plan at world {w}:\n{plan['describe']}")
    for r in f["decompositions"]:
        print(f"  decomposition d={r['d']}: eigh {r['eigh_s']:.2f} s, svd {r['svd_s']:.2f} s (float64, host)")
    if "host_linear" in f:
        h = f["host_linear"]
        print(f"  host linear {h['d_out']} x {h['d_in']}, {h['tokens']} tokens, one thread (GFLOPS): bf16 GEMM forward "
              f"{h['native_forward_gflops']:.2f}, input gradient {h['native_input_grad_gflops']:.2f}; float32 "
              f"products forward {h['float32_products_forward_gflops']:.2f}, input gradient "
              f"{h['float32_products_input_grad_gflops']:.2f}")  # fmt: skip
    for run in f["runs"]:
        peak = max(run["peak_rss_mb_per_rank"]) / 1024
        terms = " + ".join(f"{k} {v / 1024:.2f}" for k, v in run["budget_terms_mb"].items())
        verdict = (
            "met"
            if run["peak_within_budget"]
            else "MISSED, largest term " + max(run["budget_terms_mb"], key=run["budget_terms_mb"].get)
        )
        print(
            f"world {run['world']}: {run['wall_s']:.0f} s in all; peak resident {peak:.2f} GiB per rank (budget "
            f"{run['peak_budget_mb_per_rank'] / 1024:.2f} = {terms}: {verdict})"
        )
        for t, timing in enumerate(run["timings"]):
            phases = ", ".join(f"{k.removesuffix('_s')} {timing.get(k, 0.0):.1f}" for k in PHASES)
            rss = ", ".join(f"{x / 1024:.2f}" for x in timing["rss_mb_per_rank"])
            peak = ", ".join(f"{x / 1024:.2f}" for x in timing["peak_rss_mb_per_rank"])
            print(f"  task {t}: {phases} s; resident GiB per rank after training {rss}; peak {peak}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures = run_large(args.worlds, args.config, args.records, args.timeout, args.keep, args.device,
                        args.covariance_gib, args.tasks)  # fmt: skip
    report(figures)
    if args.json:
        print(json.dumps(figures, default=str), flush=True)
    return figures
