# spark-slurm: two set-up commands, `make demo` and `make test`, each installing
# what it needs (system packages as root, the venv, pip packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv system-deps proto lint typecheck test test-fast bench demo wheel clean mutation

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

proto: venv
	$(PY) proto/generate.py

lint: venv proto
	$(VENV)/bin/ruff check spark_slurm tests benchmarks proto setup.py

typecheck: venv proto
	$(VENV)/bin/mypy

test: system-deps venv proto lint typecheck
	$(VENV)/bin/pytest

test-fast: venv proto
	$(VENV)/bin/pytest -m "not slurm and not slow" -x -q

bench: system-deps venv proto
	$(PY) -m benchmarks

# Mutation testing, outside `make test` (docs/testing.md): GROUP=policy|nvml|facility|
# automations|pipeline|ledger|merge|all (default all), then the issue's hand-made
# survivors, each applied and shown killed.
GROUP ?= all
mutation: system-deps venv proto
	$(VENV)/bin/pip install -q -e '.[mutation]'
	$(PY) scripts/mutation.py --survivors
	$(PY) scripts/mutation.py $(GROUP)

demo: system-deps venv proto
	$(VENV)/bin/sparkctl demo

# The release artefacts: sdist, and the wheel built from it (bindings generated,
# admin files included; see setup.py).
wheel: venv
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache spark_slurm/karman/_proto dist build
