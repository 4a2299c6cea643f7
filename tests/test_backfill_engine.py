"""The batch protocol on the real engine: ranges, exactly-once, OOM halving, params, hooks."""
from __future__ import annotations

import threading

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.render import Raw, escape, render
from migrator import hookimpl
from migrator.plugins import pm

HOSTILE = ["", "x'y", "a\\b", "é☃", "z", "new\nline", "tab\tq\\'", "'; DROP TABLE x; --"]

SRC = f"""
CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS index_granularity = 256;
INSERT INTO {{db}}.src SELECT [{", ".join(repr(h).replace('"', "'") if "'" not in h else "'" + h.replace(chr(92), chr(92)*2).replace("'", chr(92) + "'").replace(chr(10), chr(92) + "n").replace(chr(9), chr(92) + "t") + "'" for h in HOSTILE)}][number % {len(HOSTILE)} + 1],
    number % 5000, toString(number) FROM numbers(20000);
CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 1000;
"""
COPY_SQL = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
META = {"migration_version": 1, "batch_size": 1000, "checkpoint_columns": ["a", "b"], "source_table": "src",
        "min_batch_size": 10}


def fingerprint(client, table):
    return client.query(f"SELECT count(), sum(cityHash64(a, b, v)), uniqExact(a, b, v) FROM {table}").result_rows[0]


@pytest.fixture
def generic(ch_client, db, migrations, migrator_for):
    """Migration 1 (source with hostile keys, dedup-enabled target) applied; returns the manager."""
    def setup(meta=None, sql=COPY_SQL, up=SRC, **kw):
        root = migrations(1, "copy", up, "DROP TABLE {db}.src; DROP TABLE {db}.dst", sql, {**META, **(meta or {})})
        migrator_for(db, root).up()
        return ClickHouseBackfillManager(ch_client, migrations_dir=root, **kw)
    return setup


def test_hostile_composite_keys_copied_exactly_once(ch_client, db, generic):
    mgr = generic()
    assert mgr.get_status(db, 1)["status"] == "pending"  # registered by migrate up
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed"
    assert result["rows_processed"] == 20000
    assert fingerprint(ch_client, f"{db}.dst") == fingerprint(ch_client, f"{db}.src")
    keys = ch_client.query(f"SELECT DISTINCT a FROM {db}.dst ORDER BY a").result_rows
    assert sorted(k[0] for k in keys) == sorted(HOSTILE)


def test_max_batches_then_resume_from_checkpoint(ch_client, db, generic):
    mgr = generic()
    first = mgr.run_backfill(db, 1, max_batches=3)
    assert (first["status"], first["stopped"], first["batches_completed"]) == ("paused", "max batches", 3)
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == first["rows_processed"]
    assert mgr.resume_backfill(db, 1)["status"] == "completed"
    assert fingerprint(ch_client, f"{db}.dst") == fingerprint(ch_client, f"{db}.src")
    with pytest.raises(BackfillError, match=r"is completed; only a paused or failed backfill \(or one whose runner died\) can be resumed"):
        mgr.resume_backfill(db, 1)


