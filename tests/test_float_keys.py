"""Float checkpoint columns: NaN, +-inf, -0.0 and denormals are copied exactly once, and no run reports
`completed` while source rows lie outside the key space it walked.

A comparison with NaN is false, so a plain range predicate never selects a NaN key: before this, a
source ordered by (f Float64, id) with 2,000 NaN values completed with 18,100 of 20,100 rows copied.
"""
from __future__ import annotations

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.protocol import keys
from tests.conftest import assert_copied_exactly

# 20,100 rows: 2,000 NaN (half of them -nan), 100 at +-inf, -0.0 and 0.0, denormals, ordinary values.
VALUES = ("multiIf(number < 2000, if(number % 2 = 0, nan, -nan), number < 2050, inf, number < 2100, -inf, "
          "number < 2200, -0.0, number < 2300, 0.0, number < 2400, 5e-324 * (number % 3 + 1), "
          "number < 2500, -2.2250738585072014e-308, (number % 997) / 7)")


def up(order_by: str) -> str:
    return f"""
CREATE TABLE {{db}}.src (g String, f Float64, id UInt32, v String) ENGINE = MergeTree ORDER BY ({order_by})
    SETTINGS index_granularity = 128;
INSERT INTO {{db}}.src SELECT toString(number % 3), {VALUES}, number, toString(number) FROM numbers(20100);
CREATE TABLE {{db}}.dst (g String, f Float64, id UInt32, v String) ENGINE = MergeTree ORDER BY ({order_by})
    SETTINGS non_replicated_deduplication_window = 1000;
"""


COPY = "INSERT INTO {db}.dst SELECT g, f, id, v FROM {db}.src WHERE {batch_range}"
ROW = "g, f, id, v"  # NaN = NaN is false: the fingerprint's hash sees the bytes, uniqExact the key


def meta(columns: list[str], batch_size: int) -> dict:
    return {"migration_version": 1, "batch_size": batch_size, "checkpoint_columns": columns,
            "source_table": "src", "min_batch_size": 10}


@pytest.mark.parametrize("order_by, columns, batch_size", [
    ("f, id", ["f", "id"], 700),           # NaN tail of the first column, walked after +inf
    ("f, id", ["f"], 700),                 # one column: the NaN rows are one key, one batch
    ("g, f, id", ["g", "f", "id"], 500),   # NaN inside each value of g
])
def test_nan_inf_signed_zero_and_denormal_keys_copied_exactly_once(ch_client, db, shared_store_backfill, order_by,
                                                                   columns, batch_size):
    root = shared_store_backfill(up(order_by), COPY, meta(columns, batch_size))
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)
    assert result["status"] == "completed" and result["rows_processed"] == 20100
    assert_copied_exactly(ch_client, db, 20100, keys="g, f, id" if len(columns) > 1 else "f, id, g")
    nan = ch_client.command(f"SELECT countIf(isNaN(f)) FROM {db}.dst")
    assert nan == 2000


def test_index_batch_ends_walk_into_the_nan_tail(ch_client, db, shared_store_backfill, monkeypatch):
    """Batch ends from the primary index (mergeTreeIndex) place NaN marks after +inf as the table sorts."""
    monkeypatch.setattr(keys.KeySpace, "index_min_rows", 300)
    root = shared_store_backfill(up("f, id"), COPY, meta(["f", "id"], 600))
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    status = manager.get_status(db, 1)
    assert status["rows_remaining"] >= 20100 - 2 * 128  # the estimate counts the NaN tail from its marks
    assert manager.run_backfill(db, 1)["rows_processed"] == 20100
    assert_copied_exactly(ch_client, db, 20100, keys="g, f, id")


def test_a_run_whose_walk_skips_rows_is_not_completed(ch_client, db, shared_store_backfill, monkeypatch):
    """The completion check on its own: the predicates are put back as they were before NaN was handled
    (plain comparisons, which select no NaN key), and the run must stop instead of reporting completed."""
    def plain(self, col, op, value, nan_above=True):
        return f"{col} {op} {keys.literal(value)}"
    monkeypatch.setattr(keys.KeySpace, "_cmp", plain)
    monkeypatch.setattr(keys.KeySpace, "_areas", lambda self, position, until: [(self._between(position, until), True)])
    root = shared_store_backfill(up("f, id"), COPY, meta(["f", "id"], 700))
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    with pytest.raises(BackfillError) as failed:
        manager.run_backfill(db, 1)
    message = str(failed.value)
    assert "2,000 rows of" in message and "outside the walked key space" in message and "nan" in message
    assert "\n" not in message
    status = manager.get_status(db, 1)
    assert status["status"] == "failed" and "2,000 rows" in status["error_log"]
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 18100
