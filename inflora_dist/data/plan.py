"""Which samples each rank and DataLoader worker reads: pure arithmetic, no I/O.

A task split is a list of shards with known sample counts. For one epoch:

1. The shards are ordered: in index order (exact mode) or permuted by a
   generator seeded with (seed, epoch) (training mode), identically on every
   rank. Concatenated, they give the epoch's sample positions 0..N-1.
2. Micro-step k covers positions [k g, (k + 1) g) with g = batch_size *
   world_size; rank r reads the run [k g + r b, k g + (r + 1) b). An optimizer
   step of `a` accumulated micro-steps therefore covers the same samples
   whatever the number of ranks: runs are world-size invariant.
3. Every rank yields the same number of batches, rounded up to a multiple of
   the accumulation steps, each of exactly `batch_size` rows; positions past N
   are padding with weight 0. No sample is dropped and none read twice, and no
   rank runs out early (which would deadlock the collectives of the others).
4. A rank's batches are split into contiguous blocks, one per DataLoader
   worker. The DataLoader interleaves the workers round robin, which
   `replay_round_robin` replays to resume mid-epoch.
"""

from __future__ import annotations

import bisect
import functools
import itertools
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

    shard_sizes: tuple[int, ...]
    order: tuple[int, ...]  # the epoch's shard order
    rank: int
    world_size: int
    batch_size: int  # rows per batch of this rank
    num_batches: int  # the same on every rank
    interleave: bool = False  # positions go round robin over the shards instead of shard after shard

    @property
    def total(self) -> int:
        """Samples in the epoch (all ranks)."""
        return sum(self.shard_sizes)

    def run(self, batch: int) -> range:
        """Epoch positions of this rank's real rows in `batch`."""
        g = self.batch_size * self.world_size
        start = batch * g + self.rank * self.batch_size
        return range(min(start, self.total), min(start + self.batch_size, self.total))

    @functools.cached_property
    def _ends(self) -> list[int]:
        return list(itertools.accumulate(self.shard_sizes[s] for s in self.order))  # cumulative, in epoch order

    @functools.cached_property
    def _levels(self) -> tuple[list[int], list[list[int]]]:
        # Interleaved order: level i holds sample i of every shard that has one, shards in epoch order.
        starts, alive, pos = [], [], 0
        for i in range(max(self.shard_sizes, default=0)):
            shards = [s for s in self.order if self.shard_sizes[s] > i]
            starts.append(pos)
            alive.append(shards)
            pos += len(shards)
        return starts, alive

    def segments(self, batch: int) -> list[Segment]:
        """Shard segments holding this rank's real rows of `batch`, in order."""
        if self.interleave:
            starts, alive = self._levels
            out = []
            for p in self.run(batch):
                level = bisect.bisect_right(starts, p) - 1
                out.append(Segment(alive[level][p - starts[level]], level, level + 1))
            return out
        run, ends = self.run(batch), self._ends
        out, pos = [], run.start
        i = bisect.bisect_right(ends, pos)
        while pos < run.stop:
            shard_start = ends[i - 1] if i else 0
            stop = min(run.stop, ends[i])
            if stop > pos:
                out.append(Segment(self.order[i], pos - shard_start, stop - shard_start))
            pos = stop
            i += 1
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
    multiple_of: int = 1,
    interleave: bool = False,
) -> RankPlan:
    """This rank's runs of the epoch; the batch count is rounded up to a multiple of `multiple_of`.

    `interleave` orders the epoch's positions round robin over the shards (sample 0
    of every shard, then sample 1, ...), so every batch mixes all shards: for joint
    training over shards that each hold one task. It costs a seek per sample.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if any(s < 0 for s in shard_sizes):
        raise ValueError(f"shard sizes must be >= 0, got {list(shard_sizes)}")
    steps = math.ceil(sum(shard_sizes) / (batch_size * world_size))
    return RankPlan(
        shard_sizes=tuple(shard_sizes),
        order=shard_order(len(shard_sizes), seed, epoch),
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_batches=math.ceil(steps / multiple_of) * multiple_of,
        interleave=interleave,
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
