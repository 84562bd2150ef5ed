"""Process-group helpers that also work in a single process.

Every collective here is a no-op when no process group is initialised and the
launcher asked for one process; with WORLD_SIZE > 1 and no process group it
raises instead of silently computing per-rank results.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

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


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-serialisable `value`, by rank (as JSON round-trips it). Collective: a few KB at most
    (error reports), sent as one padded byte tensor."""
    data = json.dumps(value, sort_keys=True, default=str).encode()
    if get_world_size() == 1:
        return [json.loads(data)]
    sizes = all_gather(torch.tensor([len(data)], dtype=torch.int64, device=collective_device()))[:, 0].tolist()
    buffer = torch.zeros(max(sizes), dtype=torch.uint8)
    buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    table = all_gather(buffer.to(collective_device())).cpu()
    return [json.loads(bytes(table[r, :n].tolist())) for r, n in enumerate(sizes)]


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


class UpperTriangle:
    """The upper triangle (diagonal included) of a square matrix as one stream of d(d+1)/2 values, row by row.

    Read and written in place by ranges, never through a copy of the whole
    triangle. On the host the rows' parts of a range are slices (gathered by
    one cat, written back one copy each: cheaper than index arithmetic per
    value); on an accelerator one gather/scatter per range of at most
    INDEX_CHUNK values (d kernel launches would cost more), with ~24 MiB of
    int64 index.
    """

    INDEX_CHUNK = 2**20

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"UpperTriangle needs a square matrix, got shape {tuple(matrix.shape)}")
        _check_contiguous(matrix)
        self.matrix = matrix
        self.dtype, self.device = matrix.dtype, matrix.device
        d = matrix.shape[0]
        self._row_start = [i * d - i * (i - 1) // 2 for i in range(d)]  # stream position of row i's diagonal

    def numel(self) -> int:
        d = self.matrix.shape[0]
        return d * (d + 1) // 2

    def _rows(self, start: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """(row, first column, length, offset in the range) of each row part of the range [start, start + n)."""
        d, row = self.matrix.shape[0], bisect.bisect_right(self._row_start, start) - 1
        offset = 0
        while offset < n:
            col = row + start + offset - self._row_start[row]
            length = min(d - col, n - offset)
            yield row, col, length, offset
            offset += length
            row += 1

    def _index(self, start: int, n: int) -> torch.Tensor:
        d = self.matrix.shape[0]
        starts = torch.tensor(self._row_start, device=self.device)
        position = torch.arange(start, start + n, device=self.device)
        row = torch.searchsorted(starts, position, right=True) - 1
        return row * d + row + (position - starts[row])

    def read(self, start: int, out: torch.Tensor) -> None:
        if self.device.type == "cpu":
            rows = [self.matrix[row, col : col + length] for row, col, length, _ in self._rows(start, out.numel())]
            torch.cat(rows, out=out)  # one call: cheaper than a copy per row
            return
        flat = self.matrix.view(-1)
        for offset in range(0, out.numel(), self.INDEX_CHUNK):
            part = out[offset : offset + self.INDEX_CHUNK]
            torch.index_select(flat, 0, self._index(start + offset, part.numel()), out=part)

    def write(self, start: int, values: torch.Tensor) -> None:
        if self.device.type == "cpu":
            for row, col, length, offset in self._rows(start, values.numel()):
                self.matrix[row, col : col + length].copy_(values[offset : offset + length])
            return
        flat = self.matrix.view(-1)
        for offset in range(0, values.numel(), self.INDEX_CHUNK):
            part = values[offset : offset + self.INDEX_CHUNK]
            flat.index_copy_(0, self._index(start + offset, part.numel()), part)


class Flat:
    """A contiguous tensor as one stream of its values (the Segment protocol of `sum_in_buckets_`)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        _check_contiguous(tensor)
        self.values = tensor.view(-1)
        self.dtype, self.device = tensor.dtype, tensor.device

    def numel(self) -> int:
        return self.values.numel()

    def read(self, start: int, out: torch.Tensor) -> None:
        out.copy_(self.values[start : start + out.numel()])

    def write(self, start: int, values: torch.Tensor) -> None:
        self.values[start : start + values.numel()].copy_(values)


Segment = Flat | UpperTriangle


def sum_in_buckets_(segments: Sequence[Segment], bucket_bytes: int, dst: int | None = None) -> int:
    """Sum streams of values over all ranks in place, packed back to back into flat buckets. Collective.

    The segments (`Flat` tensors, `UpperTriangle`s of matrices; one dtype and
    device) are copied into one buffer of at most `bucket_bytes` (a segment may
    straddle buckets), each full bucket is summed with one collective and its
    values written back: a stream of n values costs ceil(n * itemsize /
    bucket_bytes) collectives and one bucket of extra memory (plus, for a
    triangle, the int64 index of the range being copied), and the sums are
    elementwise those of reducing each value on its own. With `dst` the buckets
    are reduced to that rank only (the others' values become undefined).
    Returns the number of collectives (also at world size 1, where nothing is
    sent or copied).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    segments = [s for s in segments if s.numel()]
    if not segments:
        return 0
    dtype, device = segments[0].dtype, segments[0].device
    for s in segments:
        if s.dtype != dtype or s.device != device:
            raise ValueError(f"segments must all be {dtype} on {device}, got {s.dtype} on {s.device}")
    total = sum(s.numel() for s in segments)
    count = num_buckets(total, dtype.itemsize, bucket_bytes)
    if get_world_size() == 1:
        return count
    cap = max(1, bucket_bytes // dtype.itemsize)
    bucket = torch.empty(min(cap, total), dtype=dtype, device=device)
    placed: list[tuple[Segment, int, int, int]] = []  # (segment, start in it, length, offset in the bucket)
    fill = 0

    def flush() -> None:
        nonlocal fill
        if dst is None:
            all_reduce_sum_(bucket[:fill])
        else:
            reduce_sum_(bucket[:fill], dst)
        if dst is None or get_rank() == dst:
            for segment, start, n, offset in placed:
                segment.write(start, bucket[offset : offset + n])
        placed.clear()
        fill = 0

    for s in segments:
        start = 0
        while start < s.numel():
            n = min(s.numel() - start, cap - fill)
            s.read(start, bucket[fill : fill + n])
            placed.append((s, start, n, fill))
            fill += n
            start += n
            if fill == cap:
                flush()
    if fill:
        flush()
    return count


def raise_agreed(failure: str, error: Callable[[str], BaseException]) -> None:
    """Raise `error(message)` on every rank if `failure` is non-empty on any rank; the message is
    `gathered_failures`. Collective: one all-reduce, plus an all-gather only when a rank failed."""
    if any_rank(bool(failure)):
        raise error(gathered_failures(failure))


def gathered_failures(failure: str) -> str:
    """Every failing rank's `failure` ("" where a rank did not fail), joined and named by rank when several run.
    Collective (an all-gather): call it once the ranks know that one failed."""
    failures = all_gather_json(failure)
    several = get_world_size() > 1
    return "; ".join(f"rank {r}: {m}" if several else m for r, m in enumerate(failures) if m)


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
