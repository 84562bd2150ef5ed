"""Class statistics: per-class means and covariances against torch.cov, forms, bad input, and ranks (gloo)."""

from __future__ import annotations

import logging

import pytest
import torch
from distributed import run_distributed

from inflora_dist import dist
from inflora_dist.class_stats import ClassStatistics, ClassSums, nearest_mean

D = 6


def _data(seed: int = 0, n: int = 90, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and their logit positions 0..classes-1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64) * 3 + torch.arange(D, dtype=torch.float64)
    return x, torch.randint(classes, (n,), generator=gen)


def _stats(form: str, x: torch.Tensor, y: torch.Tensor, batch: int = 7) -> ClassStatistics:
    """Statistics of positions 0.. from batches of `batch` rows, each with two padding rows of weight 0."""
    sums = ClassSums(0, [40 + k for k in range(int(y.max()) + 1)], D, form)
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        pad_x, pad_y = torch.full((2, D), 1e6, dtype=torch.float64), torch.tensor([0, -1])  # weight 0: ignored
        sums.add(torch.cat([xb, pad_x]), torch.cat([yb, pad_y]), torch.cat([torch.ones(len(yb)), torch.zeros(2)]))
    stats = ClassStatistics(D, form)
    stats.extend(sums)
    return stats


def test_full_form_is_torch_cov_plus_the_reference_regulariser():
    x, y = _data()
    stats = _stats("full", x, y)
    assert len(stats) == 3
    for k in range(3):
        rows = x[y == k]
        assert stats.counts[k] == len(rows)
        torch.testing.assert_close(stats.means[k], rows.mean(0).float(), rtol=0, atol=1e-6)
        expected = torch.cov(rows.T) + 1e-4 * torch.eye(D, dtype=torch.float64)  # the reference's estimate
        torch.testing.assert_close(stats.covariance(k), expected.float().double(), rtol=0, atol=1e-5)
    assert stats.nbytes == 3 * 8 + 3 * D * 4 + 3 * D * D * 4


def test_diagonal_and_shared_forms():
    x, y = _data(1)
    full, diag, shared = (_stats(f, x, y) for f in ("full", "diagonal", "shared"))
    for k in range(3):
        torch.testing.assert_close(diag.covariance(k), torch.diag(torch.diag(full.covariance(k))), atol=1e-5, rtol=0)
    # shared: the pooled within-class covariance, sum_c (n_c - 1) cov_c / sum_c (n_c - 1)
    dof = full.counts - 1
    pooled = sum(dof[k] * (full.covariance(k) - 1e-4 * torch.eye(D, dtype=torch.float64)) for k in range(3))
    expected = pooled / dof.sum() + 1e-4 * torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(shared.covariance(2), expected, atol=1e-5, rtol=0)
    assert shared.nbytes < full.nbytes and diag.nbytes < full.nbytes


def test_statistics_grow_task_by_task_and_round_trip(tmp_path):
    x0, y0 = _data(2, classes=2)
    x1, y1 = _data(3, classes=2)
    stats = _stats("full", x0, y0)
    sums = ClassSums(2, [0, 9], D, "full")  # the next task: positions 2 and 3
    sums.add(x1, y1 + 2, torch.ones(len(y1)))
    stats.extend(sums)
    assert len(stats) == 4
    torch.testing.assert_close(stats.means[3], x1[y1 == 1].mean(0).float())
    again = ClassStatistics(D, "full")
    again.load_state_dict(stats.state_dict())
    for key, value in stats.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with pytest.raises(ValueError, match="do not continue these statistics"):
        stats.extend(ClassSums(0, [4], D, "full"))  # positions 0.. again
    with pytest.raises(ValueError, match=r"the 'shared' form needs .*another ca.covariance"):
        ClassStatistics(D, "shared").load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match=r"covariances has shape \(4, 6, 6\), expected \(4, 6\)"):
        ClassStatistics(D, "diagonal").load_state_dict(stats.state_dict())


