# Two commands a fresh clone needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CALLS ?= 200000
DEMO_STORE := $(CURDIR)/.demo/store

.PHONY: demo test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" -s

# The main job on the embedded default: schema, realistic calls, the 021 backfill, its validation.
demo: export CLICKHOUSE_URL = chdb://$(DEMO_STORE)
demo: export MIGRATE_DATABASE = demo
demo: $(STAMP)
	rm -rf .demo
	$(BIN)/migrate up
	$(BIN)/python -m backfill_plugin.demo --calls $(DEMO_CALLS)
	$(BIN)/migrate backfill list
	$(BIN)/migrate backfill run 21 --batch-size 25000
	$(BIN)/migrate backfill validate 21
	$(BIN)/python -m backfill_plugin.demo --summary

bench: $(STAMP)
	$(BIN)/python bench/bench_021.py

clean:
	rm -rf .demo .chdb .chdb.control
