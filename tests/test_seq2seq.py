"""Encoder-decoder models (model.kind seq2seq_lm): a tiny T5 built from a config, SmolLM2's real tokenizer.

Unit level: T5's input groups (self-attention q/k/v together, the cross-attention's k/v apart from its q),
the loss on the decoder's labels, and covariance sums whose padding masks (one for encoder tokens, one for
decoder tokens) make a padded batch count what its rows count alone. Trainer level: real processes and
DeepSpeed engines, 1 process against 2 under ZeRO-3, bf16 base weights with fp32 adapters, the PEFT export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_runs import (
    REPO,
    assert_bf16_runs_agree,
    evaluate_under_torchrun,
    language_runs,
    llm_demo_shards,
    predict_prompts,
    results,
)
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from inflora_dist.covariance import CovarianceCollector
from inflora_dist.data.text import IGNORE, collate_seq2seq, label_loss
from inflora_dist.inject import inject_inflora
from inflora_dist.workloads import Seq2SeqInstructionTuning

TOKENIZER = REPO / "assets" / "smollm2-135m-instruct"
T5_CONFIG = REPO / "configs" / "tiny_t5.yaml"
pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(), reason="run `make assets` first")
ROWS = [
    {"prompt": "What is the sentiment of: I love rainy days", "response": "positive"},
    {"prompt": "Topic?", "response": "a much longer answer of several words"},
    {"prompt": "Which planet is known as the red planet, and why is it red?", "response": "Mars"},
]


def _tiny_t5(seed: int = 0, gated: bool = False) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=49152, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=2, eos_token_id=2, decoder_start_token_id=2,
                   feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0)  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def test_t5_input_groups_follow_what_each_layer_reads():
    report = inject_inflora(_tiny_t5(gated=True), ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], rank=2, num_tasks=2)
    groups = set(report.groups)
    assert "encoder.block.0.layer.0.SelfAttention.q+SelfAttention.k+SelfAttention.v" in groups
    assert "decoder.block.1.layer.0.SelfAttention.q+SelfAttention.k+SelfAttention.v" in groups
    # The cross-attention's k and v read the encoder's output; its q reads the decoder's hidden state.
    assert "decoder.block.0.layer.1.EncDecAttention.k+EncDecAttention.v" in groups
    assert "decoder.block.0.layer.1.EncDecAttention.q" in groups
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0+DenseReluDense.wi_1" in groups
    sides = Seq2SeqInstructionTuning.mask_sides(report.groups)
    assert sides["decoder.block.0.layer.1.EncDecAttention.k+EncDecAttention.v"] == "encoder"
    assert sides["decoder.block.0.layer.1.EncDecAttention.q"] == "decoder"
    assert {s for g, s in sides.items() if g.startswith("encoder.")} == {"encoder"}
    assert sides["decoder.block.1.layer.2.DenseReluDense.wo"] == "decoder"


def test_the_loss_is_the_decoders_label_loss():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = _tiny_t5()
    batch = collate_seq2seq(tokenizer, ROWS, torch.tensor([1.0, 1.0, 0.0]), max_source=64, max_target=6)
    assert (batch["labels"][2] == IGNORE).all()  # a padding row of the reader trains nothing
    assert batch["labels"][1].ne(IGNORE).sum() == 6 and batch["labels"][1, 5] == tokenizer.eos_token_id  # cut, eos
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    total, count = label_loss(out.logits, batch["labels"])
    torch.testing.assert_close(total / count, out.loss, rtol=1e-6, atol=1e-6)  # transformers' own mean


def test_covariance_masks_make_a_padded_batch_count_its_rows_alone():
    """Encoder groups (and the cross-attention's k/v) follow the prompt mask, decoder groups the label mask:
    the sums of a right-padded batch equal the sums of its rows run one at a time, without padding."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = _tiny_t5()
    report = inject_inflora(model, ["q", "k", "v", "o", "wi", "wo"], rank=2, num_tasks=1)
    modules = {g: report.layers[names[0]] for g, names in report.groups.items()}
    sides = Seq2SeqInstructionTuning.mask_sides(report.groups)

    def sums(rows: list[dict[str, str]]) -> CovarianceCollector:
        collector = CovarianceCollector(modules, report.dims, sides=sides)
        batch = collate_seq2seq(tokenizer, rows, torch.ones(len(rows)), max_source=64, max_target=12)
        masks = {"encoder": batch["attention_mask"], "decoder": (batch["labels"] != IGNORE).double()}
        with torch.no_grad(), collector.capturing(), collector.token_mask(masks):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return collector

    together, alone = sums(ROWS), [sums([row]) for row in ROWS]
    for group in report.groups:
        torch.testing.assert_close(together.counts[group], sum(c.counts[group] for c in alone), rtol=0, atol=0)
        ref = sum(c.sums[group] for c in alone)  # float32 activations: padding changes the summation order
        torch.testing.assert_close(together.sums[group], ref, rtol=0, atol=1e-5 * float(ref.abs().max()), msg=group)
    encoder_tokens = sum(len(tokenizer(r["prompt"])["input_ids"]) for r in ROWS)
    decoder_tokens = sum(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"][:11]) + 1 for r in ROWS)
    assert together.counts["decoder.block.0.layer.1.EncDecAttention.k+EncDecAttention.v"] == encoder_tokens
    assert together.counts["decoder.block.0.layer.1.EncDecAttention.q"] == decoder_tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return llm_demo_shards(tmp_path_factory.mktemp("t5") / "shards")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """Finished tiny-T5 runs by (processes, ZeRO stage, dtype), each made once per module."""
    return language_runs(tmp_path_factory.mktemp("t5_runs"), shards, T5_CONFIG)


def test_one_process_t5_run_trains_scores_and_exports_a_seq2seq_adapter(runs):
    out = runs(1, 0)
    metrics, state = results(out)
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3] and len(metrics["zero_shot"]) == 3
    assert metrics["task_metrics"] == ["exact_match", "exact_match", "rouge_l"]
    adapter = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert any("EncDecAttention.k" in m for m in adapter["target_modules"])
    groups = json.loads((out / "continual_state.json").read_text())["groups"]
    assert "decoder.block.1.layer.1.EncDecAttention.k+EncDecAttention.v" in groups
    assert any(name.endswith(".A.2") for name in state) and any(name.endswith("old_basis") for name in state)


def test_evaluate_and_predict_use_the_trained_t5(runs, shards, tmp_path):
    """`evaluate` under torchrun (2 processes, ZeRO-3) gives the run's last row; `predict --prompts` answers as
    plain transformers' AutoModelForSeq2SeqLM generating greedily from the run's merged export."""
    from transformers import AutoModelForSeq2SeqLM

    from inflora_dist.data.text import collate_sources

    run = runs(2, 3)
    result = evaluate_under_torchrun(run, shards / "tasks.yaml", tmp_path / "eval.json")
    assert result["scores"]["accuracy"] == results(run)[0]["accuracy_matrix"][-1]

    prompts = ["Classify the sentiment: what a lovely day", "Who wrote Hamlet?"]
    answers = [a["answer"] for a in predict_prompts(run, prompts, tmp_path, max_new_tokens=6)]
    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(run / "model")).eval()
    for prompt, got in zip(prompts, answers, strict=True):
        ids = collate_sources(tokenizer, [{"prompt": prompt}], max_length=96)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert got == tokenizer.decode(out[0], skip_special_tokens=True), prompt


def test_two_processes_under_zero3_design_what_one_process_designs(runs):
    """The T5 path's invariant: the same A and memories (1e-5, fp32) at 1 process and 2 under ZeRO-3."""
    _, ref_state = results(runs(1, 0))
    metrics, state = results(runs(2, 3))
    assert sorted(state) == sorted(ref_state)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-5, msg=name)
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]


def test_bf16_base_with_fp32_adapters_under_zero3(runs):
    """The cluster set-up: bf16 base weights partitioned by ZeRO-3 on 2 ranks, fp32 adapters, against 1 bf16
    process, compared as on the decoder-only path (measured: one memory of 22 keeps one direction more)."""
    _, ref_state = results(runs(1, 0, "bfloat16"))
    metrics, state = results(runs(2, 3, "bfloat16"))
    assert_bf16_runs_agree(state, ref_state)
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
