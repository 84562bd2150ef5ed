"""InfLoRALinear: a linear layer with one designed low-rank branch per task.

    y = W x + b + sum_{t not merged} B_t A_t x

A_t (r, d_in) is designed by the subspace math and frozen (a buffer, so ZeRO-3
never partitions it and every rank holds the same value). B_t (d_out, r) starts
at zero and is the only trainable tensor of the layer while task t is active.

Branches of all `num_tasks` tasks are allocated up front, as in the reference
implementation: the parameter set never changes during a run, so optimizers,
DeepSpeed engines and checkpoints see the same tensors at every task. A run
extended with more tasks is built with the longer sequence's count and loads
the shorter run's state into its first slots (`_load_from_state_dict`).

Finishing a task freezes B_t and folds the branch, by `fold`:
  * "merge" (default): W += B_t A_t. The forward pass then costs one branch
    whatever the number of tasks. Exact for fp32 bases; a bf16/fp16 base rounds
    the merged delta to its precision (as PEFT's merge does).
  * "stack": keep the frozen factors and apply all of them as one concatenated
    low-rank product. Exact in any base dtype, but the cost grows with r * t.
Factors are kept in both modes, so a merged branch can be unmerged and the
whole adapter exported.

Two options serve methods whose A trains too (O-LoRA): with `train_A`, the
active task's A is the parameter `lora_A_active` (r, d_in), installed from the
given initial value and copied into `lora_A[t]` when the task finishes, and the
forward records the active factors as it used them (`active_factors`, for loss
terms on them: under ZeRO-3 the parameters are gathered only inside the
forward). `scaling` multiplies every branch (PEFT's lora_alpha / r; 1 for
InfLoRA, whose A carries its own scale).

A method that weighs the branches per input (GainLoRA's gates) sets `gates`
(batch, num_tasks) before each forward: every live branch t of row n is then
multiplied by gates[n, t]. None (the default): every branch counts fully.
"""

from __future__ import annotations

import torch
from torch import nn

from inflora_dist.dist import gathered_params

