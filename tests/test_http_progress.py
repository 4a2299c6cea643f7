"""Errors that arrive after the first progress header, and queries cancelled by a client that went away.

clickhouse-connect asks every statement for progress headers (send_progress_in_http_headers), so a server
sends the status line, 200, with the first of them; an error after it can only be written into the body
(an exception block, with the final chunk left out on purpose). tests/chhttp.py writes them as the server
does, once http_headers_progress_interval_ms (here 100 ms, set in the meta's settings) has passed with
progress made; every error is the engine's own (a real max_memory_usage, max_execution_time or parse error).
And, as a server, it cancels a query at its first progress write after its client went away.
"""

# ruff: noqa: F811 - the HTTP suite's fixtures (hclient, hdb, hsetup) are imported and taken as arguments
from __future__ import annotations

import logging
import os
import subprocess
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from tests.conftest import MIGRATE, REPO, assert_copied_exactly, wait_until
from tests.test_faults import ANTI_JOIN, COPY_SQL, OOM_SETTINGS, OOM_SQL, OOM_UP, source_sql
from tests.test_http_endpoint import _batch_inserts, hclient, hdb, hsetup, migrate, ok  # noqa: F401 - fixtures

PROGRESS = {"http_headers_progress_interval_ms": 100}
# A set built from one row every 0.1 s: progress (rows read) for 0.3 s before the batch reads its range.
SLOW_START = "(SELECT sleepEachRow(0.1) + 1000 FROM numbers(3) SETTINGS max_block_size = 1)"


def _late(entry: dict) -> bool:
    """The error reached the client after the status line 200 and at least one progress header."""
    return entry["status"] == 200 and entry["progress_headers"] >= 1 and entry.get("error_code") is not None


def test_memory_limit_after_a_progress_header_halves_the_batch(http_endpoint, hclient, hdb, hsetup):
    """MEMORY_LIMIT_EXCEEDED (a real max_memory_usage) after the first progress header: the code is read from
    the exception block that follows the 200, the batch halves and the backfill ends exact. (Before the fix the
    client's IncompleteRead lost the code: the batch was retried at the same size until max_retries.)"""
    rows = 80_000
    sql = OOM_SQL.replace("WHERE {batch_range})", f"WHERE {{batch_range}} AND b NOT IN {SLOW_START})")
    root = hsetup(rows, 20_000, sql=sql, up=OOM_UP, min_batch_size=1000, settings={**OOM_SETTINGS, **PROGRESS})
    sleeps = []
    result = ClickHouseBackfillManager(hclient, migrations_dir=root, sleep=sleeps.append).run_backfill(hdb, 1)
    assert result["stopped"] == "completed" and result["current_batch_size"] < 20_000
    inserts = _batch_inserts(http_endpoint, hdb)
    ooms = [e for e in inserts if e.get("error_code") == 241]
    assert ooms and all(_late(e) for e in ooms), ooms
    assert any(e["status"] == 200 and e.get("error_code") is None and e["progress_headers"] for e in inserts)
    assert sleeps == []  # halved, never retried as a transport failure
    assert_copied_exactly(hclient, hdb, rows)


