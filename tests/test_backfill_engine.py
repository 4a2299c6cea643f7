"""The batch protocol on the real engine: ranges, exactly-once, OOM halving, params, hooks.

Pausing from another thread, a second runner, OOM below min_batch_size, retries with backoff and a
crash after an INSERT are tested once, in test_faults.py.
"""
from __future__ import annotations

import threading
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.spec.render import Raw, escape, render
from migrator import hookimpl
from migrator.plugins import pm
from tests.conftest import assert_copied_exactly, assert_copied_through, own_client

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
ROW = "a, b, v"  # SRC repeats each (a, b) 4 times with different v: a row is (a, b, v)


@pytest.fixture
def copy_manager(ch_client, shared_store_backfill):
    """copy_manager(meta, sql, up) -> a manager over version 1 (hostile keys, dedup-enabled target) applied
    to this test's database on the shared store."""
    def setup(meta=None, sql=COPY_SQL, up=SRC, **kw):
        root = shared_store_backfill(up, sql, {**META, **(meta or {})})
        manager = ClickHouseBackfillManager(ch_client, migrations_dir=root, **kw)
        manager.root = root
        return manager
    return setup


def test_hostile_composite_keys_copied_exactly_once(ch_client, db, copy_manager):
    mgr = copy_manager()
    assert mgr.get_status(db, 1)["status"] == "pending"  # registered by migrate up
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed"
    assert result["rows_processed"] == 20000
    assert_copied_exactly(ch_client, db, 20000, keys=ROW)
    keys = ch_client.query(f"SELECT DISTINCT a FROM {db}.dst ORDER BY a").result_rows
    assert sorted(k[0] for k in keys) == sorted(HOSTILE)


def test_max_batches_then_resume_from_checkpoint(ch_client, db, copy_manager):
    mgr = copy_manager()
    first = mgr.run_backfill(db, 1, max_batches=3)
    assert (first["status"], first["stopped"], first["batches_completed"]) == ("paused", "max batches", 3)
    assert_copied_through(ch_client, db, first["position"], first["rows_processed"], keys=ROW)
    assert mgr.resume_backfill(db, 1)["status"] == "completed"
    assert_copied_exactly(ch_client, db, 20000, keys=ROW)
    with pytest.raises(BackfillError, match=r"is completed; only a paused or failed backfill \(or one whose runner died\) can be resumed"):
        mgr.resume_backfill(db, 1)


def test_key_split_across_unmerged_parts_stays_in_one_batch(ch_client, db, copy_manager):
    """Each key has rows in 3 unmerged parts; batch_size 7 puts boundaries inside a key's rows."""
    up = """CREATE TABLE {db}.src (k String, n UInt32) ENGINE = MergeTree ORDER BY k;
    SYSTEM STOP MERGES {db}.src;
    INSERT INTO {db}.src SELECT toString(number), 1 FROM numbers(500);
    INSERT INTO {db}.src SELECT toString(number), 2 FROM numbers(500);
    INSERT INTO {db}.src SELECT toString(number), 3 FROM numbers(500);
    CREATE TABLE {db}.dst (k String, total UInt64) ENGINE = MergeTree ORDER BY k
        SETTINGS non_replicated_deduplication_window = 1000"""
    sql = "INSERT INTO {db}.dst SELECT k, sum(n) FROM {db}.src WHERE {batch_range} GROUP BY k"
    mgr = copy_manager({"checkpoint_columns": ["k"], "batch_size": 7, "min_batch_size": 1}, sql, up)
    assert ch_client.command(f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'src' AND active") == 3
    assert mgr.run_backfill(db, 1)["status"] == "completed"
    assert ch_client.command(f"SELECT countIf(total != 6) FROM {db}.dst") == 0  # every key aggregated whole
    assert_copied_exactly(ch_client, db, 500, keys="k", expected=f"(SELECT k, sum(n) FROM {db}.src GROUP BY k)")


def test_batch_that_inserts_nothing_still_advances(ch_client, db, copy_manager):
    sql = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND a = 'z'"
    mgr = copy_manager(sql=sql)
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed" and result["rows_processed"] == 20000
    assert_copied_exactly(ch_client, db, 2500, keys=ROW, src_where="a = 'z'")


def test_real_oom_halves_batch_and_completes(ch_client, db, copy_manager):
    sql = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} "
           "GROUP BY a, b, v ORDER BY length(groupArray(repeat(v, 2000))) ")
    mgr = copy_manager({"batch_size": 16000, "min_batch_size": 100, "settings": {"max_memory_usage": 60_000_000}}, sql)
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed"
    assert result["current_batch_size"] < 16000
    assert_copied_exactly(ch_client, db, 20000, keys=ROW)


