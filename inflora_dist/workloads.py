"""What the task loop trains and how it scores it: image classification, or instruction tuning of a causal LM.

The loop (loop.py) is the same for both; a workload supplies what differs:

    model                     the network InfLoRA is injected into
    task_parameters(t)        trainable parameters of task t besides its B (classifier heads)
    prepare(batch)            a reader batch -> tensors on the device
    units(batch)              what a step's loss is averaged over: real rows (images) or response tokens (text)
    loss(engine, batch, ts)   the summed loss of a micro-batch of stage tasks `ts`
    token_mask / forward      one no-grad forward for the covariance passes, padding masked (returns the
                              features of the class statistics, for classification)
    row_tokens(batch)         the tokens each row gives a covariance pass (0 for padding rows): what
                              `inflora.covariance_max_tokens` counts
    mask_sides(groups)        which of token_mask's masks each input group follows (encoder-decoder models
                              have two; None: one mask for all)
    prompt                    which tokens of each forward are the prompt (PromptTap; None for images)
    classes                   the class-incremental side (ClassIncremental: class statistics, class sums, head
                              alignment and prototypes; the classification workload itself), or None
    score(engine, raw, t)     summed evaluation scores of task t's reader batch (all-reduced by the loop)
    matrices / finish(sums)   the accuracy matrices the scores fill (the first is the primary one)
    zero_shot                 whether a score before any training means something (the zero-shot row)

Image classification (the reference's setting): one linear head per task; accuracy
with all heads (class-incremental), with the task's own head (task-incremental),
and by the nearest class mean (prototypes); optional classifier alignment.
Instruction tuning (O-LoRA / TRACE setting): loss on response tokens only;
evaluation generates greedily and scores each task by its spec's metric (exact
match of label words, or ROUGE-L), in percent; a causal LM reads prompt and
response as one sequence, an encoder-decoder LM (T5) the prompt in its encoder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

from inflora_dist import dist
from inflora_dist.alignment import align_classifier
from inflora_dist.class_stats import ClassStatistics, ClassSums, nearest_mean
from inflora_dist.config import CAConfig, RunConfig
from inflora_dist.data import TaskSequenceConfig
from inflora_dist.data.text import (
    IGNORE,
    SCORERS,
    collate_examples,
    collate_prompts,
    collate_seq2seq,
    collate_sources,
    label_loss,
    response_loss,
)
from inflora_dist.engine import construction_config
from inflora_dist.export import export_classifier_heads, export_merged_model
from inflora_dist.gates import PromptTap
from inflora_dist.inject import InjectionReport
from inflora_dist.models import (
    DTYPES,
    ContinualClassifier,
    TaskHead,
    count_model_parameters,
    enable_activation_checkpointing,
    image_tokens,
    load_backbone,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

#: Generated tokens beyond the longest label word, for exact-match tasks (room for an end-of-sequence token).
_LABEL_SLACK_TOKENS = 2


def _images(batch: dict[str, Any]) -> torch.Tensor:
    """The image field of a batch: `.npy` arrays or decoded `.jpg`/`.png` files."""
    for key in ("npy", "jpg", "jpeg", "png"):
        if key in batch:
            return batch[key]
    raise KeyError(f"no image field in the batch (fields: {sorted(batch)})")


class ImageClassification:
    """A vision backbone with one classifier head per task (class-incremental label spaces).

    Besides the heads it keeps the statistics of every seen class (class_stats.py):
    their means score every evaluation a third way, by the nearest class mean
    (cosine, the prototype classifier), and with `ca.enabled` their Gaussians
    retrain the heads after every task t >= 1 (classifier alignment).
    """

    matrices = ("accuracy_matrix", "task_incremental_accuracy_matrix", "ncm_accuracy_matrix")
    peft_task_type: str | None = None
    zero_shot = False  # untrained heads score nothing meaningful
    prompt: PromptTap | None = None  # images: no prompt

    auto_class: type = AutoModel  # the transformers family of the backbone

    def __init__(self, cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device,
                 zero3_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        if seq.kind != "classification":
            raise ValueError(f"model.kind {cfg.model.kind} trains classification tasks, the sequence is {seq.kind}")
        self.device = device
        sizes = [len(t.classes or []) for t in seq.tasks]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]  # task j: logits [offsets[j], offsets[j+1])
        self.class_ids = seq.class_ids
        self.position = torch.full((max(self.class_ids) + 1,), -1, dtype=torch.long)
        self.position[torch.tensor(self.class_ids)] = torch.arange(len(self.class_ids))  # dataset label -> logit
        backbone = load_backbone(cfg.model, self.auto_class, zero3_config)
        # Under ZeRO-3 .to() moves the heads and buffers: a partitioned weight is an empty placeholder whose
        # shard DeepSpeed already keeps on the device.
        self.model: nn.Module = ContinualClassifier(backbone, sizes, cfg.model).to(device)
        form = cfg.ca.covariance if cfg.ca.enabled else "none"  # covariances only where alignment samples them
        self.statistics = ClassStatistics(self.model.hidden, form, cfg.ca.covariance_reg)
        self.bucket_bytes = cfg.inflora.reduce_bucket_bytes  # the class sums reduce like the covariances
        self.task_names = [t.name for t in seq.tasks]
        self.class_names = [n for t in seq.tasks for n in (t.class_names or [None] * len(t.classes or []))]
        # What a user of the export does to an image: the eval recipe (data/transforms.py), then the model's.
        self.preprocess = {"image_size": cfg.model.image_size, "channels": cfg.model.channels,
                           "mean": list(cfg.model.mean), "std": list(cfg.model.std),
                           "transform": cfg.data.eval_transform}  # fmt: skip
        self.prototypes = torch.zeros(0, self.model.hidden, device=device)  # the seen classes' means
        self.tokens_per_image = image_tokens(self.model.backbone.config, cfg.model.image_size)

    @property
    def classes(self) -> ImageClassification:
        return self  # it keeps the class statistics and the heads itself

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

    def row_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["weight"] > 0).long() * self.tokens_per_image

    def forward(self, engine: Any, batch: dict[str, torch.Tensor], upto: int) -> torch.Tensor:
        """One no-grad forward; returns the features (the class statistics' input)."""
        return engine(batch["images"], upto=upto, with_features=True)[1]

    def score(self, engine: Any, raw: dict[str, Any], task: int, upto: int) -> torch.Tensor:
        """(correct with all heads so far, with the task's head, by nearest class mean, rows), float64 sums."""
        batch = self.prepare(raw)
        logits, feats = engine(batch["images"], upto=upto, with_features=True)
        lo, hi = self.offsets[task], self.offsets[task + 1]
        target, w = batch["target"], batch["weight"].double()
        cil = ((logits.float().argmax(1) == target).double() * w).sum()
        til = ((logits.float()[:, lo:hi].argmax(1) + lo == target).double() * w).sum()
        seen = self.offsets[upto + 1]
        if self.prototypes.shape[0] < seen:
            raise RuntimeError(f"prototype scores of classes 0..{seen - 1} need their statistics first")
        ncm = ((nearest_mean(feats, self.prototypes[:seen]) == target).double() * w).sum()
        return torch.stack([cil, til, ncm, w.sum()])

    def finish(self, sums: torch.Tensor) -> list[float]:
        return [100.0 * float(sums[k] / sums[3]) for k in range(3)]

    def export_model(self, report: InjectionReport, directory: Path, max_shard_size: str) -> None:
        """The merged backbone (plain transformers), its heads and class map, in `directory`. Collective under
        ZeRO-3. The heads first: the backbone's large write comes last, so a failed write (a full disk) leaves no
        rank waiting in a gather (`export.written_atomically`)."""
        export_classifier_heads(
            self.model.heads,
            directory,
            self.class_ids,
            self.offsets,
            self.task_names,
            self.preprocess,
            self.class_names,
        )
        export_merged_model(self.model, report, directory, prefix="backbone.", max_shard_size=max_shard_size)

    # ------------------------------------------------------------ class statistics and alignment
    def class_sums(self, tasks: Sequence[int]) -> ClassSums:
        """Empty per-class sums for the classes of the stage's `tasks` (contiguous logit positions)."""
        lo, hi = self.offsets[tasks[0]], self.offsets[tasks[-1] + 1]
        return ClassSums(lo, self.class_ids[lo:hi], self.model.hidden, self.statistics.form, dist.collective_device())

    def add_features(self, sums: ClassSums, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        sums.add(features, batch["target"], batch["weight"])

    def finish_class_sums(self, sums: ClassSums) -> None:
        """Reduce the stage's sums over the ranks and append its classes to the statistics. Collective."""
        sums.all_reduce_(self.bucket_bytes)  # collective
        self.statistics.extend(sums)
        self._statistics_changed()

    def _statistics_changed(self) -> None:
        self.prototypes = self.statistics.means.to(self.device)
        if dist.is_main_process():
            s = self.statistics
            logger.info(
                "class statistics: %d classes x %d dims, covariance %s, %.1f MB (float32, host)",
                len(s), s.dim, s.form, s.nbytes / 2**20,
            )  # fmt: skip

    def load_statistics(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the class statistics of a checkpoint (`statistics.state_dict()` tensors)."""
        self.statistics.load_state_dict(state)
        self._statistics_changed()

    def align_heads(self, task: int, recipe: CAConfig, seed: int) -> list[float]:
        """Classifier alignment of heads 0..task (alignment.py); rank 0 computes, every rank gets its heads.

        Returns the epochs' mean losses (on rank 0; empty elsewhere). Collective.
        """
        heads = list(self.model.heads[: task + 1])
        params = [p for head in heads for p in head.parameters()]
        losses: list[float] = []
        with dist.written_by(params, src=0):  # collective
            if dist.is_main_process():
                copies = [TaskHead.copy_of(head) for head in heads]
                generator = torch.Generator().manual_seed(seed)
                losses = align_classifier(copies, self.statistics, self.offsets, task, recipe, generator)
                with torch.no_grad():
                    for p, q in zip(params, [q for c in copies for q in c.parameters()], strict=True):
                        p.copy_(q)
        return losses

    @staticmethod
    def mask_sides(groups: dict[str, list[str]]) -> dict[str, str] | None:
        """Which of `token_mask`'s masks each input group's tokens follow: None, one mask for every group."""
        return None

    def prototype_heads(self, upto: int) -> None:
        """Set heads 0..upto to the prototype classifier: weight = unit class mean, bias 0 (SimpleCIL). Collective."""
        heads = list(self.model.heads[: upto + 1])
        with dist.written_by([p for head in heads for p in head.parameters()], src=0), torch.no_grad():
            for t, head in enumerate(heads):
                means = self.statistics.means[self.offsets[t] : self.offsets[t + 1]]
                head.weight.copy_(F.normalize(means, dim=-1))
                if head.bias is not None:
                    head.bias.zero_()


class InstructionTuning:
    """A causal LM taught instruction tasks; its outputs are scored by generation (one matrix of scores)."""

    matrices = ("accuracy_matrix",)
    peft_task_type: str | None = "CAUSAL_LM"
    zero_shot = True  # the pre-trained model answers every task before any training
    classes: ClassIncremental | None = None  # no classes: no class statistics, no heads

    auto_class: type = AutoModelForCausalLM
    mask_sides = staticmethod(ImageClassification.mask_sides)  # one mask for every group

    def __init__(self, cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device,
                 zero3_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        if seq.kind != "instruction":
            raise ValueError(f"model.kind {cfg.model.kind} trains instruction tasks, the task sequence is {seq.kind}")
        self.device, self.seq = device, seq
        self.max_length = cfg.model.max_length
        self.tokenizer = load_tokenizer(cfg.model)
        self.model: nn.Module = load_backbone(cfg.model, self.auto_class, zero3_config).to(device)  # see above
        self.system_prompts = {t.name: t.instruction.system_prompt if t.instruction else None for t in seq.tasks}
        self.chat_template = cfg.model.chat_template  # auto | none: the prompt format of training and generation
        # Generation under ZeRO-3 with several ranks: every rank runs forwards until all are done.
        self.synced = cfg.deepspeed.zero_stage == 3 and dist.get_world_size() > 1
        self.new_tokens = [self._new_tokens(t, cfg.model.max_new_tokens) for t in range(len(seq.tasks))]
        self.prompt = PromptTap(self.prompt_reader())

    def prompt_reader(self) -> nn.Module:
        """The module whose forward reads the prompt: the causal LM itself."""
        return self.model

    def export_model(self, report: InjectionReport, directory: Path, max_shard_size: str) -> None:
        """The merged causal LM and its tokenizer in `directory`: a checkpoint for any serving stack. Collective
        under ZeRO-3."""
        export_merged_model(self.model, report, directory, max_shard_size=max_shard_size)
        if dist.is_main_process():
            self.tokenizer.save_pretrained(directory)

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
        tensors = collate_examples(self.tokenizer, rows, batch["weight"], self.max_length, self._system_prompts(rows),
                                   self.chat_template)  # fmt: skip
        return {k: v.to(self.device) for k, v in tensors.items()}

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], tasks: Sequence[int]) -> torch.Tensor:
        with self._prompt_of(batch):
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_loss(logits, batch["labels"])[0]

    def _prompt_of(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """The training sequence's prompt: its real tokens without a label (the response's have one)."""
        prompt = (batch["labels"] == IGNORE) & batch["attention_mask"].bool()
        return self.prompt.marked(prompt, batch["weight"])

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Every real token, prompt and response; a padding row of the reader (weight 0) counts nothing.
        return batch["attention_mask"] * batch["weight"].unsqueeze(1)

    def row_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.token_mask(batch).sum(1)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor], upto: int) -> None:
        """One no-grad forward (for the covariance hooks)."""
        with self._prompt_of(batch):
            engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def generate(self, engine: Any, rows: Sequence[dict[str, str]], max_new_tokens: int) -> list[str]:
        """Greedy answers to the rows' prompts (the text after the prompt, special tokens dropped)."""
        prompts = collate_prompts(self.tokenizer, rows, self.max_length, self._system_prompts(rows), self.chat_template)
        prompts = {k: v.to(self.device) for k, v in prompts.items()}
        out = engine.module.generate(**prompts, generation_config=self._greedy(max_new_tokens), synced_gpus=self.synced)
        return self.tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)

    def _greedy(self, max_new_tokens: int) -> GenerationConfig:
        """Greedy decoding of at most `max_new_tokens`, stopping at the tokenizer's end-of-sequence."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            decoder_start_token_id=getattr(self.model.config, "decoder_start_token_id", None),  # encoder-decoders
        )

    def score(self, engine: Any, raw: dict[str, Any], task: int, upto: int) -> torch.Tensor:
        """(summed score of the generated answers, rows), weighted, in float64.

        Reads the reader batch's records directly: generation needs the prompts only, not the
        training encoding `prepare` builds.
        """
        spec = self.seq.tasks[task].instruction
        scorer = SCORERS[spec.metric if spec else "exact_match"]
        rows = raw["json"]
        with self.prompt.marked(weights=raw["weight"].to(self.device)):
            answers = self.generate(engine, rows, self.new_tokens[task])
        scores = torch.tensor(
            [scorer(a, r["response"]) for a, r in zip(answers, rows, strict=True)], dtype=torch.float64
        )
        w = raw["weight"].double().cpu()
        return torch.stack([(scores * w).sum(), w.sum()])

    def finish(self, sums: torch.Tensor) -> list[float]:
        return [100.0 * float(sums[0] / sums[1])]


class Seq2SeqInstructionTuning(InstructionTuning):
    """An encoder-decoder LM (T5 family) taught instruction tasks: the prompt is the encoder's input, the
    answer the decoder's labels; scored by generation like the causal LM.

    Its layers read two kinds of tokens, so the covariance passes weight each input group by its own mask:
    encoder layers and the cross-attention's k and v (they read the encoder's output) by the prompt's
    padding mask, the decoder's other layers by the labels' (T5's module names: `encoder.` / `decoder.`,
    `EncDecAttention.k|v`).
    """

    peft_task_type: str | None = "SEQ_2_SEQ_LM"
    auto_class: type = AutoModelForSeq2SeqLM

    def __init__(self, cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device,
                 zero3_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(cfg, seq, device, zero3_config)
        model_type = self.model.config.model_type
        if model_type not in SEQ2SEQ_MODEL_TYPES:
            raise ValueError(
                f"model.kind seq2seq_lm supports the T5 family {SEQ2SEQ_MODEL_TYPES} (their module names tell which "
                f"layers read the encoder's output); this model is {model_type!r}"
            )
        self.max_target = cfg.model.max_new_tokens

    def prompt_reader(self) -> nn.Module:
        """The encoder: its input is the prompt."""
        return self.model.get_encoder()

    def _prompt_of(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        return self.prompt.marked(weights=batch["weight"])  # the encoder reads the prompt alone

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = collate_seq2seq(self.tokenizer, batch["json"], batch["weight"], self.max_length, self.max_target)
        return {k: v.to(self.device) for k, v in tensors.items()}

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE).sum()

    def _forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> Any:
        # The decoder reads the labels shifted right (pad for -100), built as the model builds them; passing the
        # labels themselves would make the model compute a loss of its own that label_loss computes again.
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        with self._prompt_of(batch):
            return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          decoder_input_ids=decoder_input_ids)  # fmt: skip

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], tasks: Sequence[int]) -> torch.Tensor:
        return label_loss(self._forward(engine, batch).logits, batch["labels"])[0]

    def token_mask(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # Decoder position i reads label i - 1 (or the start token): real exactly where label i is real.
        return {
            "encoder": batch["attention_mask"] * batch["weight"].unsqueeze(1),
            "decoder": (batch["labels"] != IGNORE).to(batch["weight"].dtype),
        }

    def row_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        masks = self.token_mask(batch).values()  # the encoder's and the decoder's tokens
        return sum(m.sum(1) for m in masks) * (batch["weight"] > 0)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor], upto: int) -> None:
        self._forward(engine, batch)

    @staticmethod
    def mask_sides(groups: dict[str, list[str]]) -> dict[str, str]:
        return {g: "encoder" if all(_reads_encoder(n) for n in names) else "decoder" for g, names in groups.items()}

    def generate(self, engine: Any, rows: Sequence[dict[str, str]], max_new_tokens: int) -> list[str]:
        """Greedy answers: the decoder's output for each prompt, special tokens dropped."""
        sources = {k: v.to(self.device) for k, v in collate_sources(self.tokenizer, rows, self.max_length).items()}
        out = engine.module.generate(**sources, generation_config=self._greedy(max_new_tokens), synced_gpus=self.synced)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


