"""One GPU node's figures in one command: `python -m inflora_dist.bench gpu [--json]`.

Measures on one GPU, each section printed as soon as it is done (meant to take at most 8 minutes in all;
not yet timed on a GPU):

  * vit_fp32, vit_bf16: the training step of InfLoRA (task 0 started after a
    real covariance pass) against PEFT LoRA, and the covariance pass against a
    plain no-grad forward, at ViT-B/16 224 px, batch 64, rank 10 on k/v (the
    functions of `bench step`); bf16 as a user's bf16 run has it:
    `model.dtype: bfloat16` (bf16 base weights, fp32 adapters: InfLoRA's
    adapter dtype and PEFT's default autocast_adapter_dtype), not autocast;
  * llm_bf16: the same at a TinyLlama-shaped 1.1B causal LM (hidden 2048, 22
    layers, 32 heads / 4 KV heads, MLP 5632, vocabulary 32,000; random weights
    from a config), bf16 base, rank 8 on q/v, 8 sequences of 512 tokens, the
    step's loss the next-token loss;
  * eigh: float64 decompositions on the device (`bench scale`'s functions):
    eigh and svd at d = 768 and 4096, eigh alone at 11008 (its svd takes over
    30 s there), and 24 eigh of d = 768 one at a time against one batched call;
  * llama7b_zero3: LLaMA-2-7B's shapes with q/v of all 32 blocks adapted
    (configs/scale/llama2_7b_qv_all.yaml) built partitioned under ZeRO-3 at
    world 1 and trained one optimizer step on one
    task of 4 records, a real `launch/train.py` run as `bench large` makes it:
    its phases, wall time, and peak device memory (metrics.json's
    peak_device_mb_per_rank) and host memory.

Then one line of JSON with every figure (--json), the device's name, torch's
version and the wall time. A section that fails is recorded in `errors`
(section: message) and the others still run. Ratios are InfLoRA / baseline.

    python -m inflora_dist.bench gpu --json                         # a GPU node
    python -m inflora_dist.bench gpu --device cpu --small --json    # the same code paths at toy sizes (a test)

Without a CUDA device (and without --device cpu) it stops before any work. On a
lent GPU machine the wheels and environment are set up as ../shared/gpu/README.md
says; the 7B run needs the tokenizer files of assets/smollm2-135m-instruct (not
its weights): carry them and pass --tokenizer DIR.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from inflora_dist.bench.large import model_parameters, run_world, write_tasks
from inflora_dist.bench.scale import time_batched_decompositions, time_decompositions
from inflora_dist.bench.step import (
    build_vit,
    make_batches,
    peak_step_memory,
    peft_lora,
    time_covariance_pass,
    time_interleaved,
    train_step_fn,
)
from inflora_dist.errors import UserError
from inflora_dist.inject import count_parameters

SUMMARY = "one GPU node: InfLoRA vs PEFT steps (ViT-B/16 fp32/bf16, 1.1B LM bf16), eigh, a 7B ZeRO-3 step"
REPO = Path(__file__).resolve().parents[2]
SEVEN_B = REPO / "configs" / "scale" / "llama2_7b_qv_all.yaml"
SECTIONS = ("vit_fp32", "vit_bf16", "llm_bf16", "eigh", "llama7b_zero3")
#: Records per task of the 7B run: with an eval fraction of 0.25, 4 train records, one step at global batch 4.
RECORDS = 5


class NoCudaDevice(UserError, RuntimeError):
    """`bench gpu` was asked for a GPU where torch sees none."""


@dataclass(frozen=True)
class Sizes:
    """Every size of a run: the full one for a GPU node, or a toy one for the host (--small)."""

    vit: dict[str, Any]
    llm: dict[str, Any]
    eigh_dims: tuple[int, ...]
    svd_max_d: int  # above it eigh alone: svd at d = 11008 takes over 30 s on an H200
    batched: tuple[int, int]  # (d, count)
    timing: dict[str, int]  # warmup, steps, repeats of time_interleaved
    llama7b: dict[str, Any] = field(default_factory=dict)  # model.config overrides of SEVEN_B
    batches: int = 4  # distinct batches the timed rounds cycle through


FULL = Sizes(
    vit={"hidden": 768, "layers": 12, "image_size": 224, "patch_size": 16, "batch_size": 64, "rank": 10,
         "targets": ["k_proj", "v_proj"]},
    llm={"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab_size": 32000,
         "seq_len": 512, "batch_size": 8, "rank": 8, "targets": ["q_proj", "v_proj"]},
    eigh_dims=(768, 4096, 11008),
    svd_max_d=4096,
    batched=(768, 24),
    timing={"warmup": 2, "steps": 6, "repeats": 2},
)  # fmt: skip
SMALL = Sizes(
    vit={**FULL.vit, "hidden": 64, "layers": 2, "image_size": 32, "batch_size": 4},
    llm={**FULL.llm, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab_size": 256,
         "seq_len": 16, "batch_size": 4},
    eigh_dims=(32, 64, 96),
    svd_max_d=64,
    batched=(32, 8),
    timing={"warmup": 1, "steps": 2, "repeats": 1},
    llama7b={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4},
    batches=2,
)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where everything runs (default: cuda; cpu only with --small makes sense)")  # fmt: skip
    p.add_argument("--small", action="store_true", help="toy sizes: the same code paths in seconds (a test)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory of the 7B run (default: the config's)")  # fmt: skip
    p.add_argument("--timeout", type=int, default=300, help="seconds the 7B run may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


def check_device(name: str) -> torch.device:
    """The device to measure on; NoCudaDevice (one line) when CUDA is asked for and torch has none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise NoCudaDevice(
            f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
            "`bench gpu --device cpu --small` runs the same code paths on the host"
        )
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the host CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------- steps
def build_llama(ns: argparse.Namespace) -> nn.Module:
    """A randomly initialised LLaMA causal LM from a config, built on ns.device in ns.dtype (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(ns.seed)
    cfg = LlamaConfig(
        hidden_size=ns.hidden,
        intermediate_size=ns.intermediate,
        num_hidden_layers=ns.layers,
        num_attention_heads=ns.heads,
        num_key_value_heads=ns.kv_heads,
        vocab_size=ns.vocab_size,
        max_position_embeddings=max(2048, ns.seq_len),
        tie_word_embeddings=False,
    )
    with torch.device(ns.device):  # the weights are drawn where they run (1.1B on the host would take a while)
        return AutoModelForCausalLM.from_config(cfg, dtype=ns.dtype)


def build_vit_in(ns: argparse.Namespace) -> nn.Module:
    """`bench step`'s ViT on ns.device in ns.dtype (a bf16 base: model.dtype bfloat16)."""
    return build_vit(ns).to(device=ns.device, dtype=ns.dtype)


