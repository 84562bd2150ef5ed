"""Typed configs: OmegaConf structured dataclasses merged with YAML and dotlist overrides.

Errors name the offending key: an unknown key lists the valid ones, a value of
the wrong type says which field rejected it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

T = TypeVar("T")


def read_yaml(url: str, storage_options: Mapping[str, Any] | None = None) -> DictConfig:
    """A YAML mapping from any fsspec URL; FileNotFoundError names the path, ValueError names the file (and the
    line) when it is not YAML or not a mapping of keys."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"config file {url} does not exist")
    with fs.open(path, "r") as f:
        text = f.read()
    try:
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as err:
        where = f" at line {err.problem_mark.line + 1}" if getattr(err, "problem_mark", None) else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{url}: not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{url}: expected a mapping of keys (key: value), got a {type(loaded).__name__}")
    return loaded


def merge_structured(schema: type[T], *sources: Mapping | DictConfig, overrides: Sequence[str] = ()) -> T:
    """Merge `sources` (then dotlist `overrides`) onto the dataclass `schema` and return an instance."""
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(schema),
            *[OmegaConf.create(dict(s)) if not isinstance(s, DictConfig) else s for s in sources],
        )
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep:
                raise ValueError(f"override {override!r} is not KEY=VALUE")
            # update() walks list indices too (tasks.0.train.samples=7); the value is parsed as YAML.
            OmegaConf.update(merged, key, yaml.safe_load(value), merge=True)
    except (ConfigKeyError, ConfigAttributeError) as err:
        owner = err.object_type
        valid = sorted(f.name for f in fields(owner)) if is_dataclass(owner) else []
        raise ValueError(
            f"unknown key {err.key!r} in {getattr(owner, '__name__', schema.__name__)} (at {err.full_key!r}); "
            f"valid keys: {valid}"
        ) from None
    except ValidationError as err:
        raise ValueError(f"bad value for {err.full_key!r}: {err.msg.splitlines()[0]}") from None
    result: Any = OmegaConf.to_object(merged)
    return result


# ----------------------------------------------------------------------------- run config
#: The model kinds tuned on instruction tasks (scored by generation), as opposed to `vit` (classification).
LANGUAGE_MODEL_KINDS = ("causal_lm", "seq2seq_lm")


@dataclass
class ModelConfig:
    """The model: a local transformers checkpoint (`pretrained`) or one built from `config` (tiny tests).

    kind `vit`: a vision backbone with one classifier head per task. Images
    arrive as uint8 (H, W[, C]); they are scaled to [0, 1], given `channels`
    channels (grey is repeated), resized to `image_size` and normalised with `mean`/`std`.

    kind `causal_lm`: a causal language model tuned on instruction tasks; its
    tokenizer comes from `tokenizer` (default: `pretrained`), examples are cut to
    `max_length` tokens, and evaluation generates up to `max_new_tokens` greedily.
    kind `seq2seq_lm`: an encoder-decoder model (T5 family) on the same tasks: the
    prompt is the encoder's input (cut to `max_length` tokens), the answer the
    decoder's labels (cut to `max_new_tokens`, as generation is).
    `chat_template` (causal_lm): `auto` wraps each prompt in the tokenizer's chat
    template when it ships one, `none` always gives the plain "<prompt>\\n" the
    benchmarks' raw prompts use (a base model's tokenizer may ship a template too:
    Qwen2.5). A seq2seq_lm's encoder always reads the plain prompt.
    """

    kind: str = "vit"
    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    tokenizer: str | None = None
    max_length: int = 256
    max_new_tokens: int = 32
    image_size: int = 224
    channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    head_cosine_scale: float = 0.0  # > 0: cosine-classifier heads with this scale; 0: linear heads (the reference)
    chat_template: str = "auto"  # auto: the tokenizer's chat template when it has one; none: plain prompts


@dataclass
class InfLoRAConfig:
    """The method: which layers get branches, their rank, and the DualGPM thresholds."""

    targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj"])
    layers_to_transform: list[int] | None = None  # block numbers to adapt (None: all)
    rank: int = 10
    lambda_begin: float = 0.95
    lambda_end: float = 1.0
    planned_tasks: int | None = None  # DualGPM's threshold horizon T (None: the sequence's length)
    fold: str = "merge"
    reduce: str = "all_reduce"
    accumulation_dtype: str = "auto"  # running x x^T sums (auto: float64)
    covariance_gemm_dtype: str = "auto"  # each batch's x^T x (auto: float64 on CPU, float32 on accelerators)
    reduce_bucket_bytes: int = 256 * 2**20  # cap of one flat covariance-reduction bucket
    covariance_max_bytes_per_rank: int | None = None  # split covariance passes to fit (None: one pass)
    # Tokens each covariance pass reads: the first samples of the task's data (shards interleaved) that fit;
    # None: every token (the reference's behaviour). The same samples at any world size.
    covariance_max_tokens: int | None = None


