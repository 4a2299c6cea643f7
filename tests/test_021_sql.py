"""Migration 021's own SQL (schema, backfill batch, validation, cutover param) on the real engine.

These tests render the SQL with a tiny local helper instead of the backfill framework, so that a
wrong result points at the SQL and not at the manager. Key ranges are built here the same way the
framework builds `{batch_range}`: a predicate over the unqualified key columns.
"""
from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import clickhouse_connect
import pytest

from backfill_plugin.ops.demo import generate_calls

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
BACKFILL = (MIGRATIONS / "021_calls_complete.backfill.sql").read_text()
VALIDATE = (MIGRATIONS / "021_calls_complete.backfill.validate.sql").read_text()
META = json.loads((MIGRATIONS / "021_calls_complete.backfill.meta").read_text())

UTC = timezone.utc
CUTOVER = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
CUTOVER_TEXT = "2025-03-01 12:00:00.000"
WINDOW = 3600
COLUMNS = (
    "project_id, id, trace_id, parent_id, thread_id, turn_id, op_name, display_name, "
    "toString(started_at, 'UTC'), toString(ended_at, 'UTC'), exception, attributes_dump, inputs_dump, "
    "output_dump, summary_dump, input_refs, output_refs, wb_user_id, wb_run_id, wb_run_step, wb_run_step_end"
)


@pytest.fixture(scope="module")
def _sql_client(request, tmp_path_factory):
    """The suite's shared client when conftest offers one (one chDB store per process), else our own."""
    try:
        return request.getfixturevalue("ch_client")
    except pytest.FixtureLookupError:
        return clickhouse_connect.get_client(dsn="chdb://" + str(tmp_path_factory.mktemp("store")))


@pytest.fixture
def sdb(_sql_client):
    """A fresh database with migrations 001 and 021 applied."""
    name = "t021_" + uuid.uuid4().hex[:12]
    _sql_client.command(f"CREATE DATABASE {name}")
    for version in ("001_trace_schema", "021_calls_complete"):
        _apply(_sql_client, MIGRATIONS / f"{version}.up.sql", name)
    yield name
    _sql_client.command(f"DROP DATABASE IF EXISTS {name}")


def _apply(client, path: Path, db: str) -> None:
    for chunk in path.read_text().split(";"):
        code = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if code:
            client.command(chunk.replace("{db}", db))


def _lit(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def batch_range(after: tuple | None, upto: tuple | None) -> str:
    """Keys in (after, upto], like the framework's predicate; None means unbounded."""
    terms = []
    if after is not None:
        p, i = map(_lit, after)
        terms.append(f"(project_id >= {p} AND ((project_id > {p}) OR (project_id = {p} AND id > {i})))")
    if upto is not None:
        p, i = map(_lit, upto)
        terms.append(f"(project_id <= {p} AND ((project_id < {p}) OR (project_id = {p} AND id <= {i})))")
    return " AND ".join(terms) or "1"


def render(template: str, db: str, *, batch: str = "1", retry_count: int = 0,
           cutover: str = CUTOVER_TEXT, window: int = WINDOW) -> str:
    values = {"db": db, "batch_range": batch, "retry_count": str(retry_count),
              "cutover_timestamp": cutover.replace("\\", "\\\\").replace("'", "\\'"),
              "dedup_window_seconds": str(window)}
    out = re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: values[m.group(1)], template)
    assert "{" not in out and "}" not in out, "a placeholder or brace was left in the SQL"
    return out


def run_batch(client, db, **kw) -> None:
    client.command(render(BACKFILL, db, **kw))


def run_in_batches(client, db, rows_per_batch: int, **kw) -> int:
    """Walk calls_merged in key order, rows_per_batch source rows a batch (ties kept together)."""
    position, batches = None, 0
    while True:
        count, end = client.query(
            f"SELECT count(), max((project_id, id)) FROM (SELECT project_id, id FROM {db}.calls_merged "
            f"WHERE {batch_range(position, None)} ORDER BY project_id, id LIMIT {rows_per_batch} WITH TIES)"
        ).result_rows[0]
        if not count:
            return batches
        end = tuple(end)
        run_batch(client, db, batch=batch_range(position, end), **kw)
        position, batches = end, batches + 1