def measure_pair(build: Callable[[argparse.Namespace], nn.Module], ns: argparse.Namespace) -> dict[str, Any]:
    """InfLoRA's step against PEFT LoRA's and its covariance pass against a plain forward on the model `build`
    makes from `ns` (bench step's functions), with each step's peak device memory (None on the host)."""
    device = torch.device(ns.device)
    base = build(ns)
    batches = make_batches(ns, ns.batches, seed=ns.seed, device=device)
    if ns.dtype != torch.float32:  # pixels in the weights' dtype (token ids stay integers)
        batches = [b.to(ns.dtype) if b.is_floating_point() else b for b in batches]

    def batch(i: int) -> torch.Tensor:
        return batches[i % len(batches)]

    cov, model, _ = time_covariance_pass(base, ns, batch, device)
    models = {"inflora": model, "peft": peft_lora(base, ns)}
    del base
    steps = {name: train_step_fn(m.train()) for name, m in models.items()}
    step = time_interleaved({name: (lambda i, fn=fn: fn(batch(i))) for name, fn in steps.items()},
                            ns.warmup, ns.steps, ns.repeats, device)  # fmt: skip
    return {
        "inflora_step_s": step["inflora"],
        "peft_step_s": step["peft"],
        "step_ratio": step["inflora"] / step["peft"],
        "cov_pass_s": cov["covariance"],
        "plain_forward_s": cov["plain"],
        "cov_pass_ratio": cov["covariance"] / cov["plain"],
        "peak_step_memory_mb": {name: peak_step_memory(fn, batch(0)) for name, fn in steps.items()},
        "trainable_params": {name: count_parameters(m)[0] for name, m in models.items()},
        "config": {**vars(ns), "device": device.type, "dtype": str(ns.dtype).removeprefix("torch.")},
    }


