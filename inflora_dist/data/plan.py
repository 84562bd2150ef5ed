"""Which samples each rank and each DataLoader worker reads: pure arithmetic, no I/O.

A task split is a list of shards with known sample counts. For one epoch:

1. The shards are ordered: in index order (exact mode) or permuted by a
   generator seeded with (seed, epoch) (training mode), identically on every rank.
2. The concatenated sample sequence is cut into `world_size` contiguous parts
   whose sizes differ by at most one: every sample belongs to exactly one rank.
3. Every rank yields the same number of batches, ceil(largest part / batch
   size), each of exactly `batch_size` rows; rows past a rank's own samples
   are padding with weight 0. No sample is dropped, and no rank runs out early
   (which would deadlock the collectives of the others).
4. A rank's batches are split into contiguous blocks, one per DataLoader
   worker. The DataLoader interleaves the workers round robin, which
   `consumed_per_worker` replays to resume mid-epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard number `shard` (an index into the split's shard list)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of one epoch."""

    order: tuple[int, ...]  # the epoch's shard order
    start: int  # this rank's first position in the ordered sample sequence
    num_samples: int  # real samples of this rank
    num_batches: int  # the same on every rank
    batch_size: int

    def segments(self, shard_sizes: Sequence[int], first: int, stop: int) -> list[Segment]:
        """The shard segments holding this rank's samples at local positions [first, stop)."""
        lo, hi = self.start + first, self.start + min(stop, self.num_samples)
        out, offset = [], 0
        for shard in self.order:
            size = shard_sizes[shard]
            s, e = max(lo, offset), min(hi, offset + size)
            if s < e:
                out.append(Segment(shard, s - offset, e - offset))
            offset += size
            if offset >= hi:
                break
        return out


def shard_order(num_shards: int, seed: int | None, epoch: int) -> tuple[int, ...]:
    """Index order (seed None) or a permutation seeded by (seed, epoch)."""
    order = list(range(num_shards))
    if seed is not None:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def plan_rank(
    shard_sizes: Sequence[int],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int | None = None,
    epoch: int = 0,
) -> RankPlan:
    """This rank's contiguous share of the epoch's sample sequence and the common batch count."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(s < 0 for s in shard_sizes):
        raise ValueError(f"shard sizes must be >= 0, got {list(shard_sizes)}")
    total = sum(shard_sizes)
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    largest = math.ceil(total / world_size)
    return RankPlan(
        order=shard_order(len(shard_sizes), seed, epoch),
        start=start,
        num_samples=stop - start,
        num_batches=math.ceil(largest / batch_size),
        batch_size=batch_size,
    )


def worker_blocks(num_batches: int, num_workers: int) -> list[range]:
    """Contiguous blocks of batch indices, one per worker (sizes differ by at most one)."""
    workers = max(num_workers, 1)
    return [range(w * num_batches // workers, (w + 1) * num_batches // workers) for w in range(workers)]


def replay_round_robin(blocks: Sequence[range], consumed: int) -> tuple[list[int], int]:
    """Replay the DataLoader after it delivered `consumed` batches.

    The DataLoader asks its workers round robin and skips a worker once it is
    exhausted, so the first `consumed` outputs are a prefix of each block.
    Returns how many batches each worker delivered and which worker it would
    ask next: a resumed DataLoader's worker j must act as worker (next + j) %
    num_workers to continue the same sequence.
    """
    total = sum(len(b) for b in blocks)
    if not 0 <= consumed <= total:
        raise ValueError(f"{consumed} batches consumed, but the epoch has only {total}")
    done = [0] * len(blocks)
    worker = 0
    for _ in range(consumed):
        while done[worker] >= len(blocks[worker]):
            worker = (worker + 1) % len(blocks)
        done[worker] += 1
        worker = (worker + 1) % len(blocks)
    return done, worker
