"""GainLoRA (Liang, Chen & Li, NeurIPS 2025, arXiv:2505.15424): InfLoRA's (or O-LoRA's) branches, each weighed per
input by its task's gate (gates.py), so that an old task's input switches the new branches off.

The branches are an inner method (`gainlora.branches`: InfLoRAMethod, whose A is designed outside the old tasks'
input subspace; or OLoRA, whose A trains with its orthogonality term); every branch stays unmerged (fold stack)
and every forward weighs it by a_i(prompt). Around them, per task t (the reference: `2unju/gainlora` at 0263e48,
`src/cl_trainer_gainlora_inflora_llama.py`, "TL" below, and `src/run_llama.py`, "RL"):

    prepare_stage  gate_t <- gate_{t-1} (RL L540-549); k_t <- its uniform(-1, 1) draw with the old tasks'
                   gate-output subspace taken out, rescaled to norm sqrt(d / 3) (TL L228-233, whose 64 / sqrt(3)
                   is sqrt(4096 / 3))
    training       gate_t and k_t train beside B_t (one optimizer, the engine's lr at every step; here an Adam of
                   their own, replicated on every rank, their gradients averaged over the ranks); after every
                   update, the update of gate_t's two weights and of k_t is projected out of the old tasks'
                   subspaces of the gate's input, hidden activation and output: W <- W_old + (W - W_old)(I - P)
                   (TL L1296-1333; task 0 unprojected)
    finish_stage   the branches' own finish (InfLoRA: its DualGPM update), then a pass over the task's training
                   data whose gate inputs, hidden activations and outputs (of gate_t) grow the three gate
                   subspaces (`get_repsentation`, TL L234-476: GPM on each covariance, energy of its squared
                   singular values, threshold 0.995 + 0.005 t / 15)

Departures, each for a reason: the covariances are summed in float64 over every rank by the project's collector
(the reference gathers float32 per-rank means to rank 0 and averages them, which weighs ranks, not samples, and
computes the subspaces in CuPy on rank 0); the subspaces are SubspaceMemory's (DualGPM: the same span as the
reference's GPM, stored in the cheaper of its two forms); the gate input divides by each prompt's own token
count (gates.py); the gates' gradients are clipped apart from the engine's (train.grad_clip), since the engine's
global norm covers its own parameters only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inflora_dist import dist
from inflora_dist.checkpoint import METHOD_PREFIX
from inflora_dist.config import RunConfig
from inflora_dist.covariance import CovarianceCollector
from inflora_dist.gated import save_gated_model
from inflora_dist.gates import GateRouter, TaskGates, project_update
from inflora_dist.inject import InjectionReport
from inflora_dist.methods.base import Method, Stage
from inflora_dist.methods.inflora import InfLoRAMethod
from inflora_dist.methods.olora import OLoRA
from inflora_dist.subspace import SubspaceMemory
from inflora_dist.workloads import Workload

logger = logging.getLogger(__name__)

#: The branch methods the gates weigh (`gainlora.branches`).
BRANCHES: dict[str, type[Method]] = {"inflora": InfLoRAMethod, "olora": OLoRA}
#: The gate activations whose subspaces protect the old tasks' gate values: the gate's input (xbar), its hidden
#: activation (the second linear's input) and its output.
SIDES = ("input", "hidden", "output")
#: Checkpoint tensor prefixes.
GATES_PREFIX, GATE_MEMORY_PREFIX, GATE_OPTIMIZER_PREFIX = (
    f"{METHOD_PREFIX}gates.",
    f"{METHOD_PREFIX}gate_memory.",
    f"{METHOD_PREFIX}gate_optimizer.",
)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `tensors` under `prefix`, by the rest of their name."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def gate_architecture(cfg: RunConfig) -> str:
    """`gainlora.gate_architecture`, with auto resolved by the model's family (the reference's per family)."""
    arch = cfg.gainlora.gate_architecture
    if arch == "auto":
        return "t5" if cfg.model.kind == "seq2seq_lm" else "llama"
    return arch


def embedding_dim(model: nn.Module) -> int:
    """The input embeddings' width (the whole width of a ZeRO-3 partitioned table)."""
    weight = model.get_input_embeddings().weight
    return int(tuple(getattr(weight, "ds_shape", weight.shape))[1])


