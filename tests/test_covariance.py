"""The covariance aggregator: hooks, masking, and exact reduction across real gloo processes."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from tiny_models import VOCAB, tiny_llama

from inflora_dist.continual import InfLoRA
from inflora_dist.covariance import CovarianceCollector, TokenBudget, assign_owners, restrict_mask
from inflora_dist.inject import inject_inflora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batches(n_batches: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of varying size whose rows are right-padded to varying lengths (pad id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        size, length = 1 + i % 3, 5 + (i * 3) % 7
        ids = torch.randint(1, VOCAB, (size, length), generator=g)
        mask = torch.ones(size, length, dtype=torch.long)
        for row in range(size):
            keep = int(torch.randint(2, length + 1, (1,), generator=g))
            ids[row, keep:] = 0
            mask[row, keep:] = 0
        batches.append((ids, mask))
    return batches


def covariance_pass(model: torch.nn.Module, inflora: InfLoRA, batches: list) -> None:
    with torch.no_grad(), inflora.collector.capturing():
        for ids, mask in batches:
            with inflora.collector.token_mask(mask):
                model(input_ids=ids, attention_mask=mask)


def two_tasks(rank: int, world_size: int, splits: list[list[int]]) -> dict:
    """Collect, reduce, design A_0, fake-train, update memory, design A_1, in both reduce modes.

    One thread, as in the workers: float32 matmuls then give bit-identical activations.
    """
    torch.set_num_threads(1)
    batches = make_batches()
    mine = [batches[i] for i in splits[rank]]
    out = {}
    for mode in ("all_reduce", "owner"):
        model = tiny_llama()
        inflora = InfLoRA(inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99, reduce=mode)
        covariance_pass(model, inflora, mine)
        if mode == "owner":
            covs = inflora.collector.reduce_to_owners(inflora.owners)
        else:
            covs = inflora.collector.all_reduce()
        covariance_pass(model, inflora, mine)
        a0 = inflora.on_task_start(0)
        g = torch.Generator().manual_seed(7)  # the same "trained" B on every rank
        for layer in inflora.report.layers.values():
            layer.lora_B(0).data.copy_(torch.randn(layer.lora_B(0).shape, generator=g) * 0.3)
        covariance_pass(model, inflora, mine)
        inflora.on_task_end(0)
        covariance_pass(model, inflora, mine)
        a1 = inflora.on_task_start(1)
        out[mode] = {
            "cov": covs,
            "A0": a0,
            "A1": a1,
            "old_basis": {g: m.old_basis() for g, m in inflora.memories.items()},
        }
    return out


@pytest.mark.parametrize(
    "splits",
    [
        pytest.param([[0, 1, 2, 3, 4], [5]], id="2-ranks-uneven"),
        pytest.param([[0, 1, 2, 3], [4, 5], []], id="3-ranks-one-empty"),
    ],
)
def test_distributed_matches_single_process(tmp_path, splits):
    """All-reduce and owner modes give the covariance, A and memory of one process over all the data."""
    threads = torch.get_num_threads()
    try:
        reference = two_tasks(0, 1, [sorted(i for s in splits for i in s)])["all_reduce"]
    finally:
        torch.set_num_threads(threads)
    results = run_distributed(two_tasks, len(splits), tmp_path, splits)
    groups = sorted(reference["cov"])
    assert len(groups) == 8
    for mode in ("all_reduce", "owner"):
        covs = {}
        for rank_result in results:
            owned = rank_result[mode]["cov"]
            if mode == "owner":
                assert len(owned) < len(groups), "an owner-mode rank must not hold every covariance"
                assert not set(owned) & set(covs), "a group was reduced to two owners"
            else:
                assert sorted(owned) == groups
            covs.update(owned)
        assert sorted(covs) == groups
        for g in groups:
            torch.testing.assert_close(covs[g], reference["cov"][g], rtol=0, atol=1e-10)
        for rank_result in results:
            for key in ("A0", "A1"):
                for g in groups:
                    torch.testing.assert_close(rank_result[mode][key][g], reference[key][g], rtol=0, atol=1e-10)
            for g in groups:
                b, ref = rank_result[mode]["old_basis"][g], reference["old_basis"][g]
                torch.testing.assert_close(b @ b.T, ref @ ref.T, rtol=0, atol=1e-10)


def test_padding_is_masked_out():
    """A padded batch with its mask gives the covariance of the unpadded sequences; without it, not."""
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, ["q_proj", "k_proj", "v_proj"], rank=2, num_tasks=1), 0.9, 0.99)
    group = "model.layers.0.self_attn.q_proj+k_proj+v_proj"
    ids, mask = make_batches(n_batches=3)[2]  # 3 rows, each padded differently
    assert (mask == 0).any()

    covariance_pass(model, inflora, [(ids, mask)])
    masked = inflora.collector.all_reduce()[group]
    with torch.no_grad(), inflora.collector.capturing():
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            model(input_ids=ids[row : row + 1, :n])
    separate = inflora.collector.all_reduce()[group]
    with torch.no_grad(), inflora.collector.capturing():
        model(input_ids=ids, attention_mask=mask)
    unmasked = inflora.collector.all_reduce()[group]

    torch.testing.assert_close(masked, separate, rtol=1e-5, atol=1e-6)
    assert (unmasked - separate).abs().max() > 1e-3


def test_token_counts_and_plain_sum():
    """The collector's covariance is (1/N) sum x x^T over the unmasked tokens, computed by hand."""
    layer = torch.nn.Linear(4, 3)
    collector = CovarianceCollector({"g": layer}, {"g": 4})
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with collector.capturing(), collector.token_mask(mask):
        layer(x)
    tokens = x[mask.bool()].double()
    assert float(collector.counts["g"]) == 8
    torch.testing.assert_close(collector.local_covariance("g"), tokens.T @ tokens / 8)
    torch.testing.assert_close(collector.all_reduce()["g"], tokens.T @ tokens / 8)


