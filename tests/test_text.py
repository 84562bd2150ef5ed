"""Instruction examples as tokens: response-only loss, padding that changes nothing, chat template."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from inflora_dist.continual import InfLoRA
from inflora_dist.data.text import (
    IGNORE,
    collate_examples,
    collate_prompts,
    encode_example,
    exact_match,
    prompt_ids,
    response_loss,
    rouge_l,
)
from inflora_dist.inject import inject_inflora

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "assets" / "smollm2-135m-instruct"  # `make assets`; its tokenizer ships a chat template
needs_smollm2 = pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(), reason="run `make assets` first")

WORDS = "what is the sentiment of this tweet positive negative neutral i love it hate rain sunny day answer".split()
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in the test (vocabulary < the tiny Llama's 97), with a chat template."""
    specials = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


def test_labels_cover_the_response_and_eos_only(tokenizer):
    ids, labels = encode_example(tokenizer, "what is the sentiment of i love it", "positive", max_length=64)
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["<|user|>"]
    answer_start = ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1
    assert all(label == IGNORE for label in labels[:answer_start])
    assert labels[answer_start:] == ids[answer_start:] == [tokenizer.convert_tokens_to_ids("positive"), 1]


def test_truncation_keeps_the_response(tokenizer):
    ids, labels = encode_example(tokenizer, " ".join(WORDS * 3), "negative", max_length=8)
    assert len(ids) == 8 and labels[-2:] == [tokenizer.convert_tokens_to_ids("negative"), tokenizer.eos_token_id]


def test_loss_is_cross_entropy_over_response_tokens_by_hand(tokenizer):
    model = tiny_llama()
    batch = collate_examples(
        tokenizer, [{"prompt": "what is the sentiment of i hate rain", "response": "negative neutral"}],
        torch.ones(1), max_length=64,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = response_loss(logits, batch["labels"])
    expected, n = 0.0, 0
    labels = batch["labels"][0].tolist()
    for t in range(1, len(labels)):
        if labels[t] != IGNORE:
            log_probs = torch.log_softmax(logits[0, t - 1].double(), dim=-1)
            expected -= float(log_probs[labels[t]])
            n += 1
    assert int(count) == n == 3  # two response words and the end-of-sequence token
    assert math.isclose(float(total), expected, rel_tol=1e-5)


def test_padding_changes_neither_loss_nor_covariance(tokenizer):
    """Two examples padded into one batch give the loss and covariance of each example on its own."""
    examples = [
        {"prompt": "what is the sentiment of i love it sunny day", "response": "positive"},
        {"prompt": "answer", "response": "neutral"},
    ]
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, ["q_proj", "k_proj", "v_proj"], rank=2, num_tasks=1), 0.9, 0.99)
    group = "model.layers.0.self_attn.q_proj+k_proj+v_proj"

    def run(batches):
        loss, tokens = 0.0, 0
        with torch.no_grad(), inflora.collector.capturing():
            for batch in batches:
                with inflora.collector.token_mask(batch["attention_mask"]):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                total, count = response_loss(logits, batch["labels"])
                loss, tokens = loss + float(total), tokens + int(count)
        return loss, tokens, inflora.collector.all_reduce()[group]

    together = run([collate_examples(tokenizer, examples, torch.ones(2), max_length=64)])
    alone = run([collate_examples(tokenizer, [e], torch.ones(1), max_length=64) for e in examples])
    assert together[1] == alone[1]
    assert math.isclose(together[0], alone[0], rel_tol=1e-5)
    torch.testing.assert_close(together[2], alone[2], rtol=1e-5, atol=1e-6)


def test_reader_padding_rows_train_nothing(tokenizer):
    rows = [{"prompt": "answer", "response": "positive"}] * 2
    batch = collate_examples(tokenizer, rows, torch.tensor([1.0, 0.0]), max_length=16)
    assert (batch["labels"][1] == IGNORE).all() and (batch["labels"][0] != IGNORE).any()
    assert batch["attention_mask"][1].sum() > 0  # still a real sequence for shapes; the covariance pass weights rows


