# Quick start (README): `make run` and `make test`. Both create .venv and install on first use.

PYTHON ?= python3
VENV ?= .venv
# Installed only when the venv has no importable torch: an unpinned torch pulls a multi-GB CUDA
# build, and a torch the user installed (e.g. a CUDA one) is left alone.
TORCH_SPEC ?= torch==2.13.0
# The main job: the runtime on every GPU (or three CPU workers) with its dashboard; q quits.
# MODEL=smollm2 (or a folder, or a .gguf file) serves that instead of the demo model.
MODEL ?=
MAIN ?= splitnode up$(if $(MODEL), --model $(MODEL))
PYTEST_ARGS ?=
BENCH_ARGS ?=

BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.splitnode-installed

.PHONY: run test bench install clean

run: $(STAMP)
	PATH="$(BIN):$$PATH" $(MAIN)

# Triton kernels run in the interpreter on CPU, checked against their torch references. pytest's
# exit 5 (no test collected) is not a failure here; .ci/run relies on this target.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/splitnode bench $(BENCH_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