def test_mask_of_wrong_shape_names_the_group():
    layer = torch.nn.Linear(4, 3)
    collector = CovarianceCollector({"attn.qkv": layer}, {"attn.qkv": 4})
    with pytest.raises(ValueError, match=r"attn\.qkv"), collector.capturing(), collector.token_mask(torch.ones(2, 3)):
        layer(torch.randn(2, 5, 4))


def test_empty_group_is_an_error_not_a_nan():
    layer = torch.nn.Linear(4, 3)
    collector = CovarianceCollector({"g": layer}, {"g": 4})
    with pytest.raises(ValueError, match="saw no tokens"):
        collector.all_reduce()


def test_hooks_are_removed_after_the_pass():
    layer = torch.nn.Linear(4, 3)
    collector = CovarianceCollector({"g": layer}, {"g": 4})
    with collector.capturing():
        layer(torch.randn(3, 4))
    layer(torch.randn(100, 4))  # outside the pass: not counted
    assert float(collector.counts["g"]) == 3


def test_state_dict_resumes_a_partial_pass():
    layer = torch.nn.Linear(4, 3)
    x1, x2 = torch.randn(6, 4), torch.randn(5, 4)
    whole = CovarianceCollector({"g": layer}, {"g": 4})
    with whole.capturing():
        layer(x1)
        layer(x2)
    first = CovarianceCollector({"g": layer}, {"g": 4})
    with first.capturing():
        layer(x1)
    resumed = CovarianceCollector({"g": layer}, {"g": 4})
    resumed.load_state_dict(first.state_dict())
    with resumed.capturing():
        layer(x2)
    torch.testing.assert_close(resumed.all_reduce()["g"], whole.all_reduce()["g"], rtol=0, atol=1e-12)