@dataclass
class OLoRAConfig:
    """O-LoRA's loss weights and branch scale (method=olora; the defaults are its scripts'): lambda_1 weighs the
    orthogonality of the new A to the old ones, lambda_2 the L2 norm of the new branch; the branches are
    scaled by lora_alpha / inflora.rank (its ranks and targets are inflora.rank and inflora.targets)."""

    lambda_1: float = 0.5
    lambda_2: float = 0.0
    lora_alpha: float = 32.0


@dataclass
class GainLoRAConfig:
    """GainLoRA's gates (method=gainlora; the defaults are its LLaMA scripts'): the branches (InfLoRA's designed A,
    or O-LoRA's trained A and its loss terms), scaled by lora_alpha / inflora.rank; one gate network per task of
    `gate_architecture` (llama: Linear-Linear-SiLU, t5: Linear-SiLU-Linear-SiLU; auto: t5 for seq2seq_lm, else
    llama) with `gate_hidden` units; the old tasks' gate subspaces grown to the energy threshold
    lambda_begin + (lambda_end - lambda_begin) t / planned_tasks (the scripts' 0.995 and 1.0 over 15 tasks)."""

    branches: str = "inflora"
    lora_alpha: float = 32.0
    gate_architecture: str = "auto"
    gate_hidden: int = 50
    lambda_begin: float = 0.995
    lambda_end: float = 1.0
    planned_tasks: int = 15


@dataclass
class TrainConfig:
    """Optimisation of each task (Adam and a per-task cosine schedule, as in the reference)."""

    global_batch_size: int = 32
    max_micro_batch_size: int | None = None
    epochs: int = 1
    optimizer: str = "adam"
    lr: float = 5e-4
    lr_schedule: str = "cosine"  # per task: the reference's cosine decay, or constant (O-LoRA's, GainLoRA's)
    head_lr: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float = 0.0
    precision: str = "fp32"
    eval_batch_size: int = 64
    # LLM runs score every task once before task 0 (metrics.json `zero_shot`); vision heads are untrained then.
    zero_shot_eval: bool = True
    num_workers: int = 0
    log_every: int = 10
    # Recompute each block's activations in the backward pass (transformers' checkpointing; reentrant under
    # ZeRO-3: models.enable_activation_checkpointing): less activation memory, one more forward per step.
    gradient_checkpointing: bool = False


@dataclass
class CAConfig:
    """Classifier alignment after every task t >= 1 and the class statistics it samples from.

    The defaults are the reference's (`methods/inflora_ca.py`): 256 features per
    class and epoch, 5 epochs of SGD (lr 0.01, momentum 0.9, weight decay 5e-4,
    cosine), logit normalisation at temperature 0.1 (null: off, as the reference
    on CIFAR-100), class means scaled by 1 - d + d (t_c + 1) / (t + 1) with d =
    `mean_decay`, and per-class covariances + `covariance_reg` I. `covariance`:
    full (classes x d^2 floats), diagonal, or shared (one pooled covariance), for
    many classes. With `enabled` false only class means are kept (prototype scores).
    """

    enabled: bool = False
    samples_per_class: int = 256
    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    logit_norm: float | None = 0.1
    mean_decay: float = 0.1
    covariance: str = "full"
    covariance_reg: float = 1e-4


@dataclass
class DeepSpeedSettings:
    """ZeRO stage (0, 1, 2 or 3) and CPU offload select one of the JSON templates in `config_dir`."""

    zero_stage: int = 0
    offload: bool = False
    config_dir: str = "configs/deepspeed"
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the template, e.g. zero_optimization
    collective_timeout_s: float = 600.0  # a collective waiting longer for a rank fails (DeepSpeed's default)


