"""A batch reads its key range on every thread the engine has, even when the range is a small slice of a part."""
from __future__ import annotations

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.protocol.attempt import BATCH_READ, untagged
from tests.test_migrator_cluster import Recorder
from tests.test_protocol_guards import ANTI_JOIN, META, UP


def _read_streams(client, sql: str, settings: dict) -> str:
    plan = [r[0] for r in client.query(f"EXPLAIN PIPELINE {sql}", settings={**settings, "max_threads": 2}).result_rows]
    return next(line.strip() for line in plan if "MergeTreeSelect" in line)


def test_a_range_of_one_part_is_read_on_both_threads_with_the_batch_settings(ch_client, db):
    """100k rows of a 1M-row part, as a merged source gives a 100k-row batch: under the engine's
    defaults (163,840 rows per part) one thread reads it; with the batch's settings both do."""
    ch_client.command(f"CREATE TABLE {db}.one (k UInt64, v String) ENGINE = MergeTree ORDER BY k")
    ch_client.command(f"INSERT INTO {db}.one SELECT number, repeat('x', 50) FROM numbers(1000000)")
    assert ch_client.command(f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'one' AND active") == 1
    sql = f"SELECT sum(length(v)) FROM {db}.one WHERE k > 100000 AND k <= 200000"
    assert "× 2" not in _read_streams(ch_client, sql, {})
    assert "× 2" in _read_streams(ch_client, sql, BATCH_READ)


def test_every_batch_insert_sends_the_read_settings_and_the_meta_overrides_them(ch_client, db, migrations,
                                                                                migrator_for):
    root = migrations(1, "copy", UP, "SELECT 1", ANTI_JOIN,
                      {**META, "settings": {"merge_tree_min_rows_for_concurrent_read": 4096}})
    migrator_for(db, root).up()
    recorder = Recorder(ch_client)
    assert ClickHouseBackfillManager(recorder, migrations_dir=root).run_backfill(db, 1)["status"] == "completed"
    batches = [s for sql, s in recorder.sent if untagged(sql).lstrip().startswith(f"INSERT INTO {db}.dst")]
    assert len(batches) == 4, batches
    assert all(s["merge_tree_min_rows_for_concurrent_read"] == 4096 for s in batches), batches
    assert all(s["merge_tree_min_bytes_for_concurrent_read"] == BATCH_READ["merge_tree_min_bytes_for_concurrent_read"]
               for s in batches), batches
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 4000
