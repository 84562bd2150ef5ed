"""Training-step and covariance-pass cost of InfLoRA against a plain PEFT LoRA, side by side in one run.

    python -m inflora_dist.bench step [--hidden 384] [--layers 12] [--image-size 112] [--rank 10] [--json]

One ViT (transformers ViTModel built from a config, no download; ViT-S/16-like
by default at a small image size), the same targets (k_proj, v_proj: the
paper's) and rank in every arm, fp32 on --device (default: cuda when available;
timings after torch.cuda.synchronize()):

  * step: forward + backward + torch.optim.Adam step on the trainable tensors of
      - InfLoRA at task 1 (one task started after a real covariance pass),
      - InfLoRA at task 10 (num_tasks=11; tasks 0..9 run through
        on_task_start/on_task_end with fold="merge", each B given random values
        before it is finished, then task 10 started),
      - PEFT LoRA (get_peft_model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0)),
    the baseline of both InfLoRA figures;
  * activation checkpointing (train.gradient_checkpointing): InfLoRA at task 1
    with transformers' non-reentrant checkpointing, against the same model
    without it: the step's time (checkpointing_step_ratio) and the bytes of
    activations the forward saves for the backward (checkpointing_memory_ratio;
    on a GPU also each arm's peak allocated memory);
  * covariance pass: a no-grad forward of the InfLoRA model with the collector
    capturing and a per-row token mask (as the training loop runs it), against
    a plain no-grad forward of the un-injected model, over the same batches.

The arms' measurements alternate step by step (the order flips every step),
after --warmup untimed rounds; each figure is the median over --steps timed
rounds, best of --repeats. Ratios are InfLoRA / baseline (lower is better);
goals: step ratio <= 1.05 at task 1 and at task 10, covariance-pass ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from inflora_dist.continual import InfLoRA
from inflora_dist.inject import count_parameters, inject_inflora
from inflora_dist.layer import MERGED, TRAINING
from inflora_dist.models import enable_activation_checkpointing

SUMMARY = "training-step and covariance-pass time of InfLoRA vs a plain PEFT LoRA"
GOALS = {"step_ratio_task1": 1.05, "step_ratio_task10": 1.05, "cov_pass_ratio": 1.3}
FOLDED_TASKS = 10
LAMBDA_BEGIN, LAMBDA_END = 0.95, 0.99
SETUP_IMAGES = 4  # images per covariance pass while folding the tasks before task 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=384, help="ViT hidden size (default: ViT-S)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden // 64, at least 1)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 4 * hidden)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="distinct batches the steps and passes cycle through")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--targets", nargs="+", default=["k_proj", "v_proj"], help="target modules (PEFT-style)")
    p.add_argument("--steps", type=int, default=6, help="timed rounds per repeat (one step or batch per arm)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--repeats", type=int, default=2, help="best of this many medians")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models run (default: cuda when available)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


# ---------------------------------------------------------------------- model
def build_vit(args: argparse.Namespace) -> nn.Module:
    """A randomly initialised ViTModel from a config (no pooler: the step reads last_hidden_state)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(args.seed)
    cfg = ViTConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads or max(1, args.hidden // 64),
        intermediate_size=args.intermediate or 4 * args.hidden,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
    )
    return ViTModel(cfg, add_pooling_layer=False)


def make_batches(args: argparse.Namespace, n: int, seed: int, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """`n` random batches: images (batch, 3, size, size), or token ids (batch, seq_len) when `args` has a
    `seq_len` (a causal LM's: ids below args.vocab_size)."""
    g = torch.Generator().manual_seed(seed)
    if getattr(args, "seq_len", None):
        shape = (args.batch_size, args.seq_len)
        return [torch.randint(args.vocab_size, shape, generator=g).to(device) for _ in range(n)]
    return [torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device) for _ in range(n)]


def forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What a step's loss is made of: a ViT's last hidden state from pixels, or a causal LM's next-token loss
    from token ids (integer inputs)."""
    if inputs.is_floating_point():
        return model(pixel_values=inputs).last_hidden_state
    return model(input_ids=inputs, labels=inputs).loss


def covariance_batch(model: nn.Module, inflora: InfLoRA, pixels: torch.Tensor) -> None:
    """One batch of a covariance pass, as the training loop runs it: capturing, with a per-row mask."""
    collector = inflora.collector
    with torch.no_grad(), collector.capturing(), collector.token_mask(torch.ones(pixels.shape[0])):
        forward(model, pixels)


def plain_batch(model: nn.Module, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        forward(model, pixels)


def train_step_fn(model: nn.Module) -> Callable[[torch.Tensor], None]:
    """forward + backward + Adam step on the model's trainable tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable tensor")
    opt = torch.optim.Adam(params, lr=1e-4)

    def step(pixels: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        forward(model, pixels).square().mean().backward()
        opt.step()

    return step


def peft_lora(base: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=list(args.targets))
    return get_peft_model(copy.deepcopy(base), cfg)


def inflora_model(base: nn.Module, args: argparse.Namespace, num_tasks: int) -> tuple[nn.Module, InfLoRA]:
    """A copy of `base` with InfLoRA (fp32 adapters) on args.targets, and its method."""
    model = copy.deepcopy(base)
    report = inject_inflora(model, args.targets, rank=args.rank, num_tasks=num_tasks, fold="merge")
    return model, InfLoRA(report, LAMBDA_BEGIN, LAMBDA_END)


def fold_tasks(model: nn.Module, inflora: InfLoRA, args: argparse.Namespace, tasks: int) -> None:
    """Run `tasks` tasks through the hooks (real covariance passes, random B, merge), then start the next."""
    g = torch.Generator().manual_seed(args.seed + 1)
    for t in range(tasks + 1):
        # Each task its own data; a few images are enough for a real covariance (and keep the setup short).
        (pixels,) = make_batches(args, 1, seed=args.seed + 100 + t, device=args.device)
        pixels = pixels[:SETUP_IMAGES]
        model.eval()
        covariance_batch(model, inflora, pixels)
        inflora.on_task_start(t)
        if t == tasks:
            break
        with torch.no_grad():
            for layer in inflora.report.layers.values():
                b = layer.lora_B(t)
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
        covariance_batch(model, inflora, pixels)
        inflora.on_task_end(t)
    for name, layer in inflora.report.layers.items():
        status = [layer.status(t) for t in range(tasks + 1)]
        if status != [MERGED] * tasks + [TRAINING]:
            raise RuntimeError(f"{name}: expected {tasks} merged tasks and one training, got statuses {status}")


# ---------------------------------------------------------------------- timing
def saved_activation_bytes(model: nn.Module, pixels: torch.Tensor) -> int:
    """Bytes of the tensors one training forward of `model` saves for its backward (what activation
    checkpointing trades for recomputation), counted by a saved-tensors hook; the backward then runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model, pixels).square().mean()
    out.backward()
    model.zero_grad(set_to_none=True)
    return total


def peak_step_memory(step: Callable[[torch.Tensor], None], pixels: torch.Tensor) -> float | None:
    """Peak allocated MiB of one step on a GPU (None on the host: no allocator statistics there)."""
    if pixels.device.type != "cuda":
        return None
    synchronize(pixels.device)
    torch.cuda.reset_peak_memory_stats(pixels.device)
    step(pixels)
    synchronize(pixels.device)
    return torch.cuda.max_memory_allocated(pixels.device) / 2**20


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work, so the wall clock times it (a no-op on the host)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(arms: dict[str, Callable[[int], None]], warmup: int, steps: int, repeats: int,
                     device: torch.device | None = None) -> dict[str, float]:  # fmt: skip
    """Seconds per call of each arm: median over `steps` rounds, best of `repeats`.

    A round calls every arm once (call i gets index i); the order of the arms
    flips every round, so drifting machine load hits all arms alike. On a GPU
    each call is timed between two synchronisations.
    """
    names = list(arms)
    for i in range(warmup):
        for name in names:
            arms[name](i)
    best = dict.fromkeys(names, float("inf"))
    i = warmup
    for _ in range(repeats):
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(steps):
            for name in names if i % 2 == 0 else reversed(names):
                synchronize(device)
                start = time.perf_counter()
                arms[name](i)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
            i += 1
        for name in names:
            best[name] = min(best[name], statistics.median(times[name]))
    return best


def time_covariance_pass(base: nn.Module, args: argparse.Namespace, batch: Callable[[int], torch.Tensor],
                         device: torch.device | None) -> tuple[dict[str, float], nn.Module, InfLoRA]:  # fmt: skip
    """Seconds per batch of a covariance pass of the InfLoRA model before its first task ("covariance") and of
    a plain no-grad forward of `base` ("plain"), over the same batches (time_interleaved with args.warmup,
    args.steps, args.repeats); returned with that model and its method, task 0 started from the passes just
    timed (a real covariance, as on_task_start(0) needs it)."""
    plain = copy.deepcopy(base).eval()
    model, inflora = inflora_model(base, args, num_tasks=1)
    model.eval()
    cov = time_interleaved(
        {
            "covariance": lambda i: covariance_batch(model, inflora, batch(i)),
            "plain": lambda i: plain_batch(plain, batch(i)),
        },
        args.warmup,
        args.steps,
        args.repeats,
        device,
    )
    inflora.on_task_start(0)  # A_0 from the passes just timed
    return cov, model, inflora


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    """Measure and print; returns the figures."""
    if min(args.steps, args.repeats, args.batches) < 1 or args.warmup < 0:
        raise ValueError("--steps, --repeats and --batches must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started, load_start = time.perf_counter(), _load_average()
    device = torch.device(args.device)

    base = build_vit(args).to(device)
    batches = make_batches(args, args.batches, seed=args.seed, device=device)

    def batch(i: int) -> torch.Tensor:
        return batches[i % len(batches)]

    cov, model1, _ = time_covariance_pass(base, args, batch, device)

    model10, inflora10 = inflora_model(base, args, num_tasks=FOLDED_TASKS + 1)
    fold_tasks(model10, inflora10, args, FOLDED_TASKS)
    peft = peft_lora(base, args)
    checkpointed = copy.deepcopy(model1)
    enable_activation_checkpointing(checkpointed)
    models = {"inflora_task1": model1, "inflora_task10": model10, "peft": peft, "inflora_checkpointed": checkpointed}
    trainable = {name: count_parameters(m)[0] for name, m in models.items()}
    steps = {name: train_step_fn(m.train()) for name, m in models.items()}
    step = time_interleaved(
        {name: (lambda i, fn=fn: fn(batch(i))) for name, fn in steps.items()},
        args.warmup,
        args.steps,
        args.repeats,
        device,
    )
    saved = {name: saved_activation_bytes(models[name], batch(0)) for name in ("inflora_task1", "inflora_checkpointed")}
    peaks = {name: peak_step_memory(steps[name], batch(0)) for name in ("inflora_task1", "inflora_checkpointed")}

    figures = {
        "step_ratio_task1": round(step["inflora_task1"] / step["peft"], 4),
        "step_ratio_task10": round(step["inflora_task10"] / step["peft"], 4),
        "cov_pass_ratio": round(cov["covariance"] / cov["plain"], 4),
        "checkpointing_step_ratio": round(step["inflora_checkpointed"] / step["inflora_task1"], 4),
        "checkpointing_memory_ratio": round(saved["inflora_checkpointed"] / saved["inflora_task1"], 4),
        "checkpointing_step_s": round(step["inflora_checkpointed"], 5),
        "saved_activation_bytes": saved,
        "peak_step_memory_mb": peaks,
        "inflora_step_task1_s": round(step["inflora_task1"], 5),
        "inflora_step_task10_s": round(step["inflora_task10"], 5),
        "peft_step_s": round(step["peft"], 5),
        "cov_pass_s_per_batch": round(cov["covariance"], 5),
        "plain_forward_s_per_batch": round(cov["plain"], 5),
        "trainable_params": trainable,
        "config": {
            "hidden": args.hidden,
            "layers": args.layers,
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "batch_size": args.batch_size,
            "tokens_per_image": (args.image_size // args.patch_size) ** 2 + 1,
            "rank": args.rank,
            "targets": list(args.targets),
            "threads": threads,
            "device": device.type,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
    }
    figures["goals_met"] = {key: figures[key] <= limit for key, limit in GOALS.items()}
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["load_average_1min"] = [load_start, _load_average()]  # other work on the machine, start and end
    report(figures)
    if args.json:
        print(json.dumps(figures), flush=True)
    return figures


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def report(f: dict) -> None:
    c = f["config"]
    print(
        f"ViT hidden {c['hidden']}, {c['layers']} layers, {c['image_size']}px/{c['patch_size']} "
        f"({c['tokens_per_image']} tokens), batch {c['batch_size']}, rank {c['rank']} on {'+'.join(c['targets'])}, "
        f"fp32 {c['device']}, {c['threads']} threads; median of {c['steps']} after {c['warmup']} warm-up, "
        f"best of {c['repeats']}; whole run {f['wall_s']} s, 1-min load average {f['load_average_1min']}"
    )
    n = f["trainable_params"]
    rows = [
        ("train step, task 1", f["inflora_step_task1_s"], f["peft_step_s"], "step_ratio_task1"),
        ("train step, task 10", f["inflora_step_task10_s"], f["peft_step_s"], "step_ratio_task10"),
        ("covariance pass / batch", f["cov_pass_s_per_batch"], f["plain_forward_s_per_batch"], "cov_pass_ratio"),
    ]
    print(f"{'measurement':<26}{'InfLoRA s':>11}{'baseline s':>12}{'ratio':>8}{'goal':>8}  met  (baseline)")
    baselines = ["PEFT LoRA", "PEFT LoRA", "plain no-grad forward"]
    for (label, ours, theirs, key), baseline in zip(rows, baselines, strict=True):
        met = "yes" if f["goals_met"][key] else "NO"
        print(
            f"{label:<26}{ours:>11.4f}{theirs:>12.4f}{f[key]:>8.3f}{'<= ' + str(GOALS[key]):>8}  {met:<4} ({baseline})"
        )
    saved = f["saved_activation_bytes"]
    print(
        f"activation checkpointing at task 1: step {f['checkpointing_step_s']:.4f} s "
        f"({f['checkpointing_step_ratio']:.3f}x), activations saved for the backward "
        f"{saved['inflora_checkpointed'] / 2**20:.1f} MiB vs {saved['inflora_task1'] / 2**20:.1f} MiB "
        f"({f['checkpointing_memory_ratio']:.3f}x); peak step memory (GPU) {f['peak_step_memory_mb']}"
    )
    print(
        f"trainable tensors' elements: InfLoRA {n['inflora_task1']} (B only), "
        f"PEFT {n['peft']} (A and B); InfLoRA at task 10: {n['inflora_task10']}"
    )
    print(
        "all goals met"
        if all(f["goals_met"].values())
        else "goals NOT met: " + ", ".join(k for k, ok in f["goals_met"].items() if not ok)
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m inflora_dist.bench step ...` without the dispatcher."""
    p = argparse.ArgumentParser(
        prog="python -m inflora_dist.bench step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
