"""Models: a transformers vision backbone with one classifier head per task, a causal LM or an encoder-decoder LM.

Models are loaded with `from_pretrained` from a local directory, or built from
a transformers config (`model_type` plus its fields, random weights) for tiny
test models and shape-only benchmarks. Nothing is downloaded.

Under ZeRO-3 a model is built partitioned (`partitioned_construction`):
transformers' DeepSpeed integration creates every parameter inside
`deepspeed.zero.Init`, so each rank only ever holds its shard; pre-trained
weights are read by rank 0 and scattered module by module, random weights
initialised by rank 0 module by module. Random weights are initialised in that
same order at every ZeRO stage (`_random_init`), so a model built from a config
has the same weights whichever stage builds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from inflora_dist.config import ModelConfig
from inflora_dist.host_linear import LOW_PRECISION, use_float32_products_on_host

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the model: the checkpoint's, or built from `cfg.config`."""
    if cfg.pretrained:
        return AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True)
    fields = dict(cfg.config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.config needs a model_type (e.g. vit, dinov2, llama)")
    return AutoConfig.for_model(model_type, **fields)


def meta_model(cfg: ModelConfig, auto_class: type = AutoModel) -> nn.Module:
    """The model's modules on the meta device: shapes only, no weight allocated or read."""
    with torch.device("meta"):
        return auto_class.from_config(model_config(cfg))


def count_model_parameters(cfg: ModelConfig, auto_class: type = AutoModel) -> int:
    """Parameters of the model, counted on the meta device."""
    return sum(p.numel() for p in meta_model(cfg, auto_class).parameters())


@contextlib.contextmanager
def partitioned_construction(zero3_config: dict[str, Any] | None) -> Iterator[None]:
    """Inside the block transformers builds models partitioned over the ranks (ZeRO-3), when `zero3_config`
    is a DeepSpeed config; otherwise it changes nothing.

    transformers' integration sees the config through a weak reference to an
    HfDeepSpeedConfig: alive for the block only, so later transformers calls
    (generation, saving) do not act on it.
    """
    if zero3_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    handle = HfDeepSpeedConfig(zero3_config)
    try:
        yield
    finally:
        del handle
        unset_hf_deepspeed_config()


def _random_init(auto_class: type, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """A model with random weights, initialised as transformers' ZeRO-3 path does (its `_init_weights`, module by
    module, children first, after a construction without torch's default inits), so that every ZeRO stage draws
    the same weights from the same seed."""
    from transformers.initialization import no_init_weights  # loads modeling_utils: ~1 s, only when building

    with no_init_weights():
        model = auto_class.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.initialize_weights()
    model.tie_weights()
    return model


def load_backbone(cfg: ModelConfig, auto_class: type = AutoModel, zero3_config: dict[str, Any] | None = None
                  ) -> nn.Module:  # fmt: skip
    """The transformers model (`auto_class`): from a local checkpoint directory, or built from `cfg.config`.

    With `zero3_config` (a ZeRO-3 DeepSpeed config) it is built partitioned; a model family whose
    construction leaves parameters outside DeepSpeed's partitioning is refused, naming the model. In bf16 or
    fp16 its linear layers compute with float32 products on the host (`host_linear`).
    """
    dtype = DTYPES[cfg.dtype]
    with partitioned_construction(zero3_config):
        if cfg.pretrained:
            model = auto_class.from_pretrained(cfg.pretrained, dtype=dtype, local_files_only=True)
        elif zero3_config is not None:
            model = auto_class.from_config(model_config(cfg), dtype=dtype)  # rank 0 initialises, module by module
        else:
            model = _random_init(auto_class, model_config(cfg), dtype)
    if zero3_config is not None:
        whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
        if whole:
            source = cfg.pretrained or f"model_type {cfg.config.get('model_type')!r}"
            raise ValueError(
                f"deepspeed.zero_stage=3: {type(model).__name__} ({source}) built {len(whole)} parameters outside "
                f"DeepSpeed's partitioned construction (e.g. {whole[0]!r}); this model family cannot be built "
                "partitioned: use deepspeed.zero_stage 0-2"
            )
    if dtype in LOW_PRECISION:
        use_float32_products_on_host(model)
    return model


def image_tokens(config: Any, image_size: int) -> int:
    """Tokens a ViT-family backbone reads per `image_size` image: its patches, [CLS] and any register tokens."""
    patch = getattr(config, "patch_size", None)
    if not isinstance(patch, int):
        raise ValueError(f"a {type(config).__name__} has no integer patch_size: its tokens per image are unknown")
    return (image_size // patch) ** 2 + 1 + getattr(config, "num_register_tokens", 0)


def load_causal_lm(cfg: ModelConfig, zero3_config: dict[str, Any] | None = None) -> nn.Module:
    """A transformers causal LM (`AutoModelForCausalLM`), pre-trained or built from `cfg.config`."""
    return load_backbone(cfg, AutoModelForCausalLM, zero3_config)


def load_seq2seq_lm(cfg: ModelConfig, zero3_config: dict[str, Any] | None = None) -> nn.Module:
    """A transformers encoder-decoder LM (`AutoModelForSeq2SeqLM`, e.g. T5), pre-trained or built from `cfg.config`."""
    return load_backbone(cfg, AutoModelForSeq2SeqLM, zero3_config)


def enable_activation_checkpointing(model: nn.Module, reentrant: bool = False) -> None:
    """Recompute each transformer block's activations in the backward pass, in the transformers model in `model`
    (a vision classifier's backbone); a model that does not support it is refused, naming it.

    Non-reentrant checkpointing by default (no input needs requires_grad, so frozen embeddings are fine).
    Under ZeRO-3 pass `reentrant`: the non-reentrant recomputation runs inside the backward's unpacking of
    saved tensors, where DeepSpeed does not gather the block's partitioned weights again (torch then refuses
    the recomputed empty placeholders: "Recomputed values ... have different metadata"); the reentrant one
    reruns the block's forward, hooks and all. It needs the blocks' inputs to require grad, so the input
    embeddings' output is made to (transformers' enable_input_require_grads).
    """
    from transformers import PreTrainedModel

    target = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if target is None or not target.supports_gradient_checkpointing:
        name = type(target or model).__name__
        raise ValueError(f"train.gradient_checkpointing=true: {name} does not support activation checkpointing")
    options = {"use_reentrant": reentrant}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.25; the older name warns there
        target.activation_checkpointing_enable(options)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if reentrant:
        target.enable_input_require_grads()


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `cfg.tokenizer` (default: the pretrained dir), with a pad token (eos when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.pretrained, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TaskHead(nn.Linear):
    """One task's classifier; casts its input to its own dtype (a bf16 backbone may feed an fp32 head).

    `cosine_scale` > 0 makes it a cosine classifier, s * cos(x, w_c) without bias:
    heads trained one task at a time then give logits on one scale, so the
    argmax over all heads (class-incremental prediction) is not decided by
    which head happens to have the largest weights. 0 gives the reference's
    plain linear head. The cast happens inside the head's forward: under ZeRO-3
    a parameter read outside its module's forward breaks DeepSpeed's prefetch trace.
    """

    def __init__(self, in_features: int, out_features: int, cosine_scale: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias=cosine_scale == 0.0)
        self.cosine_scale = cosine_scale

    @classmethod
    def copy_of(cls, head: TaskHead) -> TaskHead:
        """A float32 host copy of `head` (e.g. to retrain it outside the engine); draws no random numbers."""
        with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the global RNG as it was
            copy = cls(head.in_features, head.out_features, head.cosine_scale)
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in head.state_dict().items()})
        return copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.cosine_scale:
            return (self.cosine_scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))).float()
        return super().forward(x).float()


class ContinualClassifier(nn.Module):
    """A vision backbone plus one linear head per task (the reference's classifier pool).

    `forward(images, upto)` returns the concatenated logits of heads 0..upto:
    class-incremental prediction is the argmax over all heads seen so far.
    """

    def __init__(self, backbone: nn.Module, classes_per_task: Sequence[int], cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden = hidden = backbone.config.hidden_size
        self.heads = nn.ModuleList(TaskHead(hidden, n, cfg.head_cosine_scale) for n in classes_per_task)
        self.image_size, self.channels = cfg.image_size, cfg.channels
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, H, W, C) -> normalised float (B, channels, image_size, image_size)."""
        x = images.float() / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x[:, : self.channels]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        return x.to(next(self.backbone.parameters()).dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The [CLS] token of the last (normalised) hidden state, (B, hidden), in the model's dtype."""
        return self.backbone(pixel_values=self.preprocess(images)).last_hidden_state[:, 0]

    def forward(
        self, images: torch.Tensor, upto: int, with_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits of heads 0..upto, concatenated (B, classes so far); with the features if asked."""
        feats = self.features(images)
        logits = torch.cat([head(feats) for head in self.heads[: upto + 1]], dim=1)
        return (logits, feats) if with_features else logits
