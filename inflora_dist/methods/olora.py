"""O-LoRA (Wang et al., EMNLP 2023 Findings; code: cmnfriend/O-LoRA): a new LoRA branch per task whose A and
B both train, the old branches frozen, and two terms added to the loss.

From the reference's trainer (`src/uie_trainer_lora.py`, `UIETrainer.training_step`), for every adapted layer,
with A_old the old tasks' A stacked (`lora_A`, r*t x d_in) and A, B the new branch (`loranew_A`, `loranew_B`):

    orthogonality = sum_layers sum |A_old A^T|          (`orthogonal_loss`: torch.abs(torch.mm(param, param_.T)).sum())
    l2            = sum_layers (||A||_F + ||B||_F)      (`bias_loss`: torch.norm(param, p=2) of every loranew_ tensor)
    loss          = task loss + lambda_1 orthogonality + lambda_2 l2

added to every micro-batch's loss before DeepSpeed's backward (which divides by the accumulation steps), as the
reference does. Its LoRA layer (`src/peft/tuners/lora.py`) scales old and new branches by lora_alpha / r and
initialises the new A kaiming-uniform (bound 1/sqrt(d_in)), B zero; its scripts use r 8, lora_alpha 32,
lambda_1 0.5, lambda_2 0, targets q and v. Not reproduced: its LoRA dropout (0.1), so that every method here
shares one branch forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inflora_dist.config import RunConfig
from inflora_dist.continual import random_down_projection
from inflora_dist.inject import InjectionReport
from inflora_dist.layer import FROZEN, MERGED
from inflora_dist.methods.base import Method
from inflora_dist.workloads import Workload


def orthogonality_penalty(old_a: torch.Tensor, new_a: torch.Tensor) -> torch.Tensor:
    """sum |A_old A_new^T| of one layer (O-LoRA's `orthogonal_loss` term): A_old (r t, d), A_new (r, d)."""
    return (old_a @ new_a.T).abs().sum()


def l2_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||A||_F + ||B||_F of one layer's new branch (O-LoRA's `bias_loss` term: torch.norm(p=2) of each)."""
    return torch.linalg.vector_norm(a) + torch.linalg.vector_norm(b)


class OLoRA(Method):
    """O-LoRA: A_t and B_t train; the new A is pushed orthogonal to every old A of its layer."""

    @classmethod
    def layer_options(cls, cfg: RunConfig) -> dict[str, Any]:
        return {"train_A": True, "scaling": cfg.olora.lora_alpha / cfg.inflora.rank}

    def __init__(self, cfg: RunConfig, report: InjectionReport, workload: Workload) -> None:
        super().__init__(cfg, report, workload)
        if cfg.train.gradient_checkpointing and cfg.deepspeed.zero_stage == 3:
            raise ValueError(
                "method=olora with train.gradient_checkpointing under deepspeed.zero_stage=3: the reentrant "
                "checkpointing ZeRO-3 needs runs the forward without a graph, and O-LoRA's loss terms need the "
                "branch's A and B in it; use zero_stage 0-2 or turn checkpointing off"
            )
        self.lambda_1, self.lambda_2 = cfg.olora.lambda_1, cfg.olora.lambda_2
        self.last_terms: dict[str, float] = {}

    def prepare_stage(self, stage: int) -> None:
        """A new branch per layer, before the engine copies it: A kaiming-uniform (seeded by seed, task and layer:
        the same on every rank), B zero."""
        for i, layer in enumerate(self.report.layers.values()):
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + stage * 1009 + i)
            layer.start_task(stage, random_down_projection(layer.rank, layer.in_features, gen))

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        layers = self.report.layers.values()
        return [layer.lora_A_active for layer in layers] + [layer.lora_B(stage) for layer in layers]

    def loss_terms(self) -> torch.Tensor | None:
        """lambda_1 orthogonality + lambda_2 l2 over every layer, from the factors the forward just used."""
        orthogonality, l2 = [], []
        for layer in self.report.layers.values():
            if layer.active_factors is None:
                continue
            a, b = (f.float() for f in layer.active_factors)
            old = [t for t in range(layer.num_tasks) if layer.status(t) in (FROZEN, MERGED)]
            if old and self.lambda_1:
                orthogonality.append(orthogonality_penalty(layer.lora_A[old].reshape(-1, layer.in_features).float(), a))
            if self.lambda_2:
                l2.append(l2_penalty(a, b))
        terms = [(self.lambda_1, orthogonality), (self.lambda_2, l2)]
        if not any(values for _, values in terms):
            return None
        total = sum(weight * torch.stack(values).sum() for weight, values in terms if values)
        self.last_terms = {"orthogonality": float(sum(orthogonality).detach()) if orthogonality else 0.0,
                           "l2": float(sum(l2).detach()) if l2 else 0.0}  # fmt: skip
        return total

    def resume_problems(self, meta: dict[str, Any]) -> list[str]:
        saved = meta["config"].get("olora", {}).get("lora_alpha")
        if saved != self.cfg.olora.lora_alpha:  # the branches' scale: the saved B and A mean another delta
            return [f"olora.lora_alpha: {saved!r} -> {self.cfg.olora.lora_alpha!r}"]
        return []

    def log_values(self) -> dict[str, float]:
        return {f"olora/{k}": v for k, v in self.last_terms.items()}
