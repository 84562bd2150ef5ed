"""DeepSpeed in one place: process group start-up, the engine of one task, an evaluation engine, its config.

The engine is rebuilt at every task boundary: the trainable set changes (B_t
and head t), and the reference restarts Adam and the cosine schedule at every
task. A fresh `deepspeed.initialize` gives exactly that at every ZeRO stage,
with none of the manual resets (zeroing the fp32 master copy, clearing the
optimizer state) that keeping one engine would need.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as tdist
from torch import nn

from inflora_dist.config import RunConfig
from inflora_dist.dist import free_port

# DeepSpeed logs to stdout through a handler bound as it is imported, and prints op builds there: a command's
# stdout is for its results (a table, answers, JSONL), so DeepSpeed's set-up goes to stderr.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed

REPO_ROOT = Path(__file__).resolve().parents[1]


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Start the process group (gloo on CPU, NCCL on GPUs) under deepspeed, torchrun or plain python.

    Plain `python` gets the environment of a one-process group (DeepSpeed would
    otherwise look for MPI). A collective that waits longer than `timeout_s` for
    a rank fails (a rank that hangs, or a host that vanished without closing its
    connections). Returns this process's device.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    if not tdist.is_initialized():
        with contextlib.redirect_stdout(sys.stderr):  # its CPU all-reduce op prints "built successfully"
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """End the process group on every rank, and remove this rank's /dev/shm buffer of DeepSpeed's CPU
    all-reduce (its own launcher leaves a 66 MB one per rank)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    addr, port, local = (os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"))
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{local}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def exit_process(code: int) -> NoReturn:
    """Exit with `code` after a command's work is done and its process group shut down: output is flushed,
    then the interpreter's teardown is skipped. The C++ destructors of the communication libraries can abort
    a finished process there ("terminate called without an active exception": CI saw it once, on a 2-rank
    ZeRO-3 run whose results were all written), which would report a complete run as failed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def batch_layout(global_batch: int, world_size: int, max_micro: int | None) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) giving `global_batch` samples per optimizer step.

    The global batch is split over ranks, then into the fewest accumulation
    steps whose micro batch fits `max_micro`.
    """
    if global_batch % world_size:
        raise ValueError(f"train.global_batch_size={global_batch} does not divide over {world_size} processes")
    per_rank = global_batch // world_size
    cap = max_micro or per_rank
    accumulation = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= cap)
    return per_rank // accumulation, accumulation


def deepspeed_config(cfg: RunConfig, micro: int, accumulation: int, world_size: int) -> dict[str, Any]:
    """The JSON template selected by `deepspeed.zero_stage` / `deepspeed.offload`, filled from the run config."""
    stage, offload = cfg.deepspeed.zero_stage, cfg.deepspeed.offload
    if offload and stage not in (2, 3):
        raise ValueError(f"deepspeed.offload needs deepspeed.zero_stage 2 or 3, got {stage}")
    name = f"zero{stage}{'_offload' if offload else ''}.json"
    directory = Path(cfg.deepspeed.config_dir)
    path = directory / name if directory.is_absolute() or (directory / name).exists() else REPO_ROOT / directory / name
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (deepspeed.config_dir={cfg.deepspeed.config_dir})")
    ds = _merged(json.loads(path.read_text()), cfg.deepspeed.overrides)
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * world_size,
        gradient_clipping=cfg.train.grad_clip,  # DeepSpeed's own default is 1.0: always set it
    )
    if cfg.train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def construction_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config under which ZeRO-3 builds the model (models.partitioned_construction): the run's,
    with its precision flags set to the dtype the weights must have. zero.Init casts every floating tensor it
    creates to the config's precision (fp32 without a flag), and the engine does not cast a model built
    partitioned; so the flags say bf16 under `train.precision: bf16` (what the engine made of any model before),
    else `model.dtype` (a bf16 base under fp32 adapters and optimizer stays bf16)."""
    ds = deepspeed_config(cfg, 1, 1, world_size)
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    dtype = "bfloat16" if cfg.train.precision == "bf16" else cfg.model.dtype
    if dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    elif dtype == "float16":
        ds["fp16"] = {"enabled": True}
    return ds


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def destroy_engine(engine: deepspeed.DeepSpeedEngine) -> None:
    """Free an engine and take its hooks off the model (destroy() leaves the two module hooks it added)."""
    engine.destroy()
    for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, hook, None)
        if handle is not None:
            handle.remove()


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate's factor at `step` of a task's `total`: the reference's cosine decay
    cos(pi/2 * progress), from 1 to 0 over the task, or 1 throughout (constant)."""
    if schedule == "constant":
        return 1.0
    return math.cos(math.pi / 2 * min(step, total) / max(total, 1))


def build_engine(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    cfg: RunConfig,
    micro: int,
    accumulation: int,
    total_steps: int,
) -> deepspeed.DeepSpeedEngine:
    """A DeepSpeed engine training `param_groups` with a fresh optimizer and `train.lr_schedule` (cosine over
    `total_steps`, or constant).

    Collective: every rank calls it.
    """
    t = cfg.train
    if t.optimizer == "adam":
        optimizer = torch.optim.Adam(param_groups, lr=t.lr, betas=(0.9, 0.999), weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(t.lr_schedule, step, total_steps))
    world = tdist.get_world_size()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro, accumulation, world),
    )
    return engine


def build_inference_engine(model: nn.Module, cfg: RunConfig) -> deepspeed.DeepSpeedEngine:
    """An engine that only runs forwards (evaluation and prediction from a finished run). Collective.

    Under ZeRO-3 the parameters stay partitioned (DeepSpeed needs no optimizer
    for that); ZeRO-1/2 partition only optimizer state and gradients, so the
    other stages run as stage 0, every rank holding the weights. Precision is the
    run's, as in its own evaluation.
    """
    stage = 3 if cfg.deepspeed.zero_stage == 3 else 0
    run = replace(cfg, deepspeed=replace(cfg.deepspeed, zero_stage=stage, offload=cfg.deepspeed.offload and stage == 3))
    engine, _, _, _ = deepspeed.initialize(model=model, config=deepspeed_config(run, 1, 1, tdist.get_world_size()))
    engine.eval()
    return engine