def test_key_split_across_unmerged_parts_stays_in_one_batch(ch_client, db, generic):
    """Each key has rows in 3 unmerged parts; batch_size 7 puts boundaries inside a key's rows."""
    up = """CREATE TABLE {db}.src (k String, n UInt32) ENGINE = MergeTree ORDER BY k;
    SYSTEM STOP MERGES {db}.src;
    INSERT INTO {db}.src SELECT toString(number), 1 FROM numbers(500);
    INSERT INTO {db}.src SELECT toString(number), 2 FROM numbers(500);
    INSERT INTO {db}.src SELECT toString(number), 3 FROM numbers(500);
    CREATE TABLE {db}.dst (k String, total UInt64) ENGINE = MergeTree ORDER BY k
        SETTINGS non_replicated_deduplication_window = 1000"""
    sql = "INSERT INTO {db}.dst SELECT k, sum(n) FROM {db}.src WHERE {batch_range} GROUP BY k"
    mgr = generic({"checkpoint_columns": ["k"], "batch_size": 7, "min_batch_size": 1}, sql, up)
    assert ch_client.command(f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'src' AND active") == 3
    assert mgr.run_backfill(db, 1)["status"] == "completed"
    rows = ch_client.query(f"SELECT count(), countIf(total != 6), uniqExact(k) FROM {db}.dst").result_rows[0]
    assert rows == (500, 0, 500)  # every key aggregated whole, once


def test_batch_that_inserts_nothing_still_advances(ch_client, db, generic):
    sql = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND a = 'z'"
    mgr = generic(sql=sql)
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed" and result["rows_processed"] == 20000
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == ch_client.command(
        f"SELECT count() FROM {db}.src WHERE a = 'z'")


def test_replay_of_committed_batch_is_deduplicated(ch_client, db, generic):
    """Injected fault: the process 'dies' right after the INSERT commits, before the checkpoint write."""
    mgr = generic()

    class Crash(BaseException):
        pass

    real = mgr.ch_client.command
    calls = {"n": 0}

    class CrashingClient:
        def __getattr__(self, name):
            return getattr(ch_client, name)

        def command(self, sql, *a, **kw):
            out = real(sql, *a, **kw)
            if "INSERT INTO" in sql and f"{db}.dst" in sql:
                calls["n"] += 1
                if calls["n"] == 3:
                    raise Crash()
            return out

    mgr.ch_client = CrashingClient()
    with pytest.raises(Crash):
        mgr.run_backfill(db, 1)
    status = mgr.get_status(db, 1)
    assert status["checkpoint"]["in_flight"] is not None  # the write-ahead range survived the crash
    assert ch_client.command(f"SELECT count() FROM {db}.dst") > status["rows_processed"]  # batch 3 committed
    fresh = ClickHouseBackfillManager(ch_client, migrations_dir=mgr.migrations_dir)
    assert fresh.run_backfill(db, 1)["status"] == "completed"
    assert fingerprint(ch_client, f"{db}.dst") == fingerprint(ch_client, f"{db}.src")


def test_real_oom_halves_batch_and_completes(ch_client, db, generic):
    sql = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} "
           "GROUP BY a, b, v ORDER BY length(groupArray(repeat(v, 2000))) ")
    mgr = generic({"batch_size": 16000, "min_batch_size": 100, "settings": {"max_memory_usage": 60_000_000}}, sql)
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed"
    assert result["current_batch_size"] < 16000
    assert fingerprint(ch_client, f"{db}.dst") == fingerprint(ch_client, f"{db}.src")


def test_oom_below_min_batch_size_fails_and_keeps_checkpoint(ch_client, db, generic):
    sql = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} "
           "GROUP BY a, b, v ORDER BY length(groupArray(repeat(v, 20000)))")
    mgr = generic({"batch_size": 1000, "min_batch_size": 500, "settings": {"max_memory_usage": 20_000_000}}, sql)
    with pytest.raises(BackfillError, match="below min_batch_size 500"):
        mgr.run_backfill(db, 1)
    status = mgr.get_status(db, 1)
    assert status["status"] == "failed"
    assert "min_batch_size" in status["error_log"]
    assert status["checkpoint"]["in_flight"] is not None


def test_transient_error_retries_with_backoff_then_fails(ch_client, db, generic):
    """Real TIMEOUT_EXCEEDED (159) from max_execution_time; sleep is patched to record the backoff."""
    slept = []
    sql = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND sleepEachRow(0.001) = 0"
    mgr = generic({"timeout_seconds": 0.5, "max_retries": 2}, sql, sleep=slept.append)
    with pytest.raises(BackfillError, match="failed 3 times"):
        mgr.run_backfill(db, 1)
    assert slept == [1, 2]
    status = mgr.get_status(db, 1)
    assert status["status"] == "failed" and "TIMEOUT" in status["error_log"]