def test_owner_assignment_balances_decomposition_cost():
    """Groups go to ranks so the d^3 costs are balanced, the same way on every call."""
    dims = {f"layer{i}.qkv": 4096 for i in range(4)} | {f"layer{i}.down": 11008 for i in range(4)}
    owners = assign_owners(dims, 4)
    assert owners == assign_owners(dict(reversed(list(dims.items()))), 4)
    load = [0] * 4
    for g, r in owners.items():
        load[r] += dims[g] ** 3
    assert max(load) / min(load) < 1.1
    assert set(assign_owners({"a": 8}, 3).values()) == {0}
    with pytest.raises(ValueError, match="world_size"):
        assign_owners(dims, 0)


def bucketed_reductions(rank: int, world_size: int) -> dict:
    """The same data reduced three ways: today's one full-matrix all-reduce per group, and the bucketed
    triangles with a cap that makes segments straddle buckets, in both modes."""
    from inflora_dist import dist

    torch.set_num_threads(1)
    mine = [b for i, b in enumerate(make_batches()) if i % world_size == rank]
    out: dict = {}
    for name, cap, mode in (("reference", None, None), ("all_reduce", 1000, "all_reduce"), ("owner", 1000, "owner")):
        model = tiny_llama()
        inflora = InfLoRA(
            inject_inflora(model, TARGETS, rank=3, num_tasks=2), 0.9, 0.99, reduce=mode or "all_reduce",
            bucket_bytes=cap or dist.DEFAULT_BUCKET_BYTES,
        )  # fmt: skip
        covariance_pass(model, inflora, mine)
        collector = inflora.collector
        if name == "reference":  # the pre-bucketing path: every full sum and the counts on their own
            counts = dist.all_reduce_sum_(torch.stack([collector.counts[g] for g in collector.groups]))
            full = {g: dist.all_reduce_sum_(collector.sums[g].clone()) for g in collector.groups}
            out[name] = {g: full[g] / n for g, n in zip(collector.groups, counts, strict=True)}
            out["full_bytes"] = sum(collector.sums[g].numel() + 1 for g in collector.groups) * 8
            continue
        out[name] = collector.all_reduce() if mode == "all_reduce" else collector.reduce_to_owners(inflora.owners)
        out[f"{name}_stats"] = dict(collector.last_reduction)
        out["triangle_bytes"] = collector.reduce_bytes()
    groups = sorted(out["reference"])
    # The packer itself: odd sizes, a cap of 3 float64 values, every segment reduced to rank 1.
    parts = [torch.arange(n, dtype=torch.float64) * (rank + 1) for n in (5, 1, 7, 2)]
    out["packed_count"] = dist.sum_in_buckets_([dist.Flat(p) for p in parts], 24, dst=min(1, world_size - 1))
    out["packed"] = parts
    out["groups"] = groups
    return out


def test_bucketed_triangles_equal_the_full_reduction_bit_for_bit(tmp_path):
    """Upper triangles in capped buckets give exactly today's covariances, at about half the bytes,
    in ceil(bytes / cap) collectives (all-reduce mode) and per owner (owner mode)."""
    import math

    results = run_distributed(bucketed_reductions, 2, tmp_path)
    for res in results:
        for g in res["groups"]:
            assert torch.equal(res["all_reduce"][g], res["reference"][g])
            if g in res["owner"]:
                assert torch.equal(res["owner"][g], res["reference"][g])
        assert set(results[0]["owner"]) | set(results[1]["owner"]) == set(res["groups"])
        assert not set(results[0]["owner"]) & set(results[1]["owner"])
        # d(d+1)/2 + 1 of d^2 + 1 values per group: 0.516 at the tiny model's d = 32, 0.501 at ViT-S's 384
        assert res["triangle_bytes"] < 0.52 * res["full_bytes"]
        assert res["all_reduce_stats"] == {"bytes": res["triangle_bytes"], "collectives": math.ceil(
            res["triangle_bytes"] / 1000)}  # fmt: skip
        assert res["owner_stats"]["collectives"] >= 1 + 2  # the counts, then at least one bucket per owner
        assert res["packed_count"] == math.ceil(15 / 3)
    for n, part in zip((5, 1, 7, 2), results[1]["packed"], strict=True):
        assert torch.equal(part, torch.arange(n, dtype=torch.float64) * 3)  # 1x + 2x, straddling included


