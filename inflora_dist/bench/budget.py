"""What a covariance token budget costs: `python -m inflora_dist.bench budget --max-tokens 8192 [--json]`.

Runs one config twice with `launch/train.py`, everything equal (data, seed, model, method, evaluation) but the
covariance passes: every token of each task's training data (the reference's behaviour), then at most
`--max-tokens` tokens per pass (`inflora.covariance_max_tokens`: the first whole samples, shards interleaved).
Reports, side by side: each run's average accuracy (the primary matrix: class-incremental for vision, the
generation score for instruction tuning), BWT, the seconds of its covariance passes, and per task the largest
principal angle (degrees, over the input groups) between the budgeted run's A_t and the full run's (their row
spaces). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from inflora_dist.bench.cl import METHODS, REPO, launch
from inflora_dist.subspace import principal_angle, row_space

SUMMARY = "accuracy, A and pass time with inflora.covariance_max_tokens against full covariance passes"
PASSES = ("design_pass_s", "update_pass_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=None, help="run config(s) (default configs/demo_vit.yaml)")
    parser.add_argument(
        "--max-tokens", type=int, default=8192, help="inflora.covariance_max_tokens of the budgeted run"
    )
    parser.add_argument("--method", choices=["inflora", "inflora_ca"], default="inflora_ca")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("--output-dir", default="runs/bench_budget", help="the runs go to <output-dir>/{full,budget}")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both runs")


def row_space_angles(full: dict[str, torch.Tensor], budget: dict[str, torch.Tensor]) -> list[float]:
    """Per task, the largest principal angle (degrees) over the groups between the row spaces of two runs' A_t
    (`<group>.A.<t>` tensors of continual_state.safetensors)."""
    angles: dict[int, float] = {}
    for key, a in full.items():
        _, sep, task = key.rpartition(".A.")
        if not sep:
            continue
        u, v = row_space(a), row_space(budget[key])
        angle = principal_angle(u, v) if u.shape == v.shape else math.pi / 2  # a different usable rank
        angles[int(task)] = max(angles.get(int(task), 0.0), math.degrees(angle))
    return [angles[t] for t in sorted(angles)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    configs = args.config or [str(REPO / "configs" / "demo_vit.yaml")]
    out = Path(args.output_dir)
    arms = {"full": [], "budget": [f"inflora.covariance_max_tokens={args.max_tokens}"]}
    figures: dict[str, Any] = {"max_tokens": args.max_tokens, "method": args.method}
    states = {}
    for arm, extra in arms.items():
        seconds = launch(configs, [*args.overrides, *METHODS[args.method], *extra], out / arm, args.nproc)
        metrics = json.loads((out / arm / "metrics.json").read_text())
        states[arm] = load_file(str(out / arm / "continual_state.safetensors"))
        figures[arm] = {
            "avg_acc": metrics["avg_acc"],
            "bwt": metrics["bwt"],
            "last_row": metrics["accuracy_matrix"][-1],
            "covariance_pass_s": sum(t.get(k, 0.0) for t in metrics["timings"] for k in PASSES),
            "seconds": seconds,
        }
    figures["a_angle_deg_per_task"] = row_space_angles(states["full"], states["budget"])
    figures["avg_acc_change"] = figures["budget"]["avg_acc"] - figures["full"]["avg_acc"]
    figures["pass_time_ratio"] = figures["budget"]["covariance_pass_s"] / max(
        figures["full"]["covariance_pass_s"], 1e-9
    )
    print(f"\n{'run':<8}{'avg acc':>9}{'BWT':>8}{'pass s':>9}{'seconds':>9}")
    for arm in arms:
        f = figures[arm]
        print(f"{arm:<8}{f['avg_acc']:>9.2f}{f['bwt']:>8.2f}{f['covariance_pass_s']:>9.1f}{f['seconds']:>9.1f}")
    angles = ", ".join(f"{a:.2f}" for a in figures["a_angle_deg_per_task"])
    print(f"largest principal angle of A_t against the full passes, per task (degrees): {angles}")
    if args.json:
        print(json.dumps(figures), flush=True)
    return figures
