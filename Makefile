# Two commands a user needs: `make repro` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU install the CPU build of torch first, so that resolving
# `torch>=2.1` never pulls the multi-GB CUDA wheels. Override with `make TORCH_SPEC=torch ...`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install repro test clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	@cat reports/report.md

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q

clean-venv:
	rm -rf $(VENV)