def validate(client, db, *, cutover: str = CUTOVER_TEXT, batch: str = "1") -> dict:
    """{check name: (expected, actual, ok)} from the validation SQL over one range (default: the whole table)."""
    out = {}
    for chunk in VALIDATE.split(";"):
        if not "\n".join(ln for ln in chunk.splitlines() if not ln.strip().startswith("--")).strip():
            continue
        result = client.query(render(chunk, db, cutover=cutover, batch=batch))
        assert result.column_names == ("check", "expected", "actual", "ok")
        for check, expected, actual, ok in result.result_rows:
            assert check not in out, f"check {check} returned twice"
            out[check] = (expected, actual, ok)
    return out


def target_rows(client, db) -> list[tuple]:
    return client.query(f"SELECT {COLUMNS} FROM {db}.calls_complete ORDER BY project_id, id").result_rows


def start_part(client, db, project, call_id, started, **extra) -> None:
    row = {"project_id": project, "id": call_id, "trace_id": "tr-" + call_id, "op_name": "op",
           "started_at": started, "inputs_dump": '{"x": 1}', "input_refs": ["in-" + call_id],
           "wb_user_id": "u1", "created_at": started, **extra}
    client.insert("call_parts", [list(row.values())], column_names=list(row), database=db,
                  settings={"async_insert": 0})


def end_part(client, db, project, call_id, ended, **extra) -> None:
    row = {"project_id": project, "id": call_id, "ended_at": ended, "output_dump": '{"y": 2}',
           "output_refs": ["out-" + call_id], "summary_dump": "{}", "created_at": ended, **extra}
    client.insert("call_parts", [list(row.values())], column_names=list(row), database=db,
                  settings={"async_insert": 0})


def call(client, db, project, call_id, started, complete=True) -> None:
    start_part(client, db, project, call_id, started)
    if complete:
        end_part(client, db, project, call_id, started + timedelta(seconds=2))


# --- schema ---------------------------------------------------------------------------------------

def test_start_end_and_rename_parts_merge_into_one_call(_sql_client, sdb):
    c, t0 = _sql_client, CUTOVER - timedelta(days=2)
    start_part(c, sdb, "p", "c1", t0, display_name="first", parent_id="root", thread_id="th",
               turn_id="tu", attributes_dump="{}", wb_run_id="run", wb_run_step=7)
    end_part(c, sdb, "p", "c1", t0 + timedelta(seconds=3), exception="boom", wb_run_step_end=9)
    c.insert("call_parts", [["p", "c1", "renamed", t0 + timedelta(hours=1)]],
             column_names=["project_id", "id", "display_name", "created_at"], database=sdb,
             settings={"async_insert": 0})
    assert c.command(f"SELECT count() FROM {sdb}.calls_merged") == 3  # parts are not merged yet

    run_batch(c, sdb)

    assert target_rows(c, sdb) == [(
        "p", "c1", "tr-c1", "root", "th", "tu", "op", "renamed",
        "2025-02-27 12:00:00.000", "2025-02-27 12:00:03.000", "boom", "{}", '{"x": 1}', '{"y": 2}', "{}",
        ["in-c1"], ["out-c1"], "u1", "run", 7, 9,
    )]


def test_merged_table_finalises_the_same_before_and_after_background_merges(_sql_client, sdb):
    c = _sql_client
    generate_calls(c, sdb, 300, seed=3, batch=100)
    finalise = (f"SELECT project_id, id, any(started_at), any(ended_at), argMaxMerge(display_name), "
                f"array_concat_agg(input_refs), array_concat_agg(output_refs) FROM {sdb}.calls_merged "
                f"GROUP BY project_id, id ORDER BY project_id, id")
    before = c.query(finalise).result_rows
    c.command(f"OPTIMIZE TABLE {sdb}.calls_merged FINAL")
    assert c.command(f"SELECT count() FROM {sdb}.calls_merged") == 300
    assert c.query(finalise).result_rows == before


def test_down_migrations_drop_everything(_sql_client, sdb):
    c = _sql_client
    _apply(c, MIGRATIONS / "021_calls_complete.down.sql", sdb)
    _apply(c, MIGRATIONS / "001_trace_schema.down.sql", sdb)
    assert c.command(f"SELECT count() FROM system.tables WHERE database = '{sdb}'") == 0
    _apply(c, MIGRATIONS / "001_trace_schema.up.sql", sdb)  # and up again is clean
    _apply(c, MIGRATIONS / "021_calls_complete.up.sql", sdb)
    assert c.command(f"SELECT count() FROM system.tables WHERE database = '{sdb}'") == 4