def namespace(sizes: Sizes, kind: str, dtype: torch.dtype, device: torch.device, seed: int) -> argparse.Namespace:
    """The arguments `bench step`'s functions read, at `sizes`' ViT ("vit") or causal LM ("llm")."""
    shape = sizes.vit if kind == "vit" else sizes.llm
    defaults = {"heads": None, "intermediate": None}  # the ViT's: hidden // 64 heads, a 4 x hidden MLP
    return argparse.Namespace(**{**defaults, **shape}, **sizes.timing, batches=sizes.batches, seed=seed,
                              device=str(device), dtype=dtype)  # fmt: skip


def report_pair(name: str, f: dict[str, Any]) -> None:
    c = f["config"]
    shape = f"{c['image_size']}px/{c['patch_size']}" if "image_size" in c else f"{c['seq_len']} tokens"
    print(f"{name}: hidden {c['hidden']}, {c['layers']} layers, {shape} x {c['batch_size']}, {c['dtype']}, rank "
          f"{c['rank']} on {'+'.join(c['targets'])}; median of {c['steps']} after {c['warmup']} warm-up, best of "
          f"{c['repeats']}")  # fmt: skip
    peaks = f["peak_step_memory_mb"]
    memory = "n/a (host)" if None in peaks.values() else ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items())
    print(f"  step: InfLoRA {f['inflora_step_s']:.4f} s, PEFT LoRA {f['peft_step_s']:.4f} s, "
          f"ratio {f['step_ratio']:.3f}; peak step memory {memory}")  # fmt: skip
    print(f"  covariance pass {f['cov_pass_s']:.4f} s / batch, plain forward {f['plain_forward_s']:.4f} s, "
          f"ratio {f['cov_pass_ratio']:.3f}", flush=True)  # fmt: skip


# ---------------------------------------------------------------------- eigh
def measure_eigh(sizes: Sizes, device: torch.device, seed: int) -> dict[str, Any]:
    """float64 eigh (and svd up to sizes.svd_max_d) per d, and one batched eigh against one at a time, on the
    device. Above svd_max_d one matrix through time_batched_decompositions: eigh alone, best of 2."""
    rows = time_decompositions([d for d in sizes.eigh_dims if d <= sizes.svd_max_d], device, seed)
    for d in (d for d in sizes.eigh_dims if d > sizes.svd_max_d):
        alone = time_batched_decompositions(d, 1, device, seed)
        rows.append({"d": d, "device": device.type, "eigh_s": alone["sequential_s"], "svd_s": None})
    return {"decompositions": rows, "batched": time_batched_decompositions(*sizes.batched, device, seed)}


def report_eigh(f: dict[str, Any]) -> None:
    for r in f["decompositions"]:
        svd = "not timed" if r["svd_s"] is None else f"{r['svd_s']:.3f} s"
        print(f"eigh: d={r['d']} float64 on {r['device']}: eigh {r['eigh_s']:.3f} s, svd {svd}")
    b = f["batched"]
    print(f"eigh: {b['count']} of d={b['d']}: one at a time {b['sequential_s']:.3f} s, batched {b['batched_s']:.3f} s, "
          f"ratio {b['batched_ratio']:.3f}; max difference {b['max_difference']:.1e}", flush=True)  # fmt: skip