def test_prompts_are_left_padded_for_generation(tokenizer):
    rows = [{"prompt": "what is the sentiment of i love it sunny day"}, {"prompt": "answer"}]
    batch = collate_prompts(tokenizer, rows, max_length=64)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (batch["input_ids"][:, -1] == assistant).all()  # every answer starts at the same column
    short = batch["attention_mask"][1]
    assert short[0] == 0 and short[-1] == 1 and (short.diff() >= 0).all()


def test_chat_template_none_gives_the_plain_prompt_format(tokenizer):
    """`model.chat_template`: auto wraps the prompt in the tokenizer's template, none gives the plain
    "<prompt>\\n" (the benchmarks' raw prompts) although the tokenizer has one, in training and generation."""
    prompt, answer = "what is the sentiment of i love it", [tokenizer.convert_tokens_to_ids("positive"), 1]
    plain = tokenizer(prompt + "\n")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(plain[:1]) == ["what"]
    ids, labels = encode_example(tokenizer, prompt, "positive", max_length=64, chat_template="none")
    assert ids == plain + answer and labels == [IGNORE] * len(plain) + answer
    templated, _ = encode_example(tokenizer, prompt, "positive", max_length=64, chat_template="auto")
    assert templated == encode_example(tokenizer, prompt, "positive", max_length=64)[0]  # auto: the default
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.convert_ids_to_tokens(templated[:1]) == ["<|user|>"] and templated[-3:] == [assistant, *answer]
    batch = collate_examples(tokenizer, [{"prompt": prompt, "response": "positive"}], torch.ones(1), 64,
                             chat_template="none")  # fmt: skip
    assert batch["input_ids"][0].tolist() == ids
    assert collate_prompts(tokenizer, [{"prompt": prompt}], 64, chat_template="none")["input_ids"][0].tolist() == plain
    with pytest.raises(ValueError, match=r"model.chat_template must be one of \['auto', 'none'\], got 'chatml'"):
        prompt_ids(tokenizer, prompt, chat_template="chatml")


@needs_smollm2
def test_packaged_smollm2_template_is_applied_with_auto_only():
    """The packaged SmolLM2-Instruct tokenizer ships a template: auto gives its chat format (with the template's
    default system turn), none the prompt and a newline, nothing else."""
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    assert tok.chat_template
    prompt = "Which language is this line in? ciao a tutti"
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    assert tok.decode(prompt_ids(tok, prompt, chat_template="auto")) == chat
    assert chat.startswith("<|im_start|>system") and chat.endswith("<|im_start|>assistant\n")
    assert tok.decode(prompt_ids(tok, prompt, chat_template="none")) == prompt + "\n"


@needs_smollm2
def test_the_workload_trains_and_generates_in_the_configured_format():
    """model.chat_template reaches the causal-LM workload: `prepare` (training, covariance passes) and
    `generate` (evaluation, predict) both give the plain prompt with none, the template with auto; other
    values are refused naming the key."""
    from inflora_dist.config import load_run_config
    from inflora_dist.data.spec import InstructionSpec, TaskSequenceConfig, TaskSpec
    from inflora_dist.workloads import InstructionTuning

    seq = TaskSequenceConfig(kind="instruction", tasks=[TaskSpec(name="t", instruction=InstructionSpec())])
    row = {"prompt": "Which language is this line in? ciao", "response": "italian", "task": "t"}
    prompts, seen = {}, []

    def generate(input_ids, **kwargs):  # engine.module.generate: records the prompt, answers one token
        seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    for mode in ("auto", "none"):
        cfg = load_run_config(str(REPO / "configs" / "tiny_llm.yaml"),
                              [f"model.chat_template={mode}", "model.config.num_hidden_layers=1"])  # fmt: skip
        workload = InstructionTuning(cfg, seq, torch.device("cpu"))
        tok = workload.tokenizer
        trained = workload.prepare({"json": [row], "weight": torch.ones(1)})["input_ids"][0].tolist()
        workload.generate(SimpleNamespace(module=SimpleNamespace(generate=generate)), [row], max_new_tokens=1)
        prompts[mode] = tok.decode(seen[-1])
        assert trained[: len(seen[-1])] == seen[-1]  # generation reads the prompt training read
    assert prompts["none"] == row["prompt"] + "\n"
    assert prompts["auto"].startswith("<|im_start|>system") and row["prompt"] in prompts["auto"]
    with pytest.raises(ValueError, match=r"model.chat_template must be one of \['auto', 'none'\], got 'chatml'"):
        load_run_config(str(REPO / "configs" / "tiny_llm.yaml"), ["model.chat_template=chatml"])