def test_single_sample_class_is_regularised_and_logged(caplog):
    sums = ClassSums(0, [3, 8], D, "full")
    sums.add(torch.ones(3, D), torch.tensor([0, 0, 1]), torch.ones(3))
    stats = ClassStatistics(D, "full")
    with caplog.at_level(logging.WARNING):
        stats.extend(sums)
    assert "classes [8] have a single training sample" in caplog.text
    torch.testing.assert_close(stats.covariance(1), 1e-4 * torch.eye(D, dtype=torch.float64))


def test_bad_input_names_the_class():
    sums = ClassSums(0, [3, 8], D, "full")
    sums.add(torch.ones(2, D), torch.tensor([0, 0]), torch.ones(2))
    with pytest.raises(ValueError, match=r"classes \[8\] have no training sample"):
        ClassStatistics(D, "full").extend(sums)
    with pytest.raises(ValueError, match=r"logit positions \[5\] outside this task's classes \(positions 0..1\)"):
        sums.add(torch.ones(1, D), torch.tensor([5]), torch.ones(1))
    with pytest.raises(ValueError, match="covariance form must be one of"):
        ClassSums(0, [1], D, "low_rank")
    means_only = _stats("none", *_data())
    with pytest.raises(ValueError, match=r"needs a covariance: set ca\.covariance"):
        means_only.sample(4, 3, torch.ones(3), torch.Generator())


@pytest.mark.parametrize("form", ["full", "diagonal", "shared"])
def test_samples_follow_the_class_gaussians_reproducibly(form):
    x, y = _data(4, n=300)
    stats = _stats(form, x, y)
    scales = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    feats, labels = stats.sample(20000, 3, scales, torch.Generator().manual_seed(7))
    assert feats.dtype == torch.float32 and labels.tolist() == [0] * 20000 + [1] * 20000 + [2] * 20000
    for k in range(3):
        got = feats[labels == k].double()
        torch.testing.assert_close(got.mean(0), stats.means[k].double() * scales[k], atol=0.08, rtol=0)
        torch.testing.assert_close(torch.cov(got.T), stats.covariance(k), atol=0.25, rtol=0.05)
    again, _ = stats.sample(20000, 3, scales, torch.Generator().manual_seed(7))
    assert torch.equal(feats, again)


def test_nearest_mean_is_cosine():
    means = torch.tensor([[1.0, 0.0], [10.0, 10.0], [0.0, -1.0]])
    feats = torch.tensor([[5.0, 0.1], [0.2, 0.3], [0.0, -50.0], [-1.0, -1.1]])
    assert nearest_mean(feats, means).tolist() == [0, 1, 2, 2]


def _sum_on_rank(rank: int, world: int, x: torch.Tensor, y: torch.Tensor, parts: list[list[int]]) -> dict:
    """Rank `rank` sums its share of the rows; one all-reduce; the extended statistics."""
    calls = []
    reduce = dist.all_reduce_sum_
    dist.all_reduce_sum_ = lambda t: calls.append(t.numel()) or reduce(t)  # count the collectives
    try:
        sums = ClassSums(0, [4, 5, 6], D, "full")
        rows = torch.tensor(parts[rank], dtype=torch.long)
        if len(rows):
            sums.add(x[rows], y[rows], torch.ones(len(rows)))
        sums.all_reduce_()
    finally:
        dist.all_reduce_sum_ = reduce
    return {"counts": sums.counts, "sums": sums.sums, "second": sums.second, "calls": torch.tensor(calls)}


def test_three_uneven_ranks_equal_one_process(tmp_path):
    """Rank 0 holds every class, rank 1 none of class 2, rank 2 no data at all: the sums equal one process's."""
    x, y = _data(5, n=120)
    idx = torch.arange(len(y))
    r1 = idx[(y != 2) & (idx % 2 == 1)].tolist()
    r0 = [i for i in idx.tolist() if i not in set(r1)]
    results = run_distributed(_sum_on_rank, 3, tmp_path, x, y, [r0, r1, []])
    single = _sum_on_rank(0, 1, x, y, [idx.tolist()])
    for result in results:
        assert result["calls"].tolist() == [3 + 3 * D + 3 * D * D]  # one collective for the whole task
        for key in ("counts", "sums", "second"):
            torch.testing.assert_close(result[key], single[key], rtol=0, atol=1e-10, msg=key)
