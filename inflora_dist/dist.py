"""Process-group helpers that also work in a single process.

Every collective here is a no-op when no process group is initialised and the
launcher asked for one process; with WORLD_SIZE > 1 and no process group it
raises instead of silently computing per-rank results.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterable, Iterator, Sequence

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


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` stacked by rank: (world, *shape). Collective (same shape on every rank)."""
    _check_contiguous(tensor)
    if get_world_size() == 1:
        return tensor.unsqueeze(0).clone()
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


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


#: Default cap of one flat bucket in `sum_in_buckets_` (also `inflora.reduce_bucket_bytes`).
DEFAULT_BUCKET_BYTES = 256 * 2**20


def num_buckets(numel: int, itemsize: int, bucket_bytes: int) -> int:
    """How many buckets of at most `bucket_bytes` carry `numel` elements of `itemsize` bytes."""
    return math.ceil(numel / max(1, bucket_bytes // itemsize))


def sum_in_buckets_(segments: Sequence[torch.Tensor], bucket_bytes: int, dst: int | None = None) -> int:
    """Sum 1-D tensors over all ranks in place, packed back to back into flat buckets. Collective.

    The segments (contiguous 1-D, one dtype and device, e.g. views into larger
    tensors) are copied into one buffer of at most `bucket_bytes` (a segment
    may straddle two buckets), each full bucket is summed with one collective
    and copied back: a stream of n elements costs ceil(n * itemsize /
    bucket_bytes) collectives and one bucket of extra memory, and the sums are
    elementwise the ones of reducing each segment on its own. With `dst` the
    buckets are reduced to that rank only (the others' segments become
    undefined). Returns the number of collectives (also at world size 1, where
    nothing is sent or copied).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    segments = [s for s in segments if s.numel()]
    if not segments:
        return 0
    dtype, device = segments[0].dtype, segments[0].device
    for s in segments:
        _check_contiguous(s)
        if s.ndim != 1 or s.dtype != dtype or s.device != device:
            raise ValueError(f"segments must be 1-D {dtype} on {device}, got {s.dtype} {tuple(s.shape)} on {s.device}")
    total = sum(s.numel() for s in segments)
    count = num_buckets(total, dtype.itemsize, bucket_bytes)
    if get_world_size() == 1:
        return count
    cap = max(1, bucket_bytes // dtype.itemsize)
    bucket = torch.empty(min(cap, total), dtype=dtype, device=device)
    placed: list[tuple[torch.Tensor, int]] = []  # (segment slice, offset in the bucket)
    fill = 0

    def flush() -> None:
        nonlocal fill
        if dst is None:
            all_reduce_sum_(bucket[:fill])
        else:
            reduce_sum_(bucket[:fill], dst)
        if dst is None or get_rank() == dst:
            for part, offset in placed:
                part.copy_(bucket[offset : offset + part.numel()])
        placed.clear()
        fill = 0

    for s in segments:
        start = 0
        while start < s.numel():
            n = min(s.numel() - start, cap - fill)
            part = s[start : start + n]
            bucket[fill : fill + n].copy_(part)
            placed.append((part, fill))
            fill += n
            start += n
            if fill == cap:
                flush()
    if fill:
        flush()
    return count


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