def test_benchmark_configs_state_their_prompt_format():
    """Every LLM benchmark config sets model.chat_template: GainLoRA's and O-LoRA's benchmarks feed raw prompts
    (none; their collators tokenize the prompt string itself), the LLM demo its instruct model's template."""
    from inflora_dist.config import read_yaml

    expected = {"configs/demo_llm.yaml": "auto", "configs/scale/llama2_7b.yaml": "auto",
                "configs/scale/llama2_7b_qv_all.yaml": "auto", "configs/scale/tinyllama_1b.yaml": "auto"}  # fmt: skip
    for folder in ("superni", "olora", "t5"):
        expected.update({str(p.relative_to(REPO)): "none" for p in (REPO / "configs" / folder).glob("*.yaml")})
    assert len(expected) == 15  # 4 + superni: 2 InfLoRA, 2 GainLoRA, the CPU cut; olora: 2; t5: 4
    for path, mode in expected.items():
        assert read_yaml(str(REPO / path)).model.chat_template == mode, path


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tokenizer):
    model = tiny_llama()
    rows = [{"prompt": "what is the sentiment of i love it sunny day"}, {"prompt": "answer"}]
    batch = collate_prompts(tokenizer, rows, max_length=64)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    for i, row in enumerate(rows):
        alone = collate_prompts(tokenizer, [row], max_length=64)
        out = model.generate(**alone, **kwargs)[:, alone["input_ids"].shape[1] :]
        assert out[0].tolist() == together[i].tolist()


def test_exact_match_normalises_as_the_benchmarks_do():
    assert exact_match(" Positive.", "positive") == 1.0
    assert exact_match("positive sentiment", "positive") == 0.0
    assert exact_match("", "positive") == 0.0
    # SQuAD v1.1's normalisation without the article removal: punctuation is deleted (not split on), spaces folded.
    assert exact_match("Don't  know!", "dont know") == 1.0
    assert exact_match("the answer", "answer") == 0.0


# (prediction, reference, ROUGE-L F by hand after rouge-score's tokenizer and Porter stemming)
ROUGE_PAIRS = [
    ("The cat sat on the mat.", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat": P = R = 5/6
    ("a c", "a b c d", 2 / 3),  # LCS "a c": P = 1, R = 1/2
    ("a cat runs", "The cats are running", 4 / 7),  # stems cat/run match: P = 2/3, R = 2/4
    ("x y", "a b", 0.0),
    ("", "", 0.0),  # rouge-score gives 0 when a side has no word
    ("a", "", 0.0),
    (
        "Don't stop",
        "dont stop",
        0.4,
    ),  # its tokenizer splits on the apostrophe: [don, t, stop] vs [dont, stop]: P = 1/3, R = 1/2
]


@pytest.mark.parametrize(("prediction", "reference", "by_hand"), ROUGE_PAIRS)
def test_rouge_l_is_the_benchmarks_rouge_score(prediction, reference, by_hand):
    from rouge_score import rouge_scorer  # the package the benchmarks' compute_metrics.py uses, same options

    package = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure
    assert math.isclose(rouge_l(prediction, reference), package, abs_tol=1e-12)
    assert math.isclose(rouge_l(prediction, reference), by_hand, abs_tol=1e-12)


def test_importing_the_trainer_leaves_logging_unconfigured():
    """No import configures the root logger (rouge-score's scorer logs through absl, which calls basicConfig on
    a first log): the entry points' own logging.basicConfig must take effect, or rank 0's INFO lines are lost."""
    import subprocess
    import sys

    code = "import logging, inflora_dist.loop, inflora_dist.evaluate; print(len(logging.root.handlers))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "0", out.stderr[-2000:]
