"""InfLoRALinear: task lifecycle, merge/unmerge, fold modes, dtypes, forward cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from inflora_dist.layer import FROZEN, MERGED, TRAINING, InfLoRALinear


def random_a(rank: int, d_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64))[0].T / 3**0.5


def train_tasks(layer: InfLoRALinear, n: int, seed: int = 0) -> None:
    """Start and finish n tasks, giving each B a random 'trained' value."""
    g = torch.Generator().manual_seed(seed)
    for t in range(n):
        layer.start_task(t, random_a(layer.rank, layer.in_features, seed + t))
        with torch.no_grad():
            layer.lora_B(t).copy_(torch.randn(layer.lora_B(t).shape, generator=g))
        layer.finish_task()


def test_zero_b_leaves_outputs_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    expected = base(x)
    layer = InfLoRALinear(base, rank=4, num_tasks=3)
    layer.start_task(0, random_a(4, 16, 0))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_only_current_b_trains():
    torch.manual_seed(0)
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3)
    train_tasks(layer, 1)
    layer.start_task(1, random_a(4, 16, 1))
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_B_1"]
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.lora_B(1).grad is not None and layer.lora_B(1).grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and layer.lora_B(0).grad is None
    assert not layer.lora_A.requires_grad


def test_forward_is_base_plus_x_at_bt():
    torch.manual_seed(0)
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=2, fold="stack")
    a = random_a(4, 16, 0)
    layer.start_task(0, a)
    with torch.no_grad():
        layer.lora_B(0).normal_()
    x = torch.randn(5, 16)
    expected = layer.base_layer(x) + x @ a.float().T @ layer.lora_B(0).T
    torch.testing.assert_close(layer(x), expected)


def test_merge_then_unmerge_restores_weight_and_outputs_match():
    torch.manual_seed(0)
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3, fold="stack")
    w0 = layer.base_layer.weight.detach().clone()
    train_tasks(layer, 3)
    x = torch.randn(7, 16)
    unmerged = layer(x)
    for t in range(3):
        layer.merge(t)
        assert layer.status(t) == MERGED
    assert (layer.base_layer.weight - w0).abs().max() > 1e-2
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    for t in range(3):
        layer.unmerge(t)
        assert layer.status(t) == FROZEN
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_stack_folds_agree():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    merged = InfLoRALinear(base, rank=4, num_tasks=4, fold="merge")
    stacked = InfLoRALinear(nn.Linear(16, 8).requires_grad_(False), rank=4, num_tasks=4, fold="stack")
    stacked.base_layer.load_state_dict(base.state_dict())
    train_tasks(merged, 4)
    train_tasks(stacked, 4)
    assert [merged.status(t) for t in range(4)] == [MERGED] * 4
    assert [stacked.status(t) for t in range(4)] == [FROZEN] * 4
    x = torch.randn(6, 16)
    torch.testing.assert_close(merged(x), stacked(x), rtol=1e-5, atol=1e-5)


def forward_flops(layer: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


def test_forward_cost_does_not_grow_with_tasks_when_merging():
    """After 10 merged tasks the forward pass costs what it costs at task 1: one branch."""
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    merged = InfLoRALinear(nn.Linear(64, 64), rank=4, num_tasks=11, fold="merge")
    merged.start_task(0, random_a(4, 64, 0))
    at_task1 = forward_flops(merged, x)
    merged.finish_task()
    for t in range(1, 10):
        merged.start_task(t, random_a(4, 64, t))
        merged.finish_task()
    merged.start_task(10, random_a(4, 64, 10))
    assert forward_flops(merged, x) == at_task1

    stacked = InfLoRALinear(nn.Linear(64, 64), rank=4, num_tasks=11, fold="stack")
    train_tasks(stacked, 10)
    stacked.start_task(10, random_a(4, 64, 10))
    assert forward_flops(stacked, x) > at_task1  # the documented cost of "stack"


def test_bf16_base_with_fp32_adapters():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = InfLoRALinear(base, rank=4, num_tasks=2)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B(0).dtype == torch.float32
    layer.start_task(0, random_a(4, 16, 0))
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B(0).grad.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B(0).normal_()
        unmerged = layer(x).float()
    layer.finish_task()  # merges into the bf16 weight, rounding to bf16
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), unmerged, rtol=0.05, atol=0.05)


def test_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D stores (d_in, d_out): outputs and merges must respect that."""
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs
    layer = InfLoRALinear(base, rank=3, num_tasks=2, fold="stack")
    assert (layer.in_features, layer.out_features) == (16, 12)
    train_tasks(layer, 1)
    x = torch.randn(4, 16)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, base(x) + x @ layer.weight_delta(0))  # Conv1D layout: (d_in, d_out)
    layer.merge(0)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_restores_task_status():
    torch.manual_seed(0)
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3, fold="stack")
    train_tasks(layer, 2)
    layer.start_task(2, random_a(4, 16, 2))
    fresh = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3, fold="stack")
    fresh.load_state_dict(layer.state_dict())
    assert [fresh.status(t) for t in range(3)] == [FROZEN, FROZEN, TRAINING]
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["lora_B_2"]
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_a_state_with_fewer_tasks_fills_the_first_slots_of_a_larger_layer():
    """Extending a run: the layer is built for 5 tasks, the run's state holds 3."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    small = InfLoRALinear(base, rank=4, num_tasks=3, fold="stack")
    train_tasks(small, 3)
    large = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=5, fold="stack")
    large.base_layer.load_state_dict(base.state_dict())
    large.load_state_dict(small.state_dict(), strict=False)  # lora_B_3, lora_B_4: new, zero
    assert [large.status(t) for t in range(5)] == [FROZEN, FROZEN, FROZEN, 0, 0]
    torch.testing.assert_close(large.lora_A[:3], small.lora_A, rtol=0, atol=0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(large(x), small(x), rtol=0, atol=0)
    large.start_task(3, random_a(4, 16, 3))  # the new slots work as any other
    with pytest.raises(ValueError, match=r"lora_A holds 5 tasks, this layer has room for 3: a run's tasks cannot"):
        InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3).load_state_dict(large.state_dict(), strict=False)


def test_lifecycle_errors():
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=2)
    with pytest.raises(RuntimeError, match="no active task"):
        layer.finish_task()
    with pytest.raises(ValueError, match=r"shape \(4, 16\)"):
        layer.start_task(0, torch.zeros(4, 8))
    with pytest.raises(ValueError, match="task_id"):
        layer.start_task(2, random_a(4, 16, 0))
    layer.start_task(0, random_a(4, 16, 0))
    with pytest.raises(RuntimeError, match="task 0 is still active"):
        layer.start_task(1, random_a(4, 16, 1))
    layer.finish_task()
    with pytest.raises(RuntimeError, match="already started"):
        layer.start_task(0, random_a(4, 16, 0))
    with pytest.raises(ValueError, match="rank"):
        InfLoRALinear(nn.Linear(16, 8), rank=0, num_tasks=2)
    with pytest.raises(ValueError, match="'fuse'"):
        InfLoRALinear(nn.Linear(16, 8), rank=2, num_tasks=2, fold="fuse")
    with pytest.raises(TypeError, match="Conv2d"):
        InfLoRALinear(nn.Conv2d(3, 3, 1), rank=2, num_tasks=2)


def test_merge_refuses_non_finite_branch():
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=2, fold="stack")
    layer.start_task(0, random_a(4, 16, 0))
    with torch.no_grad():
        layer.lora_B(0)[0, 0] = float("nan")
    layer.finish_task()
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(0)
    torch.testing.assert_close(layer.base_layer.weight, w)


def test_reapply_merges_restores_a_checkpoint_onto_pristine_weights():
    """Adapter state loaded onto the pre-trained weight plus reapply_merges gives the same layer, bit for bit."""
    torch.manual_seed(0)
    pristine = nn.Linear(16, 8)
    layer = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3)
    layer.base_layer.load_state_dict(pristine.state_dict())
    train_tasks(layer, 2)
    adapter = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
    restored = InfLoRALinear(nn.Linear(16, 8), rank=4, num_tasks=3)
    restored.base_layer.load_state_dict(pristine.state_dict())
    restored.load_state_dict(adapter, strict=False)
    restored.reapply_merges()
    torch.testing.assert_close(restored.base_layer.weight, layer.base_layer.weight, rtol=0, atol=0)
    assert [restored.status(t) for t in range(3)] == [MERGED, MERGED, 0]
