"""The SQL checks read the statement as the engine's parser does, whatever its shape (issue 29, defects
3, 6, 7 and 9): the target of `WITH ... INSERT` and of `INSERT ... UNION ALL`, quoted identifiers and
strings that are not code, the engine's own non-deterministic functions, params read from data, and a
plan at `up` on a schema with views."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from migrator.errors import MigrateError
from tests.conftest import REPO, report
from tests.test_sql_checks import META, UP

NODEDUP = UP + "CREATE TABLE {db}.nodedup (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);"
WITH_FIRST = (
    "WITH s AS (SELECT a, b, v FROM {db}.src WHERE {batch_range}) INSERT INTO {db}.{target} SELECT a, b, v FROM s"
)
SHAPES = {
    "with-first": WITH_FIRST,
    "insert-with": "INSERT INTO {db}.{target} WITH s AS (SELECT a, b, v FROM {db}.src WHERE {batch_range}) "
    "SELECT a, b, v FROM s",
    "union-all": "INSERT INTO {db}.{target} SELECT a, b, v FROM {db}.src WHERE {batch_range} AND b % 2 = 0 "
    "UNION ALL SELECT a, b, v FROM {db}.src WHERE {batch_range} AND b % 2 = 1",
    "comments-and-quotes": '/* header */ -- a line\nINSERT /* here */ INTO `{db}`.`{target}` (`a`, "b", v) '
    "SELECT a, b, v FROM {db}.src WHERE {batch_range}",
}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_every_shape_into_a_target_without_a_window_is_refused_at_up(ch_client, db, migrations, migrator_for, shape):
    """Defect 3: the target is what the engine's parser names, so the token-only refusal holds for every
    shape (on main only an SQL starting with INSERT was looked at)."""
    root = migrations(1, "copy", NODEDUP, "SELECT 1", SHAPES[shape].replace("{target}", "nodedup"), META)
    with pytest.raises(MigrateError) as err:
        migrator_for(db, root).up()
    line = one_line(err.value)
    assert (
        "001_copy.backfill.sql: " in line and f"target {db}.nodedup has non_replicated_deduplication_window = 0" in line
    ), line
    assert ch_client.command(f"SELECT count() FROM system.tables WHERE database = '{db}'") == 0


def test_with_first_sql_refused_at_run_and_every_shape_copied_into_a_deduplicating_target(
    ch_client, db, migrations, migrator_for
):
    """Defect 3 at `run`: the SQL changed after `up` to the WITH-first form into a target without a window
    stops before any batch, in one line; the same shapes into a deduplicating target run to completion."""
    root = migrations(1, "copy", NODEDUP, "SELECT 1", SHAPES["union-all"].replace("{target}", "dst"), META)
    migrator_for(db, root).up()
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    assert mgr.run_backfill(db, 1)["status"] == "completed"
    assert ch_client.query(f"SELECT count(), uniqExact(a, b) FROM {db}.dst").result_rows == [(500, 500)]
    (root / "001_copy.backfill.sql").write_text(WITH_FIRST.replace("{target}", "nodedup"))
    mgr.reset_backfill(db, 1)
    with pytest.raises(BackfillError) as err:
        mgr.run_backfill(db, 1)
    assert f"target {db}.nodedup has non_replicated_deduplication_window = 0" in one_line(err.value)
    assert ch_client.command(f"SELECT count() FROM {db}.nodedup") == 0


@pytest.mark.parametrize(
    "sql, says",
    [
        ("ALTER TABLE {db}.dst UPDATE v = v WHERE {batch_range}", "reads this SQL as AlterQuery, not as an INSERT"),
        (
            "INSERT INTO FUNCTION null('a String, b UInt32, v String') SELECT a, b, v FROM {db}.src WHERE {batch_range}",
            "inserts into table function null()",
        ),
    ],
    ids=["not-an-insert", "table-function"],
)
def test_a_shape_the_checks_cannot_read_is_refused(db, migrations, migrator_for, sql, says):
    root = migrations(1, "copy", UP, "SELECT 1", sql, META)
    with pytest.raises(MigrateError) as err:
        migrator_for(db, root).up()
    assert says in one_line(err.value)


OFFSET_UP = UP + (
    "CREATE TABLE {db}.odst (a String, b UInt32, `offset` UInt64, at DateTime) ENGINE = MergeTree "
    "ORDER BY (a, b) SETTINGS non_replicated_deduplication_window = 1000;"
)


def test_lint_skips_quoted_identifiers_and_asks_the_engine_what_is_deterministic(
    ch_client, db, migrations, migrator_for
):
    """Defect 7: a column named `offset` (quoted) is not an OFFSET clause, and timestamp(...) is deterministic
    by the engine's own word (system.functions); both are accepted and copied."""
    sql = (
        'INSERT INTO {db}.odst (a, b, `offset`, at) SELECT a, b, b AS "offset", '
        "timestamp('2026-01-01 00:00:00') FROM {db}.src WHERE {batch_range}"
    )
    root = migrations(1, "copy", OFFSET_UP, "SELECT 1", sql, META)
    assert migrator_for(db, root).up() == [1]
    assert ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)["status"] == "completed"
    assert ch_client.query(f"SELECT count(), sum(`offset` = b), min(at) = max(at) FROM {db}.odst").result_rows == [
        (500, 500, True)
    ]


