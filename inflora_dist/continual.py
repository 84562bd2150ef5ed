"""InfLoRA's task-boundary hooks: design A_t before a task, grow the memory after it.

    collector pass over task t's data     ->  on_task_start(t): A_t per group
    train B_t (and the task's head)
    collector pass with the branch active ->  on_task_end(t):   DualGPM update, fold B_t A_t

Both hooks are collectives: every rank calls them in the same order. With
reduce="owner" each group's covariance lives only on its owner rank, which
runs the subspace math and broadcasts A_t and the updated memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from inflora_dist import dist
from inflora_dist.covariance import CovarianceCollector, assign_owners
from inflora_dist.inject import InjectionReport
from inflora_dist.subspace import REMOVE, RETAIN, Eigh, SubspaceMemory, batched_eigh

logger = logging.getLogger(__name__)

REDUCE_MODES = ("all_reduce", "owner")
_MODE_CODES = {None: 0, REMOVE: 1, RETAIN: 2}


def broadcast_memory_(memory: SubspaceMemory, src: int) -> None:
    """Make every rank's `memory` equal to rank `src`'s. Collective (two broadcasts)."""
    device = dist.collective_device()
    header = torch.tensor([_MODE_CODES[memory.mode], memory.basis.shape[1]], dtype=torch.int64, device=device)
    dist.broadcast_(header, src)
    code, k = header.tolist()
    basis = (
        memory.basis.to(device)
        if dist.get_rank() == src
        else torch.empty(memory.dim, k, dtype=torch.float64, device=device)
    )
    dist.broadcast_(basis, src)
    memory.mode = {v: m for m, v in _MODE_CODES.items()}[code]
    memory.basis = basis.cpu()


def random_down_projection(rank: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """A (rank, d) drawn like LoRA's A: kaiming-uniform with a = sqrt(5), i.e. uniform in +-1/sqrt(d); float64."""
    return (torch.rand(rank, d, generator=generator, dtype=torch.float64) * 2 - 1) / d**0.5


def start_random_branches(report: InjectionReport, task_id: int, seed: int) -> None:
    """The seq-LoRA control: A_t drawn like LoRA's A (`random_down_projection`), not designed.

    Seeded by (seed, task, group), so every rank draws the same A. Nothing is
    protected: the branch may move weights in directions old tasks use.
    """
    for i, (g, names) in enumerate(report.groups.items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + task_id * 1009 + i)
        a = random_down_projection(report.layers[names[0]].rank, report.dims[g], gen)
        for layer in report.group_modules(g):
            layer.start_task(task_id, a)


def finish_branches(report: InjectionReport) -> None:
    """Freeze and fold the active branch of every wrapped layer."""
    for layer in report.layers.values():
        layer.finish_task()