def test_pause_from_another_thread_stops_at_boundary(ch_client, db, generic):
    mgr = generic({"batch_size": 200})
    other = ClickHouseBackfillManager(ch_client, migrations_dir=mgr.migrations_dir)
    seen = threading.Event()

    def on_batch(summary, event):
        if event["number"] == 2:
            other.pause_backfill(db, 1)
            seen.set()

    result = mgr.run_backfill(db, 1, on_batch=on_batch)
    assert seen.is_set()
    assert (result["status"], result["stopped"]) == ("paused", "paused")
    assert result["batches_completed"] == 2
    assert other.resume_backfill(db, 1)["status"] == "completed"
    assert fingerprint(ch_client, f"{db}.dst") == fingerprint(ch_client, f"{db}.src")


def test_second_runner_refused_while_lease_is_fresh(ch_client, db, generic):
    mgr = generic({"batch_size": 200})
    second = ClickHouseBackfillManager(ch_client, migrations_dir=mgr.migrations_dir)
    errors = []

    def on_batch(summary, event):
        if event["number"] == 1:
            try:
                second.run_backfill(db, 1)
            except BackfillError as exc:
                errors.append(str(exc))

    assert mgr.run_backfill(db, 1, on_batch=on_batch)["status"] == "completed"
    assert len(errors) == 1 and "refusing a second runner" in errors[0]


def test_params_fixed_at_first_start_and_typed_placeholders(ch_client, db, generic):
    sql = ("INSERT INTO {db}.dst SELECT a, b, concat(v, '{suffix}') FROM {db}.src "
           "WHERE {batch_range} AND b < {limit:UInt32} AND b >= {floor}")
    mgr = generic({"params": {"suffix": "-'x", "limit": {"sql": "SELECT 4000"}, "floor": 10}}, sql)
    with pytest.raises(BackfillError, match="declares no such param"):
        mgr.run_backfill(db, 1, params={"nope": "1"})
    result = mgr.run_backfill(db, 1, max_batches=1, params={"floor": "100"})
    assert result["checkpoint"]["params"] == {"suffix": "-'x", "limit": 4000, "floor": 100}
    with pytest.raises(BackfillError, match="fixed at first start"):
        mgr.run_backfill(db, 1, params={"floor": "5"})
    mgr.run_backfill(db, 1)
    got = ch_client.query(f"SELECT count(), min(b), max(b), countIf(v NOT LIKE '%-''x') FROM {db}.dst").result_rows[0]
    want = ch_client.command(f"SELECT count() FROM {db}.src WHERE b < 4000 AND b >= 100")
    assert got == (want, 100, 3999, 0)


def test_third_party_placeholders_and_batch_events(ch_client, db, generic):
    events = []

    class Provider:
        @hookimpl
        def backfill_placeholders(self, backfill, checkpoint):
            return {"tenant": f"v{backfill.version}"}

        @hookimpl
        def backfill_batch_completed(self, backfill, batch):
            events.append(batch)

    pm.register(Provider(), name="test-provider")
    try:
        mgr = generic(sql="INSERT INTO {db}.dst SELECT a, b, '{tenant}' FROM {db}.src WHERE {batch_range}")
        mgr.run_backfill(db, 1)
    finally:
        pm.unregister(name="test-provider")
    assert ch_client.query(f"SELECT DISTINCT v FROM {db}.dst").result_rows == [("v1",)]
    assert len(events) == 20 and sum(e["rows"] for e in events) == 20000
    assert events[-1]["rows_processed"] == 20000


def test_unknown_placeholder_is_named(db, generic):
    mgr = generic(sql="INSERT INTO {db}.dst SELECT a, b, '{tennant}' FROM {db}.src WHERE {batch_range}")
    with pytest.raises(BackfillError, match=r"unknown placeholder \{tennant\}"):
        mgr.run_backfill(db, 1)


