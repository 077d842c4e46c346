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

# The JS client's test dependencies (ws, ajv, typescript), pinned by package-lock.json.
clients/js/node_modules/.package-lock.json: clients/js/package.json clients/js/package-lock.json
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error

install: $(BIN)/attendance-hub clients/js/node_modules/.package-lock.json

demo: install
	$(BIN)/attendance-hub serve --demo

lint: install
	$(BIN)/ruff check hub workers tests benchmarks
	$(BIN)/ruff format --check hub workers
	$(BIN)/mypy

# Two workers (pytest-xdist), a test file each at a time: most tests wait on hubs, not on a core.
test: install lint
	$(BIN)/pytest -n 2 --dist loadfile
