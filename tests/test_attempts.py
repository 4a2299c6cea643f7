"""No two attempts of one batch at once: an abandoned attempt that the engine keeps running is killed
before the retry, the replay or the takeover that follows.

On a server an INSERT ... SELECT keeps running after its client stops waiting (an HTTP read timeout,
a second Ctrl-C, kill -9 of the runner). The embedded engine shows the same behaviour when a second
chDB handle in the same process keeps executing the query that the runner's client gave up on: it is
listed in `system.processes`, and `KILL QUERY ... SYNC` ends it there. The client that gives up is
the injected fault (the engine cannot make an HTTP client time out); the orphaned query, its blocks,
the kill and the retry are all real.
"""
from __future__ import annotations

import threading
import time

import clickhouse_connect
import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import LeaseLost
from backfill_plugin.protocol.attempt import MARKER, Attempts

ROWS = 2000
UP = f"""
CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS index_granularity = 100;
INSERT INTO {{db}}.src SELECT ['', 'x''y', 'b\\\\s', 'é'][number % 4 + 1], number, toString(number * 7)
    FROM numbers({ROWS});
CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 1000;
"""
# 3 ms a row, read and inserted in blocks of 100 rows: a batch of 1,000 rows takes about 3 s and
# commits a block every 0.3 s.
SLOW = "sleepEachRow(0.003) = 0"
ANTI_JOIN = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND " + SLOW +
             " AND (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range} AND {retry_count} > 0)")
TOKEN_ONLY = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND " + SLOW
META = {"migration_version": 1, "batch_size": 1000, "checkpoint_columns": ["a", "b"], "source_table": "src",
        "min_batch_size": 10, "max_retries": 2,
        "settings": {"max_block_size": 100, "min_insert_block_size_rows": 100, "max_threads": 1,
                     "optimize_move_to_prewhere": 0}}


def other_handle(client):
    """A second handle on the same store: what keeps running a query its client abandoned."""
    return clickhouse_connect.get_client(dsn=f"chdb://{client.path}") if hasattr(client, "path") else client


def exact(client, db) -> tuple:
    """(rows, duplicate keys, src == dst over every column) of the target."""
    fp = "SELECT count(), groupBitXor(cityHash64(a, b, v)), sum(cityHash64(a, b, v)) FROM {db}.{t}"
    src = client.query(fp.format(db=db, t="src")).result_rows[0]
    dst = client.query(fp.format(db=db, t="dst")).result_rows[0]
    dups = client.command(f"SELECT count() FROM (SELECT a, b FROM {db}.dst GROUP BY a, b HAVING count() > 1)")
    return dst[0], dups, src == dst


class GivesUp:
    """The runner's client, except that on the `which`-th batch attempt it hands the query to another
    handle and stops waiting after `after` seconds, as an HTTP client whose read timeout expired."""

    def __init__(self, client, which: int, after: float, then=None):
        self.client, self.which, self.after, self.then = client, which, after, then
        self.seen, self.orphans, self.orphan_errors = 0, [], []
        self.orphan_handle = other_handle(client)

    def __getattr__(self, name):
        return getattr(self.client, name)

    def command(self, sql, *args, **kwargs):
        if not sql.startswith(f"/* {MARKER} "):
            return self.client.command(sql, *args, **kwargs)
        self.seen += 1
        if self.seen != self.which:
            return self.client.command(sql, *args, **kwargs)

        def orphan():
            try:
                self.orphan_handle.command(sql, *args, **kwargs)
            except Exception as exc:  # KILL QUERY ends it with QUERY_WAS_CANCELLED
                self.orphan_errors.append(str(exc))

        thread = threading.Thread(target=orphan, daemon=True)
        thread.start()
        self.orphans.append(thread)
        time.sleep(self.after)
        if self.then is not None:
            self.then()
        raise TimeoutError(f"read timed out after {self.after}s (the server goes on)")


@pytest.fixture
def setup(ch_client, db, migrations, migrator_for):
    def make(sql):
        root = migrations(1, "copy", UP, "DROP TABLE {db}.src; DROP TABLE {db}.dst", sql, META)
        migrator_for(db, root).up()
        return root
    return make


@pytest.mark.parametrize("sql", [ANTI_JOIN, TOKEN_ONLY], ids=["anti-join", "token-only"])
@pytest.mark.parametrize("after", [0.15, 1.5], ids=["before-first-block", "after-some-blocks"])
def test_retry_after_an_abandoned_attempt_is_exact(ch_client, db, setup, sql, after):
    """Batch 2's first attempt is abandoned by its client while the engine keeps executing it."""
    root = setup(sql)
    runner = GivesUp(ch_client, which=2, after=after)
    mgr = ClickHouseBackfillManager(runner, migrations_dir=root, sleep=lambda s: None)
    committed_when_abandoned = []
    runner.then = lambda: committed_when_abandoned.append(ch_client.command(f"SELECT count() FROM {db}.dst"))
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed" and result["rows_processed"] == ROWS
    assert exact(ch_client, db) == (ROWS, 0, True)
    for thread in runner.orphans:
        thread.join(60)
    assert runner.orphan_errors and "QUERY_WAS_CANCELLED" in runner.orphan_errors[0]  # killed, not finished
    assert exact(ch_client, db) == (ROWS, 0, True)  # and nothing arrived after the kill either
    if after > 1 and sql is ANTI_JOIN:
        assert committed_when_abandoned[0] > 1000  # batch 1 plus some blocks of the orphaned batch 2
    assert not Attempts(ch_client).running(f"{db}_1")


def test_takeover_kills_the_dead_runners_attempt_first(ch_client, db, setup, monkeypatch):
    """Runner A's process 'dies' mid-batch: its heartbeat stops and its thread never returns (the injected
    fault), while its INSERT goes on in the engine. Runner B takes over once the lease is stale."""
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "1")
    root = setup(ANTI_JOIN)
    resume = threading.Event()
    client_a = other_handle(ch_client)
    runner = GivesUp(client_a, which=2, after=1.0, then=resume.wait)
    first = ClickHouseBackfillManager(runner, migrations_dir=root, sleep=lambda s: None)
    monkeypatch.setattr(first, "_beat", lambda: None)  # a dead process sends no heartbeat
    outcome = {}

    def run_a():
        try:
            outcome["result"] = first.run_backfill(db, 1)
        except BaseException as exc:  # noqa: BLE001 - the outcome is asserted below
            outcome["error"] = exc

    thread_a = threading.Thread(target=run_a, daemon=True)
    thread_a.start()
    deadline = time.time() + 60
    while not runner.orphans:  # A's batch 2 is in the engine; A has not beaten since its claim
        time.sleep(0.05)
        assert time.time() < deadline
    time.sleep(0.3)  # a block or so into the orphaned batch; A's lease (1 s, never renewed) is stale
    second = ClickHouseBackfillManager(other_handle(ch_client), migrations_dir=root, sleep=lambda s: None)
    result = second.run_backfill(db, 1)
    assert result["status"] == "completed"
    assert exact(ch_client, db) == (ROWS, 0, True)
    runner.orphans[0].join(60)
    assert runner.orphan_errors and "QUERY_WAS_CANCELLED" in runner.orphan_errors[0]
    resume.set()  # the 'dead' runner comes back: it must notice the takeover and write nothing
    thread_a.join(60)
    assert isinstance(outcome.get("error"), LeaseLost), outcome
    assert second.get_status(db, 1, live_counts=False)["status"] == "completed"
    assert exact(ch_client, db) == (ROWS, 0, True)