#: The encoder-decoder families whose module names `Seq2SeqInstructionTuning` reads.
SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "umt5")


def _reads_encoder(module: str) -> bool:
    """Whether a T5 module's input is encoder tokens: the encoder's layers and the cross-attention's k, v."""
    return module.startswith("encoder.") or module.endswith((".EncDecAttention.k", ".EncDecAttention.v"))


class ClassIncremental(Protocol):
    """The class-incremental side of a classification workload: statistics of every seen class (class_stats.py),
    filled from a pass over each stage's data, and the heads set from them (alignment, prototypes)."""

    statistics: ClassStatistics
    class_ids: list[int]
    offsets: list[int]  # task j's classes are the logit positions [offsets[j], offsets[j + 1])

    def class_sums(self, tasks: Sequence[int]) -> ClassSums:
        """Empty per-class sums for the classes of the stage's `tasks`."""

    def add_features(self, sums: ClassSums, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Add a batch's features (`Workload.forward`'s output) to `sums`."""

    def finish_class_sums(self, sums: ClassSums) -> None:
        """Reduce the sums over the ranks and append their classes to the statistics. Collective."""

    def load_statistics(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the statistics of a checkpoint."""

    def align_heads(self, task: int, recipe: CAConfig, seed: int) -> list[float]:
        """Classifier alignment of heads 0..task from the statistics; the epochs' losses. Collective."""

    def prototype_heads(self, upto: int) -> None:
        """Heads 0..upto become the prototype classifier (the unit class means). Collective."""


