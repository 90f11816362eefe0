# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP_VERSION := 26.3
# Large wheels (DALI is 424 MB) survive a dropped connection: pip resumes the download.
PIP_RETRIES := --retries 10 --resume-retries 20
# Bytecode is written as modules are first imported, not compiled up front: pip does not
# byte-compile (--no-compile: one core), and `compileall` of the whole venv took 55 s of a
# clean clone's set-up on 2 cores, while the project's imports use about a quarter of its
# modules (4,937 of 19,612: 37 s cold once, then 13 s with their bytecode). Where
# PYTHONDONTWRITEBYTECODE is set (as on the machines this project is built and tested on)
# Python never writes what it compiles, and every process (each Ray worker, each CLI test)
# compiled torch, ray and pandas from source again: 11 of the test suite's 26 CPU minutes. So
# the recipes below run without it; Python writes each .pyc beside and renames it, so processes
# importing side by side are safe.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := install --quiet --no-compile

SERVERS := .venv-servers
SERVERS_STAMP := $(SERVERS)/.installed

.PHONY: venv servers demo test test-fast lint format bench gpu-kit browser clean

# The venv is rebuilt whenever the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip $(PIP_INSTALL) --upgrade pip==$(PIP_VERSION)
	$(PY) -m pip $(PIP_INSTALL) $(PIP_RETRIES) -r requirements.txt
	$(PY) -m pip $(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# The servers the tests start as processes (an S3-compatible server, an MLflow tracking server),
# in a venv of their own so that their pins never move the project's (requirements-servers.txt).
$(SERVERS_STAMP): requirements-servers.txt
	test -x $(SERVERS)/bin/python || $(PYTHON) -m venv $(SERVERS)
	$(SERVERS)/bin/python -m pip $(PIP_INSTALL) --upgrade pip==$(PIP_VERSION)
	$(SERVERS)/bin/python -m pip $(PIP_INSTALL) $(PIP_RETRIES) -r requirements-servers.txt
	touch $(SERVERS_STAMP)

servers: $(SERVERS_STAMP)

demo: venv
	$(VENV)/bin/cellmorph demo

# The three set-ups run side by side (pip mostly waits on the disk and the network; apt too);
# the tests run on 2 pytest-xdist workers, each test group that shares a cluster or a server on
# one worker (tests/conftest.py).
XDIST := -n 2 --dist loadgroup

test:
	$(MAKE) -j3 venv servers browser
	$(PY) -m pytest -q --durations=25 $(XDIST)

test-fast: venv
	$(PY) -m pytest -q $(XDIST) -m "not slow and not ray and not browser"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) bench/index.py
	$(PY) bench/loader.py
	$(PY) bench/convert.py
	$(PY) bench/train.py
	$(PY) bench/objectstore.py

# The GPU check kit (docs/gpu-kit.md): the cp312 wheels the lent GPU machine lacks, recompressed
# and cut into parts of <= 48 MiB under .gpukit/, a SHA-256 manifest and .gpukit/RUNBOOK.md (the
# device calls to paste). Downloads with pip (PyPI); no GPU needed. GPU_KIT_PRESET=6 packs faster.
GPU_KIT_PRESET ?= 9e
gpu-kit: venv
	$(PY) tools/gpu_kit.py build --preset $(GPU_KIT_PRESET)

clean:
	rm -rf $(VENV) $(SERVERS) runs data .pytest_cache

# Headless Chromium for the report test (marker `browser`); without root or apt it is skipped.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium is installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	    || echo "could not install chromium; the browser test will be skipped"; \
	else \
	  echo "not installing chromium (needs root and apt-get); the browser test will be skipped"; \
	fi
