"""The point of InfLoRA, end to end: learning task 1 barely moves the outputs on task 0.

Two regression tasks whose inputs live in overlapping subspaces of R^16
(task 0: e0..e5, task 1: e3..e9) are learned one after the other by the same
adapters. InfLoRA designs A_1 outside task 0's protected subspace; the control
("seq-LoRA") is the same LoRA, same rank and targets, with A_1 designed from
task 1's covariance alone (no subspace removed), so the comparison isolates the
subspace design.

lambda = 0.9999: DualGPM counts energy in squared singular values of the
covariance, so at 0.999 the tanh hidden layer of this tiny MLP keeps only 3 of
32 directions and about a quarter of its activation norm stays unprotected.
"""

from __future__ import annotations

import torch
from torch import nn

from inflora_dist.continual import InfLoRA
from inflora_dist.inject import inject_inflora
from inflora_dist.subspace import SubspaceMemory

DIM, HIDDEN, OUT, RANK, N = 16, 32, 4, 4, 256
LAMBDA = 0.9999


def make_task(directions: range, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.eye(DIM)[list(directions)]  # (k, DIM)
    # A decaying spectrum, as real features have: DualGPM keeps the strong
    # directions (k = #{cumulative energy < eps} never counts the one that crosses).
    scale = torch.ones(len(directions))
    scale[:3] = torch.tensor([0.5, 0.4, 0.2])
    x = (torch.randn(N, len(directions), generator=g) * scale) @ basis
    teacher = torch.randn(DIM, OUT, generator=g)
    return x, torch.tanh(x @ teacher)


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN, bias=False), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def covariance_pass(model: nn.Module, inflora: InfLoRA, x: torch.Tensor) -> None:
    with torch.no_grad(), inflora.collector.capturing():
        model(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def run_sequence(project: bool) -> dict[str, float]:
    model = build()
    inflora = InfLoRA(inject_inflora(model, ["0", "2"], rank=RANK, num_tasks=2), LAMBDA, LAMBDA)
    tasks = [make_task(range(0, 6), seed=1), make_task(range(3, 10), seed=2)]
    x0 = tasks[0][0]
    with torch.no_grad():
        base_loss1 = float(nn.functional.mse_loss(model(tasks[1][0]), tasks[1][1]))
    for t, (x, y) in enumerate(tasks):
        covariance_pass(model, inflora, x)
        if project:
            inflora.on_task_start(t)
        else:  # the control: A_t from this task's covariance alone
            for g, cov in inflora.collector.all_reduce().items():
                a = SubspaceMemory(inflora.report.dims[g], LAMBDA, LAMBDA, 2).down_projection(cov, RANK)
                for layer in inflora.report.group_modules(g):
                    layer.start_task(t, a)
        loss = train(model, x, y)
        covariance_pass(model, inflora, x)
        inflora.on_task_end(t)
        if t == 0:
            with torch.no_grad():
                after_task0 = model(x0)
    with torch.no_grad():
        drift = float((model(x0) - after_task0).norm() / after_task0.norm())
    return {"drift": drift, "task1_loss": loss, "task1_loss_before": base_loss1}


def test_inflora_protects_old_task_outputs():
    inflora = run_sequence(project=True)
    control = run_sequence(project=False)
    # Both learn task 1 (plasticity), InfLoRA without disturbing task 0 (stability).
    assert inflora["task1_loss"] < 0.5 * inflora["task1_loss_before"]
    assert control["task1_loss"] < 0.5 * control["task1_loss_before"]
    assert control["drift"] > 0.5
    assert inflora["drift"] < 0.1
    assert inflora["drift"] < 0.1 * control["drift"], (inflora, control)  # measured: 0.048 vs 1.29