def test_timeout_after_a_progress_header_keeps_its_code_and_is_retried(
    http_endpoint,
    hclient,
    hdb,
    hsetup,
    caplog,
):
    """TIMEOUT_EXCEEDED (a real max_execution_time, timeout_seconds = 1) after progress headers: the attempt
    is retried like any error that is not in the SQL, and its line names the server's error. The first attempt
    builds a slow set (30 rows, 0.1 s each); the replay's ({retry_count} = 1) is empty. Nothing of the timed-out
    attempt was inserted (the set is built before any row is read); the target ends exact."""
    rows = 300
    slow = "(SELECT sleepEachRow(0.1) + 1000 FROM numbers(if({retry_count} = 0, 30, 0)) SETTINGS max_block_size = 1)"
    root = hsetup(rows, 300, sql=COPY_SQL + f" AND b NOT IN {slow}" + ANTI_JOIN, timeout_seconds=1, settings=PROGRESS)
    sleeps = []
    with caplog.at_level(logging.WARNING, logger="backfill"):
        result = ClickHouseBackfillManager(hclient, migrations_dir=root, sleep=sleeps.append).run_backfill(hdb, 1)
    assert result["stopped"] == "completed" and result["rows_processed"] == rows
    first = _batch_inserts(http_endpoint, hdb)[0]
    assert first["error_code"] == 159 and _late(first), first
    assert sleeps == [1]
    assert any(
        "Code: 159. DB::Exception: Timeout exceeded" in r.getMessage() and "retry 1 of" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert_copied_exactly(hclient, hdb, rows)


def test_an_error_in_the_sql_after_a_progress_header_is_not_retried(http_endpoint, hclient, hdb, hsetup):
    """A value the SQL cannot convert (a real CANNOT_PARSE_TEXT-family error, in PERMANENT_CODES) after
    progress headers: the run stops at once with the server's message, no retry, nothing copied."""
    rows = 200
    bad = (
        "(SELECT toUInt32(if(number < 3, toString(number), 'not a number')) + sleepEachRow(0.1) + 1000 "
        "FROM numbers(5) SETTINGS max_block_size = 1)"
    )
    root = hsetup(rows, 200, sql=COPY_SQL + f" AND b NOT IN {bad}", settings=PROGRESS)
    sleeps = []
    with pytest.raises(BackfillError, match=r"batch after the start failed: Code: (6|72)\. DB::Exception: "):
        ClickHouseBackfillManager(hclient, migrations_dir=root, sleep=sleeps.append).run_backfill(hdb, 1)
    inserts = _batch_inserts(http_endpoint, hdb)
    assert len(inserts) == 1 and _late(inserts[0]), inserts
    assert sleeps == []
    assert hclient.command(f"SELECT count() FROM {hdb}.dst") == 0


@pytest.mark.parametrize("replay", ["token", "anti-join"])
def test_orphan_cancelled_by_its_lost_client_then_replayed_exactly(http_endpoint, hclient, hdb, hsetup, replay):
    """No injected fault: `migrate backfill run` is killed (-9) while its batch INSERT runs (0.04 s a row,
    blocks of 10 rows). The endpoint finds the client gone at its next progress write and cancels the query
    (QUERY_WAS_CANCELLED), as a server does. Anti-join SQL commits block by block, so some blocks are in the
    target before the cancel; token-only SQL is squashed into one block (the framework's settings) and commits
    nothing. The next runner replays the range; the target ends exact either way."""
    rows = 60
    blocks = {
        "max_block_size": 10,
        "min_insert_block_size_rows": 10,
        "min_insert_block_size_bytes": 1,
        "max_threads": 1,
    }
    sql = COPY_SQL + " AND sleepEachRow(0.04) = 0" + (ANTI_JOIN if replay == "anti-join" else "")
    # granules of 10 rows: reading makes progress (so progress headers go out) every 10 rows, as a big table does
    up = source_sql(rows).replace(
        "ENGINE = MergeTree ORDER BY (a, b);", "ENGINE = MergeTree ORDER BY (a, b) SETTINGS index_granularity = 10;", 1
    )
    root = hsetup(rows, rows, sql=sql, up=up, settings={**PROGRESS, **blocks})
    env = {
        **os.environ,
        "CLICKHOUSE_URL": http_endpoint.url,
        "MIGRATE_DATABASE": hdb,
        "MIGRATE_DIR": str(root),
        "BACKFILL_LEASE_SECONDS": "1",
    }
    proc = subprocess.Popen(
        MIGRATE + ["backfill", "run", "1"], env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: _batch_inserts(http_endpoint, hdb), timeout=60)
        if replay == "anti-join":
            wait_until(lambda: hclient.command(f"SELECT count() FROM {hdb}.dst") >= 10, timeout=60)
        else:
            time.sleep(0.8)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    wait_until(lambda: "finished" in _batch_inserts(http_endpoint, hdb)[0], timeout=30)
    orphan = _batch_inserts(http_endpoint, hdb)[0]
    assert orphan.get("error_code") == 394 and orphan["client_gone"], orphan  # QUERY_WAS_CANCELLED by the endpoint
    committed = hclient.command(f"SELECT count() FROM {hdb}.dst")
    assert (0 < committed < rows) if replay == "anti-join" else committed == 0, committed
    time.sleep(1.2)  # the lease goes stale
    assert "completed" in ok(
        migrate(http_endpoint.url, hdb, root, "backfill", "run", "1", env={"BACKFILL_LEASE_SECONDS": "1"})
    )
    assert_copied_exactly(hclient, hdb, rows)
