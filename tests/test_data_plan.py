"""The epoch planner: every sample to exactly one rank, equal batch counts, resumable worker blocks."""

from __future__ import annotations

import itertools
import random

import pytest

from inflora_dist.data.plan import plan_rank, replay_round_robin, shard_order, worker_blocks

CASES = [
    ([100] * 7, 2, 16),  # 7 shards over 2 ranks
    ([100] * 7, 3, 16),
    ([5, 0, 17, 3, 64, 1], 3, 8),  # uneven, one empty shard
    ([3], 4, 2),  # fewer samples than ranks
    ([1000, 1, 999], 2, 64),
]


@pytest.mark.parametrize("sizes,world,batch", CASES)
@pytest.mark.parametrize("seed", [None, 3])
def test_every_sample_goes_to_exactly_one_rank(sizes, world, batch, seed):
    seen = []
    batches = set()
    for rank in range(world):
        plan = plan_rank(sizes, rank=rank, world_size=world, batch_size=batch, seed=seed, epoch=1)
        batches.add(plan.num_batches)
        assert plan.num_batches * batch >= plan.num_samples
        segments = plan.segments(sizes, 0, plan.num_batches * batch)
        assert sum(s.stop - s.start for s in segments) == plan.num_samples
        seen += [(s.shard, i) for s in segments for i in range(s.start, s.stop)]
    assert len(batches) == 1, "ranks disagree on the number of batches: a collective would deadlock"
    assert sorted(seen) == sorted((shard, i) for shard, n in enumerate(sizes) for i in range(n))
    parts = [plan_rank(sizes, rank=r, world_size=world, batch_size=batch).num_samples for r in range(world)]
    assert max(parts) - min(parts) <= 1


def test_shard_order_depends_on_seed_and_epoch_only():
    assert shard_order(10, None, 5) == tuple(range(10))
    assert shard_order(10, 1, 0) == shard_order(10, 1, 0)
    assert shard_order(10, 1, 0) != shard_order(10, 1, 1)
    assert sorted(shard_order(10, 1, 1)) == list(range(10))


def test_segments_of_a_sub_range_are_consistent():
    """Splitting a rank's positions among workers gives the same samples as reading them all."""
    sizes = [7, 11, 5, 9]
    plan = plan_rank(sizes, rank=1, world_size=2, batch_size=4, seed=0, epoch=2)
    whole = [(s.shard, i) for s in plan.segments(sizes, 0, 100) for i in range(s.start, s.stop)]
    parts = []
    for block in worker_blocks(plan.num_batches, 3):
        parts += [
            (s.shard, i) for s in plan.segments(sizes, block.start * 4, block.stop * 4) for i in range(s.start, s.stop)
        ]
    assert parts == whole


@pytest.mark.parametrize("batches,workers", [(10, 1), (10, 3), (7, 4), (2, 4), (0, 2)])
def test_worker_blocks_and_round_robin_replay(batches, workers):
    blocks = worker_blocks(batches, workers)
    assert list(itertools.chain(*blocks)) == list(range(batches))
    # Replay the DataLoader's round robin by brute force and compare at every point.
    delivered = [0] * len(blocks)
    order = []
    while len(order) < batches:
        for w, block in enumerate(blocks):
            if delivered[w] < len(block):
                order.append(w)
                delivered[w] += 1
    for n in range(batches + 1):
        done, next_worker = replay_round_robin(blocks, n)
        assert done == [order[:n].count(w) for w in range(len(blocks))]
        # A fresh round robin starting at next_worker over what is left continues the same order.
        rest, left, w = [], [len(b) - d for b, d in zip(blocks, done, strict=True)], next_worker
        while sum(left):
            if left[w]:
                rest.append(w)
                left[w] -= 1
            w = (w + 1) % len(blocks)
        assert order[:n] + rest == order
    with pytest.raises(ValueError, match="only"):
        replay_round_robin(blocks, batches + 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        plan_rank([4], rank=2, world_size=2, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        plan_rank([4], rank=0, world_size=1, batch_size=0)
    with pytest.raises(ValueError, match="sizes"):
        plan_rank([4, -1], rank=0, world_size=1, batch_size=1)


def test_random_cases():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randrange(0, 40) for _ in range(rng.randrange(1, 9))]
        world, batch = rng.randrange(1, 5), rng.randrange(1, 9)
        counts = {plan_rank(sizes, rank=r, world_size=world, batch_size=batch).num_batches for r in range(world)}
        assert len(counts) == 1
        total = sum(plan_rank(sizes, rank=r, world_size=world, batch_size=batch).num_samples for r in range(world))
        assert total == sum(sizes)
