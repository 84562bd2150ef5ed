"""The interface every continual-learning method implements, and what a stage hands it.

The trainer (loop.py) runs the same stages for every method and asks the method
at each point where methods differ:

    stages(num_tasks)        which tasks train together: one per stage, or all at once (joint)
    layer_options(cfg)       how the branch layers are built (a trainable A, a scaling)
    prepare_stage(s)         before the stage's engine exists: install what needs no data (a trained A's start)
    start_stage(stage)       before training: design or draw the stage's branches (may read the data)
    trainable_parameters(s)  the branch tensors that train in stage s (the workload adds its heads)
    loss_terms()             terms added to each micro-batch's loss after its forward (regularisers)
    after_update(lr)         after each optimizer update: the method's own parameters' update (GainLoRA's gates)
    finish_stage(stage, ..)  after training: grow memories, fold the branches; fill the class sums
    update_heads(..)         set the heads from the class statistics (classification): alignment, prototypes
    state / load_state       what the method adds to a checkpoint; resume_problems: what must not change
    export(out, names)       files the method adds to a finished run
    exports / write_export   folders the method adds to a finished run, written on every rank (gathered)
    new_scores(keys, T)      how evaluation rows are kept (a matrix per score, or one joint row)
    evaluating(j, upto)      around the scoring of task j: what the method measures there (GainLoRA's gates)
    metrics()                what the method adds to metrics.json

`Method` implements the plain LoRA-like behaviour; methods override what differs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inflora_dist.config import RunConfig
from inflora_dist.continual import finish_branches
from inflora_dist.covariance import CovarianceCollector
from inflora_dist.inject import InjectionReport
from inflora_dist.metrics import MatrixScores, Scores
from inflora_dist.workloads import ClassIncremental, Workload

logger = logging.getLogger(__name__)

#: `data_pass(desc, collector, sums, max_tokens)`: one no-grad pass over the stage's training data feeding a
#: covariance collector and/or class sums; returns the seconds spent summing class features. Collective.
DataPass = Callable[[str, CovarianceCollector | None, Any, int | None], float]


@dataclass
class Stage:
    """One stage of the sequence as the trainer hands it to the method's hooks."""

    index: int
    tasks: list[int]  # the tasks trained together in this stage
    engine: Any  # the stage's DeepSpeed engine (forward passes)
    data_pass: DataPass
    timings: dict[str, float] = field(default_factory=dict)  # phase seconds the method measured


class Method:
    """A continual-learning method over InfLoRALinear branches; see the module docstring for the hooks.

    Every hook that communicates is a collective: every rank calls it in the same order.
    """

    #: Whether stages train (SimpleCIL trains nothing: its heads come from the class statistics).
    trains: bool = True
    #: Whether the branches export as a PEFT adapter and a merged model (GainLoRA's gated ones cannot).
    adapter_export: bool = True
    #: Folders the method writes into a finished run (`write_export`), beside the adapter exports.
    exports: tuple[str, ...] = ()
    #: Whether `finish_stage` runs a pass over the stage's training data (InfLoRA's update pass): a method
    #: wrapping this one may observe that pass instead of running its own (GainLoRA).
    reads_data_after_training: bool = False

    def __init__(self, cfg: RunConfig, report: InjectionReport, workload: Workload) -> None:
        self.cfg, self.report, self.workload = cfg, report, workload

    # ------------------------------------------------------------------ construction
    @staticmethod
    def stages(num_tasks: int) -> list[list[int]]:
        """The tasks trained together at each stage: one per stage."""
        return [[t] for t in range(num_tasks)]

    @classmethod
    def layer_options(cls, cfg: RunConfig) -> dict[str, Any]:
        """Keyword options of `inject_inflora` for this method's branch layers."""
        return {}

    # ------------------------------------------------------------------ stages
    def prepare_stage(self, stage: int) -> None:
        """Before `stage`'s engine is built (not on a mid-task resume). Optimizers with master weights (ZeRO 1-3,
        mixed precision) copy the trainable tensors when the engine is built: a trained tensor's initial value
        must be set here, not in `start_stage`. Collective."""

    def start_stage(self, stage: Stage) -> None:
        """Install the stage's branches before training. Collective."""

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """The branch tensors that train in `stage`: B_stage of every layer."""
        return [layer.lora_B(stage) for layer in self.report.layers.values()]

    def loss_terms(self) -> torch.Tensor | None:
        """Terms to add to the micro-batch loss just computed (None: none). Called after every training forward."""
        return None

    def after_update(self, lr: float) -> None:
        """After each optimizer update of the engine (at learning rate `lr`): update what the method trains
        outside the engine. Collective."""

    def finish_stage(self, stage: Stage, sums: Any) -> float:
        """Fold the stage's branches, after a pass that fills the class `sums` (if any). Collective.

        Returns the seconds spent on the class sums.
        """
        seconds = self.class_sums_pass(stage, sums)
        finish_branches(self.report)
        return seconds

    @staticmethod
    def class_sums_pass(stage: Stage, sums: Any) -> float:
        """A pass over the stage's data for the class `sums` alone (none without sums); returns its seconds."""
        start = time.perf_counter()
        if sums is not None:
            stage.data_pass(f"stage {stage.index} class statistics", None, sums, None)
        return time.perf_counter() - start

    def update_heads(self, classes: ClassIncremental, stage: int, tasks: Sequence[int]) -> list[float]:
        """Classifier alignment of heads 0..tasks[-1] after every stage >= 1, if `ca.enabled`. Collective.

        Returns the alignment's losses per epoch (rank 0; empty elsewhere or when none ran).
        """
        if not (self.cfg.ca.enabled and stage >= 1):
            return []
        logger.info("stage %d: classifier alignment of heads 0..%d", stage, tasks[-1])
        return classes.align_heads(tasks[-1], self.cfg.ca, seed=self.cfg.seed * 1_000_003 + stage)

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON the method adds to a checkpoint (beyond the branch layers' own)."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state` saved."""

    def resume_problems(self, meta: dict[str, Any]) -> list[str]:
        """'key: saved -> now' for method settings a checkpoint's state cannot be resumed under."""
        return []

    def export(self, out: Path, stage_names: Sequence[str]) -> None:
        """Files the method writes into a finished run's directory (main process only)."""

    def write_export(self, name: str, folder: Path, stage_names: Sequence[str]) -> None:
        """Write the export `name` (one of `exports`) into `folder`. Collective (every rank; the main one writes)."""

    def log_values(self) -> dict[str, float]:
        """Scalars for the monitor after each stage."""
        return {}

    @contextlib.contextmanager
    def evaluating(self, task: int, upto: int) -> Iterator[dict[str, Any]]:
        """Around the scoring of task `task` with tasks 0..`upto` learned (-1: zero-shot); the yielded dict holds
        what the method measured there once the block has exited (GainLoRA: `gates`). Collective."""
        yield {}

    def metrics(self) -> dict[str, Any]:
        """Entries the method adds to metrics.json."""
        return {}

    def describe(self) -> str:
        """One line for the log when a run is extended by more tasks."""
        return ""

    @staticmethod
    def new_scores(keys: Sequence[str], num_tasks: int) -> Scores:
        """How evaluation rows are kept: one accuracy matrix per score, a row per stage."""
        return MatrixScores(keys, num_tasks)