def test_params_fixed_at_first_start_and_typed_placeholders(ch_client, db, copy_manager):
    sql = ("INSERT INTO {db}.dst SELECT a, b, concat(v, '{suffix}') FROM {db}.src "
           "WHERE {batch_range} AND b < {limit:UInt32} AND b >= {floor}")
    mgr = copy_manager({"params": {"suffix": "-'x", "limit": {"sql": "SELECT 4000"}, "floor": 10}}, sql)
    with pytest.raises(BackfillError, match="declares no such param"):
        mgr.run_backfill(db, 1, params={"nope": "1"})
    result = mgr.run_backfill(db, 1, max_batches=1, params={"floor": "100"})
    assert result["checkpoint"]["params"] == {"suffix": "-'x", "limit": 4000, "floor": 100}
    with pytest.raises(BackfillError, match="fixed at first start"):
        mgr.run_backfill(db, 1, params={"floor": "5"})
    mgr.run_backfill(db, 1)
    assert_copied_exactly(ch_client, db, 15600, keys=ROW,
                          expected=f"(SELECT a, b, concat(v, '-\\'x') AS v FROM {db}.src WHERE b < 4000 AND b >= 100)")


def test_third_party_placeholders_and_batch_events(ch_client, db, copy_manager):
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
        mgr = copy_manager(sql="INSERT INTO {db}.dst SELECT a, b, '{tenant}' FROM {db}.src WHERE {batch_range}")
        mgr.run_backfill(db, 1)
    finally:
        pm.unregister(name="test-provider")
    assert_copied_exactly(ch_client, db, 20000, expected=f"(SELECT a, b, 'v1' FROM {db}.src)", unique_keys=False)
    assert len(events) == 20 and sum(e["rows"] for e in events) == 20000
    assert events[-1]["rows_processed"] == 20000


def test_unknown_placeholder_is_named(db, copy_manager):
    """A plugin may provide a placeholder only at run time (from its environment), so `up` lets an
    unknown one pass; the run names it before the first batch."""
    mgr = copy_manager(sql="INSERT INTO {db}.dst SELECT a, b, '{tennant}' FROM {db}.src WHERE {batch_range}")
    with pytest.raises(BackfillError, match=r"001_x\.backfill\.sql: unknown placeholder \{tennant\}"):
        mgr.run_backfill(db, 1)


def test_dry_run_writes_nothing(ch_client, db, copy_manager):
    mgr = copy_manager()
    before = ch_client.command("SELECT count() FROM db_management.backfills")
    out = mgr.run_backfill(db, 1, dry_run=True)
    assert out["rows_remaining"] == 20000 and out["first_batch"]["rows"] == 1000
    assert out["first_batch"]["start"] is None and f"{db}.dst" in out["sql"]
    assert ch_client.command("SELECT count() FROM db_management.backfills") == before
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_list_includes_discovered_and_rollback_resets(ch_client, db, copy_manager, migrator_for):
    mgr = copy_manager()
    mgr.run_backfill(db, 1, max_batches=1)
    [item] = mgr.list_backfills(db)
    assert (item["status"], item["rows_processed"]) == ("paused", 1000)
    migrator_for(db, mgr.root).down(0)
    assert mgr.list_backfills(db)[0]["status"] == "pending"
    assert mgr.get_status(db, 1, live_counts=False)["rows_processed"] == 0


