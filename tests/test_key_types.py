"""Key values the walk holds exactly: a position is read back by the engine as the value it was taken from.

Before, a DateTime position was kept as local wall-clock text (two instants in the hour a clock change
repeats) and a wide integer was rendered as a bare number (read by the engine as Float64): rows lost
and copied twice, and a walk that never ends. Both cases below looped for ever on that code.
"""

from __future__ import annotations

import json

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.protocol.checkpoint import backfill_id
from backfill_plugin.spec import keytypes
from tests.conftest import assert_copied_exactly

COPY = "INSERT INTO {db}.dst SELECT * FROM {db}.src WHERE {batch_range}"


def up(columns: str, order_by: str, rows: str) -> str:
    return (
        f"CREATE TABLE {{db}}.src ({columns}) ENGINE = MergeTree ORDER BY {order_by};\n"
        f"INSERT INTO {{db}}.src {rows};\n"
        f"CREATE TABLE {{db}}.dst ({columns}) ENGINE = MergeTree ORDER BY {order_by} "
        f"SETTINGS non_replicated_deduplication_window = 1000;\n"
    )


def meta(columns: list[str], batch_size: int) -> dict:
    return {
        "migration_version": 1,
        "batch_size": batch_size,
        "checkpoint_columns": columns,
        "source_table": "src",
        "min_batch_size": 1,
    }


# One row a minute across the night of 2025-10-26 in Berlin: 02:00-02:59 happens twice.
BERLIN = up(
    "at DateTime('Europe/Berlin'), v UInt32",
    "at",
    "SELECT toDateTime('2025-10-26 00:00:00', 'Europe/Berlin') + number * 60, number FROM numbers(300)",
)


def test_datetime_key_across_a_repeated_hour_is_copied_exactly_once(ch_client, db, shared_store_backfill):
    root = shared_store_backfill(BERLIN, COPY, meta(["at"], 50))
    repeated = f"SELECT count(), uniqExact(at) FROM {db}.src WHERE startsWith(toString(at), '2025-10-26 02:')"
    assert ch_client.query(repeated).result_rows == [(120, 120)]  # 60 local times, each twice
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1, max_batches=20)
    assert result["status"] == "completed" and result["rows_processed"] == 300
    assert_copied_exactly(ch_client, db, 300, keys="at, v")
    assert all(isinstance(v, int) for v in result["position"])  # epoch seconds, not local text


def test_uint128_keys_past_2_64_are_copied_exactly_once(ch_client, db, shared_store_backfill):
    rows = "SELECT toUInt128('18446744073709551616') + number, number FROM numbers(1000)"
    root = shared_store_backfill(up("k UInt128, v UInt32", "k", rows), COPY, meta(["k"], 100))
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1, max_batches=30)
    assert result["status"] == "completed" and result["rows_processed"] == 1000
    assert result["position"] == [2**64 + 999]
    assert_copied_exactly(ch_client, db, 1000, keys="k, v")


def test_a_checkpoint_in_the_older_text_form_resumes_exactly(ch_client, db, shared_store_backfill):
    """A backfill upgraded mid-way: its position was stored by the previous version as text (DateTime as
    local time, Enum as its name) and still reads back as the same key."""
    rows = (
        "SELECT toDateTime('2025-10-26 00:00:00', 'Europe/Berlin') + intDiv(number, 2) * 60, "
        "if(number % 2, 'b', 'a'), number FROM numbers(600)"
    )
    root = shared_store_backfill(
        up("at DateTime('Europe/Berlin'), e Enum8('b' = -1, 'a' = 7), v UInt32", "(at, e)", rows),
        COPY,
        meta(["at", "e"], 50),
    )
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    first = manager.run_backfill(db, 1, max_batches=3)
    assert first["stopped"] == "max batches" and first["rows_processed"] == 150
    secs, value = first["position"]
    assert isinstance(secs, int) and value in (-1, 7)
    old = ch_client.query(
        f"SELECT toString(at), toString(e) FROM {db}.src WHERE toUnixTimestamp(at) = {secs} "
        f"AND CAST(e, 'Int16') = {value} LIMIT 1"
    ).result_rows[0]
    assert old[0] == "2025-10-26 01:14:00"  # before the repeated hour: text the older version read right
    row = manager.store.load(backfill_id(db, 1))
    row.checkpoint["position"] = list(old)
    manager.store.save(row)
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1, max_batches=30)
    assert result["status"] == "completed" and result["rows_processed"] == 600
    assert_copied_exactly(ch_client, db, 600, keys="at, e, v")


