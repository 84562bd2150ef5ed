"""What large models need: activation checkpointing (train.gradient_checkpointing) with the same loss and branch
gradients as without it, and weights that cannot fit a rank refused before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_dinov2, tiny_llama, tiny_vit
from torch import nn

from inflora_dist.inject import inject_inflora
from inflora_dist.models import enable_activation_checkpointing

REPO = Path(__file__).resolve().parents[1]


def _loss_and_grads(model: nn.Module, inputs: dict[str, torch.Tensor], checkpointing: bool, reentrant: bool = False):
    """Loss and B gradients of one training-mode step of `model` with InfLoRA on q/v (fixed A, nonzero B)."""
    report = inject_inflora(model, ["q_proj", "v_proj"], rank=2, num_tasks=1)
    gen = torch.Generator().manual_seed(0)
    for g in report.groups:
        a = torch.randn(2, report.dims[g], generator=gen, dtype=torch.float64)
        for layer in report.group_modules(g):
            layer.start_task(0, a)
            with torch.no_grad():
                layer.lora_B(0).copy_(torch.randn(layer.lora_B(0).shape, generator=gen))
    if checkpointing:
        enable_activation_checkpointing(model, reentrant=reentrant)
    model.train()  # transformers checkpoints only in training mode
    out = model(**inputs)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss = hidden.float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_vit, tiny_dinov2], ids=["llama", "vit", "dinov2"])
def test_checkpointing_keeps_loss_and_gradients(build, reentrant):
    """fp32: loss and every trained B's gradient equal with and without checkpointing (1e-6), in both modes (the
    reentrant one is used under ZeRO-3, with the embeddings' output made to require grad); the blocks were
    checkpointed (transformers' flag is set on them)."""
    torch.manual_seed(1)
    if build is tiny_llama:
        inputs = {"input_ids": torch.randint(0, VOCAB, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    else:
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    plain_loss, plain = _loss_and_grads(build(), inputs, checkpointing=False)
    model = build()
    loss, grads = _loss_and_grads(model, inputs, checkpointing=True, reentrant=reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert loss == pytest.approx(plain_loss, rel=1e-6, abs=1e-6)
    assert sorted(grads) == sorted(plain) and len(grads) >= 4
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-6, atol=1e-6, msg=name)


def test_checkpointing_refuses_a_model_without_support():
    with pytest.raises(ValueError, match=r"train.gradient_checkpointing=true: Sequential does not support"):
        enable_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_weights_that_cannot_fit_a_rank_are_refused_before_building():
    """A LLaMA with 200 layers of 4096 (about 40e9 parameters, 80 GB in bf16) on one rank at ZeRO-0: refused,
    naming the model, the stage and the way out, before anything is built (counted on the meta device)."""
    from inflora_dist.config import RunConfig
    from inflora_dist.workloads import InstructionTuning, check_weights_fit

    cfg = RunConfig()
    cfg.model.kind, cfg.model.dtype = "causal_lm", "bfloat16"
    cfg.model.config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 200, "num_attention_heads": 32}  # fmt: skip
    with pytest.raises(MemoryError, match=r"model.config.model_type=llama: .* at deepspeed.zero_stage=0 .*"
                       r"use deepspeed.zero_stage=3 over at least \d+ ranks"):  # fmt: skip
        check_weights_fit(cfg, InstructionTuning, torch.device("cpu"))
    cfg.model.config["num_hidden_layers"] = 1
    check_weights_fit(cfg, InstructionTuning, torch.device("cpu"))  # 0.4e9 parameters fit


def _build_partitioned(rank: int, world: int) -> dict:
    """On each of `world` gloo ranks: the tiny LLM config built partitioned, as the trainer builds it under ZeRO-3
    (`construction_config`), with a bf16 base; this rank's shard sizes and dtypes, and the weights gathered
    layer by layer."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from inflora_dist.config import load_run_config
    from inflora_dist.dist import gathered_params
    from inflora_dist.engine import construction_config
    from inflora_dist.models import load_backbone

    deepspeed.init_distributed(dist_backend="gloo")
    overrides = ["deepspeed.zero_stage=3", "data.tasks=x.yaml", "data.build={source: x}", "model.dtype=bfloat16"]
    cfg = load_run_config(str(REPO / "configs" / "tiny_llm.yaml"), overrides)
    torch.manual_seed(cfg.seed)
    model = load_backbone(cfg.model, AutoModelForCausalLM, construction_config(cfg, world))
    shards = {
        n: (p.ds_tensor.numel(), p.ds_numel, p.numel(), str(p.ds_tensor.dtype)) for n, p in model.named_parameters()
    }
    weights = {}
    for name, p in model.named_parameters():
        with gathered_params([p]):
            weights[name] = p.detach().clone()
    return {"shards": shards, "weights": weights}


def test_zero3_builds_partitioned_with_the_weights_of_every_stage(tmp_path):
    """Under ZeRO-3 no rank ever holds a whole weight: 2 gloo ranks each keep about half of every parameter (an
    empty placeholder in the module) in the base's dtype (bf16 here, under fp32 training), and the gathered
    weights are exactly those a ZeRO-0 build draws from the same seed (random weights are initialised module by
    module in one order at every stage)."""
    from distributed import run_distributed
    from transformers import AutoModelForCausalLM

    from inflora_dist.config import load_run_config
    from inflora_dist.models import load_backbone

    results = run_distributed(_build_partitioned, 2, tmp_path)
    for rank in results:
        for name, (shard, whole, placeholder, dtype) in rank["shards"].items():
            assert placeholder == 0 and shard <= -(-whole // 2), name  # ceil(whole / 2): padded halves
            assert dtype == "torch.bfloat16", name  # model.dtype, not the fp32 of train.precision
    overrides = ["data.tasks=x.yaml", "data.build={source: x}", "model.dtype=bfloat16"]
    cfg = load_run_config(str(REPO / "configs" / "tiny_llm.yaml"), overrides)
    torch.manual_seed(cfg.seed)
    plain = dict(load_backbone(cfg.model, AutoModelForCausalLM).named_parameters())
    for name, weight in results[0]["weights"].items():
        assert torch.equal(weight, plain[name].detach()), name
        assert torch.equal(weight, results[1]["weights"][name]), name
