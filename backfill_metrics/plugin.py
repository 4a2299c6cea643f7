"""The metrics plugin's hooks: `--metrics-port` / `--metrics-file` on `migrate backfill run` and `resume`, and
the batch, attempt and status events that feed the metrics (backfill_metrics/exporter.py)."""

from __future__ import annotations

import contextlib
import time

import click

from migrator import hookimpl
from migrator.errors import MigrateError

from . import exporter

_exporter: exporter.Exporter | None = None
_files: dict[str, str] = {}  # backfill_id -> the textfile its run rewrites after every batch


def current() -> exporter.Exporter | None:
    """The process's exporter, made by the first run that asked for metrics (None before: no cost otherwise)."""
    return _exporter


def _labels(backfill) -> tuple:
    return backfill.backfill_id, getattr(backfill, "shard", "") or ""


def _written(backfill) -> None:
    path = _files.get(backfill.backfill_id)
    if path and _exporter is not None:
        _exporter.write_textfile(path)


@hookimpl
def backfill_run_options():
    return [
        click.Option(
            ["--metrics-port"],
            type=click.IntRange(0, 65535),
            envvar="MIGRATE_METRICS_PORT",
            default=None,
            help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics while the run lasts (0: any free port)",
        ),
        click.Option(
            ["--metrics-file"],
            type=click.Path(dir_okay=False),
            default=None,
            help="write the metrics to this file after every batch (node_exporter textfile collector)",
        ),
    ]


@hookimpl
def backfill_run_context(backfill, options):
    port, path = options.get("metrics_port"), options.get("metrics_file")
    if port is None and path is None:
        return None
    if not exporter.available():
        raise MigrateError(
            "--metrics-port and --metrics-file need prometheus-client: pip install 'clickhouse-migrator[metrics]'"
        )
    return _serving(backfill, port, path)


@contextlib.contextmanager
def _serving(backfill, port, path):
    global _exporter
    _exporter = _exporter or exporter.Exporter()
    _exporter.start(_labels(backfill))
    server = None
    if port is not None:
        try:
            server = _exporter.serve(port)
        except OSError as exc:
            raise MigrateError(f"--metrics-port {port}: cannot serve metrics: {exc.strerror or exc}") from None
        click.echo(f"metrics: http://0.0.0.0:{server.server_port}/metrics", err=True)
    if path is not None:
        _files[backfill.backfill_id] = path
        _written(backfill)
    try:
        yield
    finally:
        _written(backfill)
        _files.pop(backfill.backfill_id, None)
        if server is not None:
            server.shutdown()
            server.server_close()


@hookimpl
def backfill_batch_attempted(backfill, event):
    if _exporter is not None:
        _exporter.attempted(_labels(backfill), event)


@hookimpl
def backfill_batch_completed(backfill, batch):
    if _exporter is not None:
        _exporter.completed(_labels(backfill), batch, time.time())
        _written(backfill)


@hookimpl
def backfill_status_changed(backfill, status, error):
    if _exporter is not None:
        _exporter.set_status(_labels(backfill), status)
        _written(backfill)