class Workload(Protocol):
    """What the task loop trains and scores (see the module docstring)."""

    model: nn.Module
    matrices: tuple[str, ...]
    peft_task_type: str | None
    zero_shot: bool
    prompt: PromptTap | None  # which tokens of a forward are the prompt (None: the model reads no prompt)

    @property
    def classes(self) -> ClassIncremental | None:
        """The class-incremental side, or None (instruction tuning)."""

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Trainable parameters of task `task` besides its branches (classifier heads)."""

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A reader batch -> tensors on the device."""

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What a step's loss is averaged over: real rows (images) or response tokens (text)."""

    def loss(self, engine: Any, batch: dict[str, torch.Tensor], tasks: Sequence[int]) -> torch.Tensor:
        """The summed loss of a micro-batch of the stage's `tasks`."""

    def token_mask(self, batch: dict[str, torch.Tensor]) -> Any:
        """The covariance passes' token weights (a tensor, or one per side: `mask_sides`)."""

    def row_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tokens each row gives a covariance pass (0 for padding rows)."""

    def forward(self, engine: Any, batch: dict[str, torch.Tensor], upto: int) -> torch.Tensor | None:
        """One no-grad forward for the data passes; the class statistics' features (classification) or None."""

    def mask_sides(self, groups: dict[str, list[str]]) -> dict[str, str] | None:
        """Which of `token_mask`'s masks each input group follows (None: one mask for every group)."""

    def score(self, engine: Any, raw: dict[str, Any], task: int, upto: int) -> torch.Tensor:
        """Summed evaluation scores of task `task`'s reader batch, then the rows (float64)."""

    def finish(self, sums: torch.Tensor) -> list[float]:
        """The scores (%) from the all-reduced sums, one per matrix."""

    def export_model(self, report: InjectionReport, directory: Path, max_shard_size: str) -> None:
        """The merged model (and what serving it needs) in `directory`. Collective under ZeRO-3."""