# ---------------------------------------------------------------------- 7B
def measure_llama7b(sizes: Sizes, device: torch.device, tokenizer: Path | None, timeout: int) -> dict[str, Any]:
    """configs/scale/llama2_7b_qv_all.yaml (its model at sizes.llama7b) at world 1 under ZeRO-3 on one task of
    4 training records: one optimizer step, a real launch/train.py run (bench large's run_world)."""
    cfg = OmegaConf.load(SEVEN_B)
    if sizes.llama7b:
        cfg = OmegaConf.merge(cfg, {"model": {"config": sizes.llama7b}})
    if tokenizer is not None:
        cfg.model.tokenizer = str(tokenizer.resolve())
    with tempfile.TemporaryDirectory(prefix="inflora-gpu-") as tmp:
        root = Path(tmp)
        config = root / "llama2_7b.yaml"
        OmegaConf.save(cfg, config)
        one_task = write_tasks(root / "data", RECORDS, tasks=1)  # one covariance pass, one step, one update pass
        run = run_world(1, config, one_task, root / "run", timeout, device.type)
        parameters = model_parameters(config)
    (timing,) = run["timings"]
    device_peak = timing.get("peak_device_mb_per_rank")
    return {
        "parameters": parameters,
        "wall_s": run["wall_s"],
        "phases_s": run["phases_s"],
        "peak_device_mb": device_peak[0] if device_peak else None,
        "peak_rss_mb": run["peak_rss_mb_per_rank"][0],
        "zero_stage": cfg.deepspeed.zero_stage,
        "model": dict(OmegaConf.to_container(cfg.model.config)),
    }


def report_llama7b(f: dict[str, Any]) -> None:
    peak = "n/a (host)" if f["peak_device_mb"] is None else f"{f['peak_device_mb'] / 1024:.2f} GiB"
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in f["phases_s"].items())
    print(f"llama7b_zero3: {f['parameters'] / 1e9:.2f}B parameters, world 1, ZeRO-{f['zero_stage']}, one step: "
          f"{f['wall_s']:.1f} s in all, start, construction, evaluation and checkpoint included ({phases} s); "
          f"peak device memory {peak}, peak resident {f['peak_rss_mb'] / 1024:.2f} GiB", flush=True)  # fmt: skip


# ---------------------------------------------------------------------- main
def run_section(figures: dict[str, Any], name: str, measure: Callable[[], dict[str, Any]],
                report: Callable[[dict[str, Any]], None]) -> None:  # fmt: skip
    """figures[name] = measure(), printed by `report`; an exception is recorded in figures["errors"][name] and
    printed instead (one failure must not cost a lent GPU's other figures). The device's cache is emptied after."""
    start = time.perf_counter()
    try:
        result = measure()
        result["section_s"] = time.perf_counter() - start
        figures[name] = result
        report(result)
    except Exception as err:  # recorded; the other sections still run
        message = f"{type(err).__name__}: {err}"
        figures["errors"][name] = message[-4000:]
        print(f"{name}: FAILED after {time.perf_counter() - start:.1f} s: {message}", flush=True)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory back: the 7B run is another process


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every section of args.sections and print them; returns the figures."""
    device = check_device(args.device)  # before any work
    started = time.perf_counter()
    sizes = SMALL if args.small else FULL
    figures: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "small": args.small,
        "errors": {},
    }
    print(f"bench gpu on {figures['device_name']} ({device.type}), torch {torch.__version__}"
          f"{', toy sizes' if args.small else ''}", flush=True)  # fmt: skip
    measures: dict[str, Callable[[], dict[str, Any]]] = {
        "vit_fp32": lambda: measure_pair(build_vit_in, namespace(sizes, "vit", torch.float32, device, args.seed)),
        "vit_bf16": lambda: measure_pair(build_vit_in, namespace(sizes, "vit", torch.bfloat16, device, args.seed)),
        "llm_bf16": lambda: measure_pair(build_llama, namespace(sizes, "llm", torch.bfloat16, device, args.seed)),
        "eigh": lambda: measure_eigh(sizes, device, args.seed),
        "llama7b_zero3": lambda: measure_llama7b(sizes, device, args.tokenizer, args.timeout),
    }
    reports: dict[str, Callable[[dict[str, Any]], None]] = {
        "eigh": report_eigh, "llama7b_zero3": report_llama7b,
    }  # fmt: skip
    for name in (s for s in SECTIONS if s in args.sections):
        run_section(figures, name, measures[name], reports.get(name, lambda f, name=name: report_pair(name, f)))
    figures["wall_s"] = time.perf_counter() - started
    failed = ", ".join(figures["errors"]) or "none"
    print(f"bench gpu: {figures['wall_s']:.1f} s in all; failed sections: {failed}", flush=True)
    if args.json:
        print(json.dumps(figures, default=str), flush=True)
    return figures