class InfLoRA:
    """Subspace memories and the covariance collector for the input groups of an injected model."""

    def __init__(
        self,
        report: InjectionReport,
        lambda_begin: float,
        lambda_end: float,
        reduce: str = "all_reduce",
        accumulation_dtype: torch.dtype | None = None,
        gemm_dtype: torch.dtype | None = None,
        bucket_bytes: int = dist.DEFAULT_BUCKET_BYTES,
        planned_tasks: int | None = None,
        mask_sides: Mapping[str, str] | None = None,
    ) -> None:
        """`accumulation_dtype` (default float64) and `gemm_dtype` (default: float64 on CPU, float32 on
        accelerators) are the covariance sums' and each batch's x^T x; `bucket_bytes` caps one reduction
        bucket (see covariance.py). `planned_tasks` is DualGPM's threshold horizon T (default: the layers'
        task count). `mask_sides` names each group's token mask when a model's layers read different tokens
        (encoder-decoder: see CovarianceCollector)."""
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        self.report = report
        first = next(iter(report.layers.values()))
        self.rank, self.num_tasks = first.rank, first.num_tasks
        self.reduce = reduce
        horizon = planned_tasks or self.num_tasks
        self.memories = {g: SubspaceMemory(d, lambda_begin, lambda_end, horizon) for g, d in report.dims.items()}
        representatives = {g: report.layers[names[0]] for g, names in report.groups.items()}
        self.collector = CovarianceCollector(
            representatives,
            report.dims,
            dtype=accumulation_dtype or torch.float64,
            gemm_dtype=gemm_dtype,
            bucket_bytes=bucket_bytes,
            sides=mask_sides,
        )
        self.owners = assign_owners(report.dims, dist.get_world_size()) if reduce == "owner" else None

    def reduced_covariances(self) -> dict[str, torch.Tensor]:
        """The collector's sums reduced over the ranks: every group's covariance, or in owner mode this rank's
        own groups' (float64); the sums are dropped. Collective."""
        if self.owners is not None:
            return self.collector.reduce_to_owners(self.owners)
        return self.collector.all_reduce()

    def _decompositions(self, covs: Mapping[str, torch.Tensor], groups: Sequence[str]) -> dict[str, Eigh]:
        """The eigh of the groups of `groups` this rank decomposes, computed ahead on accelerators only: there
        those of equal size take one stacked call (batched_eigh). On the host none ahead: each group's own eigh
        in its turn, since a stack gains nothing there and holding every group's vectors at once would add d^2
        float64 per group (2 GiB for a rank's 16 q/v groups of LLaMA-2-7B)."""
        mine = [g for g in groups if g in covs]
        if not mine or covs[mine[0]].device.type == "cpu":
            return {}
        eigs = batched_eigh([self.memories[g].eigh_operand(covs[g]) for g in mine])
        return dict(zip(mine, eigs, strict=True))

    def _groups(self, groups: Sequence[str] | None) -> list[str]:
        if groups is None:
            return self.collector.groups
        unknown = sorted(set(groups) - set(self.collector.groups))
        if unknown:
            raise ValueError(f"unknown input group(s) {unknown}; this model's are {self.collector.groups}")
        return [g for g in self.collector.groups if g in groups]

    def on_task_start(
        self,
        task_id: int,
        covariances: Mapping[str, torch.Tensor] | None = None,
        groups: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Design A_t for every group from the collected pass over task t's data; install it. Collective.

        `covariances` (this rank's reduced covariances, e.g. from planner.collect_in_passes)
        replace the collector's. `groups` (default all) designs those only: one pass of a
        split collection, every rank naming the same ones. Returns the designed A_t per
        group, (rank, d_in) float64, identical on every rank.
        """
        covs = self.reduced_covariances() if covariances is None else covariances
        groups = self._groups(groups)
        eigs = self._decompositions(covs, groups)
        designs = {}
        for g in groups:
            if g in covs:
                a = self.memories[g].down_projection(covs[g], self.rank, eigs.get(g))
            else:
                a = torch.empty(self.rank, self.report.dims[g], dtype=torch.float64)
            if self.owners is not None:
                a = dist.broadcast_(a.to(dist.collective_device()), self.owners[g]).cpu()  # collective
            for layer in self.report.group_modules(g):
                layer.start_task(task_id, a)
            designs[g] = a
        return designs

    def update_memories(
        self,
        task_id: int,
        covariances: Mapping[str, torch.Tensor] | None = None,
        groups: Sequence[str] | None = None,
    ) -> None:
        """Grow the memories of `groups` (default all) from the post-task pass (DualGPM). Collective.

        `covariances` and `groups` as in `on_task_start`."""
        covs = self.reduced_covariances() if covariances is None else covariances
        groups = self._groups(groups)
        eigs = self._decompositions(covs, groups)
        for g in groups:
            if g in covs:
                self.memories[g].update(covs[g], task_id, eigs.get(g))
            if self.owners is not None:
                broadcast_memory_(self.memories[g], self.owners[g])  # collective

    def on_task_end(self, task_id: int, covariances: Mapping[str, torch.Tensor] | None = None) -> None:
        """Grow every group's memory from the post-task pass (DualGPM) and fold the task's branches. Collective.

        `covariances`, if given, replace the collector's (as in `on_task_start`).
        """
        self.update_memories(task_id, covariances)
        self.finish_task(task_id)

    def finish_task(self, task_id: int) -> None:
        """Fold the task's branches (after every group's memory is updated) and log the memories."""
        finish_branches(self.report)
        if dist.is_main_process():
            for g, m in self.memories.items():
                logger.info(
                    "task %d: %s protects %d/%d directions (%s mode)", task_id, g, m.protected_dim, m.dim, m.mode
                )

    def state_dict(self) -> dict[str, dict]:
        """Every group's subspace memory."""
        return {g: m.state_dict() for g, m in self.memories.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore memories saved by `state_dict`; the groups must match."""
        if set(state) != set(self.memories):
            raise ValueError(f"state names groups {sorted(set(state) ^ set(self.memories))} this model does not have")
        for g, s in state.items():
            self.memories[g].load_state_dict(s)
