"""Classifier alignment (SLCA's, as the reference's `InfLoRA_CA._stage2_compact_classifier`), pure on modules.

Heads trained one task at a time never see old classes, so the argmax over all
heads favours whichever head is newest. After every task t >= 1, alignment
retrains every seen head together on features drawn from each seen class's
Gaussian (class_stats.py), with the reference's recipe:

  * each epoch draws `samples_per_class` features per class, from
    N(s_c mean_c, cov_c) with the mean scaled by s_c = (1 - d) + d (t_c + 1) / (t + 1)
    (d = 0.1, t_c the class's task): older classes' means shrink a little more;
  * shuffles them and takes one SGD step per `samples_per_class` rows (so as
    many steps per epoch as classes), lr 0.01, momentum 0.9, weight decay 5e-4,
    cosine annealing over 5 epochs, stepped per epoch;
  * optional logit normalisation: the logits are divided by the mean over
    tasks of each task's logit L2 norm, then by a temperature (0.1).

Where we differ from the reference: a class's task comes from the sequence's
task offsets (the reference divides the class index by the last task's size,
which assumes equal tasks), and all randomness comes from one seeded generator,
so the result depends only on the statistics, the heads and the seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from inflora_dist.class_stats import ClassStatistics
from inflora_dist.config import CAConfig


def mean_scales(offsets: Sequence[int], task: int, decay: float) -> torch.Tensor:
    """s_c = (1 - decay) + decay (t_c + 1) / (task + 1) for every class of tasks 0..task (float64)."""
    sizes = [offsets[t + 1] - offsets[t] for t in range(task + 1)]
    scales = [(1.0 - decay) + decay * (t + 1) / (task + 1) for t, size in enumerate(sizes) for _ in range(size)]
    return torch.tensor(scales, dtype=torch.float64)


def normalized_logits(logits: torch.Tensor, offsets: Sequence[int], temperature: float) -> torch.Tensor:
    """Logits divided by the mean over tasks of each task's logit L2 norm (+1e-7), then by `temperature`."""
    norms = [logits[:, lo:hi].norm(p=2, dim=-1, keepdim=True) + 1e-7 for lo, hi in itertools.pairwise(offsets)]
    return logits / torch.cat(norms, dim=-1).mean(dim=-1, keepdim=True) / temperature


def align_classifier(
    heads: Sequence[nn.Module],
    stats: ClassStatistics,
    offsets: Sequence[int],
    task: int,
    recipe: CAConfig,
    generator: torch.Generator,
) -> list[float]:
    """Retrain `heads` (heads 0..task, on the host) in place on sampled features; returns each epoch's mean loss.

    `offsets[j]` is the first logit position of task j (offsets[task + 1]: the classes seen so far).
    """
    if len(heads) != task + 1:
        raise ValueError(f"alignment after task {task} retrains {task + 1} heads, got {len(heads)}")
    seen = offsets[task + 1]
    params = [p for head in heads for p in head.parameters()]
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    scales = mean_scales(offsets, task, recipe.mean_decay)
    n = recipe.samples_per_class
    losses = []
    for _ in range(recipe.epochs):
        features, labels = stats.sample(n, seen, scales, generator)
        order = torch.randperm(len(labels), generator=generator)
        features, labels = features[order], labels[order]
        total = 0.0
        for i in range(seen):  # as many steps as classes, `n` rows each
            x, y = features[i * n : (i + 1) * n], labels[i * n : (i + 1) * n]
            logits = torch.cat([head(x) for head in heads], dim=1)
            if recipe.logit_norm is not None:
                logits = normalized_logits(logits, offsets[: task + 2], recipe.logit_norm)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        schedule.step()
        losses.append(total / seen)
    return losses
