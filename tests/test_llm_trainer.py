"""Instruction tuning through the real trainer: a tiny Llama with SmolLM2's tokenizer, real processes, DeepSpeed.

The tasks are the demo's three packaged instruction tasks in small sizes; the model is
random, so scores are near zero: these tests check the machinery (token-weighted loss
across ranks, masked covariance, generation scoring, ZeRO-3 with bf16 base weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_runs import (
    LLM_CONFIG,
    REPO,
    assert_bf16_runs_agree,
    evaluate_under_torchrun,
    language_runs,
    llm_demo_shards,
    predict_prompts,
    results,
    train,
)

TOKENIZER = REPO / "assets" / "smollm2-135m-instruct" / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.exists(), reason="the SmolLM2 asset is not built (make assets)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return llm_demo_shards(tmp_path_factory.mktemp("llm") / "shards")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """Finished tiny-LLM runs by (processes, ZeRO stage, dtype), each made once per module."""
    return language_runs(tmp_path_factory.mktemp("llm_runs"), shards, LLM_CONFIG)


def test_one_process_run_scores_every_task_by_its_metric(runs):
    out = runs(1, 0)
    metrics, _ = results(out)
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert metrics["task_metrics"] == ["exact_match", "exact_match", "rouge_l"]
    assert all(0.0 <= v <= 100.0 for row in metrics["accuracy_matrix"] for v in row)
    assert "task_incremental_accuracy_matrix" not in metrics  # no heads: one score per task
    assert len(metrics["zero_shot"]) == 3 and all(0.0 <= v <= 100.0 for v in metrics["zero_shot"])
    adapter = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM"
    assert any("mlp.down_proj" in m for m in adapter["target_modules"])
    groups = json.loads((out / "continual_state.json").read_text())["groups"]
    assert any(g.endswith("q_proj+k_proj+v_proj") for g in groups)
    assert any(g.endswith("gate_proj+up_proj") for g in groups)


def test_two_processes_under_zero3_reproduce_one_process(runs):
    """The loss is a mean over the step's response tokens on all ranks: 2 ranks under ZeRO-3 train what 1 does."""
    ref_metrics, ref_state = results(runs(1, 0))
    metrics, state = results(runs(2, 3))
    assert sorted(state) == sorted(ref_state)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-5, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
    assert metrics["zero_shot"] == ref_metrics["zero_shot"]  # scored before training, by synced generation


def test_merged_export_is_a_plain_transformers_model_at_any_world_size(runs):
    """export.merged_model: model/ loads with AutoModelForCausalLM and AutoTokenizer alone; the 2-rank ZeRO-3 run
    (its parameters gathered for the export) writes the model the 1-process run writes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logits = []
    for out in (runs(1, 0), runs(2, 3)):
        tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
        model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
        ids = tokenizer("Classify the sentiment: what a lovely day", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


def test_bf16_base_with_fp32_adapters_under_zero3(runs):
    """The cluster set-up: bf16 pre-trained weights, fp32 adapters, ZeRO-3 over 2 ranks, against 1 process.

    Task 0's A comes from the frozen model's covariance: equal. After that, bf16 training of
    differently padded batches rounds differently, so later A and the protected subspaces
    (compared as projectors: a basis is not unique) agree closely, not exactly. Measured on the
    demo's tasks: projectors within 0.03, every A within 0.03 but one (0.32: a turned direction).
    """
    _, ref_state = results(runs(1, 0, "bfloat16"))
    metrics, state = results(runs(2, 3, "bfloat16"))
    assert_bf16_runs_agree(state, ref_state)
    assert len(metrics["accuracy_matrix"]) == 3


@pytest.mark.parametrize(
    ("family", "targets"),
    [("qwen2", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"), ("gpt2", "[c_attn,c_proj,c_fc]")],
)
def test_other_causal_lm_families_train(shards, tmp_path, family, targets):
    """Qwen2 and GPT-2 (Conv1D projections) built from the same tiny sizes go through the whole sequence."""
    out = tmp_path / family
    train(1, out, f"model.config.model_type={family}", f"inflora.targets={targets}", shards=shards, config=LLM_CONFIG)
    metrics, state = results(out)
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert any(".A.2" in name for name in state)


def test_evaluate_and_predict_use_the_trained_llm(runs, shards, tmp_path):
    """`evaluate` on the run's tasks gives its last row (torchrun, 2 processes, ZeRO-3); `predict --prompts` answers
    as plain transformers generating greedily from the run's merged export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inflora_dist.data.text import collate_prompts

    run = runs(2, 3)
    result = evaluate_under_torchrun(run, shards / "tasks.yaml", tmp_path / "eval.json")
    assert result["scores"]["accuracy"] == results(run)[0]["accuracy_matrix"][-1]
    assert result["task_metrics"] == ["exact_match", "exact_match", "rouge_l"]

    prompts = ["Classify the sentiment: what a lovely day", "Who wrote Hamlet?"]
    answers = predict_prompts(run, prompts, tmp_path, max_new_tokens=6)
    assert [a["prompt"] for a in answers] == prompts

    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    for prompt, got in zip(prompts, answers, strict=True):
        ids = collate_prompts(tokenizer, [{"prompt": prompt}], max_length=96)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert got["answer"] == expected, prompt
