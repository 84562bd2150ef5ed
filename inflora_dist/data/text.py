"""Instruction examples as token tensors: chat template, response-only labels, padding masks.

`encode_example` turns one {prompt, response} into input ids and labels, with
the tokenizer's chat template when it has one and `chat_template` is "auto" (a
plain "prompt\\n" prefix otherwise, or always with "none": the benchmarks' raw
prompts); the loss sees response tokens only (labels -100 elsewhere).
`collate_examples` right-pads a batch: `attention_mask` marks real tokens (the
covariance passes use every real token, prompt and response), padding carries
label -100, and rows of weight 0 (the reader's padding rows) carry no label at all.
`collate_prompts` left-pads prompts for batched generation, and `exact_match` /
`rouge_l` score the generated answers as the benchmarks' evaluation code does.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

IGNORE = -100
#: `model.chat_template`: "auto" applies the tokenizer's chat template when it has one; "none" never does.
CHAT_TEMPLATE_MODES = ("auto", "none")


def prompt_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None, chat_template: str = "auto") -> list[int]:
    """Token ids of the prompt, ending where the response starts: the tokenizer's chat template (`chat_template`
    "auto" and the tokenizer has one), else "<system>\\n<prompt>\\n" with the tokenizer's special tokens."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"model.chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {chat_template!r}")
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    prefix = f"{system_prompt}\n" if system_prompt else ""
    return tokenizer(prefix + prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    system_prompt: str | None = None,
    chat_template: str = "auto",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; labels are -100 on the prompt. The prompt is cut from the left
    when the example is longer than `max_length`, so the response (and the end-of-sequence token) stay.
    `chat_template`: as `prompt_ids`."""
    head = prompt_ids(tokenizer, prompt, system_prompt, chat_template)
    tail = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        tail = [*tail, tokenizer.eos_token_id]
    tail = tail[:max_length]
    head = head[max(0, len(head) + len(tail) - max_length) :]
    return head + tail, [IGNORE] * len(head) + tail


def _per_row(system_prompt: str | Sequence[str | None] | None, rows: int) -> list[str | None]:
    if system_prompt is None or isinstance(system_prompt, str):
        return [system_prompt] * rows
    if len(system_prompt) != rows:
        raise ValueError(f"{len(system_prompt)} system prompts for {rows} rows")
    return list(system_prompt)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _padded(
    sequences: Sequence[Sequence[int]], value: int, width: int | None = None, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) long tensor of `sequences` padded with `value` on the right (or the left), and its 0/1 mask of
    real entries; `width` defaults to the longest sequence."""
    width = max(map(len, sequences)) if width is None else width
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        out[i, cols] = torch.tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def collate_examples(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    weights: torch.Tensor,
    max_length: int,
    system_prompt: str | Sequence[str | None] | None = None,
    chat_template: str = "auto",
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (B, T) and the row `weight` (B,).

    `system_prompt`: one for every row, or one per row (rows of several tasks); `chat_template`: as `prompt_ids`."""
    systems = _per_row(system_prompt, len(rows))
    encoded = [
        encode_example(tokenizer, r["prompt"], r["response"], max_length, s, chat_template)
        for r, s in zip(rows, systems, strict=True)
    ]
    input_ids, mask = _padded([ids for ids, _ in encoded], _pad_id(tokenizer))
    trained = [lab if w > 0 else [] for (_, lab), w in zip(encoded, weights.tolist(), strict=True)]
    labels, _ = _padded(trained, IGNORE, width=input_ids.shape[1])  # a padding row of the reader trains nothing
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "weight": weights.float()}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over response tokens, number of those tokens).

    Summed, not averaged, so the caller can average over every response token of
    an optimizer step whatever the ranks and accumulation (as the image loop does with rows).
    """
    return label_loss(logits[:, :-1], labels[:, 1:])  # position i predicts token i + 1


def collate_prompts(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    max_length: int,
    system_prompt: str | Sequence[str | None] | None = None,
    chat_template: str = "auto",
) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids and attention mask (B, T) for generation: every row's answer starts at column T.

    A prompt longer than `max_length` keeps its last `max_length` tokens (where the answer starts);
    `chat_template`: as `prompt_ids` (the same as training's, or the answers start in another format).
    """
    systems = _per_row(system_prompt, len(rows))
    prompts = [
        prompt_ids(tokenizer, r["prompt"], s, chat_template)[-max_length:] for r, s in zip(rows, systems, strict=True)
    ]
    input_ids, mask = _padded(prompts, _pad_id(tokenizer), left=True)
    return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------- encoder-decoder models
def source_ids(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """The encoder's token ids of a prompt, cut at the end to `max_length` (as GainLoRA's and O-LoRA's T5
    collators cut the source); the tokenizer adds its own special tokens (T5: the closing </s>)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"][:max_length]


def target_ids(tokenizer: Any, response: str, max_length: int) -> list[int]:
    """The decoder's labels of a response: its tokens cut to `max_length` - 1, then end-of-sequence."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids[: max_length - len(eos)] + eos


def collate_sources(tokenizer: Any, rows: Sequence[Mapping[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder `input_ids` and `attention_mask` (B, S) of the rows' prompts."""
    input_ids, mask = _padded([source_ids(tokenizer, r["prompt"], max_length) for r in rows], _pad_id(tokenizer))
    return {"input_ids": input_ids, "attention_mask": mask}


def collate_seq2seq(
    tokenizer: Any, rows: Sequence[Mapping[str, str]], weights: torch.Tensor, max_source: int, max_target: int
) -> dict[str, torch.Tensor]:
    """Encoder `input_ids` / `attention_mask` (B, S), decoder `labels` (B, T; -100 on padding, and on every
    position of a weight-0 row, the reader's padding rows) and the row `weight` (B,)."""
    batch = collate_sources(tokenizer, rows, max_source)
    targets = [target_ids(tokenizer, r["response"], max_target) for r in rows]
    trained = [ids if w > 0 else [] for ids, w in zip(targets, weights.tolist(), strict=True)]
    labels, _ = _padded(trained, IGNORE, width=max(map(len, targets)))
    return {**batch, "labels": labels, "weight": weights.float()}


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies of the decoder's logits against its labels, number of label tokens): the
    encoder-decoder form of `response_loss` (position i predicts label i; no shift)."""
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (labels != IGNORE).sum()


# ---------------------------------------------------------------- scoring generations
# As the benchmarks' own evaluation code scores (GainLoRA / O-LoRA / SuperNI `compute_metrics.py`):
# exact match after SQuAD v1.1's normalisation without the article removal, and the `rouge-score`
# package's ROUGE-L F-measure with its default tokenizer and the Porter stemmer.
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@functools.cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    # Built on first use, not at import: its constructor logs through absl, whose first log call runs
    # logging.basicConfig() when the root logger has no handler yet, which would make ours a no-op.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """Lower-cased, ASCII punctuation deleted, runs of whitespace made one space (the benchmarks' exact match)."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of `rouge-score`'s `RougeScorer(["rougeL"], use_stemmer=True)` (0.0 when either
    side has no word, as that package scores it)."""
    return _rouge_l_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


SCORERS = {"exact_match": exact_match, "rouge_l": rouge_l}
