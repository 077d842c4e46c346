# Two commands for a fresh machine: `make demo` runs the hub, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/attendance-hub: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/attendance-hub

demo: install
	$(BIN)/attendance-hub serve --demo

lint: install
	$(BIN)/ruff check hub workers tests benchmarks
	$(BIN)/ruff format --check hub workers
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest
