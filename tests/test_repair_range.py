"""`run --range START..END`: one key range replayed exactly once, the backfill's own position untouched.

The damage is real (rows deleted from the target with a lightweight DELETE); the repair runs the
backfill's own SQL on the engine and the checks compare every column with the source.
"""
from __future__ import annotations

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.protocol.repair import Range, parse
from tests.conftest import assert_copied_exactly, fingerprint

ROWS = 3000
UP = f"""
CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS index_granularity = 256;
INSERT INTO {{db}}.src SELECT ['', 'x''y', 'b..s', 'é'][number % 4 + 1], number, toString(number * 7)
    FROM numbers({ROWS});
CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 1000;
"""
ANTI_JOIN = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} "
             "AND (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range} AND {retry_count} > 0)")
TOKEN_ONLY = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
META = {"migration_version": 1, "batch_size": 400, "checkpoint_columns": ["a", "b"], "source_table": "src"}


@pytest.fixture
def backfilled(ch_client, db, shared_store_backfill):
    def make(sql=ANTI_JOIN, **run):
        root = shared_store_backfill(UP, sql, META)
        mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
        mgr.run_backfill(db, 1, **run)
        return mgr
    return make


def damage(client, db, where: str) -> int:
    """Delete the target rows matching `where`; returns how many went."""
    gone = client.command(f"SELECT count() FROM {db}.dst WHERE {where}")
    client.command(f"DELETE FROM {db}.dst WHERE {where}", settings={"mutations_sync": 2})
    return int(gone)


def test_repair_restores_exactly_the_range_and_nothing_else(ch_client, db, backfilled):
    mgr = backfilled()
    before = mgr.get_status(db, 1)
    inside = damage(ch_client, db, "a = 'b..s' AND b BETWEEN 1000 AND 1999")  # a key that contains '..'
    outside = damage(ch_client, db, "a = 'x''y' AND b < 500")
    assert inside > 0 and outside > 0
    start, end = parse('["b..s", 998]..["b..s", 2002]')  # both bounds are keys of the source (b % 4 == 2)
    result = mgr.run_backfill(db, 1, key_range=(start, end), batch_size=100)
    assert result["stopped"] == "repaired" and result["status"] == "completed"
    assert result["repair"]["rows_processed"] == 251 and result["repair"]["batches_completed"] == 3
    # Inside (start, end] the target equals the source again; the damage outside stays: exactly the range.
    assert_copied_exactly(ch_client, db, rows=ROWS - outside, src_where="NOT (a = 'x''y' AND b < 500)")
    after = mgr.get_status(db, 1)
    assert (after["rows_processed"], after["position"], after["batches_completed"]) == \
        (before["rows_processed"], before["position"], before["batches_completed"])
    assert after["checkpoint"]["repairs"][-1]["end"] == end and "repair" not in after["checkpoint"]


def test_a_repair_interrupted_goes_on_when_run_again_and_blocks_other_runs(ch_client, db, backfilled):
    mgr = backfilled()
    damage(ch_client, db, "b BETWEEN 200 AND 2800")
    whole = Range(None, ["é", 2999], whole=True)  # every key: confirmed, as `--yes` does
    first = mgr.run_backfill(db, 1, key_range=whole, batch_size=200, max_batches=2)
    assert first["stopped"] == "max batches" and first["status"] == "paused"
    with pytest.raises(BackfillError, match="unfinished repair"):
        mgr.run_backfill(db, 1, key_range=(None, ["", 100]))
    with pytest.raises(BackfillError, match="unfinished repair"):
        mgr.resume_backfill(db, 1)
    done = mgr.run_backfill(db, 1, key_range=whole)
    assert done["stopped"] == "repaired" and done["status"] == "completed"
    assert done["repair"]["rows_processed"] == ROWS
    assert_copied_exactly(ch_client, db, rows=ROWS)


def test_repair_refusals_are_one_line_and_write_nothing(ch_client, db, backfilled, shared_store_backfill):
    mgr = backfilled(max_batches=2)  # 800 rows done: the position is inside the key space
    position = mgr.get_status(db, 1)["position"]
    before = fingerprint(ch_client, f"{db}.dst")
    with pytest.raises(BackfillError, match="lies past the backfill's position"):
        mgr.run_backfill(db, 1, key_range=(position, ["é", 2999]))
    with pytest.raises(BackfillError, match="start is not before the end"):
        mgr.run_backfill(db, 1, key_range=(position, position))
    with pytest.raises(BackfillError, match="expected a JSON array of 2 values"):
        mgr.run_backfill(db, 1, key_range=(None, ["", 1, 2]))
    assert fingerprint(ch_client, f"{db}.dst") == before
    assert "repair" not in mgr.get_status(db, 1)["checkpoint"]


def test_token_only_sql_cannot_repair(ch_client, db, backfilled):
    mgr = backfilled(sql=TOKEN_ONLY)
    with pytest.raises(BackfillError, match=r"does not read \{retry_count\}"):
        mgr.run_backfill(db, 1, key_range=(None, ["", 100]))


@pytest.mark.parametrize("text, expected", [
    ('..["p", "id"]', (None, ["p", "id"])),
    ('["a..b", 1]..["c", 2]', (["a..b", 1], ["c", 2])),
    (' [1] .. [2] ', ([1], [2])),
    ('[1]..', ([1], None)),  # an open end
    ('..', (None, None)),
])
def test_parse_reads_json_bounds(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text", ["[1]", "1..2x", "[1][2]", "[1]..null", "..null", "null..[2]"])
def test_parse_rejects_a_malformed_range(text):
    with pytest.raises(BackfillError, match="expected START..END"):
        parse(text)


def test_cli_range_error_is_one_line(cli, tmp_path):
    proc = cli("backfill", "run", "1", "--range", "[1]..oops")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--range" in proc.stderr, proc.stderr
