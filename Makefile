# cdc-dashboard: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint bench-capture cluster-up cluster-down cluster-status chaos clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev extra

run: $(STAMP) ## zero-setup demo: embedded PostgreSQL (unless CDC_DATABASE_URL), demo data, live dashboard
	$(BIN)/cdc-dashboard run

test: $(STAMP) ## run the test suite (CDC_TEST_DATABASE_URL, else Docker, else embedded PostgreSQL)
	$(BIN)/pytest -q

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench-capture: $(STAMP) ## capture overhead benchmark (pgbench, 8 writers); needs CDC_DATABASE_URL
	$(BIN)/python bench/capture_overhead.py

cluster-up: $(STAMP) ## 3 gateways behind HAProxy + active and standby listener (deploy/local/cluster.sh)
	deploy/local/cluster.sh up

cluster-down: ## stop what cluster-up started
	deploy/local/cluster.sh down

cluster-status: ## the cluster's processes, HAProxy's view, the active listener
	deploy/local/cluster.sh status

chaos: $(STAMP) ## chaos run, several minutes: faults of every kind at once, then nothing lost and every figure exact
	$(BIN)/python bench/chaos.py

clean: ## remove the virtualenv and local state
	rm -rf $(VENV) .cdc .pytest_cache .mypy_cache .ruff_cache
