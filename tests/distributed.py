"""Run a function in real torch.distributed processes (gloo on CPU) and collect their results."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, workdir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(workdir) / f"result.{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, workdir: Path, *args: object) -> list:
    """Start `world_size` processes running fn(rank, world_size, *args); return their results by rank.

    Results must be made of tensors, plain containers and numbers (they are
    read back with weights_only=True).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, str(workdir), fn, args), nprocs=world_size, join=True)
    return [torch.load(workdir / f"result.{r}.pt", weights_only=True) for r in range(world_size)]
