"""Injection into tiny transformers ViTs and causal LMs built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_dinov2, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_vit

from inflora_dist.continual import InfLoRA
from inflora_dist.inject import count_parameters, inject_inflora
from inflora_dist.layer import InfLoRALinear

IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 9, dtype=torch.long)
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

CASES = {
    "vit": (tiny_vit, ["k_proj", "v_proj"], "layers.0.attention.k_proj+v_proj"),
    "dinov2": (tiny_dinov2, ["q_proj", "k_proj", "v_proj"], "encoder.layer.0.attention.q_proj+k_proj+v_proj"),
    "llama": (
        tiny_llama,
        ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
        "model.layers.1.mlp.gate_proj+up_proj",
    ),
    "qwen2": (tiny_qwen2, ["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj+v_proj"),
    "gpt2": (tiny_gpt2, ["c_attn"], "transformer.h.0.attn.c_attn"),
}


def run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if model.main_input_name == "pixel_values":
            return model(pixel_values=PIXELS).last_hidden_state
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("family", sorted(CASES))
def test_injection_preserves_outputs_and_trains_only_b(family):
    build, targets, group = CASES[family]
    model = build()
    expected = run(model)
    report = inject_inflora(model, targets, rank=2, num_tasks=3)
    assert group in report.groups
    assert all(isinstance(model.get_submodule(n), InfLoRALinear) for n in report.layers)
    torch.testing.assert_close(run(model), expected, rtol=0, atol=0)

    inflora = InfLoRA(report, 0.9, 0.99)
    with inflora.collector.capturing():
        run(model)
    designs = inflora.on_task_start(0)
    assert set(designs) == set(report.groups)
    torch.testing.assert_close(run(model), expected, rtol=0, atol=0)  # B_0 = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B_0") for n in trainable)
    assert len(trainable) == len(report.layers)


def test_shared_input_group_shares_one_a():
    model = tiny_llama()
    report = inject_inflora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=2, num_tasks=2)
    qkv = report.groups["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    assert qkv == [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
    assert report.groups["model.layers.0.self_attn.o_proj"] == ["model.layers.0.self_attn.o_proj"]
    assert len(report.groups) == 4
    inflora = InfLoRA(report, 0.9, 0.99)
    with inflora.collector.capturing():
        run(model)
    inflora.on_task_start(0)
    a = [report.layers[n].lora_A[0] for n in qkv]
    assert a[0].abs().sum() > 0
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[2], rtol=0, atol=0)


def test_heads_stay_trainable_and_parameters_are_reported():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    report = inject_inflora(model, ["k_proj", "v_proj"], rank=2, num_tasks=3, trainable=["lm_head"])
    trainable, total = count_parameters(model)
    assert trainable == model.lm_head.weight.numel()
    b_params = sum(layer.lora_B(t).numel() for layer in report.layers.values() for t in range(3))
    a_buffers = sum(layer.lora_A.numel() for layer in report.layers.values())
    assert total == total_before + b_params
    assert a_buffers > 0  # A is a buffer, not a parameter


def test_regex_and_exact_targets():
    model = tiny_llama()
    report = inject_inflora(model, [r"model\.layers\.1\.self_attn\.(k|v)_proj"], rank=2, num_tasks=1)
    assert sorted(report.layers) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    model = tiny_llama()
    report = inject_inflora(model, ["model.layers.0.mlp.down_proj"], rank=2, num_tasks=1)
    assert list(report.layers) == ["model.layers.0.mlp.down_proj"]
    assert report.dims["model.layers.0.mlp.down_proj"] == 48


def test_bad_targets_raise_naming_the_patterns():
    with pytest.raises(ValueError, match="query_proj"):
        inject_inflora(tiny_llama(), ["query_proj"], rank=2, num_tasks=1)
    with pytest.raises(TypeError, match="LlamaAttention"):
        inject_inflora(tiny_llama(), ["self_attn"], rank=2, num_tasks=1)
    with pytest.raises(ValueError, match="targets is empty"):
        inject_inflora(tiny_llama(), [], rank=2, num_tasks=1)


def test_layers_to_transform_keeps_the_named_blocks_only():
    model = tiny_llama(layers=3)
    report = inject_inflora(model, ["k_proj", "v_proj"], rank=2, num_tasks=1, layers_to_transform=[1, 2])
    assert sorted(report.layers) == [f"model.layers.{i}.self_attn.{m}" for i in (1, 2) for m in ("k_proj", "v_proj")]
    with pytest.raises(ValueError, match=r"in blocks \[7\]"):
        inject_inflora(tiny_llama(), ["k_proj"], rank=2, num_tasks=1, layers_to_transform=[7])
    vit = inject_inflora(tiny_vit(), ["k_proj"], rank=2, num_tasks=1, layers_to_transform=[1])
    assert list(vit.layers) == ["layers.1.attention.k_proj"]
