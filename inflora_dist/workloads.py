"""What the task loop trains and how it scores it: image classification, or instruction tuning of a causal LM.

The loop (loop.py) is the same for both; a workload supplies what differs:

    model                     the network InfLoRA is injected into
    task_parameters(t)        trainable parameters of task t besides its B (classifier heads)
    prepare(batch)            a reader batch -> tensors on the device
    units(batch)              what a step's loss is averaged over: real rows (images) or response tokens (text)
    loss(engine, batch, ts)   the summed loss of a micro-batch of stage tasks `ts`
    token_mask / forward      one no-grad forward for the covariance passes, padding masked
    score(engine, raw, t)     summed evaluation scores of task t's reader batch (all-reduced by the loop)
    matrices / finish(sums)   the accuracy matrices the scores fill (the first is the primary one)

Image classification (the reference's setting): one linear head per task; accuracy
with all heads (class-incremental) and with the task's own head (task-incremental).
Instruction tuning (O-LoRA / TRACE setting): loss on response tokens only;
evaluation generates greedily and scores each task by its spec's metric (exact
match of label words, or ROUGE-L), in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from inflora_dist import dist
from inflora_dist.config import RunConfig
from inflora_dist.data import TaskSequenceConfig
from inflora_dist.data.text import IGNORE, SCORERS, collate_examples, collate_prompts, response_loss
from inflora_dist.models import ContinualClassifier, load_backbone, load_causal_lm, load_tokenizer

#: Generated tokens beyond the longest label word, for exact-match tasks (room for an end-of-sequence token).
_LABEL_SLACK_TOKENS = 2


def _images(batch: dict[str, Any]) -> torch.Tensor:
    """The image field of a batch: `.npy` arrays or decoded `.jpg`/`.png` files."""
    for key in ("npy", "jpg", "jpeg", "png"):
        if key in batch:
            return batch[key]
    raise KeyError(f"no image field in the batch (fields: {sorted(batch)})")


class ImageClassification:
    """A vision backbone with one classifier head per task (class-incremental label spaces)."""

    matrices = ("accuracy_matrix", "task_incremental_accuracy_matrix")
    peft_task_type: str | None = None

    def __init__(self, cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device) -> None:
        if seq.kind != "classification":
            raise ValueError(f"model.kind {cfg.model.kind} trains classification tasks, the sequence is {seq.kind}")
        self.device = device
        sizes = [len(t.classes or []) for t in seq.tasks]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]  # task j: logits [offsets[j], offsets[j+1])
        order = seq.class_ids
        self.position = torch.full((max(order) + 1,), -1, dtype=torch.long)
        self.position[torch.tensor(order)] = torch.arange(len(order))  # dataset label -> logit index
        self.model: nn.Module = ContinualClassifier(load_backbone(cfg.model), sizes, cfg.model).to(device)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return list(self.model.heads[task].parameters())

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            "images": _images(batch).to(self.device),
            "target": self.position[batch["cls"]].to(self.device),
            "weight": batch["weight"].to(self.device),
        }

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["weight"].sum()

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], tasks: Sequence[int]) -> torch.Tensor:
        lo, hi = self.offsets[tasks[0]], self.offsets[tasks[-1] + 1]  # the stage's logits
        logits = engine(batch["images"], upto=tasks[-1])[:, lo:hi]
        return (F.cross_entropy(logits, batch["target"] - lo, reduction="none") * batch["weight"]).sum()

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["weight"]

    def forward(self, engine: Any, batch: dict[str, torch.Tensor], upto: int) -> None:
        engine(batch["images"], upto=upto)

    def score(self, engine: Any, raw: dict[str, Any], task: int, upto: int) -> torch.Tensor:
        """(correct with all heads so far, correct with task's head, rows), weighted sums in float64."""
        batch = self.prepare(raw)
        logits = engine(batch["images"], upto=upto).float()
        lo, hi = self.offsets[task], self.offsets[task + 1]
        target, w = batch["target"], batch["weight"].double()
        cil = ((logits.argmax(1) == target).double() * w).sum()
        til = ((logits[:, lo:hi].argmax(1) + lo == target).double() * w).sum()
        return torch.stack([cil, til, w.sum()])

    def finish(self, sums: torch.Tensor) -> list[float]:
        return [100.0 * float(sums[0] / sums[2]), 100.0 * float(sums[1] / sums[2])]


class InstructionTuning:
    """A causal LM taught instruction tasks; its outputs are scored by generation (one matrix of scores)."""

    matrices = ("accuracy_matrix",)
    peft_task_type: str | None = "CAUSAL_LM"

    def __init__(self, cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device) -> None:
        if seq.kind != "instruction":
            raise ValueError(f"model.kind causal_lm trains instruction tasks, the task sequence is {seq.kind}")
        self.device, self.seq = device, seq
        self.max_length = cfg.model.max_length
        self.tokenizer = load_tokenizer(cfg.model)
        self.model: nn.Module = load_causal_lm(cfg.model).to(device)
        self.system_prompts = {t.name: t.instruction.system_prompt if t.instruction else None for t in seq.tasks}
        # Generation under ZeRO-3 with several ranks: every rank runs forwards until all are done.
        self.synced = cfg.deepspeed.zero_stage == 3 and dist.get_world_size() > 1
        self.new_tokens = [self._new_tokens(t, cfg.model.max_new_tokens) for t in range(len(seq.tasks))]

    def _new_tokens(self, task: int, limit: int) -> int:
        """Tokens to generate for `task`: the longest label word and a little slack (exact match), else `limit`."""
        spec = self.seq.tasks[task].instruction
        if spec is None or spec.metric != "exact_match" or not spec.labels:
            return limit
        longest = max(len(self.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in spec.labels)
        return min(limit, longest + _LABEL_SLACK_TOKENS)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return []  # the LM head is shared and frozen: only the branches train

    def _system_prompts(self, rows: Sequence[dict[str, str]]) -> list[str | None]:
        return [self.system_prompts.get(r.get("task", "")) for r in rows]

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rows = batch["json"]
        tensors = collate_examples(self.tokenizer, rows, batch["weight"], self.max_length, self._system_prompts(rows))
        return {k: v.to(self.device) for k, v in tensors.items()}

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], tasks: Sequence[int]) -> torch.Tensor:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_loss(logits, batch["labels"])[0]

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Every real token, prompt and response; a padding row of the reader (weight 0) counts nothing.
        return batch["attention_mask"] * batch["weight"].unsqueeze(1)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor], upto: int) -> None:
        engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def generate(self, engine: Any, rows: Sequence[dict[str, str]], max_new_tokens: int) -> list[str]:
        """Greedy answers to the rows' prompts (the text after the prompt, special tokens dropped)."""
        prompts = collate_prompts(self.tokenizer, rows, self.max_length, self._system_prompts(rows))
        prompts = {k: v.to(self.device) for k, v in prompts.items()}
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        out = engine.module.generate(**prompts, generation_config=config, synced_gpus=self.synced)
        return self.tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)

    def score(self, engine: Any, raw: dict[str, Any], task: int, upto: int) -> torch.Tensor:
        """(summed score of the generated answers, rows), weighted, in float64.

        Reads the reader batch's records directly: generation needs the prompts only, not the
        training encoding `prepare` builds.
        """
        spec = self.seq.tasks[task].instruction
        scorer = SCORERS[spec.metric if spec else "exact_match"]
        rows = raw["json"]
        answers = self.generate(engine, rows, self.new_tokens[task])
        scores = torch.tensor([scorer(a, r["response"]) for a, r in zip(answers, rows, strict=True)])
        w = raw["weight"].double().cpu()
        return torch.stack([(scores.double() * w).sum(), w.sum()])

    def finish(self, sums: torch.Tensor) -> list[float]:
        return [100.0 * float(sums[0] / sums[1])]


Workload = ImageClassification | InstructionTuning


def build_workload(cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device) -> Workload:
    """The workload of `cfg.model.kind`; the model is built with the same seed on every rank."""
    torch.manual_seed(cfg.seed)
    if cfg.model.kind == "causal_lm":
        return InstructionTuning(cfg, seq, device)
    return ImageClassification(cfg, seq, device)