def test_corrupt_checkpoint_is_an_error_not_a_restart(ch_client, db, copy_manager):
    mgr = copy_manager()
    position = mgr.run_backfill(db, 1, max_batches=1)["position"]
    ch_client.command(
        "INSERT INTO db_management.backfills (backfill_id, migration_version, db_name, status, checkpoint_data, "
        f"rows_processed, version) VALUES ('{db}_1', 1, '{db}', 'paused', '{{not json', 1000, 18446744073709551000)")
    with pytest.raises(BackfillError, match="is corrupt .* reset 1 --yes"):
        mgr.run_backfill(db, 1)
    assert_copied_through(ch_client, db, position, 1000, keys=ROW)  # nothing more ran


def test_escape_and_render():
    assert escape("a'b\\c") == "a\\'b\\\\c"
    assert escape(3) == "3" and escape(Raw("x > 'y'")) == "x > 'y'"
    sql, params = render("SELECT '{s}', {n}, {t:String}", {"s": "it's", "n": 5, "t": "q'"})
    assert sql == "SELECT 'it\\'s', 5, {t:String}" and params == {"t": "q'"}


def test_heartbeat_keeps_the_lease_fresh_during_a_long_batch(ch_client, store_url, db, copy_manager, monkeypatch):
    """A batch longer than the lease: without a heartbeat running beside the batch the lease would go
    stale and a second runner would take over mid-batch."""
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.8")
    sql = COPY_SQL + " AND sleepEachRow(0.0025) = 0"  # ~2.5 s for the one batch of 1000 rows
    mgr = copy_manager({"batch_size": 1000}, sql, up=SRC.replace("numbers(20000)", "numbers(1000)"))
    second = ClickHouseBackfillManager(own_client(store_url), migrations_dir=mgr.root)
    outcome = {}

    def try_second():
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
    assert_copied_exactly(ch_client, db, 1000, keys=ROW)


def test_reset_keeps_first_start_params_as_defaults_and_param_overrides(ch_client, db, copy_manager):
    """A cutover-like param recomputed after a reset would describe the copy, not the deploy."""
    sql = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND b < {limit}"
    mgr = copy_manager({"params": {"limit": {"sql": "SELECT count() FROM {db}.dst"}}}, sql)
    mgr.run_backfill(db, 1, params={"limit": "3000"})
    mgr.reset_backfill(db, 1)
    ch_client.command(f"TRUNCATE TABLE {db}.dst")
    ch_client.command(f"INSERT INTO {db}.dst VALUES ('q', 1, 'x')")  # the SQL default would now say 1
    assert mgr.run_backfill(db, 1)["checkpoint"]["params"] == {"limit": 3000}
    mgr.reset_backfill(db, 1)
    assert mgr.run_backfill(db, 1, params={"limit": "10"})["checkpoint"]["params"] == {"limit": 10}


def test_batch_ends_from_the_primary_index_copy_hostile_keys_exactly_once(ch_client, db, copy_manager, monkeypatch):
    """Large batches take their end from the granule marks (mergeTreeIndex): here with 16-row granules
    in two unmerged parts whose keys interleave, so marks of both parts decide every end."""
    up = SRC.replace("index_granularity = 256", "index_granularity = 16").replace(
        "INSERT INTO {db}.src", "SYSTEM STOP MERGES {db}.src;\nINSERT INTO {db}.src", 1)
    up += "INSERT INTO {db}.src SELECT 'é☃', 100000 + number, 'late' FROM numbers(3000);\n"
    from backfill_plugin.protocol.keys import KeySpace
    monkeypatch.setattr(KeySpace, "index_min_rows", 100)
    placed = []
    original = KeySpace._end_from_index

    def spy(self, *args):
        found = original(self, *args)
        placed.append(found is not None)
        return found
    monkeypatch.setattr(KeySpace, "_end_from_index", spy)
    mgr = copy_manager({"batch_size": 700, "min_batch_size": 100}, up=up)
    result = mgr.run_backfill(db, 1)
    assert result["status"] == "completed" and result["rows_processed"] == 23000
    assert sum(placed) >= 20, placed  # the index placed most ends; the tail read rows
    assert_copied_exactly(ch_client, db, 23000, keys=ROW)