@dataclass
class DataConfig:
    """The task sequence (a tasks.yaml written by build_shards) and, optionally, how to build it first."""

    tasks: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] | None = None
    #: Image recipes run in the loader workers (data/transforms.py TRANSFORMS: e.g. imagenet_r_train, resize):
    #: `train_transform` on the training split (training and the covariance passes, as the reference), and
    #: `eval_transform` on evaluation (and the class statistics). None: the shard's pixels as stored, which the
    #: model resizes to model.image_size (the demo's path).
    train_transform: str | None = None
    eval_transform: str | None = None


@dataclass
class CheckpointConfig:
    """Checkpoints go to `<output_dir>/checkpoints` after every task and every `every_steps` steps (0: never).

    The run holds `<output_dir>/.run.lock` (runlock.py); a lock whose heartbeat is
    older than `lock_stale_after_s` is taken over (its holder's node is gone).
    """

    every_steps: int = 0
    keep: int = 2
    lock_stale_after_s: float = 300.0


@dataclass
class WandbConfig:
    """Weights & Biases logging from rank 0; mode offline needs no network."""

    enabled: bool = False
    project: str = "inflora-dist"
    entity: str | None = None
    name: str | None = None
    mode: str = "offline"


@dataclass
class ExportConfig:
    """What a finished run writes besides the continual state, class statistics and PEFT adapter."""

    merged_model: bool = False  # <output_dir>/model: plain transformers weights, adapters merged (+ heads, vision)
    max_shard_size: str = "2GB"  # safetensors shard size of the merged model


