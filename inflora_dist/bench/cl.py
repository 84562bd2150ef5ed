"""InfLoRA against its baselines and peers on one task sequence, side by side.

Each method runs `launch/train.py` with the same config (same data, model,
targets, rank, budget and evaluation); only these overrides differ:

  inflora     A_t designed outside the old tasks' subspace (the method), no classifier alignment
  inflora_ca  InfLoRA with classifier alignment after every task (ca.enabled=true), whatever the config says
  seq_lora    the same branches with A_t drawn like LoRA's A and nothing protected (the forgetting baseline)
  olora       O-LoRA: A_t and B_t trained, A_t pushed orthogonal to the old A's (olora.lambda_1 / lambda_2)
  olora_ca    O-LoRA with classifier alignment after every task (classification)
  gainlora    GainLoRA: InfLoRA's branches weighed per prompt by a gate per task (language models)
  joint       all tasks' data at once, one branch (the upper bound; no sequence, so no BWT or forgetting)
  simple_cil  the frozen pre-trained backbone and the prototype classifier (class means; trains nothing)

Prints a table of average accuracy, BWT, forgetting and wall time per method
(for instruction tuning, "accuracy" is each task's generation score: exact match
or ROUGE-L, in percent; inflora_ca, olora_ca and simple_cil are for classification), and,
for runs that collect class statistics, the prototype (nearest class mean)
accuracy and the cost of the statistics and alignment as a share of the
training time, both measured in the same run. With --json the last line is one
JSON object keyed by method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from inflora_dist.dist import free_port
from inflora_dist.metrics import AccuracyMatrix

SUMMARY = "InfLoRA vs its baselines and peers (seq-LoRA, O-LoRA, GainLoRA, joint, SimpleCIL): accuracy, BWT, time"
REPO = Path(__file__).resolve().parents[2]
#: The overrides that make each method (on top of the config and the user's overrides).
METHODS: dict[str, list[str]] = {
    "inflora": ["method=inflora", "ca.enabled=false"],
    "inflora_ca": ["method=inflora", "ca.enabled=true"],
    "seq_lora": ["method=seq_lora", "ca.enabled=false"],
    "olora": ["method=olora", "ca.enabled=false"],
    "olora_ca": ["method=olora", "ca.enabled=true"],
    "gainlora": ["method=gainlora", "ca.enabled=false"],
    "joint": ["method=joint", "ca.enabled=false"],
    "simple_cil": ["method=simple_cil", "ca.enabled=false"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=None, help="run config(s) (default configs/demo_vit.yaml)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["inflora", "seq_lora"])
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("--output-dir", default="runs/bench_cl", help="each method writes <output-dir>/<method>")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")


def launch(configs: list[str], overrides: list[str], output_dir: Path, nproc: int = 1) -> float:
    """Run `launch/train.py` on `configs` with `overrides` into `output_dir` (afresh), under python or torchrun;
    returns its wall seconds. Exits naming the run if it fails."""
    script = [str(REPO / "launch" / "train.py"), *(a for c in configs for a in ("--config", c)), *overrides]
    script += [f"output_dir={output_dir}", "resume=never"]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *script]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # several processes share the cores
    print(f"== {output_dir}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the run into {output_dir} failed with exit status {proc.returncode}")
    return round(time.perf_counter() - start, 1)


def run(args: argparse.Namespace) -> dict:
    """Run every method; returns {method: {avg_acc, bwt, forgetting, seconds, ...}}."""
    configs = args.config or [str(REPO / "configs" / "demo_vit.yaml")]
    figures = {}
    for method in args.methods:
        seconds = launch(configs, [*args.overrides, *METHODS[method]], Path(args.output_dir) / method, args.nproc)
        metrics = json.loads((Path(args.output_dir) / method / "metrics.json").read_text())
        figures[method] = {
            "avg_acc": metrics["avg_acc"],
            "avg_incremental_acc": metrics["avg_incremental_acc"],
            "bwt": metrics["bwt"],
            "forgetting": metrics["forgetting"],
            "seconds": seconds,
        }
        rows = metrics.get("accuracy_matrix")
        if rows:  # per task: right after its own training, and after the last task (instruction tuning's table)
            figures[method].update(after_own=[row[t] for t, row in enumerate(rows)], final=rows[-1])
        elif "joint_accuracy" in metrics:
            figures[method]["final"] = metrics["joint_accuracy"]
        if metrics.get("zero_shot") is not None:
            figures[method]["zero_shot"] = metrics["zero_shot"]
        if "task_incremental_accuracy_matrix" in metrics:
            til = AccuracyMatrix(metrics["task_incremental_accuracy_matrix"])
            figures[method].update(til_avg_acc=til.avg_acc, til_bwt=til.bwt, til_forgetting=til.forgetting)
        elif "joint_task_incremental_accuracy" in metrics:  # joint: one evaluation of every task, no sequence
            accs = metrics["joint_task_incremental_accuracy"]
            figures[method].update(til_avg_acc=sum(accs) / len(accs), til_bwt=0.0, til_forgetting=0.0)
        if "ncm_accuracy_matrix" in metrics:
            figures[method]["ncm_avg_acc"] = AccuracyMatrix(metrics["ncm_accuracy_matrix"]).avg_acc
        elif "joint_ncm_accuracy" in metrics:
            figures[method]["ncm_avg_acc"] = sum(metrics["joint_ncm_accuracy"]) / len(metrics["joint_ncm_accuracy"])
        timings = metrics.get("timings", [])
        if timings and method != "simple_cil":  # (simple_cil trains nothing to compare with)
            # The statistics and the alignment against training, all timed in this run.
            extra_s = sum(t["class_statistics_s"] + t["alignment_s"] for t in timings)
            figures[method]["stats_ca_share"] = round(extra_s / sum(t["train_s"] for t in timings), 4)
    # Classification has two views (all heads, the task's own head); instruction tuning one score per task.
    two_views = all("til_avg_acc" in f for f in figures.values())
    print("\nclass-incremental (all heads) | task-incremental (the task's head)" if two_views else "")
    header = f"{'method':<12}{'avg acc':>9}{'BWT':>8}{'forget':>8}"
    header += f" |{'avg acc':>9}{'BWT':>8}{'forget':>8}" if two_views else ""
    prototypes = any("ncm_avg_acc" in f for f in figures.values())
    header += f" |{'NCM acc':>9}{'stats+CA':>10}" if prototypes else ""
    print(header + f"{'seconds':>9}")
    for method, f in figures.items():
        line = f"{method:<12}{f['avg_acc']:>9.2f}{f['bwt']:>8.2f}{f['forgetting']:>8.2f}"
        if two_views:
            line += f" |{f['til_avg_acc']:>9.2f}{f['til_bwt']:>8.2f}{f['til_forgetting']:>8.2f}"
        if prototypes:
            ncm, share = f.get("ncm_avg_acc"), f.get("stats_ca_share")
            line += f" |{ncm:>9.2f}" if ncm is not None else f" |{'-':>9}"
            line += f"{share:>9.1%} " if share is not None else f"{'-':>10}"
        print(line + f"{f['seconds']:>9.1f}")
    if prototypes:
        print("NCM acc: nearest class mean (cosine); stats+CA: class statistics and alignment / training time")
    zero_shot = next((f["zero_shot"] for f in figures.values() if "zero_shot" in f), None)
    if zero_shot is not None:  # every task scored before any training (the same model for every method)
        print(f"{'zero-shot':<12}" + " ".join(f"{v:.2f}" if v is not None else "-" for v in zero_shot) + " (per task)")
        print(f"{'zero-shot AP':<12}{sum(v for v in zero_shot if v is not None) / len(zero_shot):>9.2f}")
    for method, f in figures.items():
        if "after_own" in f:
            own = " ".join(f"{v:.2f}" for v in f["after_own"])
            print(f"{method:<12}after own training: {own} | final: {' '.join(f'{v:.2f}' for v in f['final'])}")
    if args.json:
        print(json.dumps(figures))
    return figures
