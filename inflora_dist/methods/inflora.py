"""InfLoRA (Liang & Li, CVPR 2024) as a method: A_t designed from the task's data outside the old tasks'
subspace, only B_t trained, the subspace grown by DualGPM after the task (continual.py, subspace.py).

    start_stage   covariance pass over the stage's data  -> A_t per input group
    finish_stage  covariance pass with the branch active -> DualGPM update, fold B_t A_t
                  (the same pass sums the class statistics, for classification)

`Joint` is the upper bound in the same branches: every task's data in one stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from inflora_dist import dist
from inflora_dist.checkpoint import MEMORY_PREFIX
from inflora_dist.config import RunConfig
from inflora_dist.continual import InfLoRA
from inflora_dist.covariance import CovarianceCollector
from inflora_dist.export import export_continual_state
from inflora_dist.inject import InjectionReport
from inflora_dist.methods.base import Method, Stage
from inflora_dist.metrics import JointScores, Scores
from inflora_dist.planner import collect_in_passes, plan_for
from inflora_dist.workloads import Workload

logger = logging.getLogger(__name__)

_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


class InfLoRAMethod(Method):
    """InfLoRA: designed, frozen A_t; trained B_t; DualGPM memories per input group (checkpointed, exported)."""

    reads_data_after_training = True  # the DualGPM update's covariance pass

    def __init__(self, cfg: RunConfig, report: InjectionReport, workload: Workload) -> None:
        super().__init__(cfg, report, workload)
        c = cfg.inflora
        self.inflora = InfLoRA(
            report, c.lambda_begin, c.lambda_end, reduce=c.reduce, accumulation_dtype=_DTYPES[c.accumulation_dtype],
            gemm_dtype=_DTYPES[c.covariance_gemm_dtype], bucket_bytes=c.reduce_bucket_bytes,
            planned_tasks=c.planned_tasks, mask_sides=workload.mask_sides(report.groups),
        )  # fmt: skip

    # ------------------------------------------------------------------ stages
    def start_stage(self, stage: Stage) -> None:
        def design(covs: dict[str, torch.Tensor], groups: list[str]) -> None:
            self.inflora.on_task_start(stage.index, covs, groups)  # collective

        seconds, _ = self._covariance_pass(stage, design)
        stage.timings.update(design_pass_s=seconds["pass"], design_reduce_s=seconds["reduce"],
                             subspace_design_s=seconds["use"])  # fmt: skip

    def finish_stage(self, stage: Stage, sums: Any) -> float:
        def update(covs: dict[str, torch.Tensor], groups: list[str]) -> None:
            self.inflora.update_memories(stage.index, covs, groups)  # collective

        seconds, summing = self._covariance_pass(stage, update, sums)
        start = time.perf_counter()
        self.inflora.finish_task(stage.index)  # folds B A
        stage.timings.update(update_pass_s=seconds["pass"], update_reduce_s=seconds["reduce"],
                             subspace_update_s=seconds["use"] + time.perf_counter() - start)  # fmt: skip
        return summing

    def _covariance_pass(
        self, stage: Stage, use: Callable[[dict[str, torch.Tensor], list[str]], None], sums: Any = None
    ) -> tuple[dict[str, float], float]:
        """Collect x x^T of the stage's training data (exact mode), reduce it, and hand this rank's reduced
        covariances with their groups to `use`; returns the seconds of the data passes, the reductions and
        `use` (decompositions), and the seconds of class sums.

        With `sums`, the same forwards also sum the class statistics' features
        (once, even when the pass is split). Without
        `inflora.covariance_max_bytes_per_rank` one pass fills the InfLoRA
        collector. With it, the input groups are split into several passes over
        the data that fit the budget (planner.py), each pass's covariances used
        and dropped before the next: no rank holds more than one pass's. Collective.
        """
        seconds = {"pass": 0.0, "reduce": 0.0, "use": 0.0}
        stage.engine.eval()
        pending = [sums]  # class sums go into the first pass only
        summing = [0.0]
        max_tokens = self.cfg.inflora.covariance_max_tokens

        def run_pass(collector: CovarianceCollector) -> None:
            start = time.perf_counter()
            class_sums = pending.pop() if pending else None
            summing[0] += stage.data_pass(f"stage {stage.index} covariance", collector, class_sums, max_tokens)
            seconds["pass"] += time.perf_counter() - start

        def timed_use(covs: dict[str, torch.Tensor], groups: list[str]) -> None:
            start = time.perf_counter()
            use(covs, groups)
            seconds["use"] += time.perf_counter() - start

        start = time.perf_counter()
        budget = self.cfg.inflora.covariance_max_bytes_per_rank
        if budget is None:
            with self.inflora.collector.capturing():
                run_pass(self.inflora.collector)
            reduced = time.perf_counter()
            covs = self.inflora.reduced_covariances()  # collective
            seconds["reduce"] = time.perf_counter() - reduced
            timed_use(covs, self.inflora.collector.groups)
            return seconds, summing[0]
        plan = plan_for(self.inflora, budget, keep_results=False)
        if dist.is_main_process():
            logger.info("covariance plan:\n%s", plan.describe())
        collect_in_passes(self.inflora, plan, run_pass, lambda p, covs: timed_use(covs, plan.passes[p]))  # collective
        seconds["reduce"] = time.perf_counter() - start - seconds["pass"] - seconds["use"]
        return seconds, summing[0]

    # ------------------------------------------------------------------ state
    @property
    def horizon(self) -> int:
        """DualGPM's threshold horizon T in use (the same in every group's memory)."""
        return next(iter(self.inflora.memories.values())).num_tasks

    @staticmethod
    def saved_horizon(meta: dict[str, Any]) -> int:
        """The horizon of a checkpoint's run; before it was recorded: the explicit key, else the run's length."""
        return meta.get("planned_tasks") or meta["config"]["inflora"].get("planned_tasks") or len(meta["task_sequence"])

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{MEMORY_PREFIX}{g}": m.basis for g, m in self.inflora.memories.items()}
        meta = {"planned_tasks": self.horizon, "memory_modes": {g: m.mode for g, m in self.inflora.memories.items()}}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if self.cfg.inflora.planned_tasks is None and "config" in meta:
            for memory in self.inflora.memories.values():  # the run's horizon holds for the tasks it gains
                memory.num_tasks = self.saved_horizon(meta)
        for g, memory in self.inflora.memories.items():
            memory.load_state_dict(
                {**memory.state_dict(), "mode": meta["memory_modes"][g], "basis": tensors[f"{MEMORY_PREFIX}{g}"]}
            )

    def resume_problems(self, meta: dict[str, Any]) -> list[str]:
        planned, horizon = self.cfg.inflora.planned_tasks, self.saved_horizon(meta)
        if planned is not None and planned != horizon:
            return [f"inflora.planned_tasks: the run's threshold horizon is {horizon} -> {planned}"]
        return []

    def export(self, out: Path, stage_names: Sequence[str]) -> None:
        export_continual_state(self.inflora, out / "continual_state.safetensors", stage_names)

    def log_values(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for g, m in self.inflora.memories.items():
            values[f"subspace/{g}/dim"] = m.protected_dim
            values[f"subspace/{g}/retain"] = int(m.mode == "retain")
        return values

    def describe(self) -> str:
        return f"DualGPM horizon T={self.horizon}"


class Joint(InfLoRAMethod):
    """All tasks in one stage, every batch mixing them (the upper bound): InfLoRA's branch on the union."""

    @staticmethod
    def stages(num_tasks: int) -> list[list[int]]:
        return [list(range(num_tasks))]

    @staticmethod
    def new_scores(keys: Sequence[str], num_tasks: int) -> Scores:
        return JointScores(keys)
