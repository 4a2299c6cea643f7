"""Checks before the first batch of a run: what a server or cluster would otherwise get wrong silently.

- a multi-shard cluster holds a different part of the source on each shard: one manager on one client is
  refused (the CLI drives one walk per shard instead: ops/shards.py);
- the HTTP receive timeout must outlast the batch's own timeout, or the client gives up on a batch
  that the server keeps running;
- SQL that relies on the dedup token alone needs a target whose dedup window covers a replay;
- the SQL of the first range is linted and planned by the engine (spec/sqlcheck.py): a typo or a
  column count that does not match stops here in one line, not after max_retries with backoff;
- a `publish` block names tables that EXCHANGE or REPLACE PARTITION accepts, checked before the
  first batch rather than after hours of copying.
"""
from __future__ import annotations

import logging

from migrator import tracking, transport

from ..errors import BackfillError, one_line
from ..spec import sqlast, sqlcheck
from . import dedup, tables
from .lease import lease_seconds

log = logging.getLogger("backfill")
TIMEOUT_MARGIN = 60.0  # seconds the client waits beyond the server's max_execution_time


def check(run, cluster: str | None) -> None:
    """Fill in the run's settings and refuse what would break exactly-once; one line per refusal."""
    meta = run.spec.meta
    if cluster:
        check_single_shard(run.client, cluster)
    check_receive_timeout(receive_timeout(run.client), meta["timeout_seconds"])
    if meta.get("publish") and not run.row.checkpoint.get("publish"):  # publishing moves the tables
        tables.check_tables(run.client, run.row.db_name, meta["publish"], run.spec.meta_path)
    run.read_settings, run.write_settings = dict(tracking.LATEST_READ), dict(tracking.QUORUM_WRITE)
    run.known_settings = run.keys.known_settings  # probed once per manager (ClickHouseBackfillManager.keyspace)
    sql, params = run.render(run.check_batch(), 0)
    shape = ask(run, "the preflight's parse of the first range", lambda: sqlast.parse(run.client, sql, params,
                                                                                     run.spec.sql_path))
    sqlcheck.warn(sqlcheck.lint(run.template, run.spec.sql_path, run.client, shape))
    sqlcheck.check_form(shape, run.spec.sql_path, run.skips_existing)
    explain_first_range(run, sql, params)
    run.target = shape.target_in(run.row.db_name)
    if run.skips_existing or run.target is None:  # None: a table function, refused unless the SQL skips existing keys
        return
    run.window = dedup.window(run.client, *run.target)
    try:
        dedup.check_window(run.target, run.window, meta["timeout_seconds"] + lease_seconds())
    except BackfillError as exc:  # BACKFILL_CHECKS=warn: run it anyway, to see what it does (exactly_once)
        sqlcheck.refuse(f"{run.spec.sql_path}: {exc}")


def ask(run, what: str, question, sleep=None):
    """A read of the preflight (the parse, the plan: nothing is written), asked again across a network or
    proxy fault; when the server stays out of reach the line says so and does not blame the SQL."""
    try:
        return transport.retry(question, what, **({"sleep": sleep} if sleep else {}))
    except BackfillError:
        raise
    except Exception as exc:
        if transport.cause(exc) is None:
            raise
        raise BackfillError(f"{one_line(exc)}; {what} of {run.spec.sql_path} did not run, nothing was written: "
                            f"run again") from None


def explain_first_range(run, sql: str, params: dict | None, sleep=None) -> None:
    """The engine's plan of the first range (nothing runs), asked again across a transport fault."""
    ask(run, "the preflight EXPLAIN of the first range", lambda: sqlcheck.explain(run.client, sql, params,
                                                                                 run.spec.sql_path), sleep)


def has_table_function(client, name: str) -> bool:
    """Whether the server has a table function (mergeTreeIndex arrived in ClickHouse 24.3)."""
    return bool(client.command("SELECT count() FROM system.table_functions WHERE name = {n:String}",
                               parameters={"n": name}))


def check_single_shard(client, cluster: str) -> None:
    """A backfill walks the source it can see: on a multi-shard cluster that is one shard's data only."""
    rows = client.query("SELECT shard_num, groupArray(host_name) FROM system.clusters WHERE cluster = {c:String} "
                        "GROUP BY shard_num ORDER BY shard_num", parameters={"c": cluster}).result_rows
    if not rows:
        raise BackfillError(f"--cluster {cluster}: no such cluster in system.clusters")
    if len(rows) > 1:
        shards = "; ".join(f"shard {num}: {', '.join(hosts)}" for num, hosts in rows)
        raise BackfillError(f"--cluster {cluster} has {len(rows)} shards ({shards}); a backfill would copy only the "
                            f"shard behind --url. 'migrate backfill run' with --cluster and an http(s) --url, or with "
                            f"--shards URL,URL,..., runs one walk per shard")


def receive_timeout(client) -> float | None:
    """The HTTP client's read timeout in seconds (None for the embedded engine, which has none)."""
    timeout = getattr(getattr(client, "_backend", None), "timeout", None)
    value = getattr(timeout, "read_timeout", None)
    return float(value) if isinstance(value, (int, float)) else None


def check_receive_timeout(read: float | None, batch_timeout: float) -> None:
    """`read` is the client's receive timeout (None: the embedded engine, which has none)."""
    if read is not None and read < batch_timeout + TIMEOUT_MARGIN:
        raise BackfillError(f"the HTTP receive timeout ({read:.0f}s) is shorter than the batch's timeout_seconds "
                            f"({batch_timeout:g}s) plus {TIMEOUT_MARGIN:.0f}s: the client would give up on a batch the "
                            f"server keeps running. Raise MIGRATE_RECEIVE_TIMEOUT or lower timeout_seconds in the meta")
