"""`bench budget`'s comparison of two runs' A: the row-space angles per task (its runs are the trainer's own)."""

from __future__ import annotations

import math

import pytest
import torch

from inflora_dist.bench.budget import row_space_angles


def test_row_space_angles_per_task_over_groups():
    """Per task, the largest angle over the groups; rows scaled or reordered are the same space; a zero row
    (no direction with energy) is left out, and a differing usable rank counts as 90 degrees."""
    e = torch.eye(4)
    tilted = torch.stack([e[0], math.cos(0.1) * e[1] + math.sin(0.1) * e[2]])
    full = {"g.A.0": e[:2], "h.A.0": e[2:], "g.A.1": e[:2], "g.old_basis": e}
    budget = {"g.A.0": 3 * e[[1, 0]], "h.A.0": -e[[3, 2]], "g.A.1": tilted}
    angles = row_space_angles(full, budget)
    assert angles[0] == pytest.approx(0.0, abs=1e-6)
    assert angles[1] == pytest.approx(math.degrees(0.1), abs=1e-6)
    budget["g.A.1"] = torch.stack([e[0], torch.zeros(4)])
    assert row_space_angles(full, budget)[1] == 90.0
