"""Instruction examples as token tensors: chat template, response-only labels, padding masks.

`encode_example` turns one {prompt, response} into input ids and labels, with
the tokenizer's chat template when it has one (a plain "prompt\\n" prefix
otherwise); the loss sees response tokens only (labels -100 elsewhere).
`collate_examples` right-pads a batch: `attention_mask` marks real tokens (the
covariance passes use every real token, prompt and response), padding carries
label -100, and rows of weight 0 (the reader's padding rows) carry no label at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def prompt_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt, ending where the response starts."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    prefix = f"{system_prompt}\n" if system_prompt else ""
    return tokenizer(prefix + prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_example(
    tokenizer: Any, prompt: str, response: str, max_length: int, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; labels are -100 on the prompt. The prompt is cut from the left
    when the example is longer than `max_length`, so the response (and the end-of-sequence token) stay."""
    head = prompt_ids(tokenizer, prompt, system_prompt)
    tail = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        tail = [*tail, tokenizer.eos_token_id]
    tail = tail[:max_length]
    head = head[max(0, len(head) + len(tail) - max_length) :]
    return head + tail, [IGNORE] * len(head) + tail


def collate_examples(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    weights: torch.Tensor,
    max_length: int,
    system_prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (B, T) and the row `weight` (B,)."""
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], max_length, system_prompt) for r in rows]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ((ids, lab), w) in enumerate(zip(encoded, weights.tolist(), strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        if w > 0:  # a padding row of the reader trains nothing
            labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "weight": weights.float()}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over response tokens, number of those tokens).

    Summed, not averaged, so the caller can average over every response token of
    an optimizer step whatever the ranks and accumulation (as the image loop does with rows).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (shift_labels != IGNORE).sum()
