"""The epoch planner: every sample to exactly one rank, equal batch counts, world-size invariant steps."""

from __future__ import annotations

import itertools
import random

import pytest

from inflora_dist.data.plan import plan_rank, replay_round_robin, shard_order, worker_blocks

CASES = [
    ([100] * 7, 2, 16, 1),  # 7 shards over 2 ranks
    ([100] * 7, 3, 16, 2),
    ([5, 0, 17, 3, 64, 1], 3, 8, 1),  # uneven, one empty shard
    ([3], 4, 2, 1),  # fewer samples than ranks
    ([1000, 1, 999], 2, 64, 4),
]


def rows(plan, batch):
    return [(s.shard, i) for s in plan.segments(batch) for i in range(s.start, s.stop)]


@pytest.mark.parametrize("sizes,world,batch,accumulation", CASES)
@pytest.mark.parametrize("seed", [None, 3])
def test_every_sample_goes_to_exactly_one_rank(sizes, world, batch, accumulation, seed):
    seen, counts = [], set()
    for rank in range(world):
        plan = plan_rank(sizes, rank=rank, world_size=world, batch_size=batch, seed=seed, epoch=1,
                         multiple_of=accumulation)  # fmt: skip
        counts.add(plan.num_batches)
        assert plan.num_batches % accumulation == 0
        for b in range(plan.num_batches):
            got = rows(plan, b)
            assert len(got) == len(plan.run(b)) <= batch
            seen += got
    assert len(counts) == 1, "ranks disagree on the number of batches: a collective would deadlock"
    assert sorted(seen) == sorted((shard, i) for shard, n in enumerate(sizes) for i in range(n))


@pytest.mark.parametrize("seed", [None, 5])
def test_micro_steps_cover_the_same_samples_whatever_the_world_size(seed):
    """Micro-step k of 1 rank x 16 rows holds what micro-step k of 2 ranks x 8 or 4 ranks x 4 hold."""
    sizes = [37, 50, 13, 64]

    def step_sets(world: int) -> list[set]:
        plans = [plan_rank(sizes, rank=r, world_size=world, batch_size=16 // world, seed=seed) for r in range(world)]
        return [set().union(*(rows(p, k) for p in plans)) for k in range(plans[0].num_batches)]

    assert step_sets(1) == step_sets(2) == step_sets(4)


def test_shard_order_depends_on_seed_and_epoch_only():
    assert shard_order(10, None, 5) == tuple(range(10))
    assert shard_order(10, 1, 0) == shard_order(10, 1, 0)
    assert shard_order(10, 1, 0) != shard_order(10, 1, 1)
    assert sorted(shard_order(10, 1, 1)) == list(range(10))


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
    with pytest.raises(ValueError, match="multiple_of"):
        plan_rank([4], rank=0, world_size=1, batch_size=1, multiple_of=0)


def test_random_cases():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randrange(0, 40) for _ in range(rng.randrange(1, 9))]
        world, batch = rng.randrange(1, 5), rng.randrange(1, 9)
        plans = [plan_rank(sizes, rank=r, world_size=world, batch_size=batch, seed=1) for r in range(world)]
        assert len({p.num_batches for p in plans}) == 1
        assert sum(len(rows(p, b)) for p in plans for b in range(p.num_batches)) == sum(sizes)


@pytest.mark.parametrize("sizes,world,batch", [([5, 3, 4], 2, 3), ([10, 10, 10, 10], 3, 4), ([7], 2, 2)])
def test_interleaved_plan_mixes_shards_and_stays_exact_and_world_invariant(sizes, world, batch):
    plans = [
        plan_rank(sizes, rank=r, world_size=world, batch_size=batch, seed=2, interleave=True) for r in range(world)
    ]
    seen = [row for p in plans for b in range(p.num_batches) for row in rows(p, b)]
    assert sorted(seen) == sorted((s, i) for s, n in enumerate(sizes) for i in range(n))
    one = plan_rank(sizes, rank=0, world_size=1, batch_size=batch * world, seed=2, interleave=True)
    for k in range(one.num_batches):
        assert sorted(rows(one, k)) == sorted(row for p in plans for row in rows(p, k))
    if len(sizes) > 1:  # the first positions come from different shards
        first = rows(one, 0)[: len(sizes)]
        assert len({s for s, _ in first}) == min(len(sizes), len(first))
