"""The covariance planner: byte counts at LLaMA-2-7B scale, pass splitting, and multi-pass collection."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from test_covariance import TARGETS, covariance_pass, make_batches
from tiny_models import tiny_llama

from inflora_dist.continual import InfLoRA
from inflora_dist.covariance import assign_owners, traffic_bytes
from inflora_dist.inject import inject_inflora
from inflora_dist.planner import collect_in_passes, plan_covariance, result_bytes, sum_bytes
from inflora_dist.subspace import SubspaceMemory


def llama2_7b_dims() -> dict[str, int]:
    """The input groups of LLaMA-2-7B adapted on q/k/v/o/gate/up/down: 32 layers x (3 of 4096 + 1 of 11008)."""
    dims = {}
    for i in range(32):
        dims[f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj"] = 4096
        dims[f"model.layers.{i}.self_attn.o_proj"] = 4096
        dims[f"model.layers.{i}.mlp.gate_proj+up_proj"] = 4096
        dims[f"model.layers.{i}.mlp.down_proj"] = 11008
    return dims


def test_llama2_7b_byte_counts():
    dims = llama2_7b_dims()
    assert 11008**2 * 4 == 484_704_256  # one fp32 down_proj sum: 485 MB
    assert sum_bytes(11008, 4) == 484_704_256 + 4  # + its float32 token count
    assert result_bytes(11008) == 969_408_512  # its reduced float64 covariance

    plan = plan_covariance(dims, world_size=2, bytes_per_element=4, reduce="all_reduce")
    local = 32 * (3 * 4096**2 + 11008**2) * 4 + 128 * 4
    assert local == 21_952_987_648
    assert plan.total_sum_bytes() == local
    assert plan.passes == [sorted(dims, key=lambda g: (-dims[g], g))]  # no budget: one pass, largest first
    # All-reduce: every rank holds all fp32 sums, every float64 result, one float64 temporary of 11008^2
    # and one reduction bucket (the default 256 MiB: the pass's triangles are far larger).
    peak = local + 32 * (3 * 4096**2 + 11008**2) * 8 + 11008**2 * 8 + 256 * 2**20
    assert peak == 67_096_805_888
    assert plan.bytes_per_rank_per_pass == [[peak, peak]]
    assert plan.peak_bytes_per_rank == [peak, peak]

    # Owner mode: the same local sums everywhere; each rank adds only the results it owns.
    owner = plan_covariance(dims, world_size=4, bytes_per_element=4, reduce="owner")
    assert owner.owners == assign_owners(dims, 4)
    for r, row in enumerate(owner.bytes_per_rank_per_pass[0]):
        owned = [g for g in dims if owner.owners[g] == r]
        assert row == local + sum(dims[g] ** 2 * 8 for g in owned) + max(dims[g] ** 2 * 8 for g in owned) + 2**28

    # The bucket is at most the pass's traffic (upper triangles and counts); none at world size 1.
    small = {"a": 8, "b": 4}
    traffic = (36 + 1 + 10 + 1) * 8
    assert traffic_bytes(8, 8) + traffic_bytes(4, 8) == traffic
    two = plan_covariance(small, 2, bytes_per_element=8, reduce="all_reduce")
    one = plan_covariance(small, 1, bytes_per_element=8, reduce="all_reduce")
    assert two.bytes_per_rank_per_pass[0][0] == one.bytes_per_rank_per_pass[0][0] + traffic
    capped = plan_covariance(small, 2, bytes_per_element=8, reduce="all_reduce", bucket_bytes=64)
    assert capped.bytes_per_rank_per_pass[0][0] == one.bytes_per_rank_per_pass[0][0] + 64


def test_number_of_passes_by_hand():
    """float64 sums, one rank, owner mode, each pass consumed: a group costs 16 d^2 + 8 bytes."""
    dims = llama2_7b_dims()
    budget = 4_000_000_000
    plan = plan_covariance(dims, 1, bytes_per_element=8, max_bytes_per_rank=budget, keep_results=False)
    down, small = 16 * 11008**2 + 8, 16 * 4096**2 + 8
    assert (down, small) == (1_938_817_032, 268_435_464)
    # 2 downs per pass (3 would be 5.8 GB): 16 passes; the 16th is too full for a 4096 group
    # (3,877,634,064 + 268,435,464 > 4e9); then 14 of 4096 per pass (15 would be 4,026,531,960): 96 / 14 -> 7.
    assert plan.num_passes == 16 + 7
    assert [len(p) for p in plan.passes] == [2] * 16 + [14] * 6 + [12]
    assert plan.bytes_per_rank_per_pass[0] == [2 * down]
    assert plan.bytes_per_rank_per_pass[16] == [14 * small]
    assert plan.peak_bytes_per_rank == [2 * down]
    assert sorted(g for p in plan.passes for g in p) == sorted(dims)

    # Keeping the float64 results of earlier passes fills the budget: after two downs (1.94 GB kept),
    # one more fits (3.88 GB), then the third pass's down would need 2.91 + 1.94 GB.
    with pytest.raises(ValueError, match="kept from earlier passes"):
        plan_covariance(dims, 1, bytes_per_element=8, max_bytes_per_rank=budget, keep_results=True)


def test_group_over_budget_is_an_error():
    dims = llama2_7b_dims()
    with pytest.raises(ValueError) as err:
        plan_covariance(dims, 1, bytes_per_element=4, max_bytes_per_rank=1_000_000_000)
    message = str(err.value)
    assert "'model.layers.0.mlp.down_proj'" in message
    assert "484,704,260 bytes" in message  # its local sum
    assert "2,423,521,284 bytes" in message  # + float64 result + float64 temporary on its owner
    assert "1,000,000,000" in message
    with pytest.raises(ValueError, match="reduce"):
        plan_covariance(dims, 1, reduce="gather")


def test_describe_lists_every_group_and_the_budget():
    dims = {"layers.0.qkv": 32, "layers.0.down": 48, "layers.1.qkv": 32}
    plan = plan_covariance(dims, 2, bytes_per_element=4, max_bytes_per_rank=60_000)
    text = plan.describe()
    for g in dims:
        assert g in text
    assert "60,000 bytes" in text and "budget" in text
    assert "rank 1" in text
    assert plan.num_passes > 1
    assert "budget per rank: none" in plan_covariance(dims, 1).describe()


def run_pass_over(model: torch.nn.Module, batches: list):
    def run_pass(collector) -> None:
        for ids, mask in batches:
            with collector.token_mask(mask):
                model(input_ids=ids, attention_mask=mask)

    return run_pass


def test_multi_pass_matches_one_pass_and_designs_the_same_a():
    torch.manual_seed(0)
    batches = make_batches()
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99, reduce="all_reduce")
    dims = inflora.report.dims
    assert sorted(set(dims.values())) == [32, 48] and len(dims) == 8

    covariance_pass(model, inflora, batches)
    reference = inflora.collector.all_reduce()

    # Kept results: 4 passes by hand (see the planner's accounting; float64 sums, one rank).
    plan = plan_covariance(dims, 1, bytes_per_element=8, max_bytes_per_rank=100_000, reduce="all_reduce")
    assert [len(p) for p in plan.passes] == [3, 3, 1, 1]
    covs = collect_in_passes(inflora, plan, run_pass_over(model, batches))
    assert sorted(covs) == sorted(reference)
    for g in reference:
        assert covs[g].dtype == torch.float64
        torch.testing.assert_close(covs[g], reference[g], rtol=0, atol=1e-12)
    assert not inflora.collector.sums  # the InfLoRA's own collector is untouched

    covariance_pass(model, inflora, batches)
    designed = inflora.on_task_start(0)
    for g, a in designed.items():
        fresh = SubspaceMemory(dims[g], 0.9, 0.99, 2)
        torch.testing.assert_close(fresh.down_projection(covs[g], 3), a, rtol=0, atol=1e-12)


def test_consumed_per_pass_in_owner_mode():
    """Just above the biggest group, each pass consumed by on_pass: one pass per down group, then pairs."""
    batches = make_batches()
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99, reduce="owner")
    dims = inflora.report.dims
    covariance_pass(model, inflora, batches)
    reference = inflora.collector.reduce_to_owners(inflora.owners)

    biggest = sum_bytes(48, 8) + result_bytes(48)
    plan = plan_covariance(dims, 1, bytes_per_element=8, max_bytes_per_rank=biggest + 1, keep_results=False)
    assert [len(p) for p in plan.passes] == [1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="on_pass"):
        collect_in_passes(inflora, plan, run_pass_over(model, batches))

    seen, designs = [], {}

    def on_pass(index: int, covs: dict) -> None:
        seen.append((index, sorted(covs)))
        for g, c in covs.items():
            torch.testing.assert_close(c, reference[g], rtol=0, atol=1e-12)
            designs[g] = inflora.memories[g].down_projection(c, 3)

    assert collect_in_passes(inflora, plan, run_pass_over(model, batches), on_pass) == {}
    assert seen == [(i, sorted(p)) for i, p in enumerate(plan.passes)]
    covariance_pass(model, inflora, batches)
    for g, a in inflora.on_task_start(0).items():
        torch.testing.assert_close(designs[g], a, rtol=0, atol=1e-12)


def test_plan_must_match_the_collector():
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99, reduce="owner")
    with pytest.raises(ValueError, match="differ in groups"):
        collect_in_passes(inflora, plan_covariance({"x": 4}, 1), lambda c: None)
    with pytest.raises(ValueError, match="all_reduce"):
        collect_in_passes(inflora, plan_covariance(inflora.report.dims, 1, reduce="all_reduce"), lambda c: None)
    with pytest.raises(ValueError, match="2 rank"):
        collect_in_passes(inflora, plan_covariance(inflora.report.dims, 2), lambda c: None)


def owner_passes(rank: int, world_size: int, splits: list[list[int]], budget: int) -> dict:
    torch.set_num_threads(1)
    batches = make_batches()
    mine = [batches[i] for i in splits[rank]]
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99, reduce="owner")
    plan = plan_covariance(inflora.report.dims, world_size, bytes_per_element=8, max_bytes_per_rank=budget)
    covs = collect_in_passes(inflora, plan, run_pass_over(model, mine))
    return {"covs": covs, "passes": plan.num_passes, "owners": plan.owners}


def test_two_process_owner_mode_matches_single_process(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = tiny_llama()
        inflora = InfLoRA(inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99)
        covariance_pass(model, inflora, make_batches())
        reference = inflora.collector.all_reduce()
    finally:
        torch.set_num_threads(threads)
    results = run_distributed(owner_passes, 2, tmp_path, [[0, 1, 2, 3, 4], [5]], 60_000)
    assert results[0]["passes"] == results[1]["passes"] > 1
    covs = {}
    for rank, result in enumerate(results):
        assert all(result["owners"][g] == rank for g in result["covs"])
        assert not set(covs) & set(result["covs"])
        covs.update(result["covs"])
    assert sorted(covs) == sorted(reference)
    for g in reference:
        torch.testing.assert_close(covs[g], reference[g], rtol=0, atol=1e-10)