@pytest.mark.parametrize(
    "columns, order_by, checkpoint, says",
    [
        (
            "at DateTime, v UInt32",
            "toStartOfHour(at), v",
            ["at"],
            "field 'checkpoint_columns' ['at'] must be a prefix of {db}.src's sorting key (toStartOfHour(at), v): "
            "column 'at' (DateTime) is at position 1, where the key has toStartOfHour(at)",
        ),
        (
            "a Array(UInt8), v UInt32",
            "a, v",
            ["a", "v"],
            "field 'checkpoint_columns': column 'a' is Array(UInt8), a type the walk cannot hold exactly",
        ),
        (
            "t Tuple(UInt8, String), v UInt32",
            "t, v",
            ["t"],
            "field 'checkpoint_columns': column 't' is Tuple(UInt8, String), a type the walk cannot hold exactly",
        ),
        (
            "v UInt32, w UInt32",
            "v, cityHash64(w, v), w",
            ["v", "w"],
            "sorting key (v, cityHash64(w, v), w): column 'w' (UInt32) is at position 2, where the key has cityHash64(w, v)",
        ),
    ],
)
def test_a_key_the_walk_cannot_hold_is_refused_before_any_write(
    ch_client, db, migrations, migrator_for, columns, order_by, checkpoint, says
):
    """Found when the key space is built (each run, validate, status, and `up`): one line naming the
    column and its type; nothing written, not even a claim."""
    root = migrations(1, "x", up("v UInt32", "v", "SELECT 1"), "SELECT 1", COPY, meta(["v"], 10))
    migrator_for(db, root).up()
    ch_client.command(f"DROP TABLE {db}.src")
    ch_client.command(f"CREATE TABLE {db}.src ({columns}) ENGINE = MergeTree ORDER BY ({order_by})")
    ch_client.command(f"INSERT INTO {db}.src SELECT * FROM generateRandom() LIMIT 10")
    (root / "001_x.backfill.meta").write_text(json.dumps(meta(checkpoint, 10)))
    before = ch_client.command("SELECT count() FROM db_management.backfills")
    with pytest.raises(BackfillError) as info:
        ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)
    message = str(info.value)
    assert "\n" not in message and says.format(db=db) in message and "001_x.backfill.meta" in message
    assert ch_client.command("SELECT count() FROM db_management.backfills") == before  # no claim written
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0


@pytest.mark.parametrize(
    "ch_type, value, sql",
    [
        ("UInt256", 2**255, f"CAST('{2**255}', 'UInt256')"),
        ("Int128", "-5", "CAST('-5', 'Int128')"),
        ("DateTime('Europe/Berlin')", 1761438600, "CAST(toUInt32(1761438600), 'DateTime(\\'Europe/Berlin\\')')"),
        (
            "DateTime('Europe/Berlin')",
            "2025-10-26 01:14:00",
            "CAST('2025-10-26 01:14:00', 'DateTime(\\'Europe/Berlin\\')')",
        ),
        ("DateTime64(3, 'Asia/Kathmandu')", -5, "reinterpret(toInt64(-5), 'DateTime64(3, \\'Asia/Kathmandu\\')')"),
        ("LowCardinality(String)", "x'\udcff", "'x\\'\\xFF'"),
        ("Bool", True, "true"),
    ],
)
def test_each_kept_form_renders_as_a_constant_of_the_column_type(ch_type, value, sql):
    assert keytypes.sql(ch_type, value) == sql
