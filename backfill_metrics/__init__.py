"""Prometheus metrics for backfills: a plugin on the public `migrator` hooks, shipped in this repository as a
third party would ship it (its own package and entry point), installed with `pip install
clickhouse-migrator[metrics]` (the official `prometheus-client`)."""