@pytest.mark.parametrize("call", ["now()", "RAND()", "randExponential(1)", "generateSerialID('x')"])
def test_lint_refuses_what_the_engine_calls_non_deterministic(db, migrations, migrator_for, call):
    """now() and rand() as before (in any case), and functions the old hand-written list did not have."""
    sql = f"INSERT INTO {{db}}.dst SELECT a, b, toString({call}) FROM {{db}}.src WHERE {{batch_range}}"
    root = migrations(1, "copy", UP, "SELECT 1", sql, META)
    with pytest.raises(MigrateError) as err:
        migrator_for(db, root).up()
    assert f"{call.split('(')[0]}() gives another value when a batch is replayed" in one_line(err.value)


SETTINGS_UP = (
    "CREATE TABLE {db}.app_settings (name String, value String) ENGINE = MergeTree ORDER BY name;\n"
    "INSERT INTO {db}.app_settings VALUES ('cutover', '2026-01-01 00:00:00');\n"
)
CUTOVER = {"sql": "SELECT any(value) FROM {db}.app_settings WHERE name = 'cutover'"}
CUTOVER_SQL = (
    "INSERT INTO {db}.dst SELECT a, b, v{extra} FROM {db}.src WHERE {batch_range} "
    "AND toDateTime(b) < parseDateTimeBestEffort('{cutover}')"
)


@pytest.mark.parametrize("filled", ["before-up", "by-the-same-up"])
def test_a_param_read_from_data_is_computed_where_the_run_would_read_it(
    ch_client, db, migrations, migrator_for, filled
):
    """Defect 6: the param comes from a settings table filled before `up` (computed on the real table,
    read-only) or by the up file itself (its INSERT ... VALUES repeated on the scratch copy). `up` accepts
    what `run` executes correctly, and still plans the SQL: one column too many is refused."""
    meta = {**META, "migration_version": 2, "params": {"cutover": CUTOVER}}
    if filled == "before-up":
        migrations(1, "settings", UP + SETTINGS_UP)
        first_up = ""
    else:
        migrations(1, "base", UP)
        first_up = SETTINGS_UP
    migrator_for(db, migrations.root).up()
    migrations(2, "copy", first_up or "SELECT 1", "SELECT 1", CUTOVER_SQL.replace("{extra}", ", v"), meta)
    with pytest.raises(MigrateError) as err:
        migrator_for(db, migrations.root).up()
    assert "002_copy.backfill.sql: " in one_line(err.value) and "NUMBER_OF_COLUMNS_DOESNT_MATCH" in str(err.value)
    migrations(2, "copy", first_up or "SELECT 1", "SELECT 1", CUTOVER_SQL.replace("{extra}", ""), meta)
    assert migrator_for(db, migrations.root).up() == [2]
    assert (
        ClickHouseBackfillManager(ch_client, migrations_dir=migrations.root).run_backfill(db, 2)["status"]
        == "completed"
    )
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 500


def project_with(root, extra_sql: str, meta: dict):
    """The project's migrations 001, 020, 021 and a version 22 backfill into calls_complete."""
    for path in (REPO / "migrations").iterdir():
        shutil.copy(path, root / path.name)
    (root / "022_more.up.sql").write_text("SELECT 1")
    (root / "022_more.down.sql").write_text("SELECT 1")
    (root / "022_more.backfill.sql").write_text(extra_sql)
    (root / "022_more.backfill.meta").write_text(json.dumps(meta))


PROJECT_SQL = (
    "INSERT INTO {db}.calls_complete (project_id, id, trace_id, op_name, started_at, ended_at) "
    "SELECT project_id, id, any(trace_id), any(op_name), any(started_at), any(ended_at){extra} "
    "FROM {db}.{source} WHERE {batch_range} AND {retry_count} >= 0 GROUP BY project_id, id"
)
PROJECT_META = {
    "migration_version": 22,
    "batch_size": 1000,
    "checkpoint_columns": ["project_id", "id"],
    "source_table": "calls_merged",
    "max_retries": 0,
}


def test_up_plans_in_full_beside_views_it_cannot_copy(request, ch_client, db, tmp_path, migrator_for):
    """Defect 9: the project's own 001 holds a materialized view, which the scratch copy cannot hold. A new
    backfill that does not read it is planned in full (one column too many is refused by `up`); one that
    reads the view is left to the run's preflight, which plans it on the real tables."""
    root = tmp_path / "project"
    root.mkdir()
    for path in (REPO / "migrations").iterdir():
        shutil.copy(path, root / path.name)
    assert migrator_for(db, root).up() == [1, 20, 21]
    assert (
        ch_client.command(f"SELECT engine FROM system.tables WHERE database = '{db}' AND name = 'calls_merged_view'")
        == "MaterializedView"
    )
    project_with(root, PROJECT_SQL.replace("{source}", "calls_merged").replace("{extra}", ", 1"), PROJECT_META)
    started = time.monotonic()
    with pytest.raises(MigrateError) as err:
        migrator_for(db, root).up()
    assert "022_more.backfill.sql: " in one_line(err.value) and "NUMBER_OF_COLUMNS_DOESNT_MATCH" in str(err.value)
    report(
        request,
        f"\nmigrate up (in-process) with 001's view in the database refused the SQL in "
        f"{time.monotonic() - started:.2f}s",
    )
    project_with(root, PROJECT_SQL.replace("{source}", "calls_merged_view").replace("{extra}", ", 1"), PROJECT_META)
    assert migrator_for(db, root).up() == [22]  # reads the view: not judged at up
    with pytest.raises(BackfillError) as err:
        ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 22)
    assert "NUMBER_OF_COLUMNS_DOESNT_MATCH" in one_line(err.value)