def score_task(workload: Workload, engine: Any, loader: Iterable[dict[str, Any]], task: int, upto: int,
               bar: Any = None) -> list[float]:  # fmt: skip
    """One score (%) per matrix of `workload` on the batches of `loader` (this rank's share of an eval split),
    scored as task `task` of the run with tasks 0..`upto` learned. Collective (one all-reduce)."""
    sums = torch.zeros(len(workload.matrices) + 1, dtype=torch.float64)
    with torch.no_grad():
        for raw in loader:
            sums += workload.score(engine, raw, task, upto).cpu()
            if bar is not None:
                bar.update(1)
    return workload.finish(dist.all_reduce_sum_(sums.to(dist.collective_device())))  # collective


def _available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory this rank may fill: free device memory, or the host's available memory shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), 0)
    return kib * 1024 // max(local, 1), f"available host memory / {local} local rank(s)"


def check_weights_fit(cfg: RunConfig, kind: type[ImageClassification | InstructionTuning], device: torch.device
                      ) -> None:  # fmt: skip
    """Refuse, before anything is built, a model whose weights alone exceed what each rank has: all of them at
    ZeRO 0-2, a 1/world share under ZeRO-3. Collective (one all-reduce): every rank raises, or none."""
    world, stage = dist.get_world_size(), cfg.deepspeed.zero_stage
    params = count_model_parameters(cfg.model, kind.auto_class)
    weights = params * DTYPES[cfg.model.dtype].itemsize
    need = weights // (world if stage == 3 else 1)
    have, where = _available_bytes(device)
    problem = ""
    if have and need > have:
        source = f"model.pretrained={cfg.model.pretrained}" if cfg.model.pretrained else (
            f"model.config.model_type={cfg.model.config.get('model_type')}")  # fmt: skip
        ranks = math.ceil(weights / have)  # the fewest ranks whose ZeRO-3 shares would fit, memory alike
        where_to = "" if stage == 3 else "deepspeed.zero_stage=3 over "
        problem = (
            f"{source}: {params / 1e9:.2f}B parameters in {cfg.model.dtype} need {need / 1e9:.2f} GB per rank at "
            f"deepspeed.zero_stage={stage} with {world} rank(s), but this rank has {have / 1e9:.2f} GB ({where}): "
            f"use {where_to}at least {ranks} ranks ({weights / ranks / 1e9:.2f} GB each)"
        )
    if dist.any_rank(bool(problem)):  # collective
        raise MemoryError(problem or "the model's weights do not fit on another rank (see its message)")


