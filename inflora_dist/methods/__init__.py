"""Continual-learning methods behind one interface (base.Method), and the one function that assembles a run's
model: the workload (backbone, heads), the branch layers and the method, as training and every command that
reads a finished run build them.

    inflora     A_t designed outside the old tasks' subspace, B_t trained (inflora.py)
    joint       every task in one stage: the upper bound (inflora.py)
    olora       A_t and B_t trained, A_t pushed orthogonal to the old A's (olora.py)
    seq_lora    random frozen A_t, B_t trained, nothing protected (baselines.py)
    simple_cil  nothing trained, prototype heads (baselines.py)
    gainlora    InfLoRA's (or O-LoRA's) branches weighed per input by a gate per task (gainlora.py)

A method is chosen by `method:` in the config; adding one means a class here and its name in METHODS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inflora_dist.checkpoint import class_statistics_state, restore_model_state
from inflora_dist.config import METHOD_NAMES, RunConfig
from inflora_dist.data import TaskSequenceConfig
from inflora_dist.inject import inject_inflora
from inflora_dist.methods.base import Method, Stage
from inflora_dist.methods.baselines import SeqLoRA, SimpleCIL
from inflora_dist.methods.gainlora import GainLoRA
from inflora_dist.methods.inflora import InfLoRAMethod, Joint
from inflora_dist.methods.olora import OLoRA
from inflora_dist.workloads import Workload, build_workload

#: The methods by their config name.
METHODS: dict[str, type[Method]] = {
    "inflora": InfLoRAMethod,
    "seq_lora": SeqLoRA,
    "joint": Joint,
    "simple_cil": SimpleCIL,
    "olora": OLoRA,
    "gainlora": GainLoRA,
}
assert set(METHODS) == set(METHOD_NAMES), "config.METHOD_NAMES lists the methods of this registry"

__all__ = ["METHODS", "Method", "Stage", "assemble", "restore"]


def assemble(cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device, num_tasks: int) -> tuple[Workload, Method]:
    """The workload of `cfg.model` for `seq`, with the method's branch layers (one slot per stage of
    `num_tasks` tasks) injected into its model, and the method. Collective: every rank builds the same."""
    kind = METHODS[cfg.method]
    workload = build_workload(cfg, seq, device)
    options = {"fold": cfg.inflora.fold, **kind.layer_options(cfg)}  # a method may fix the fold (GainLoRA)
    report = inject_inflora(
        workload.model, cfg.inflora.targets, cfg.inflora.rank, len(kind.stages(num_tasks)),
        layers_to_transform=cfg.inflora.layers_to_transform, **options,
    )  # fmt: skip
    return workload, kind(cfg, report, workload)


def restore(workload: Workload, method: Method, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
            source: Path) -> None:  # fmt: skip
    """Load a checkpoint's state (`checkpoint.read_state`) into an assembled run: branches and heads (merged
    branches added back into the freshly loaded weights), the method's state, the class statistics."""
    restore_model_state(workload.model, method.report.layers.values(), tensors, source)
    method.load_state(tensors, meta)
    if workload.classes is not None:
        workload.classes.load_statistics(class_statistics_state(tensors))
