"""Helpers to launch launch/train.py as real processes (python, torchrun) on the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from inflora_dist.data.build_shards import main as build_shards
from inflora_dist.dist import free_port
from inflora_dist.subspace import row_space

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_vit.yaml"
LLM_CONFIG = REPO / "configs" / "tiny_llm.yaml"


def tiny_shards(out: Path, train_per_class: int = 96, eval_per_class: int = 32) -> Path:
    """The tiny config's task sequence (3 Fashion-MNIST tasks of 2 classes) written to `out`."""
    sizes = ["--train-per-class", str(train_per_class), "--eval-per-class", str(eval_per_class)]
    build_shards(["fashion-mnist", "--out", str(out), "--tasks", "3", "--classes-per-task", "2", *sizes,
                  "--shard-size", "40", "--quiet"])  # fmt: skip
    return out


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # The venv's tools first: a different ninja on PATH makes DeepSpeed rebuild its CPU op (~30 s) each time.
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def command(nproc: int, *overrides: str, config: Path = CONFIG) -> list[str]:
    script = [str(REPO / "launch" / "train.py"), "--config", str(config), *overrides]
    if nproc == 1:
        return [sys.executable, *script]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *script]


def train(
    nproc: int,
    out: Path,
    *overrides: str,
    shards: Path,
    timeout: int = 600,
    config: Path = CONFIG,
    tasks_file: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a tiny config (the ViT one by default) to completion on `shards`/tasks.yaml (or `tasks_file`); raise
    with the output if it fails."""
    tasks = tasks_file or shards / "tasks.yaml"
    args = command(nproc, f"output_dir={out}", f"data.tasks={tasks}", *overrides, config=config)
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The train.py processes a launcher started."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]


def interrupt_two_processes(overrides: list[str], out: Path, sig: int, checkpoint: str = "*-task1-step3",
                            config: Path = CONFIG) -> str:  # fmt: skip
    """Launch a 2-process run (`overrides`, into `out`); when its checkpoint `checkpoint` appears, send `sig` to
    both workers. Returns the run's output once it has exited, which must be with a failure status."""
    proc = subprocess.Popen(command(2, f"output_dir={out}", *overrides, config=config), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob(checkpoint)):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint {checkpoint} appeared"
        time.sleep(0.05)
    running = workers(proc)
    assert len(running) == 2
    for w in running:
        w.send_signal(sig)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, log[-3000:]
    return log


def results(out: Path) -> tuple[dict, dict]:
    """(metrics.json, continual_state tensors) of a finished run."""
    return json.loads((out / "metrics.json").read_text()), load_file(str(out / "continual_state.safetensors"))


def heads_and_statistics(out: Path) -> dict:
    """The heads of a finished run's last checkpoint and its exported class statistics, by name."""
    last = sorted((out / "checkpoints").iterdir())[-1]
    tensors = {k: v for k, v in load_file(str(last / "state.safetensors")).items() if k.startswith("heads.")}
    tensors.update({f"stats.{k}": v for k, v in load_file(str(out / "class_statistics.safetensors")).items()})
    return tensors


def llm_demo_shards(out: Path) -> Path:
    """The demo's 3 packaged instruction tasks in the LLM tests' small sizes, written to `out`; the last is scored
    by ROUGE-L (on its label words), so the tests run both metrics' generation and scoring."""
    build_shards(["llm-demo", "--out", str(out), "--per-label", "8", "--eval-fraction", "0.25", "--shard-size", "10",
                  "--metric", "chat_topic=rouge_l", "--quiet"])  # fmt: skip
    return out


def language_runs(root: Path, shards: Path, config: Path) -> Callable[..., Path]:
    """get(processes, ZeRO stage, dtype="float32"): a finished run of a language-model `config` on `shards`, made
    on first use (each test module keeps one), with the merged model exported."""
    done: dict[tuple[int, int, str], Path] = {}

    def get(nproc: int, stage: int, dtype: str = "float32") -> Path:
        key = (nproc, stage, dtype)
        if key not in done:
            out = root / f"p{nproc}-z{stage}-{dtype}"
            extra = [f"deepspeed.zero_stage={stage}", f"model.dtype={dtype}", "export.merged_model=true"]
            if stage == 3:  # partition even the tiny model's parameters
                extra.append("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
            train(nproc, out, *extra, shards=shards, config=config)
            done[key] = out
        return done[key]

    return get


def evaluate_under_torchrun(run: Path, tasks: Path, out: Path, nproc: int = 2) -> dict:
    """`python -m inflora_dist.evaluate --run-dir RUN --tasks TASKS` under torchrun; its metrics JSON."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m"]
    args = [*launcher, "inflora_dist.evaluate", "--run-dir", str(run), "--tasks", str(tasks), "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def predict_prompts(run: Path, prompts: list[str], scratch: Path, max_new_tokens: int) -> list[dict]:
    """`python -m inflora_dist.predict --run RUN --prompts FILE`: one {"prompt", "answer"} per prompt."""
    path = scratch / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = [sys.executable, "-m", "inflora_dist.predict", "--run", str(run), "--prompts", str(path),
            "--max-new-tokens", str(max_new_tokens)]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _row_projector(a: torch.Tensor) -> torch.Tensor:
    q = row_space(a)
    return q @ q.T


def assert_bf16_runs_agree(state: dict, ref: dict) -> None:
    """Two runs with bf16 base weights (e.g. 2 ranks under ZeRO-3 against 1 process) design the same task-0 A
    (1e-6); later A (their row spaces) and the memories, compared as projectors (a basis is not unique: where
    two singular values of the projected covariance are nearly tied, bf16's rounding of differently padded
    batches swaps or turns directions within the same span), agree to 0.1, except for at most one A and one
    memory: where a singular value sits at DualGPM's threshold a memory keeps one direction more, and an A
    then differs in span. Adapters and memories stay fp32/fp64."""
    assert sorted(state) == sorted(ref)
    assert all(t.dtype in (torch.float32, torch.float64) for t in state.values())
    off: dict[str, list[str]] = {"A": [], "memory": []}
    for name, ours in state.items():
        theirs = ref[name]
        if name.endswith(".A.0"):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
        elif name.endswith("old_basis"):
            if ours.shape != theirs.shape or (ours @ ours.T - theirs @ theirs.T).abs().max() > 0.1:
                off["memory"].append(name)
        elif ".A." in name and (_row_projector(ours) - _row_projector(theirs)).abs().max() > 0.1:
            off["A"].append(name)
    assert len(off["A"]) <= 1 and len(off["memory"]) <= 1, off