def build_workload(cfg: RunConfig, seq: TaskSequenceConfig, device: torch.device) -> Workload:
    """The workload of `cfg.model.kind`; the model is built with the same seed on every rank, partitioned under
    ZeRO-3 (no rank ever holds all of its weights), with activation checkpointing if asked. Collective."""
    kinds = {"causal_lm": InstructionTuning, "seq2seq_lm": Seq2SeqInstructionTuning}
    kind = kinds.get(cfg.model.kind, ImageClassification)
    check_weights_fit(cfg, kind, device)  # collective
    zero3 = construction_config(cfg, dist.get_world_size()) if cfg.deepspeed.zero_stage == 3 else None
    torch.manual_seed(cfg.seed)
    workload = kind(cfg, seq, device, zero3)
    partitioned = [p for p in workload.model.parameters() if hasattr(p, "ds_tensor")]
    if partitioned and dist.is_main_process():
        logger.info(
            "model built partitioned (ZeRO-3): this rank holds %d of the %d elements of %d parameters",
            sum(p.ds_tensor.numel() for p in partitioned), sum(p.ds_numel for p in partitioned), len(partitioned),
        )  # fmt: skip
    if cfg.train.gradient_checkpointing:
        reentrant = cfg.deepspeed.zero_stage == 3
        enable_activation_checkpointing(workload.model, reentrant=reentrant)
        if dist.is_main_process():
            logger.info("activation checkpointing on (%s)", "reentrant" if reentrant else "non-reentrant")
    return workload
