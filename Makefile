# Every target builds .venv from nothing, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on the dev/CI disk; installing it first keeps pip from pulling a multi-GB
# CUDA build to satisfy pyproject's wide `torch>=2.9`.
TORCH_PIN ?= torch==2.13.0

.PHONY: install dev serve test lint format bench bench-engine bench-service gpu-check clean

$(BIN)/patchpack: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(BIN)/patchpack
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/patchpack
dev: $(VENV)/.dev

serve: install
	$(BIN)/patchpack serve

lint: dev
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy app

test: lint
	$(BIN)/pytest -q

format: dev
	$(BIN)/ruff check --fix app tests bench
	$(BIN)/ruff format app tests bench

bench: dev
	$(BIN)/python -m bench.all

bench-engine: dev
	$(BIN)/python -m bench.engine

bench-service: dev
	$(BIN)/python -m bench.service

gpu-check: dev
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