UNUSED, TRAINING, FROZEN, MERGED = 0, 1, 2, 3
FOLD_MODES = ("merge", "stack")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight as (d_in, d_out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def supported_base(module: nn.Module) -> bool:
    """Whether `module` can be wrapped: nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class InfLoRALinear(nn.Module):
    """Wraps `base_layer` (nn.Linear or transformers Conv1D) with per-task InfLoRA branches."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        num_tasks: int,
        fold: str = "merge",
        adapter_dtype: torch.dtype = torch.float32,
        train_A: bool = False,
        scaling: float = 1.0,
    ) -> None:
        super().__init__()
        if not supported_base(base_layer):
            raise TypeError(f"InfLoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        if fold not in FOLD_MODES:
            raise ValueError(f"fold must be one of {FOLD_MODES}, got {fold!r}")
        self.fan_in_fan_out = _is_conv1d(base_layer)
        weight = base_layer.weight
        shape = tuple(getattr(weight, "ds_shape", weight.shape))  # a ZeRO-3 partitioned weight is empty here
        self.in_features, self.out_features = shape if self.fan_in_fan_out else (shape[1], shape[0])
        if not isinstance(rank, int) or not 1 <= rank <= self.in_features:
            raise ValueError(f"rank must be an int in [1, {self.in_features}], got {rank!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self.base_layer = base_layer
        self.rank, self.num_tasks, self.fold = rank, num_tasks, fold
        self.train_A, self.scaling = train_A, float(scaling)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = weight.device
        self.register_buffer(
            "lora_A", torch.zeros(num_tasks, rank, self.in_features, dtype=adapter_dtype, device=device)
        )
        # Direct parameters (not a ParameterList) so ZeRO-3 gathers them with this module's forward.
        for t in range(num_tasks):
            b = torch.zeros(self.out_features, rank, dtype=adapter_dtype, device=device)
            self.register_parameter(f"lora_B_{t}", nn.Parameter(b, requires_grad=False))
        if train_A:
            a = torch.zeros(rank, self.in_features, dtype=adapter_dtype, device=device)
            self.lora_A_active = nn.Parameter(a, requires_grad=False)
        #: (A, B) of the active task as the last training forward used them (train_A only), graph attached.
        self.active_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("task_status", torch.zeros(num_tasks, dtype=torch.int8, device=device))
        self._status = [UNUSED] * num_tasks  # host mirror: no device sync in forward
        #: Per-row weights of the branches, (batch, num_tasks), set by a gating method; None: ungated.
        self.gates: torch.Tensor | None = None

    # ------------------------------------------------------------------ access
    def lora_B(self, task_id: int) -> nn.Parameter:
        """B_t, (d_out, r)."""
        return getattr(self, f"lora_B_{task_id}")

    def status(self, task_id: int) -> int:
        """UNUSED, TRAINING, FROZEN or MERGED."""
        return self._status[task_id]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads it (T5 casts its FFN input to `wo.weight.dtype`),
        as PEFT's tuner layers expose it."""
        return self.base_layer.weight

    @property
    def active_task(self) -> int | None:
        """The task whose B trains now, if any."""
        return next((t for t, s in enumerate(self._status) if s == TRAINING), None)

    def _set_status(self, task_id: int, status: int) -> None:
        self._status[task_id] = status
        self.task_status[task_id] = status

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state with fewer task slots (a run now extended by more tasks) fills the first ones; the rest stay
        # UNUSED, their B zero.
        for name in ("lora_A", "task_status"):
            saved, own = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape[1:] == own.shape[1:] and len(saved) != len(own):
                if len(saved) > len(own):
                    raise ValueError(
                        f"{prefix}{name} holds {len(saved)} tasks, this layer has room for {len(own)}: "
                        "a run's tasks cannot be dropped"
                    )
                state_dict[prefix + name] = torch.cat([saved.to(own.dtype), own[len(saved) :].cpu()])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._status = [int(s) for s in self.task_status.tolist()]
        for t in range(self.num_tasks):
            self.lora_B(t).requires_grad_(self._status[t] == TRAINING)
        if self.train_A:
            self.lora_A_active.requires_grad_(self.active_task is not None)

    # ------------------------------------------------------------------ tasks
    def start_task(self, task_id: int, lora_A: torch.Tensor) -> None:
        """Install the designed A_t (r, d_in), zero B_t and make it the only trainable tensor."""
        self._check_task(task_id)
        if self.active_task is not None:
            raise RuntimeError(f"task {self.active_task} is still active; finish it before starting task {task_id}")
        if self._status[task_id] != UNUSED:
            raise RuntimeError(f"task {task_id} was already started")
        if tuple(lora_A.shape) != (self.rank, self.in_features):
            raise ValueError(f"A must have shape ({self.rank}, {self.in_features}), got {tuple(lora_A.shape)}")
        b = self.lora_B(task_id)
        with torch.no_grad():
            self.lora_A[task_id].copy_(lora_A.to(self.lora_A.dtype))
            with gathered_params([b], modifier_rank=0):  # under ZeRO-3 a bare zero_() misses the partitions
                b.zero_()
            if self.train_A:
                with gathered_params([self.lora_A_active], modifier_rank=0):
                    self.lora_A_active.copy_(lora_A.to(self.lora_A_active.dtype))
        b.requires_grad_(True)
        if self.train_A:
            self.lora_A_active.requires_grad_(True)
        self._set_status(task_id, TRAINING)

    def finish_task(self) -> None:
        """Freeze the active branch and fold it as configured (merge into W, or keep stacked)."""
        task_id = self.active_task
        if task_id is None:
            raise RuntimeError("no active task to finish")
        self.lora_B(task_id).requires_grad_(False)
        if self.train_A:  # the trained A becomes the task's frozen A
            with gathered_params([self.lora_A_active]), torch.no_grad():
                self.lora_A[task_id].copy_(self.lora_A_active.to(self.lora_A.dtype))
            self.lora_A_active.requires_grad_(False)
            self.active_factors = None
        self._set_status(task_id, FROZEN)
        if self.fold == "merge":
            self.merge(task_id)

    def _check_task(self, task_id: int) -> None:
        if not isinstance(task_id, int) or not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id must be an int in [0, {self.num_tasks}), got {task_id!r}")

    # ------------------------------------------------------------------ merge
    def weight_delta(self, task_id: int) -> torch.Tensor:
        """scaling B_t A_t in the base weight's own layout: (d_out, d_in), transposed for GPT-2's Conv1D;
        float32 whatever the adapter dtype (it is added into the base weight)."""
        delta = self.lora_B(task_id).float() @ self.lora_A[task_id].float()
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def live_tasks(self) -> list[int]:
        """Tasks whose branch the forward applies: training or frozen, not yet merged into the weight."""
        return [t for t, s in enumerate(self._status) if s in (TRAINING, FROZEN)]

    def _add_to_weight(self, task_id: int, sign: float) -> None:
        weight = self.base_layer.weight
        with gathered_params([weight, self.lora_B(task_id)], modifier_rank=0), torch.no_grad():
            delta = self.weight_delta(task_id)
            if not torch.isfinite(delta).all():
                raise ValueError(f"the branch of task {task_id} contains NaN or inf; refusing to merge it")
            weight.add_(delta.to(weight.dtype), alpha=sign)

    def merge(self, task_id: int) -> None:
        """Fold the frozen branch of `task_id` into the base weight."""
        self._check_task(task_id)
        if self._status[task_id] != FROZEN:
            raise RuntimeError(f"only a finished, unmerged task can be merged; task {task_id} is not")
        self._add_to_weight(task_id, 1.0)
        self._set_status(task_id, MERGED)

    def reapply_merges(self) -> None:
        """Add the MERGED branches to the base weight again.

        For restoring a checkpoint onto freshly loaded pre-trained weights: the
        adapter state says which branches are merged, the base weight does not
        hold them yet. Same order as the original merges, so the same result.
        """
        for task_id, status in enumerate(self._status):
            if status == MERGED:
                self._add_to_weight(task_id, 1.0)

    def unmerge(self, task_id: int) -> None:
        """Take the branch of `task_id` back out of the base weight (inverse of `merge`)."""
        self._check_task(task_id)
        if self._status[task_id] != MERGED:
            raise RuntimeError(f"task {task_id} is not merged")
        self._add_to_weight(task_id, -1.0)
        self._set_status(task_id, FROZEN)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        live = self.live_tasks()
        if not live:
            return result
        training = self.active_task
        if self.train_A and training is not None:
            a_active, b_active = self.lora_A_active, self.lora_B(training)
            if torch.is_grad_enabled():
                self.active_factors = (a_active.clone(), b_active.clone())  # outlive a ZeRO-3 release
            a = torch.cat([self.lora_A[t].to(a_active.dtype) if t != training else a_active for t in live])
            b = torch.cat([self.lora_B(t) for t in live], dim=1)
        elif len(live) == 1:
            a, b = self.lora_A[live[0]], self.lora_B(live[0])
        else:
            a = self.lora_A[live].reshape(-1, self.in_features)  # (r * n, d_in)
            b = torch.cat([self.lora_B(t) for t in live], dim=1)  # (d_out, r * n)
        # The branch computes in B's dtype: fp32 adapters on a bf16 base, or bf16 where DeepSpeed cast B.
        down = x.to(b.dtype) @ a.to(b.dtype).T  # (..., r * n)
        if self.gates is not None:
            down = down * self._gate_weights(x, live).to(b.dtype)
        branch = down @ b.T
        if self.scaling != 1.0:
            branch = branch * self.scaling
        return result + branch.to(result.dtype)

    def _gate_weights(self, x: torch.Tensor, live: list[int]) -> torch.Tensor:
        """The gates of the live branches, each repeated over its rank, shaped to multiply x A^T (batch, ..., r n)."""
        gates = self.gates
        if gates.shape[0] != x.shape[0]:
            raise ValueError(f"gates for {gates.shape[0]} rows, but the input has {x.shape[0]}: the gates are set "
                             "per batch, before its forward")  # fmt: skip
        weights = gates[:, live].repeat_interleave(self.rank, dim=1)  # (batch, r n)
        return weights.reshape(x.shape[0], *([1] * (x.dim() - 2)), weights.shape[1])

    def extra_repr(self) -> str:
        extra = f", train_A=True, scaling={self.scaling:g}" if self.train_A else ""
        return f"rank={self.rank}, num_tasks={self.num_tasks}, fold={self.fold}{extra}, status={self._status}"