def test_dry_run_writes_nothing(ch_client, db, generic):
    mgr = generic()
    before = ch_client.command("SELECT count() FROM db_management.backfills")
    out = mgr.run_backfill(db, 1, dry_run=True)
    assert out["rows_remaining"] == 20000 and out["first_batch"]["rows"] == 1000
    assert out["first_batch"]["start"] is None and f"{db}.dst" in out["sql"]
    assert ch_client.command("SELECT count() FROM db_management.backfills") == before
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_list_includes_discovered_and_rollback_resets(ch_client, db, generic, migrator_for):
    mgr = generic()
    mgr.run_backfill(db, 1, max_batches=1)
    [item] = mgr.list_backfills(db)
    assert (item["status"], item["rows_processed"]) == ("paused", 1000)
    migrator_for(db, mgr.migrations_dir).down(0)
    assert mgr.list_backfills(db)[0]["status"] == "pending"
    assert mgr.get_status(db, 1, live_counts=False)["rows_processed"] == 0


def test_corrupt_checkpoint_is_an_error_not_a_restart(ch_client, db, generic):
    mgr = generic()
    mgr.run_backfill(db, 1, max_batches=1)
    ch_client.command(
        "INSERT INTO db_management.backfills (backfill_id, migration_version, db_name, status, checkpoint_data, "
        f"rows_processed, version) VALUES ('{db}_1', 1, '{db}', 'paused', '{{not json', 1000, 18446744073709551000)")
    with pytest.raises(BackfillError, match="is corrupt .* reset 1 --yes"):
        mgr.run_backfill(db, 1)
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 1000


def test_escape_and_render():
    assert escape("a'b\\c") == "a\\'b\\\\c"
    assert escape(3) == "3" and escape(Raw("x > 'y'")) == "x > 'y'"
    sql, params = render("SELECT '{s}', {n}, {t:String}", {"s": "it's", "n": 5, "t": "q'"})
    assert sql == "SELECT 'it\\'s', 5, {t:String}" and params == {"t": "q'"}


def test_heartbeat_keeps_the_lease_fresh_during_a_long_batch(ch_client, db, generic, monkeypatch):
    """A batch longer than the lease: without a heartbeat running beside the batch the lease would go
    stale and a second runner would take over mid-batch."""
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.8")
    sql = COPY_SQL + " AND sleepEachRow(0.0025) = 0"  # ~2.5 s for the one batch of 1000 rows
    mgr = generic({"batch_size": 1000}, sql, up=SRC.replace("numbers(20000)", "numbers(1000)"))
    own = ch_client if not hasattr(ch_client, "path") else __import__("clickhouse_connect").get_client(
        dsn=f"chdb://{ch_client.path}")  # a second operator's own client: the runner's is busy
    second = ClickHouseBackfillManager(own, migrations_dir=mgr.migrations_dir)
    outcome = {}

    def try_second():
        import time
        time.sleep(1.6)  # two lease lengths into the batch
        try:
            outcome["result"] = second.run_backfill(db, 1)
        except BackfillError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=try_second)
    thread.start()
    assert mgr.run_backfill(db, 1)["status"] == "completed"
    thread.join(30)
    assert "refusing a second runner" in outcome.get("error", ""), outcome
    assert fingerprint(ch_client, f"{db}.dst") == fingerprint(ch_client, f"{db}.src")


def test_reset_keeps_first_start_params_as_defaults_and_param_overrides(ch_client, db, generic):
    """A cutover-like param recomputed after a reset would describe the copy, not the deploy."""
    sql = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND b < {limit}"
    mgr = generic({"params": {"limit": {"sql": "SELECT count() FROM {db}.dst"}}}, sql)
    mgr.run_backfill(db, 1, params={"limit": "3000"})
    mgr.reset_backfill(db, 1)
    ch_client.command(f"TRUNCATE TABLE {db}.dst")
    ch_client.command(f"INSERT INTO {db}.dst VALUES ('q', 1, 'x')")  # the SQL default would now say 1
    assert mgr.run_backfill(db, 1)["checkpoint"]["params"] == {"limit": 3000}
    mgr.reset_backfill(db, 1)
    assert mgr.run_backfill(db, 1, params={"limit": "10"})["checkpoint"]["params"] == {"limit": 10}