@dataclass
class RunConfig:
    """Everything one continual-learning run needs; keys follow the module that reads them."""

    output_dir: str = "runs/default"
    seed: int = 0
    method: str = "inflora"
    resume: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    inflora: InfLoRAConfig = field(default_factory=InfLoRAConfig)
    olora: OLoRAConfig = field(default_factory=OLoRAConfig)
    gainlora: GainLoRAConfig = field(default_factory=GainLoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ca: CAConfig = field(default_factory=CAConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


#: The continual-learning methods (methods.METHODS holds their classes).
METHOD_NAMES = ("inflora", "seq_lora", "joint", "simple_cil", "olora", "gainlora")

_CHOICES = {
    "method": METHOD_NAMES,
    "model.kind": ("vit", *LANGUAGE_MODEL_KINDS),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.chat_template": ("auto", "none"),
    "inflora.fold": ("merge", "stack"),
    "gainlora.branches": ("inflora", "olora"),
    "gainlora.gate_architecture": ("auto", "llama", "t5"),
    "inflora.reduce": ("all_reduce", "owner"),
    "inflora.accumulation_dtype": ("auto", "float32", "float64"),
    "inflora.covariance_gemm_dtype": ("auto", "float32", "float64"),
    "train.optimizer": ("adam", "sgd"),
    "train.lr_schedule": ("cosine", "constant"),
    "ca.covariance": ("full", "diagonal", "shared"),
    "train.precision": ("fp32", "bf16"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "wandb.mode": ("online", "offline", "disabled"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    """Check values before any heavy work; errors name the key and the allowed range."""
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {list(allowed)}, got {_get(cfg, key)!r}")
    positive = (
        "inflora.rank", "train.global_batch_size", "train.epochs", "train.eval_batch_size", "model.image_size",
        "model.max_length", "model.max_new_tokens", "ca.samples_per_class", "ca.epochs", "inflora.reduce_bucket_bytes",
        "gainlora.gate_hidden", "gainlora.planned_tasks",
    )  # fmt: skip
    for key in positive:
        if not isinstance(_get(cfg, key), int) or _get(cfg, key) < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {_get(cfg, key)!r}")
    for key in ("inflora.lambda_begin", "inflora.lambda_end", "gainlora.lambda_begin", "gainlora.lambda_end"):
        if not 0.0 < _get(cfg, key) <= 1.0:
            raise ValueError(f"{key} must be in (0, 1], got {_get(cfg, key)!r}")
    for key in ("olora.lambda_1", "olora.lambda_2", "train.lr", "train.weight_decay", "train.grad_clip",
                "train.momentum", "ca.lr", "ca.momentum",
                "ca.weight_decay", "ca.covariance_reg"):  # fmt: skip
        if _get(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {_get(cfg, key)!r}")
    for key in ("olora.lora_alpha", "gainlora.lora_alpha"):
        if _get(cfg, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {_get(cfg, key)!r}")
    if cfg.method == "gainlora":
        _check_gainlora(cfg)
    if cfg.ca.logit_norm is not None and cfg.ca.logit_norm <= 0:
        raise ValueError(f"ca.logit_norm (a temperature) must be > 0 or null, got {cfg.ca.logit_norm!r}")
    if not 0.0 <= cfg.ca.mean_decay < 1.0:
        raise ValueError(f"ca.mean_decay must be in [0, 1), got {cfg.ca.mean_decay!r}")
    if cfg.model.kind in LANGUAGE_MODEL_KINDS and (cfg.ca.enabled or cfg.method == "simple_cil"):
        what = "ca.enabled" if cfg.ca.enabled else "method=simple_cil"
        raise ValueError(
            f"{what}: classifier alignment and prototypes need a classification model (model.kind vit); "
            f"this run tunes a language model ({cfg.model.kind}) on instruction tasks"
        )
    if cfg.train.max_micro_batch_size is not None and cfg.train.max_micro_batch_size < 1:
        raise ValueError(f"train.max_micro_batch_size must be >= 1 or null, got {cfg.train.max_micro_batch_size!r}")
    planned = cfg.inflora.planned_tasks
    if planned is not None and (not isinstance(planned, int) or planned < 1):
        raise ValueError(f"inflora.planned_tasks must be an integer >= 1 or null, got {planned!r}")
    budget = cfg.inflora.covariance_max_bytes_per_rank
    if budget is not None and budget < 1:
        raise ValueError(f"inflora.covariance_max_bytes_per_rank must be >= 1 or null, got {budget!r}")
    max_tokens = cfg.inflora.covariance_max_tokens
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"inflora.covariance_max_tokens must be an integer >= 1 or null, got {max_tokens!r}")
    if cfg.deepspeed.collective_timeout_s <= 0:
        raise ValueError(f"deepspeed.collective_timeout_s must be > 0, got {cfg.deepspeed.collective_timeout_s!r}")
    if cfg.checkpoint.lock_stale_after_s <= 0:
        raise ValueError(f"checkpoint.lock_stale_after_s must be > 0, got {cfg.checkpoint.lock_stale_after_s!r}")
    if cfg.checkpoint.keep < 1 or cfg.checkpoint.every_steps < 0:
        raise ValueError(f"checkpoint.keep must be >= 1 and checkpoint.every_steps >= 0, got {cfg.checkpoint}")
    if cfg.train.num_workers < 0:
        raise ValueError(f"train.num_workers must be >= 0, got {cfg.train.num_workers}")
    if len(cfg.model.mean) != cfg.model.channels or len(cfg.model.std) != cfg.model.channels:
        raise ValueError(f"model.mean and model.std need {cfg.model.channels} values (model.channels)")
    if cfg.model.pretrained is None and not cfg.model.config:
        raise ValueError("model.pretrained (a local checkpoint dir) or model.config (a transformers config) is needed")
    if cfg.model.pretrained is not None and not Path(cfg.model.pretrained).is_dir():
        raise FileNotFoundError(f"model.pretrained: {cfg.model.pretrained} is not a directory")
    from inflora_dist.data.transforms import TRANSFORMS  # the data package imports this module

    for key in ("data.train_transform", "data.eval_transform"):
        name = _get(cfg, key)
        if name is not None and cfg.model.kind in LANGUAGE_MODEL_KINDS:
            raise ValueError(f"{key}={name!r} transforms images; model.kind {cfg.model.kind} reads text: unset it")
        if name is not None and name not in TRANSFORMS:
            raise ValueError(f"{key}: unknown transform {name!r}; valid: {', '.join(sorted(TRANSFORMS))}")
    if cfg.model.kind in LANGUAGE_MODEL_KINDS and not (cfg.model.tokenizer or cfg.model.pretrained):
        raise ValueError(
            f"model.kind {cfg.model.kind} needs model.tokenizer (a local tokenizer dir) or model.pretrained"
        )
    if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).is_dir():
        raise FileNotFoundError(f"model.tokenizer: {cfg.model.tokenizer} is not a directory")
    if not cfg.data.tasks:
        raise ValueError("data.tasks (the task-sequence YAML) is required")
    if cfg.data.build is None and "://" not in cfg.data.tasks and not Path(cfg.data.tasks).exists():
        raise FileNotFoundError(f"data.tasks: {cfg.data.tasks} does not exist (and data.build is not set)")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume: {cfg.resume} is neither auto, never, nor a checkpoint directory")


def _check_gainlora(cfg: RunConfig) -> None:
    """What GainLoRA's gates cannot do, refused before any work."""
    if cfg.model.kind not in LANGUAGE_MODEL_KINDS:
        raise ValueError(
            f"method=gainlora gates each task's branch by the prompt's token embeddings: it needs a language model "
            f"(model.kind {' or '.join(LANGUAGE_MODEL_KINDS)}), this run is model.kind={cfg.model.kind}"
        )
    if cfg.export.merged_model:
        raise ValueError(
            "export.merged_model=true with method=gainlora: a merged model (like a PEFT adapter) cannot carry the "
            "input-dependent gates; a GainLoRA run exports its gated model (<output_dir>/gated_model): unset it"
        )
    if cfg.train.gradient_checkpointing and cfg.deepspeed.zero_stage == 3:
        raise ValueError(
            "method=gainlora with train.gradient_checkpointing under deepspeed.zero_stage=3: the reentrant "
            "checkpointing ZeRO-3 needs runs the blocks without a graph, and the gates' gradients pass through "
            "them; use zero_stage 0-2 or turn checkpointing off"
        )


def load_run_config(paths: str | Sequence[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config from YAML files merged in order (or defaults), then dotlist overrides, validated.

    Several files compose a run: e.g. a model file, a task-sequence file and a run file.
    """
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    sources = [read_yaml(p) for p in paths]
    cfg = merge_structured(RunConfig, *sources, overrides=overrides)
    validate_run_config(cfg)
    return cfg


#: What a resume must keep: these change the shapes or the meaning of a run's saved state (a prefix covers
#: its whole section), or which run it is: `seed` (shard order, augmentation and alignment draws: a run of
#: seeds 0-4 is five runs, and seed=1 into seed 0's output_dir must not continue seed 0's run) and the image
#: recipes (`data.train_transform`; `data.eval_transform` also made the saved class statistics).
#: Everything else may change on resume (lr, epochs, batch and optimizer settings of later tasks, logging,
#: W&B, checkpoint cadence, evaluation batch, DeepSpeed settings, the covariance passes' numerics, memory
#: and `inflora.covariance_max_tokens`, and the world size at a task boundary). The data's own identity is
#: checked apart (the task records' shard checksums, checkpoint.check_resumable).
#: (A method checks its own: Method.resume_problems, e.g. inflora.planned_tasks against the run's horizon.)
RESUME_FIXED_KEYS = ("method", "seed", "model.", "gainlora.", "inflora.targets", "inflora.layers_to_transform",
                     "inflora.rank", "inflora.fold", "inflora.lambda_begin", "inflora.lambda_end", "ca.",
                     "data.train_transform", "data.eval_transform")  # fmt: skip
#: model keys that only change how evaluation generates, not the state.
_RESUME_FREE_MODEL_KEYS = ("model.max_new_tokens",)


def flatten(tree: Any, lists: bool = False) -> dict[str, Any]:
    """{'a.b': value} for every leaf of nested mappings; lists are leaves, or with `lists` are walked too
    ('a[0].b'). A `tree` that is itself a leaf is the one key '(value)'."""
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif lists and isinstance(value, list) and value:
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            out[key or "(value)"] = value

    walk(tree, "")
    return out


def with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict as written by an earlier version, flattened, each key it lacks (added since) at its default:
    a key a new version adds is no change to a run that never set it."""
    old = flatten(saved)
    # A default leaf inside, or holding, a subtree the saved config has (model.config) is not missing.
    within = {k for key in old for k in _prefixes(key)}
    missing = {k: v for k, v in flatten(to_dict(RunConfig())).items() if k not in within and not _under(k, old)}
    return {**missing, **old}


def _prefixes(key: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']."""
    parts = key.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _under(key: str, flat: Mapping[str, Any]) -> bool:
    """Whether a leaf of `flat` sits at a prefix of `key` (a saved leaf where the defaults have a subtree)."""
    return any(p in flat for p in _prefixes(key)[:-1])


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: saved -> current' for every RESUME_FIXED_KEYS key on which two config dicts differ (sorted); a key
    `saved` lacks counts at its default (`with_defaults`)."""
    old, new = with_defaults(saved), flatten(current)

    def fixed(key: str) -> bool:
        return key not in _RESUME_FREE_MODEL_KEYS and any(
            key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FIXED_KEYS
        )

    keys = sorted(k for k in set(old) | set(new) if fixed(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain nested dicts and lists (JSON-ready)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The YAML text of a config dataclass (what a run writes next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