# --- the batch SQL --------------------------------------------------------------------------------

def test_incomplete_calls_are_not_copied(_sql_client, sdb):
    c, t0 = _sql_client, CUTOVER - timedelta(days=1)
    call(c, sdb, "p", "done", t0)
    call(c, sdb, "p", "running", t0, complete=False)
    end_part(c, sdb, "p", "end-only", t0)  # an end part whose start part never arrived
    run_batch(c, sdb)
    assert [r[1] for r in target_rows(c, sdb)] == ["done"]


@pytest.mark.parametrize("cutover", [CUTOVER_TEXT, "2025-03-01T14:00:00+02:00"])  # --param may be ISO text
def test_only_calls_started_before_the_cutover_are_copied(_sql_client, sdb, cutover):
    c = _sql_client
    call(c, sdb, "p", "a-just-before", CUTOVER - timedelta(milliseconds=1))
    call(c, sdb, "p", "b-at", CUTOVER)
    call(c, sdb, "p", "c-after", CUTOVER + timedelta(minutes=5))
    run_batch(c, sdb, cutover=cutover)
    assert [r[1] for r in target_rows(c, sdb)] == ["a-just-before"]


def test_call_written_by_the_new_path_within_the_window_is_neither_duplicated_nor_overwritten(_sql_client, sdb):
    c = _sql_client
    near = CUTOVER - timedelta(seconds=WINDOW // 2)
    call(c, sdb, "p", "near", near)
    call(c, sdb, "p", "near-missing", near)  # in the window but not written by the new path
    call(c, sdb, "p", "old", CUTOVER - timedelta(days=3))
    # The new write path already wrote "near", with its own (newer) display name.
    c.command(f"INSERT INTO {sdb}.calls_complete (project_id, id, trace_id, op_name, display_name, started_at, ended_at) "
              f"VALUES ('p', 'near', 'tr-near', 'op', 'from new path', "
              f"toDateTime64('{near:%Y-%m-%d %H:%M:%S}', 3, 'UTC'), toDateTime64('{near:%Y-%m-%d %H:%M:%S}', 3, 'UTC') + 2)")
    run_batch(c, sdb)
    rows = {r[1]: r for r in target_rows(c, sdb)}
    assert sorted(c.query(f"SELECT id, count() FROM {sdb}.calls_complete GROUP BY id ORDER BY id").result_rows) == [
        ("near", 1), ("near-missing", 1), ("old", 1)]
    assert rows["near"][7] == "from new path"


def test_replay_with_retry_count_inserts_nothing_new(_sql_client, sdb):
    c = _sql_client
    generate_calls(c, sdb, 400, seed=5, batch=150)
    keys = c.query(f"SELECT DISTINCT project_id, id FROM {sdb}.calls_merged ORDER BY project_id, id").result_rows
    whole = batch_range(None, tuple(keys[-1]))
    # A crashed first attempt committed only part of the batch ...
    run_batch(c, sdb, batch=batch_range(None, tuple(keys[len(keys) // 3])))
    partial = c.command(f"SELECT count() FROM {sdb}.calls_complete")
    assert 0 < partial
    # ... the replay of the whole batch (retry_count > 0) adds the rest and duplicates nothing.
    run_batch(c, sdb, batch=whole, retry_count=1)
    once = target_rows(c, sdb)
    run_batch(c, sdb, batch=whole, retry_count=2)
    assert target_rows(c, sdb) == once
    assert len(once) == len({(r[0], r[1]) for r in once}) > partial
    assert all(ok for _, _, ok in validate(c, sdb).values())


def test_first_attempt_skips_the_whole_batch_lookup_so_retry_count_matters(_sql_client, sdb):
    """Documents why the framework must pass retry_count > 0 on a replay of a batch."""
    c, t0 = _sql_client, CUTOVER - timedelta(days=2)
    call(c, sdb, "p", "c1", t0)
    run_batch(c, sdb)
    run_batch(c, sdb, retry_count=0)  # replayed as if first: an old call is not looked up
    assert c.command(f"SELECT count() FROM {sdb}.calls_complete") == 2


def test_batches_give_the_same_result_as_one_full_range_run(_sql_client, sdb):
    c = _sql_client
    generate_calls(c, sdb, 2000, seed=11, batch=700)
    t0 = CUTOVER - timedelta(days=1)
    for hostile in ("", "o'brien", "back\\slash", "ünï😀", "a' OR '1'='1"):  # keys the range must quote
        call(c, sdb, hostile, hostile + "x", t0)
        call(c, sdb, "zz", hostile, t0)
    cutover = "2100-01-01 00:00:00.000"  # the demo data lies around 2025; take all of it
    run_batch(c, sdb, cutover=cutover)
    single = target_rows(c, sdb)
    c.command(f"TRUNCATE TABLE {sdb}.calls_complete")
    assert run_in_batches(c, sdb, 97, cutover=cutover) > 20
    assert target_rows(c, sdb) == single
    complete = c.command(f"SELECT countIf(ended_at IS NOT NULL AND started_at IS NOT NULL) FROM "
                         f"(SELECT any(ended_at) AS ended_at, any(started_at) AS started_at "
                         f"FROM {sdb}.calls_merged GROUP BY project_id, id)")
    assert len(single) == complete
    assert all(ok for _, _, ok in validate(c, sdb, cutover=cutover).values())


def test_batch_range_prunes_source_and_target_by_primary_key(_sql_client, sdb):
    c = _sql_client
    c.command(f"INSERT INTO {sdb}.call_parts (project_id, id, started_at, ended_at) "
              f"SELECT 'p' || toString(number % 10), leftPad(toString(number), 8, '0'), "
              f"toDateTime64('2025-01-01 00:00:00', 3, 'UTC'), toDateTime64('2025-01-01 00:00:01', 3, 'UTC') "
              f"FROM numbers(200000) SETTINGS async_insert = 0")
    c.command(f"OPTIMIZE TABLE {sdb}.calls_merged FINAL")
    run_batch(c, sdb)  # fill the target too, so that its lookup has something to prune
    c.command(f"OPTIMIZE TABLE {sdb}.calls_complete FINAL")
    sql = render(BACKFILL, sdb, batch=batch_range(("p3", "00000100"), ("p3", "00050000")), retry_count=1)
    source = sql[sql.index("\nSELECT\n"):]
    lookup = sql[sql.index("SELECT project_id, id\n        FROM"):sql.rindex(")")]  # the NOT IN subquery
    assert "calls_complete" in lookup
    for query, table in ((source, "calls_merged"), (lookup, "calls_complete")):
        plan = "\n".join(r[0] for r in c.query("EXPLAIN indexes = 1 " + query).result_rows)
        assert f"ReadFromMergeTree ({sdb}.{table})" in plan
        used, total = map(int, re.findall(r"Granules: (\d+)/(\d+)", plan)[-1])
        assert 0 < used <= 2 and total >= 24, plan


# --- cutover param --------------------------------------------------------------------------------

def test_meta_has_only_known_fields_and_the_cutover_param(_sql_client, sdb):
    from backfill_plugin.spec.meta import FIELDS
    assert set(META) <= set(FIELDS)
    assert META["migration_version"] == 21 and META["checkpoint_columns"] == ["project_id", "id"]
    assert META["params"]["dedup_window_seconds"] == WINDOW
    c, sql = _sql_client, META["params"]["cutover_timestamp"]["sql"].replace("{db}", sdb)
    empty = c.query(sql).result_rows[0][0]  # nothing written by the new path yet: now
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", empty)
    assert abs(datetime.strptime(empty, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=5)
    c.command(f"INSERT INTO {sdb}.calls_complete (project_id, id, trace_id, op_name, started_at, ended_at) VALUES "
              f"('p', 'b', 't', 'o', toDateTime64('2025-03-01 12:00:00.250', 3, 'UTC'), now64(3)), "
              f"('p', 'a', 't', 'o', toDateTime64('2025-03-02 00:00:00', 3, 'UTC'), now64(3))")
    assert c.query(sql).result_rows[0][0] == "2025-03-01 12:00:00.250"


# --- validation -----------------------------------------------------------------------------------

@pytest.fixture
def backfilled(_sql_client, sdb):
    """A database whose backfill ran correctly, plus a new-path row inside the dedup window."""
    c = _sql_client
    call(c, sdb, "p", "a", CUTOVER - timedelta(days=2))
    call(c, sdb, "p", "b", CUTOVER - timedelta(days=1))
    call(c, sdb, "q", "c", CUTOVER - timedelta(hours=5))
    call(c, sdb, "q", "d", CUTOVER - timedelta(hours=3), complete=False)
    call(c, sdb, "q", "e", CUTOVER + timedelta(hours=1))
    call(c, sdb, "q", "near", CUTOVER - timedelta(seconds=60))
    near = (CUTOVER - timedelta(seconds=60)).strftime("%Y-%m-%d %H:%M:%S")
    c.command(f"INSERT INTO {sdb}.calls_complete (project_id, id, trace_id, op_name, display_name, started_at, ended_at) "
              f"VALUES ('q', 'near', 'tr-near', 'op', 'new path value', toDateTime64('{near}', 3, 'UTC'), "
              f"toDateTime64('{near}', 3, 'UTC') + 1)")
    run_batch(c, sdb)
    return sdb


def test_validation_passes_on_a_correct_backfill(_sql_client, backfilled):
    result = validate(_sql_client, backfilled)
    assert set(result) == {"missing_in_calls_complete", "duplicate_keys_in_calls_complete",
                           "source_count_equals_target_rows", "rows_equal_source", "extra_keys_in_calls_complete"}
    assert all(ok for _, _, ok in result.values()), result
    assert result["source_count_equals_target_rows"][:2] == (4, 4)
    assert result["rows_equal_source"][:2] == (3, 3)  # 'near' started within the dedup window: not compared


def test_validation_fails_when_a_row_is_missing(_sql_client, backfilled):
    _sql_client.command(f"DELETE FROM {backfilled}.calls_complete WHERE id = 'b'")
    result = validate(_sql_client, backfilled)
    assert result["missing_in_calls_complete"] == (0, 1, 0)
    assert result["source_count_equals_target_rows"] == (4, 3, 0)
    assert result["rows_equal_source"] == (3, 2, 0)


@pytest.mark.parametrize("key", [("z", "past-the-last"), ("a", "before-the-first"), ("p", "between")])
def test_validation_fails_on_a_stray_target_row_the_new_path_cannot_have_written(_sql_client, backfilled, key):
    """A calls_complete row with no such call in the source that started before the dedup window: only the
    backfill writes there. The last range is open above (the framework's), so a row past the last key counts."""
    c = _sql_client
    c.command(f"INSERT INTO {backfilled}.calls_complete (project_id, id, trace_id, op_name, started_at, ended_at) "
              f"VALUES ('{key[0]}', '{key[1]}', 't', 'o', toDateTime64('{CUTOVER_TEXT}', 3, 'UTC') - "
              f"toIntervalDay(3), now64(3))")
    assert validate(c, backfilled)["extra_keys_in_calls_complete"] == (0, 1, 0)
    assert validate(c, backfilled, batch=batch_range(("q", "near"), None))["extra_keys_in_calls_complete"] == \
        ((0, 1, 0) if key[0] == "z" else (0, 0, 1))


def test_a_stray_target_row_with_an_empty_source_fails_validation(_sql_client, sdb):
    c = _sql_client
    c.command(f"INSERT INTO {sdb}.calls_complete (project_id, id, trace_id, op_name, started_at, ended_at) VALUES "
              f"('p', 'x', 't', 'o', toDateTime64('{CUTOVER_TEXT}', 3, 'UTC') - toIntervalDay(3), now64(3))")
    assert validate(c, sdb)["extra_keys_in_calls_complete"] == (0, 1, 0)


def test_validation_fails_when_a_row_is_duplicated(_sql_client, backfilled):
    _sql_client.command(f"INSERT INTO {backfilled}.calls_complete SELECT * FROM {backfilled}.calls_complete WHERE id = 'a'")
    result = validate(_sql_client, backfilled)
    assert result["duplicate_keys_in_calls_complete"] == (0, 1, 0)
    assert result["source_count_equals_target_rows"] == (4, 5, 0)
    assert result["missing_in_calls_complete"][2] == 1 and result["rows_equal_source"] == (3, 3, 1)


@pytest.mark.parametrize("change", ["output_dump = 'tampered'", "output_dump = NULL", "exception = 'x'",
                                    "output_refs = []", "started_at = started_at + toIntervalMillisecond(1)",
                                    "trace_id = ''", "display_name = 'other'", "wb_run_step = 99",
                                    "input_refs = ['in-c', 'in-c']", "ended_at = ended_at + toIntervalSecond(1)"])
def test_validation_fails_when_a_row_is_altered(_sql_client, backfilled, change):
    c = _sql_client
    c.command(f"ALTER TABLE {backfilled}.calls_complete UPDATE {change} WHERE id = 'c' SETTINGS mutations_sync = 2")
    result = validate(c, backfilled)
    assert result["rows_equal_source"] == (3, 2, 0)
    assert result["missing_in_calls_complete"][2] == 1 and result["duplicate_keys_in_calls_complete"][2] == 1
    # Per range: only the range holding 'c' differs.
    assert validate(c, backfilled, batch=batch_range(None, ("p", "b")))["rows_equal_source"] == (2, 2, 1)
    assert validate(c, backfilled, batch=batch_range(("p", "b"), None))["rows_equal_source"] == (1, 0, 0)


def test_validation_range_prunes_source_and_target_by_primary_key(_sql_client, sdb):
    c = _sql_client
    c.command(f"INSERT INTO {sdb}.call_parts (project_id, id, started_at, ended_at) "
              f"SELECT 'p' || toString(number % 10), leftPad(toString(number), 8, '0'), "
              f"toDateTime64('2025-01-01 00:00:00', 3, 'UTC'), toDateTime64('2025-01-01 00:00:01', 3, 'UTC') "
              f"FROM numbers(200000) SETTINGS async_insert = 0")
    c.command(f"OPTIMIZE TABLE {sdb}.calls_merged FINAL")
    run_batch(c, sdb)
    c.command(f"OPTIMIZE TABLE {sdb}.calls_complete FINAL")
    query = render(VALIDATE, sdb, batch=batch_range(("p3", "00000100"), ("p3", "00050000")))
    plan = "\n".join(r[0] for r in c.query("EXPLAIN indexes = 1 " + query.strip().rstrip(";")).result_rows)
    for table in ("calls_merged", "calls_complete"):
        part = plan[plan.index(f"ReadFromMergeTree ({sdb}.{table})"):]
        used, total = map(int, re.search(r"Granules: (\d+)/(\d+)", part).groups())  # its own, the first after it
        assert 0 < used <= 2 and total >= 24, plan


# --- demo data ------------------------------------------------------------------------------------

def test_demo_data_is_deterministic_and_realistic(_sql_client, sdb):
    c = _sql_client
    other = sdb + "_b"
    c.command(f"CREATE DATABASE {other}")
    try:
        _apply(c, MIGRATIONS / "001_trace_schema.up.sql", other)
        first = generate_calls(c, sdb, 1500, seed=7, batch=400)
        second = generate_calls(c, other, 1500, seed=7, batch=400)
        assert first == second and first["calls"] == 1500
        assert 0.8 * 1500 < first["complete"] < 0.97 * 1500
        digest = ("SELECT groupBitXor(cityHash64(*)) FROM {}.call_parts")
        assert c.command(digest.format(sdb)) == c.command(digest.format(other))
        assert c.command(f"SELECT count() FROM {sdb}.call_parts") == first["parts"]
        stats = c.query(
            f"SELECT uniqExact(project_id), max(length(inputs_dump)), min(length(inputs_dump)), "
            f"countIf(parent_id IS NOT NULL), dateDiff('second', min(started_at), max(started_at)) FROM {sdb}.call_parts "
            f"WHERE started_at IS NOT NULL").result_rows[0]
        assert stats[0] >= 20 and stats[1] > 1000 and stats[2] < 200 and stats[3] > 0
        assert stats[4] > 20 * 86400
        # Parts stay separate rows: calls_merged has more rows than calls until merges happen.
        assert c.command(f"SELECT uniqExact(project_id, id) FROM {sdb}.calls_merged") == 1500
    finally:
        c.command(f"DROP DATABASE IF EXISTS {other}")
