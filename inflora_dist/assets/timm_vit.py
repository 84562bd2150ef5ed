"""`timm-vit`: a timm VisionTransformer checkpoint -> transformers ViTModel (the paper's ViT-B/16 backbone).

    python -m inflora_dist.assets timm-vit \
        --checkpoint B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
        --out /models/vit-base-patch16-224-in21k [--num-heads N] [--force]

The paper's backbone is timm's `vit_base_patch16_224_in21k` (now `vit_base_patch16_224.augreg_in21k`: the AugReg
ImageNet-21k weights, file `B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz`). Nothing is downloaded
and timm is not imported: the weights are read from a local file in one of three layouts,

- `.npz`: the AugReg / big_vision JAX layout that timm's `vision_transformer._load_weights` reads
  (`embedding/kernel`, `cls`, `Transformer/posembed_input/pos_embedding` or `pos_embedding`,
  `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value,out}/{kernel,bias}`, ...,
  `Transformer/encoder_norm/{scale,bias}`; optional `opt/target/`, `params/`, `params/img/` prefixes; the
  big_vision sub-module numbering and its stacked `Transformer/encoderblock/` form); q, k, v are separate there,
  with a per-head layout (hidden, heads, head_dim) that gives the number of heads;
- `.safetensors` and `.pth`/`.pt`/`.bin`: a timm `VisionTransformer` state dict (`cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`), with the fused
  `attn.qkv` (rows q, k, v); a `.pth` may wrap it in `model` or `state_dict` and prefix it with `module.`. A state
  dict does not say how many heads it has: `--num-heads`, else hidden / 64 (right for ViT-Ti/S/B/L, not ViT-H).

The fused qkv is split into the query, key and value projections (`q_proj`, `k_proj`, `v_proj` in transformers
>= 5, saved under the `attention.attention.{query,key,value}` names), and the rest mapped one to one: patch
embedding, class token, position embeddings, the pre-norms of attention and MLP, the MLP, the final norm
(`layernorm`). The config comes from the weights: hidden size, layers, MLP size, heads, patch size (the conv
kernel), image size (position grid x patch), channels, `qkv_bias` (present or not), layer-norm eps 1e-6 (timm's),
exact GELU (timm's nn.GELU). The classifier (`head`, and the unused `pre_logits` of old in21k npz files) is dropped.
Every other key, or a missing one, stops the conversion before anything is written, with one line naming the file
and the keys: other architectures (ResNet, Swin, DeiT with a distillation token, register tokens, layer scale,
fc_norm/average pooling, separate q/k biases) are refused.

What matches timm (`timm.create_model(..., num_classes=0)`; tests/test_timm_vit.py, scripts/check_timm_vit.py):

- `last_hidden_state` == timm's `forward_features(x)` (final norm applied there as here), all tokens;
- `pooler_output` == `last_hidden_state[:, 0]` == timm's pooled feature (`forward_head(..., pre_logits=True)`, the
  CLS token after the final norm: `global_pool='token'`, no fc_norm). transformers' ViT pooler is a dense layer +
  tanh; it is written as the identity (weight I, bias 0, `pooler_act: linear`) so that the loaded model has no
  randomly initialised weights. The project's backbone feature is `last_hidden_state[:, 0]` (models.py).

Preprocessing is not in the weights: the AugReg in21k models take RGB scaled to [0, 1], then mean = std = 0.5
(timm's pretrained_cfg; the configs/paper files say so). Weights are saved as float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inflora_dist.assets.common import (
    _PROVENANCE,
    _WEIGHTS,
    AssetError,
    _config_and_weight_names,
    _convert_once,
    _sha256,
    _write_checkpoint,
)

if TYPE_CHECKING:
    import torch
    from transformers import ViTConfig

logger = logging.getLogger(__package__)  # one logger for the package (inflora_dist.assets)

LAYER_NORM_EPS = 1e-6  # timm's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
DEFAULT_HEAD_DIM = 64  # a state dict's heads, unless --num-heads: hidden / 64
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # as timm's _load_weights looks for them
_DROPPED_STATE = ("head.weight", "head.bias")  # the classifier; timm with num_classes=0 has none
_DROPPED_NPZ = ("head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias")  # timm ignores pre_logits
_BLOCK_KEYS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")  # each .weight and .bias
_TOP_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias")

# timm name -> candidates in the installed transformers (>= 5 first, then < 5): the first one the model has wins.
_TOP_NAMES = {
    "cls_token": ("embeddings.cls_token",),
    "pos_embed": ("embeddings.position_embeddings",),
    "patch_embed.proj": ("embeddings.patch_embeddings.projection",),
    "norm": ("layernorm",),
}
_LAYER_NAMES = ("layers.{i}.", "encoder.layer.{i}.")
_BLOCK_NAMES = {
    "norm1": ("layernorm_before",),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "norm2": ("layernorm_after",),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
_QKV_NAMES = (
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
)


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _names(keys: Iterable[str], limit: int = 12, ordered: bool = False) -> str:
    """`[a, b, c, ... (+N more)]`: key names for a one-line message, sorted unless `ordered` (kept as given)."""
    keys = list(keys) if ordered else sorted(keys, key=_natural)
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


def _refuse(path: Path, what: str, missing: Iterable[str], unexpected: Iterable[str]) -> AssetError:
    missing, unexpected = list(missing), list(unexpected)
    return AssetError(
        f"{path}: not a timm ViT checkpoint ({what}): missing {len(missing)} keys {_names(missing, ordered=True)}, "
        f"unexpected {len(unexpected)} keys {_names(unexpected)}"
    )


# ---------------------------------------------------------------- reading the checkpoint
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as w:
            return {k: w[k] for k in w.files}
    except Exception as e:  # zipfile / numpy errors on a file that is not an npz
        raise AssetError(f"{path}: cannot read as .npz ({_first_line(e)})") from e


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle / zip errors; weights_only refusals are several lines long
        raise AssetError(f"{path}: cannot read as a {path.suffix} state dict ({_first_line(e)})") from e
    for key in ("model", "state_dict"):  # training checkpoints, as timm's checkpoint_filter_fn unwraps them
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise AssetError(f"{path}: not a state dict (a {type(state).__name__})")
    others = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if others:
        raise AssetError(f"{path}: entries that are not tensors: {_names(others)}")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _npz_to_timm(w: Mapping[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], int | None, list[str]]:
    """The timm state dict that `_load_weights` would fill from the AugReg / big_vision arrays `w`, the number of
    heads of their per-head layout (None when the kernels are 2-D) and the dropped keys."""
    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise _refuse(path, "AugReg/big_vision .npz layout", ["embedding/kernel"], w)
    big_vision = (
        prefix.startswith("params/")
        or f"{prefix}pos_embedding" in w
        or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    )
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w  # big_vision's scanned blocks
    if stacked:
        depth = int(w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        found = (re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k) for k in w)
        depth = 1 + max((int(m.group(1)) for m in found if m), default=0)  # block 0 is required

    used: set[str] = set()
    missing: list[str] = []

    def take(name: str, idx: int | None = None) -> np.ndarray | None:
        key = prefix + name
        if key not in w:
            missing.append(key)
            return None
        used.add(key)
        return w[key] if idx is None else w[key][idx]

    out: dict[str, np.ndarray | None] = {}
    kernel = take("embedding/kernel")  # (p, p, in, out)
    out["patch_embed.proj.weight"] = None if kernel is None else kernel.transpose(3, 2, 0, 1)
    out["patch_embed.proj.bias"] = take("embedding/bias")
    out["cls_token"] = take("cls")
    out["pos_embed"] = take("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding")
    out["norm.weight"] = take("Transformer/encoder_norm/scale")
    out["norm.bias"] = take("Transformer/encoder_norm/bias")
    heads: set[int] = set()
    for i in range(depth):
        block, idx = ("Transformer/encoderblock/", i) if stacked else (f"Transformer/encoderblock_{i}/", None)
        attn, t = f"{block}MultiHeadDotProductAttention_{mha}/", f"blocks.{i}."
        out[t + "norm1.weight"] = take(f"{block}LayerNorm_0/scale", idx)
        out[t + "norm1.bias"] = take(f"{block}LayerNorm_0/bias", idx)
        qkv = [take(f"{attn}{n}/kernel", idx) for n in ("query", "key", "value")]  # (hidden, heads, head_dim)
        qkv_b = [take(f"{attn}{n}/bias", idx) for n in ("query", "key", "value")]  # (heads, head_dim)
        if all(k is not None for k in qkv):
            heads |= {k.shape[1] for k in qkv if k.ndim == 3}
            out[t + "attn.qkv.weight"] = np.concatenate([k.reshape(k.shape[0], -1).T for k in qkv])
        if all(b is not None for b in qkv_b):
            out[t + "attn.qkv.bias"] = np.concatenate([b.reshape(-1) for b in qkv_b])
        proj = take(f"{attn}out/kernel", idx)  # (heads, head_dim, hidden)
        if proj is not None:
            per_head = proj.ndim == 3
            out[t + "attn.proj.weight"] = proj.transpose(2, 0, 1).reshape(proj.shape[-1], -1) if per_head else proj.T
        out[t + "attn.proj.bias"] = take(f"{attn}out/bias", idx)
        out[t + "norm2.weight"] = take(f"{block}LayerNorm_{ln2}/scale", idx)
        out[t + "norm2.bias"] = take(f"{block}LayerNorm_{ln2}/bias", idx)
        for r in range(2):
            dense = take(f"{block}MlpBlock_{mlp}/Dense_{r}/kernel", idx)
            out[f"{t}mlp.fc{r + 1}.weight"] = None if dense is None else dense.T
            out[f"{t}mlp.fc{r + 1}.bias"] = take(f"{block}MlpBlock_{mlp}/Dense_{r}/bias", idx)

    dropped = sorted(prefix + k for k in _DROPPED_NPZ if prefix + k in w)
    unexpected = [k for k in w if k.startswith(prefix) and k not in used and k not in dropped]
    if missing or unexpected:
        raise _refuse(path, "AugReg/big_vision .npz layout", missing, unexpected)
    if len(heads) > 1:
        raise AssetError(f"{path}: attention kernels with different numbers of heads {sorted(heads)}")
    ignored = sum(1 for k in w if not k.startswith(prefix))
    if ignored:
        logger.info("timm-vit: %s: ignored %d arrays outside %r (optimizer state)", path.name, ignored, prefix)
    return {k: v for k, v in out.items() if v is not None}, (heads.pop() if heads else None), dropped


def _check_state_dict(state: Mapping[str, Any], path: Path) -> tuple[int, bool, list[str]]:
    """(depth, qkv_bias, dropped keys) of a timm ViT state dict; refuses any other layout naming the keys."""
    found = (re.match(r"blocks\.(\d+)\.", k) for k in state)
    depth = 1 + max((int(m.group(1)) for m in found if m), default=0)  # block 0 is required
    qkv_bias = any(k.endswith(".attn.qkv.bias") for k in state)
    expected = list(_TOP_KEYS)  # in this order in the message: the top-level keys name the architecture
    for i in range(depth):
        expected += [f"blocks.{i}.{m}.{p}" for m in _BLOCK_KEYS for p in ("weight", "bias")]
        if not qkv_bias:
            expected.remove(f"blocks.{i}.attn.qkv.bias")
    dropped = sorted(k for k in _DROPPED_STATE if k in state)
    missing = [k for k in expected if k not in state]
    unexpected = set(state) - set(expected) - set(dropped)
    if missing or unexpected:
        raise _refuse(path, "timm VisionTransformer state dict", missing, unexpected)
    return depth, qkv_bias, dropped


def read_timm_vit(checkpoint: str | Path, num_heads: int | None = None) -> tuple[ViTConfig, dict[str, Any], dict]:
    """The transformers `ViTConfig`, the timm-named float32 weights (torch tensors, fused qkv) and a description
    (format, where the heads came from, dropped keys, source dtypes) of a timm ViT checkpoint file."""
    import torch
    from transformers import ViTConfig

    path = Path(checkpoint)
    if not path.is_file():
        raise AssetError(f"{path}: no such checkpoint file")
    if path.suffix == ".npz":
        arrays, npz_heads, dropped = _npz_to_timm(_load_npz(path), path)
        bad = sorted(k for k, v in arrays.items() if v.dtype.kind != "f")  # e.g. bfloat16 saved as raw bytes
        if bad:
            raise AssetError(f"{path}: arrays that are not floating point: {_names(bad)}")
        state: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        fmt = "npz (AugReg/big_vision JAX layout)"
    elif path.suffix in STATE_DICT_SUFFIXES:
        state, npz_heads, dropped, fmt = _load_state_dict(path), None, [], f"{path.suffix[1:]} (timm state dict)"
    else:
        raise AssetError(f"{path}: unknown checkpoint format {path.suffix!r} (.npz, {', '.join(STATE_DICT_SUFFIXES)})")
    depth, qkv_bias, head = _check_state_dict(state, path)  # the npz's arrays, renamed, pass it too
    state = {k: v for k, v in state.items() if k not in head}
    dropped += head
    bad = sorted(k for k, v in state.items() if not v.is_floating_point())
    if bad:
        raise AssetError(f"{path}: tensors that are not floating point: {_names(bad)}")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    state = {k: v.to(torch.float32) for k, v in state.items()}

    hidden = state["cls_token"].shape[-1]
    conv, pos = state["patch_embed.proj.weight"], state["pos_embed"]  # (hidden, channels, p, p), (1, tokens, hidden)
    if conv.ndim != 4 or conv.shape[0] != hidden or conv.shape[2] != conv.shape[3]:
        raise AssetError(f"{path}: patch_embed.proj.weight {tuple(conv.shape)} is not a square conv to {hidden}")
    if state["cls_token"].numel() != hidden or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden:
        raise AssetError(f"{path}: cls_token {tuple(state['cls_token'].shape)} and pos_embed {tuple(pos.shape)} "
                         f"are not (1, 1, {hidden}) and (1, tokens, {hidden})")  # fmt: skip
    patch, channels, positions = int(conv.shape[2]), int(conv.shape[1]), int(pos.shape[1])
    state["cls_token"] = state["cls_token"].reshape(1, 1, hidden)
    grid = math.isqrt(positions - 1) if positions > 1 else 0
    note = "the class token's row of pos_embed"
    if grid < 1 or grid * grid != positions - 1:
        grid = math.isqrt(positions)
        if grid < 1 or grid * grid != positions:
            raise AssetError(f"{path}: pos_embed has {positions} positions: not 1 + a square grid of patches")
        # no_embed_class (DeiT-3, big_vision): timm adds pos_embed to the patches only, then prepends the class
        # token; a zero row for the class token computes the same.
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, hidden), pos], dim=1)
        note = "zero (no_embed_class layout: pos_embed covers the patches only)"

    if npz_heads is not None and num_heads is not None and npz_heads != num_heads:
        raise AssetError(f"{path}: --num-heads {num_heads}, but the npz's attention kernels have {npz_heads} heads")
    heads, heads_from = (
        (npz_heads, "npz per-head layout") if npz_heads is not None
        else (num_heads, "--num-heads") if num_heads is not None
        else (hidden // DEFAULT_HEAD_DIM, f"hidden / {DEFAULT_HEAD_DIM}")
    )  # fmt: skip
    if heads < 1 or hidden % heads:
        raise AssetError(f"{path}: hidden size {hidden} is not divisible into {heads} heads ({heads_from}); "
                         "give --num-heads")  # fmt: skip
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        hidden_act="gelu",  # timm's nn.GELU: exact (erf)
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=LAYER_NORM_EPS,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        qkv_bias=qkv_bias,
        pooler_act="linear",  # with an identity pooler: pooler_output = last_hidden_state[:, 0]
    )
    info = {
        "format": fmt,
        "dtype": dtypes,
        "num_heads_from": heads_from,
        "dropped": dropped,
        "class_token_position": note,
    }
    return config, state, info


def _to_transformers(state: Mapping[str, Any], config: ViTConfig, targets: Mapping[str, Any]) -> dict[str, Any]:
    """The ViTModel state dict (names of the installed transformers) of the timm weights, with an identity pooler."""
    import torch

    out: dict[str, Any] = {}

    def put(candidates: Sequence[str], value: Any) -> None:
        out[next((c for c in candidates if c in targets), candidates[0])] = value

    for timm_name, names in _TOP_NAMES.items():
        if timm_name in state:
            put(names, state[timm_name])
        else:  # weight and bias
            for p in ("weight", "bias"):
                put([f"{n}.{p}" for n in names], state[f"{timm_name}.{p}"])
    for i in range(config.num_hidden_layers):
        layers, t = [n.format(i=i) for n in _LAYER_NAMES], f"blocks.{i}."
        for timm_name, names in _BLOCK_NAMES.items():
            for p in ("weight", "bias"):
                put([f"{layer}{n}.{p}" for layer in layers for n in names], state[f"{t}{timm_name}.{p}"])
        for p in ("weight", "bias") if config.qkv_bias else ("weight",):
            for names, part in zip(_QKV_NAMES, state[f"{t}attn.qkv.{p}"].chunk(3, dim=0), strict=True):
                put([f"{layer}{n}.{p}" for layer in layers for n in names], part.contiguous())
    hidden = config.hidden_size
    put(["pooler.dense.weight"], torch.eye(hidden, dtype=torch.float32))
    put(["pooler.dense.bias"], torch.zeros(hidden, dtype=torch.float32))
    return out


# ---------------------------------------------------------------- conversion
def convert_timm_vit(checkpoint: str | Path, out_dir: str | Path, num_heads: int | None = None) -> Path:
    """Convert a timm ViT checkpoint (.npz, .safetensors, .pth) into a transformers `ViTModel` directory; returns
    `out_dir`.

    Writes config.json + model.safetensors (`ViTModel.save_pretrained`, float32) and conversion.json (source file,
    its sha256, format, where the heads came from, dropped keys). Every parameter of the model is set from the
    checkpoint (strict load, shapes checked) and every key of the checkpoint used or dropped on purpose, else
    nothing is written. Files go to a temporary sibling directory first and are moved in, config.json last.
    """
    from transformers import ViTModel

    path, out_dir = Path(checkpoint), Path(out_dir)
    config, state, info = read_timm_vit(path, num_heads)
    model = ViTModel(config)
    targets = model.state_dict()
    weights = _to_transformers(state, config, targets)
    missing, unused = sorted(set(targets) - set(weights)), sorted(set(weights) - set(targets))
    wrong = [f"{k} {tuple(v.shape)} != {tuple(targets[k].shape)}" for k, v in weights.items()
             if k in targets and v.shape != targets[k].shape]  # fmt: skip
    if missing or unused or wrong:
        raise AssetError(f"{path}: weights do not fit ViTModel ({config.num_attention_heads} heads): "
                         f"missing {_names(missing)}, unused {_names(unused)}, shapes {_names(wrong, 4)}")  # fmt: skip
    model.load_state_dict(weights, strict=True)
    model.eval()

    provenance = {
        "source": {"file": str(path), "sha256": _sha256(path), **info},
        "model": "timm VisionTransformer (class token, global_pool='token') -> transformers ViTModel",
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "patch_size": config.patch_size,
            "image_size": config.image_size,
            "qkv_bias": config.qkv_bias,
        },
        "outputs": {
            "last_hidden_state": "timm forward_features (after the final norm)",
            "pooler_output": "last_hidden_state[:, 0] (identity pooler): timm's pooled feature, global_pool='token'",
        },
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return _write_checkpoint(out_dir, model.save_pretrained, provenance, required=(_WEIGHTS,))


def is_timm_vit_converted(
    out_dir: str | Path, checkpoint: str | Path | None = None, num_heads: int | None = None
) -> bool:
    """Whether `out_dir` holds a ViTModel conversion (a vit config.json and a model.safetensors with its weights);
    with `checkpoint`, one of that file (its sha256 in conversion.json), with `num_heads`, one with that many heads."""
    out_dir = Path(out_dir)
    found = _config_and_weight_names(out_dir)
    if found is None:
        return False
    config, keys = found
    last = config.get("num_hidden_layers", 0) - 1
    if not (
        config.get("model_type") == "vit"
        and {"embeddings.cls_token", "layernorm.weight", "pooler.dense.weight"} <= keys
        and any(k.startswith((f"encoder.layer.{last}.", f"layers.{last}.")) for k in keys)
    ):
        return False
    if num_heads is not None and config.get("num_attention_heads") != num_heads:
        return False
    if checkpoint is None:
        return True
    try:
        recorded = json.loads((out_dir / _PROVENANCE).read_text())["source"]["sha256"]
        return Path(checkpoint).is_file() and recorded == _sha256(Path(checkpoint))
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------- CLI
def _cmd_timm_vit(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    done = lambda out: is_timm_vit_converted(out, checkpoint, args.num_heads)  # noqa: E731
    convert = lambda src, out: convert_timm_vit(src, out, args.num_heads)  # noqa: E731
    return _convert_once("timm-vit", Path(args.out), args.force, done, lambda: checkpoint, convert)


def _add_timm_vit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "timm-vit",
        help="a timm ViT checkpoint (AugReg .npz, timm .safetensors/.pth) -> transformers ViTModel checkpoint",
        description="Convert a local timm VisionTransformer checkpoint (the AugReg/big_vision .npz layout, e.g. "
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz for vit_base_patch16_224_in21k, or a timm "
        "state dict as .safetensors/.pth) into a directory ViTModel.from_pretrained loads (config.json + "
        "model.safetensors). last_hidden_state equals timm's forward_features. Skipped when the directory already "
        "holds a conversion of the same file.",
    )
    p.add_argument("--checkpoint", required=True, help="the timm checkpoint file (.npz, .safetensors, .pth)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="convert even if --out already holds this conversion")
    p.add_argument("--num-heads", type=int, help="attention heads of a .safetensors/.pth state dict "
                   f"(default: hidden / {DEFAULT_HEAD_DIM}; an .npz says it itself)")  # fmt: skip
    p.set_defaults(func=_cmd_timm_vit)
