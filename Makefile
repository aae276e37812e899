# Set-up and everyday commands. Every target installs the virtual environment first if needed.

VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY := $(VENV)/bin/python
# The demo checkpoint's directory. Empty: moe-serve's own default ($MOE_SERVE_DEMO_DIR, else
# ~/.cache/moe-serve/demo-model), which is where `moe-serve serve` looks; set, `make demo-model`
# and `make serve` both use it (through MOE_SERVE_DEMO_DIR), so they always agree.
DEMO_DIR ?=
DEMO_ENV = $(if $(DEMO_DIR),MOE_SERVE_DEMO_DIR=$(abspath $(DEMO_DIR)))
# Options for `moe-serve serve`: make serve ARGS="--expert-workers 4 --port 8001"
ARGS ?=

.PHONY: install serve test test-slow test-gpu bench lint demo-model clean prometheus

install: $(VENV)/.installed

# torch first and pinned: `pip install torch==2.13.0` takes the CPU build this machine keeps on
# disk, and then nothing else can pull the newest torch with gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,bench]'
	$(PY) -m gateway.grpc_stubs
	touch $@

serve: $(VENV)/.installed
	$(DEMO_ENV) $(VENV)/bin/moe-serve serve $(ARGS)

# Debian's Prometheus server and promtool, for tests/deploy/test_prometheus_server.py. Installed
# only where we are root and it is missing; elsewhere that test skips and says why.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" -eq 0 ] \
		&& apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; } \
		|| echo "prometheus: not installed (needs root); tests/deploy/test_prometheus_server.py will skip"

# `gpu` tests are left out by name: on a CPU they would only skip, and on a GPU box they belong to
# `make test-gpu`, so `make test` means the same suite everywhere.
test: $(VENV)/.installed prometheus
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow -q

# The CUDA checks (docs/gpu.md). They live in tests/gpu; where CUDA is absent each one skips and
# says why. tests/gpu/run_on_device.sh runs the same selection on a lent GPU machine.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -m gpu -q tests/gpu

# Each tests/bench/bench_*.py is a script that prints its own ratios; run as modules so the
# repository root is importable.
bench: $(VENV)/.installed
	@set -e; for f in tests/bench/bench_*.py; do \
		[ -e "$$f" ] || continue; \
		echo "== $$f"; \
		$(PY) -m tests.bench.$$(basename $$f .py); \
	done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

demo-model: $(VENV)/.installed
	$(DEMO_ENV) $(VENV)/bin/moe-serve demo-model

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis $(DEMO_DIR)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
