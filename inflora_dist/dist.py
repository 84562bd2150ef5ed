"""Process-group helpers that also work in a single process.

Every collective here is a no-op when no process group is initialised and the
launcher asked for one process; with WORLD_SIZE > 1 and no process group it
raises instead of silently computing per-rank results.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous or a local test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    """True when a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    if is_distributed():
        return dist.get_world_size()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected > 1:
        raise RuntimeError(
            f"WORLD_SIZE={expected} but torch.distributed is not initialised: "
            "initialise the process group before running collectives"
        )
    return 1


def is_main_process() -> bool:
    """Rank 0 does all logging, progress bars and file output."""
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where tensors must live for collectives: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_contiguous(tensor: torch.Tensor) -> None:
    # Backends send the raw storage: a transposed view would arrive scrambled.
    if not tensor.is_contiguous():
        raise ValueError(f"collectives need contiguous tensors, got strides {tensor.stride()}")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks. Collective: every rank must call it."""
    _check_contiguous(tensor)
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one all-reduce). Collective."""
    value = torch.tensor([float(flag)], device=collective_device())
    return float(all_reduce_sum_(value)) > 0


def reduce_sum_(tensor: torch.Tensor, dst: int) -> torch.Tensor:
    """Sum `tensor` over all ranks into rank `dst` (other ranks' copies become undefined). Collective."""
    _check_contiguous(tensor)
    if get_world_size() > 1:
        dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s. Collective."""
    _check_contiguous(tensor)
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    """Wait for every rank. Collective."""
    if get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def gathered_params(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for the duration of the block.

    A no-op unless DeepSpeed ZeRO-3 has partitioned one of `params` (it tags
    them with `ds_id`). With `modifier_rank`, that rank's in-place changes are
    broadcast and re-partitioned on exit. Collective under ZeRO-3.
    """
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed  # only needed, and only importable cheaply, when ZeRO-3 is in use

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def written_by(params: Iterable[torch.nn.Parameter], src: int = 0) -> Iterator[None]:
    """Rank `src` changes `params` in place inside the block; on exit every rank holds its values.

    Under ZeRO-3 the parameters are gathered for the block and re-partitioned from
    `src`'s copy; otherwise `src`'s values are broadcast in one flat float64
    collective (exact for fp32 and bf16). Collective: every rank enters the block.
    """
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        with gathered_params(params, modifier_rank=src):
            yield
        return
    yield
    if get_world_size() > 1:
        flat = torch.cat([p.detach().reshape(-1).double() for p in params]).to(collective_device())
        broadcast_(flat, src)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