class GainLoRA(Method):
    """Gated branches: see the module docstring. Trains a gate and a key per task beside the branches."""

    #: A PEFT adapter or a merged model cannot carry the input-dependent gates: the run exports `gated_model/`.
    adapter_export = False
    exports = ("gated_model",)

    @classmethod
    def layer_options(cls, cfg: RunConfig) -> dict[str, Any]:
        options = BRANCHES[cfg.gainlora.branches].layer_options(cfg)
        # Every branch stays a branch (a gated one cannot be merged), scaled by lora_alpha / r as the reference's.
        return {**options, "fold": "stack", "scaling": cfg.gainlora.lora_alpha / cfg.inflora.rank}

    def __init__(self, cfg: RunConfig, report: InjectionReport, workload: Workload) -> None:
        super().__init__(cfg, report, workload)
        if workload.prompt is None:
            raise ValueError(f"method=gainlora needs a language model's prompt; model.kind={cfg.model.kind} has none")
        self.branches = BRANCHES[cfg.gainlora.branches](cfg, report, workload)
        g = cfg.gainlora
        self.num_tasks = next(iter(report.layers.values())).num_tasks
        device = next(iter(report.layers.values())).lora_A.device
        dim = embedding_dim(workload.model)
        self.gates = TaskGates(dim, g.gate_hidden, self.num_tasks, gate_architecture(cfg), cfg.seed).to(device)
        self.gates.requires_grad_(False)
        sizes = {"input": dim, "hidden": g.gate_hidden, "output": dim}
        self.memories = {s: SubspaceMemory(d, g.lambda_begin, g.lambda_end, g.planned_tasks) for s, d in sizes.items()}
        self.router = GateRouter(self.gates, list(report.layers.values()), workload.prompt)
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimizer_task: int | None = None
        self._saved_optimizer: dict[str, torch.Tensor] | None = None  # a mid-task checkpoint's, until its stage
        #: The gate matrix: after stage s, on task j's evaluation prompts, the mean gate of each branch 0..s.
        self.gate_rows: list[list[list[float]]] = []

    @contextlib.contextmanager
    def evaluating(self, task: int, upto: int) -> Iterator[dict[str, Any]]:
        """Sum the gates of task `task`'s evaluation prompts (tasks 0..upto learned) into the gate matrix; the
        yielded dict gets `gates`, the mean gate of each branch. Collective (one all-reduce on exit)."""
        measured: dict[str, Any] = {}
        self.router.totals = torch.zeros(self.num_tasks + 1, dtype=torch.float64)
        try:
            yield measured
        finally:
            sums, self.router.totals = self.router.totals, None
        sums = dist.all_reduce_sum_(sums.to(dist.collective_device())).cpu()
        if upto < 0:
            return  # zero-shot: no branch yet
        while len(self.gate_rows) <= upto:
            self.gate_rows.append([])
        row = self.gate_rows[upto]
        means = (sums[: upto + 1] / max(float(sums[-1]), 1.0)).tolist()
        row.extend([[]] * (task + 1 - len(row)))
        row[task] = measured["gates"] = [round(v, 6) for v in means]
        if dist.is_main_process():
            logger.info("gates on task %d's prompts after stage %d: %s", task, upto,
                        ", ".join(f"{v:.3f}" for v in means))  # fmt: skip

    # ------------------------------------------------------------------ stages
    def prepare_stage(self, stage: int) -> None:
        """gate_stage <- gate_{stage-1}; the new key outside the old gate outputs' subspace. Then the branches'."""
        if stage > 0:
            with torch.no_grad():
                self.gates.gates[stage].load_state_dict(self.gates.gates[stage - 1].state_dict())
                key = self.gates.keys[stage]
                projected = project_update(key, torch.zeros_like(key), self._projector("output"))
                key.copy_(projected * math.sqrt(key.numel() / 3.0) / projected.norm().clamp_min(1e-12))
        self.branches.prepare_stage(stage)

    def start_stage(self, stage: Stage) -> None:
        self.branches.start_stage(stage)

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """The branches' tensors (the engine trains them); the stage's gate and key train beside, by this method's
        own optimizer (`after_update`)."""
        self.gates.requires_grad_(False)
        own = self.gates.task_parameters(stage)
        for p in own:
            p.requires_grad_(True)
        if self._optimizer_task != stage:
            t = self.cfg.train
            if t.optimizer == "adam":
                self.optimizer = torch.optim.Adam(own, lr=t.lr, betas=(0.9, 0.999), weight_decay=t.weight_decay)
            else:
                self.optimizer = torch.optim.SGD(own, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            self._optimizer_task = stage
            if self._saved_optimizer is not None:
                self._load_optimizer(self._saved_optimizer)
                self._saved_optimizer = None
        return self.branches.trainable_parameters(stage)

    def loss_terms(self) -> torch.Tensor | None:
        return self.branches.loss_terms()

    def after_update(self, lr: float) -> None:
        """Update the stage's gate and key with their gradients averaged over the ranks (one all-reduce), at the
        engine's learning rate; project the update out of the old tasks' gate subspaces. Collective."""
        assert self.optimizer is not None and self._optimizer_task is not None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = dist.all_reduce_sum_(torch.cat([g.reshape(-1) for g in grads]).to(dist.collective_device()))
        flat = flat.to(params[0].device) / dist.get_world_size()
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        old = [p.detach().clone() for p in params]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, before, side in zip(params, old, SIDES, strict=True):  # input weight, hidden weight, key
                p.copy_(project_update(p, before, self._projector(side)))

    def _projector(self, side: str) -> torch.Tensor | None:
        """P = M M^T of the old tasks' subspace of one gate side (float64), or None before any task."""
        memory = self.memories[side]
        if memory.mode is None:
            return None
        basis = memory.old_basis().to(self.gates.keys[0].device)
        return basis @ basis.T

    def finish_stage(self, stage: Stage, sums: Any) -> float:
        """The branches' finish (InfLoRA: DualGPM; both: fold) and the gate subspaces grown from the gate
        activations of a pass over the stage's training data: the branches' own pass where it reads every sample
        once (InfLoRA without a token cap or a split), else a pass of its own. Collective."""
        gate = self.gates.gates[stage.index]
        modules = {"input": gate.input, "hidden": gate.hidden, "output": gate.output}
        collector = CovarianceCollector(modules, {s: m.dim for s, m in self.memories.items()})
        c = self.cfg.inflora
        shared = self.branches.reads_data_after_training and c.covariance_max_tokens is None and (
            c.covariance_max_bytes_per_rank is None
        )  # fmt: skip
        start = time.perf_counter()
        self.router.collector = collector
        try:
            with collector.capturing():
                if shared:  # the gates observe the branches' own pass
                    summing = self.branches.finish_stage(stage, sums)
                else:
                    stage.data_pass(f"stage {stage.index} gate subspaces", None, None, None)
        finally:
            self.router.collector = None
        seconds = 0.0 if shared else time.perf_counter() - start  # the gates' own pass, if any
        if not shared:
            summing = self.branches.finish_stage(stage, sums)
        start = time.perf_counter()
        covariances = collector.all_reduce()  # collective: float64 sums of every rank
        for side, memory in self.memories.items():
            memory.update(covariances[side], stage.index)
        if dist.is_main_process():
            logger.info("stage %d: gate subspaces %s", stage.index,
                        ", ".join(f"{s} {m.protected_dim}/{m.dim}" for s, m in self.memories.items()))  # fmt: skip
        stage.timings.update(gate_pass_s=seconds, gate_subspace_s=time.perf_counter() - start)
        return summing

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = self.branches.state()
        tensors = dict(tensors)
        tensors.update({f"{GATES_PREFIX}{k}": v.detach().cpu().clone() for k, v in self.gates.state_dict().items()})
        tensors.update({f"{GATE_MEMORY_PREFIX}{s}": m.basis for s, m in self.memories.items()})
        if self.optimizer is not None:
            for i, values in self.optimizer.state_dict()["state"].items():
                tensors.update({f"{GATE_OPTIMIZER_PREFIX}{i}.{k}": torch.as_tensor(v).clone()
                                for k, v in values.items()})  # fmt: skip
        gate_meta = {
            "memory_modes": {s: m.mode for s, m in self.memories.items()},
            "optimizer_task": self._optimizer_task,
            "gate_rows": self.gate_rows,
            "architecture": self.gates.architecture,
            "hidden": self.gates.hidden_dim,
        }
        return tensors, {**meta, "gainlora": gate_meta}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.branches.load_state(tensors, meta)
        own = self.gates.state_dict()
        for name, value in _prefixed(tensors, GATES_PREFIX).items():  # a run extended by tasks fills the first slots
            own[name].copy_(value)
        saved = meta["gainlora"]
        for side, memory in self.memories.items():
            memory.mode = saved["memory_modes"][side]
            memory.basis = tensors[f"{GATE_MEMORY_PREFIX}{side}"].clone()
        self.gate_rows = saved["gate_rows"]
        optimizer = _prefixed(tensors, GATE_OPTIMIZER_PREFIX)
        progress = meta.get("progress", {})
        if optimizer and progress.get("phase") == "train":  # mid-task: the stage's optimizer resumes its state
            self._saved_optimizer = optimizer

    def _load_optimizer(self, flat: dict[str, torch.Tensor]) -> None:
        assert self.optimizer is not None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})

    def resume_problems(self, meta: dict[str, Any]) -> list[str]:
        return self.branches.resume_problems(meta)

    def export(self, out: Path, stage_names: Sequence[str]) -> None:
        self.branches.export(out, stage_names)

    def write_export(self, name: str, folder: Path, stage_names: Sequence[str]) -> None:
        """gated_model/ (gated.py): the base model, the learned branches and gates. Collective."""
        learned = len(next(iter(self.report.layers.values())).live_tasks())
        save_gated_model(folder, self.workload.model, self.report, self.gates, stage_names[:learned],
                         self.workload.tokenizer, self.cfg.model.kind)  # fmt: skip

    def log_values(self) -> dict[str, float]:
        values = self.branches.log_values()
        values.update({f"gainlora/{s}_dim": m.protected_dim for s, m in self.memories.items()})
        if self.gate_rows:
            for j, means in enumerate(self.gate_rows[-1]):
                values.update({f"gates/task{j}/branch{i}": v for i, v in enumerate(means)})
        return values

    def metrics(self) -> dict[str, Any]:
        """metrics.json's `gate_matrix`: [stage][task j] the mean gate of each branch on task j's prompts."""
        return {"gate_matrix": self.gate_rows}

    def describe(self) -> str:
        return f"{self.branches.describe()}; gates of {self.gates.architecture} architecture".lstrip("; ")
