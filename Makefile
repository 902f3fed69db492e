# cip: two commands on a fresh machine do all the set-up.
#   make test   installs the Python reference stack (.venv) and runs every test tier
#   make demo   runs the demo experiment on the bundled tiny models
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CARGO ?= cargo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-rust test-python parity demo build bench-plan bench-generate bench-caption bench-train slurm-up slurm-down

# The venv carries onnxruntime's shared library (cip finds it in .venv on its own) and the pinned
# export/reference stack. The stamp makes reruns free until requirements change.
setup: $(VENV)/.installed

# --no-cache-dir: the CUDA-build torch stack is ~3 GB of wheels; pip's cache would keep a second copy
# beside the ~6 GB venv, and a CI machine's disk can be that short.
$(VENV)/.installed: models/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-cache-dir --upgrade pip
	$(VENV)/bin/pip install --quiet --no-cache-dir -r models/requirements.txt || { \
	  echo "setup: pip could not install models/requirements.txt. A fresh install peaks at about 9 GB" \
	       "(torch's CUDA wheels); free here: $$(df -BG --output=avail . | tail -1 | tr -d ' ')." \
	       "Free space, or point TMPDIR at a larger disk, and rerun make." >&2; exit 1; }
	@$(PY) -c "import onnxruntime, torch, diffusers, transformers; print('venv ok: onnxruntime', onnxruntime.__version__, 'torch', torch.__version__)"
	touch $@

build:
	$(CARGO) build --release

test: setup slurm-up test-rust test-python

# A one-node Slurm cluster for the slurm executor's tests (tests/slurm.rs). It needs root and the
# Debian packages (installed when apt can reach a mirror); when it cannot start, make goes on and
# those tests print "SKIPPED: slurm cluster not available: ...".
slurm-up:
	@tests/slurm/start-cluster.sh || echo "slurm-up: no Slurm cluster here; the slurm executor tests will be SKIPPED"

slurm-down:
	@tests/slurm/stop-cluster.sh

# Rust tier: unit + integration tests on the committed fixtures. `test-kinds` adds the small
# engine-test node kinds to the test build only.
test-rust:
	$(CARGO) test --features test-kinds

# Python tier: export tool, parity of the exported graphs against the reference libraries,
# fixture reproducibility.
test-python: setup
	$(PY) -m pytest models/tests -q

# Regenerate every fixture and reference output, then check cip still matches them.
parity: setup
	$(PY) models/export.py fixtures --out tests/fixtures
	$(MAKE) test-rust test-python

demo: setup build
	./target/release/cip data demo --out experiments/data/demo
	./target/release/cip run experiments/demo.toml

# `cip plan` over a fully cached 1.3 M-item experiment (see README, Performance).
bench-plan: build
	./target/release/cip bench plan --items 1300000

# cip vs diffusers on the full-size SD-1.5 architecture (random weights; exported once into
# .cip/bench/sd15, ~8 GB with the diffusers copy, ~10 min the first time). See README, Performance.
bench-generate: setup build
	./target/release/cip bench generate

# cip vs transformers' generate on BLIP-2 at OPT-2.7b widths, 2 layers (.cip/bench/blip2, ~3.3 GB).
bench-caption: setup build
	./target/release/cip bench caption

# Train-step images/s, cip (ONNX Runtime) vs PyTorch eager, ResNet-18 b32 64px and ResNet-50 b16
# 112px. The first run exports both models (minutes).
bench-train: setup build
	./target/release/cip bench train
