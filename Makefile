# Two commands a fresh clone needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CALLS ?= 200000
DEMO_STORE := $(CURDIR)/.demo/store

.PHONY: demo test test-keys-long test-all test-server test-http serve-http soak soak-embedded lint mutation-check bench bench-narrow bench-scale bench-shards bench-overhead clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Three workers, each with its own embedded store: the suite waits on subprocesses and sleeps about a
# third of the time, so three workers on two cores keep it near 6 minutes (two: 7, one: 14).
test: lint
	$(BIN)/python -m pytest -q -n 3 --dist worksteal

# The property test of the key walk at length: every key type first and later in a key, KEYS_EXAMPLES
# examples each (default 3), and 20x as many fully random tables (about 15 minutes at the default).
test-keys-long: $(STAMP)
	KEYS_EXAMPLES=$${KEYS_EXAMPLES:-3} $(BIN)/python -m pytest -q -p no:xdist -m slow tests/test_key_walk_property.py

# Break one guarantee at a time in a temporary copy; every mutation must make a test fail.
mutation-check: $(STAMP)
	$(BIN)/python tests/mutation_check.py

# Faults at random (tests/chaos.py) over HTTP for SOAK_MINUTES (default 30): three backfills re-run by supervisors,
# pollers, pause/resume, a migration, kill -9; rounds of new seeds (SOAK_SEED=N replays from seed N). Prints the
# faults by fault kind and statement kind, the restarts and the verdict of each round, then the coverage so far and
# the pairs not yet hit; fails at the end, naming them, if any applicable pair was never hit.
soak: $(STAMP)
	SOAK_MINUTES=$${SOAK_MINUTES:-30} $(BIN)/python -m pytest -q -s -p no:xdist -m slow tests/test_chaos_soak.py

# Three backfills at once on one embedded store, polled every 100 ms, one paused and resumed, a migration
# applied meanwhile; SOAK_ROWS rows each (default 200000: a few minutes on 2 cores).
soak-embedded: $(STAMP)
	SOAK_ROWS=$${SOAK_ROWS:-200000} $(BIN)/python -m pytest -q -s -m slow tests/test_concurrent_backfills.py -k soak

# The server suites against a real server: CLICKHOUSE_URL=http://user@host:8123 (and CLICKHOUSE_CLUSTER_URL /
# MIGRATE_CLUSTER), or Docker for testcontainers; without either they are skipped with their reason.
# (`make test` runs tests/test_server_mode.py against tests/chhttp.py, the HTTP endpoint over the engine.)
test-server: export MIGRATE_TEST_SERVER = docker
test-server: $(STAMP)
	$(BIN)/python -m pytest -q -m "server or not server" -rs tests/test_server_mode.py tests/test_cluster_server.py

# The in-process suites with every client over HTTP: each worker's tests/chhttp.py endpoint instead of its
# embedded store (tests that assert embedded-only behaviour say so and check the HTTP equivalent).
test-http: $(STAMP)
	MIGRATE_TEST_HTTP=1 $(BIN)/python -m pytest -q -n 3 $(or $(TESTS),tests)

# ClickHouse's HTTP interface over the embedded engine, for trying `migrate --url http://127.0.0.1:8123` by hand.
serve-http: $(STAMP)
	$(BIN)/python -m tests.chhttp --store $(CURDIR)/.chhttp/store --port $(or $(PORT),8123)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" -s

# The main job on the embedded default: schema, realistic calls, the 021 backfill, its validation.
demo: export CLICKHOUSE_URL = chdb://$(DEMO_STORE)
demo: export MIGRATE_DATABASE = demo
demo: $(STAMP)
	rm -rf .demo
	$(BIN)/migrate up
	$(BIN)/python -m backfill_plugin.ops.demo --calls $(DEMO_CALLS)
	$(BIN)/migrate backfill list
	$(BIN)/migrate backfill run 21 --batch-size 25000
	$(BIN)/migrate backfill validate 21
	$(BIN)/python -m backfill_plugin.ops.demo --summary

# Benchmarks: run them on a quiet machine (they use both cores and up to 60% of RAM). Each prints its
# settings and a table; add ARGS="--batch-size 100000", "--target-batch-seconds 5", "--json", ...
# bench: 2M realistic calls, single statement vs 021 backfill vs validate (about 3 minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/python bench/bench_021.py --calls 2000000 --shape realistic $(ARGS)

# bench-narrow: 2M calls with 10-30 character payloads, where the fixed cost per batch weighs more
# (about 2 minutes).
bench-narrow: $(STAMP)
	$(BIN)/python bench/bench_021.py --calls 2000000 --shape narrow $(ARGS)

# bench-scale: the same shape at 2M and at 20M calls, side by side (peak RSS, rows/s, what the single
# statement does at 20M; the deferred variant: the same backfill with the target's merges held until it ends).
# About 45 minutes on 2 cores (generating 20M calls: ~4) and about
# 25 GB of free disk in $TMPDIR.
bench-scale: $(STAMP)
	$(BIN)/python bench/bench_021.py --calls 2000000 --scale --variants deferred $(ARGS)

# bench-shards: the same rows per shard over 1, 2 and 3 shards (tests/chhttp.py endpoints, pinned with taskset
# where the cores allow); wall time and total rows/s as ratios against one shard (about 1 minute).
bench-shards: $(STAMP)
	$(BIN)/python bench/bench_shards.py $(ARGS)

# bench-overhead: the framework's time between two batch INSERTs, with and without the batch history (about 1 minute).
bench-overhead: $(STAMP)
	$(BIN)/python bench/bench_overhead.py $(ARGS)

clean:
	rm -rf .demo .chdb .chdb.control .chhttp