def test_float32_gemm_with_float64_sum_keeps_massive_activations_exact():
    """A few huge coordinates (LLM-style massive activations) over many batches: the top-r projector of
    float32 per-batch products summed in float64 matches the all-float64 one; an all-float32 sum does not."""
    from inflora_dist.bench.precision import projector_errors

    errors = projector_errors(dim=48, batches=400, tokens=512, rank=8, seed=0)
    assert errors["fp32_gemm_fp64_sum"] <= 1e-6, errors
    assert errors["fp32_all"] > 10 * max(errors["fp32_gemm_fp64_sum"], 1e-9), errors


def test_upper_triangle_streams_by_ranges_on_both_paths():
    """Ranges of the triangle stream straddling rows: the host path (row slices) reads and writes exactly the
    row-major upper triangle; the accelerator path's index (run here on the CPU) names the same entries."""
    from inflora_dist.dist import UpperTriangle

    d = 9
    m = torch.arange(d * d, dtype=torch.float64).reshape(d, d)
    rows, cols = torch.triu_indices(d, d)
    expected = m[rows, cols]
    tri = UpperTriangle(m)
    assert tri.numel() == d * (d + 1) // 2 == expected.numel()
    for step in (1, 4, 7, 45):
        got = torch.cat([torch.empty(min(step, tri.numel() - s), dtype=torch.float64) for s in
                         range(0, tri.numel(), step)])  # fmt: skip
        for s in range(0, tri.numel(), step):
            tri.read(s, got[s : s + step])
            assert torch.equal(tri._index(s, min(step, tri.numel() - s)), (rows * d + cols)[s : s + step])
        assert torch.equal(got, expected)
        target = torch.zeros(d, d, dtype=torch.float64)
        back = UpperTriangle(target)
        for s in range(0, tri.numel(), step):
            back.write(s, expected[s : s + step])
        assert torch.equal(target, m.triu())


def test_planned_tasks_sets_the_threshold_horizon():
    """inflora.planned_tasks: eps_t runs over the planned horizon, not the layers' task count (default)."""
    report = inject_inflora(tiny_llama(), ["k_proj", "v_proj"], rank=2, num_tasks=3)
    default = InfLoRA(report, 0.9, 0.99)
    planned = InfLoRA(report, 0.9, 0.99, planned_tasks=6)
    for memory in default.memories.values():
        assert memory.threshold(3) == pytest.approx(0.99)
    for memory in planned.memories.values():
        assert memory.threshold(3) == pytest.approx(0.9 + 0.09 * 3 / 6) and memory.threshold(9) == pytest.approx(0.99)


def test_token_budget_takes_a_prefix_of_whole_samples():
    """Whole samples in order until one does not fit (padding rows skipped); nothing after it; the first sample
    always counts; masks by side are restricted row by row."""
    budget = TokenBudget(10)
    assert budget.take(torch.tensor([3, 0, 4])).tolist() == [True, False, True]
    assert budget.take(torch.tensor([5, 2])).tolist() == [False, False]  # 5 does not fit: 2 is not taken either
    assert (budget.used, budget.samples, budget.full) == (7, 2, True)
    assert budget.take(torch.tensor([1])).tolist() == [False]
    big = TokenBudget(4)
    assert big.take(torch.tensor([9, 1])).tolist() == [True, False]
    keep = torch.tensor([True, False])
    masks = restrict_mask({"encoder": torch.ones(2, 3), "decoder": torch.ones(2)}, keep)
    assert masks["encoder"].tolist() == [[1, 1, 1], [0, 0, 0]] and masks["decoder"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="covariance_max_tokens"):
        TokenBudget(0)
