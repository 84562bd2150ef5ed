"""Classifier alignment: the reference's mean scaling and logit normalisation, and that it aligns biased heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inflora_dist.alignment import align_classifier, mean_scales, normalized_logits
from inflora_dist.class_stats import ClassStatistics, ClassSums
from inflora_dist.config import CAConfig
from inflora_dist.models import TaskHead

D, TASKS, K = 16, 3, 2


def test_mean_scales_are_the_reference_decay():
    # reference: decay = (t_id + 1) / (cur_task + 1) * 0.1; mean * (0.9 + decay), t_id = class // task_size
    offsets = [0, 2, 4, 6]
    expected = [0.9 + (c // 2 + 1) / 3 * 0.1 for c in range(6)]
    torch.testing.assert_close(mean_scales(offsets, 2, 0.1), torch.tensor(expected, dtype=torch.float64))
    assert mean_scales([0, 3, 4], 1, 0.1).tolist() == pytest.approx([0.95, 0.95, 0.95, 1.0])  # unequal tasks
    assert mean_scales(offsets, 2, 0.0).tolist() == [1.0] * 6


def test_normalized_logits_match_the_reference_loop():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    task_sizes = [2, 3, 2]
    # the reference's _stage2_compact_classifier, transcribed
    per_task_norm, prev, cur = [], 0, 0
    for size in task_sizes:
        cur += size
        per_task_norm.append(torch.norm(logits[:, prev:cur], p=2, dim=-1, keepdim=True) + 1e-7)
        prev += size
    norms = torch.cat(per_task_norm, dim=-1).mean(dim=-1, keepdim=True)
    expected = torch.div(logits[:, :7], norms) / 0.1
    torch.testing.assert_close(normalized_logits(logits, [0, 2, 5, 7], 0.1), expected)


def _gaussian_tasks() -> tuple[ClassStatistics, list[TaskHead], torch.Tensor, torch.Tensor]:
    """Three tasks of two Gaussian classes; each head trained alone, newer heads with larger logits (the bias)."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(TASKS * K, D, generator=gen) * 1.2
    stats, heads = ClassStatistics(D, "full"), []
    for t in range(TASKS):
        ys = torch.arange(t * K, (t + 1) * K).repeat_interleave(200)
        xs = centers[ys] + 0.7 * torch.randn(len(ys), D, generator=gen)
        sums = ClassSums(t * K, list(range(t * K, (t + 1) * K)), D, "full")
        sums.add(xs, ys, torch.ones(len(ys)))
        stats.extend(sums)
        torch.manual_seed(t)
        head = TaskHead(D, K)
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        for _ in range(100):
            loss = F.cross_entropy(head(xs), ys - t * K)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            head.weight.mul_(1 + t)
            head.bias.add_(t)
        heads.append(head)
    y_test = torch.arange(TASKS * K).repeat_interleave(100)
    x_test = centers[y_test] + 0.7 * torch.randn(len(y_test), D, generator=gen)
    return stats, heads, x_test, y_test


def _accuracy(heads: list[TaskHead], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([h(x) for h in heads], 1).argmax(1) == y).float().mean())


@pytest.mark.parametrize("logit_norm", [0.1, None])
def test_alignment_undoes_the_newest_head_bias(logit_norm):
    stats, heads, x, y = _gaussian_tasks()
    before = _accuracy(heads, x, y)
    losses = align_classifier(heads, stats, [0, 2, 4, 6], 2, CAConfig(logit_norm=logit_norm), torch.Generator())
    assert len(losses) == 5 and losses[-1] < losses[0]
    after = _accuracy(heads, x, y)
    assert before < 0.7 and after > 0.85, (before, after)  # (a Gaussian-Bayes classifier: 1.0)


def test_alignment_depends_only_on_its_inputs_and_seed():
    results = []
    for seed in (3, 3, 4):
        stats, heads, _, _ = _gaussian_tasks()
        align_classifier(heads, stats, [0, 2, 4, 6], 2, CAConfig(epochs=2), torch.Generator().manual_seed(seed))
        results.append(torch.cat([p.detach().reshape(-1) for h in heads for p in h.parameters()]))
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_alignment_checks_the_heads():
    stats, heads, _, _ = _gaussian_tasks()
    with pytest.raises(ValueError, match="alignment after task 2 retrains 3 heads, got 2"):
        align_classifier(heads[:2], stats, [0, 2, 4, 6], 2, CAConfig(), torch.Generator())
