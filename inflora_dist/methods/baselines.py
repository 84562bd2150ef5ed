"""The baselines InfLoRA is compared with, in the same branches and on the same data.

* `SeqLoRA`: the same branches, rank and targets, A_t drawn like LoRA's A and
  frozen (LoRA-FA style, so the trainable set is InfLoRA's), nothing protected:
  the forgetting baseline.
* `SimpleCIL` (Zhou et al., 2023): nothing trains; after each task the heads
  become the prototype classifier of the frozen backbone (the unit class means).
"""

from __future__ import annotations

from collections.abc import Sequence

from inflora_dist.continual import start_random_branches
from inflora_dist.methods.base import Method, Stage
from inflora_dist.workloads import ClassIncremental


class SeqLoRA(Method):
    """Sequential LoRA with a random, frozen A_t per input group (seeded: the same on every rank)."""

    def start_stage(self, stage: Stage) -> None:
        start_random_branches(self.report, stage.index, self.cfg.seed)


class SimpleCIL(Method):
    """The pre-trained backbone as it is; heads from the class means (classification only)."""

    trains = False

    def finish_stage(self, stage: Stage, sums: object) -> float:
        return self.class_sums_pass(stage, sums)  # no branch to fold

    def update_heads(self, classes: ClassIncremental, stage: int, tasks: Sequence[int]) -> list[float]:
        classes.prototype_heads(tasks[-1])  # collective
        return []
