"""Mistakes in a backfill's SQL stop at once, in one line naming the file, before anything is written:
at `migrate up` (before the up file runs), at `run --dry-run`, and before the first batch of a run;
errors no retry can mend are not retried."""
from __future__ import annotations

import json
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import PERMANENT_CODES, BackfillError
from migrator import hookimpl
from migrator.errors import MigrateError
from migrator.plugins import pm
from tests.conftest import report, store_query

UP = """
CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {db}.src SELECT toString(number % 7), number, toString(number) FROM numbers(500);
CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 1000;
"""
GOOD = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
META = {"migration_version": 1, "batch_size": 100, "checkpoint_columns": ["a", "b"], "source_table": "src",
        "max_retries": 3}


def one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("sql, engine_says", [
    ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHER {batch_range}", "Syntax error"),
    ("INSERT INTO {db}.dst SELECT a, b, v, v FROM {db}.src WHERE {batch_range}",
     "NUMBER_OF_COLUMNS_DOESNT_MATCH"),
], ids=["syntax", "one-column-too-many"])
def test_up_refuses_bad_backfill_sql_before_applying_anything(request, migrations, cli, sql, engine_says):
    root = migrations(1, "copy", UP, "SELECT 1", sql, META)
    started = time.monotonic()
    proc = cli("up", migrations_dir=root)
    report(request, f"\nmigrate up refused {request.node.callspec.id} SQL in {time.monotonic() - started:.2f}s "
                    f"(process start included)")
    line = one_line(proc)
    assert line.startswith(f"error: {root / '001_copy.backfill.sql'}: ") and engine_says in line, line
    assert "applied" not in proc.stdout
    tables, databases = store_query(cli.store, "SELECT count() FROM system.tables WHERE database = 'd'",
                                    "SELECT count() FROM system.databases WHERE name LIKE '_migrate_check_%'")
    assert tables == [[0]] and databases == [[0]]  # nothing applied, the scratch database gone
    status = json.loads(cli("status", "--json", migrations_dir=root).stdout)
    assert status["current_version"] == 0
    if engine_says == "Syntax error":  # `up --dry-run` writes nothing, and still reads the SQL's syntax
        assert engine_says in one_line(cli("up", "--dry-run", migrations_dir=root))


@pytest.mark.parametrize("sql, says", [
    ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src", "does not use {batch_range}"),
    ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} ORDER BY a, b LIMIT {batch_size}",
     "LIMIT in the backfill SQL"),
    ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} LIMIT 10 OFFSET 5",
     "LIMIT in the backfill SQL"),
    ("INSERT INTO {db}.dst SELECT a, b, toString(now()) FROM {db}.src WHERE {batch_range}", "now() gives another"),
    ("INSERT INTO {db}.dst SELECT a, b, toString(rand()) FROM {db}.src WHERE {batch_range}", "rand() gives another"),
    # the token alone cannot hide a replay from a target that keeps no tokens: said at `up` already
    ("INSERT INTO {db}.nodedup SELECT a, b, v FROM {db}.src WHERE {batch_range}",
     "non_replicated_deduplication_window = 0"),
], ids=["no-batch-range", "limit", "offset", "now", "rand", "token-only-without-window"])
def test_up_refuses_sql_that_cannot_be_exactly_once(ch_client, db, migrations, migrator_for, sql, says):
    up = UP + "CREATE TABLE {db}.nodedup (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);"
    root = migrations(1, "copy", up, "SELECT 1", sql, META)
    with pytest.raises(MigrateError, match=r"001_copy\.backfill\.sql: .*" + says.replace("(", r"\(").replace(")", r"\)")
                       .replace("{", r"\{").replace("}", r"\}")):
        migrator_for(db, root).up()
    assert ch_client.command(f"SELECT count() FROM system.tables WHERE database = '{db}'") == 0


def test_up_accepts_what_is_deterministic(ch_client, db, migrations, migrator_for):
    """LIMIT n BY, a LIMIT inside a subquery (a warning), now() in a comment or a string, a param fixed
    at first start, and the anti-join on {retry_count} into a target without a window all pass."""
    up = UP + "CREATE TABLE {db}.nodedup (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);"
    sql = ("-- now() would not be deterministic, so the start time is a param\n"
           "INSERT INTO {db}.nodedup SELECT a, b, concat(v, 'rand()', '{started}') FROM {db}.src "
           "WHERE {batch_range} AND b >= (SELECT min(b) FROM {db}.src LIMIT 1) "
           "AND (a, b) NOT IN (SELECT a, b FROM {db}.nodedup WHERE {batch_range} AND {retry_count} > 0) "
           "LIMIT 1 BY a, b")
    root = migrations(1, "copy", up, "SELECT 1", sql, {**META, "params": {"started": {"sql": "SELECT now()"}}})
    migrator_for(db, root).up()
    assert ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)["status"] == "completed"
    assert ch_client.command(f"SELECT count() FROM {db}.nodedup") == 500


def test_up_plans_on_the_schema_earlier_versions_left(ch_client, db, migrations, migrator_for):
    """Version 2 adds a column and backfills it: planned on a scratch copy of version 1's tables plus
    version 2's ALTER (the column does not exist before the up file runs); a wrong name is refused."""
    migrations(1, "base", UP)
    migrator_for(db, migrations.root).up()
    alter = "ALTER TABLE {db}.dst ADD COLUMN w UInt64 DEFAULT 0"
    fill = "INSERT INTO {db}.dst (a, b, v, w) SELECT a, b, v, {wcol} FROM {db}.src WHERE {batch_range}"
    meta = {**META, "migration_version": 2}
    migrations(2, "fill", alter, "SELECT 1", fill.replace("{wcol}", "cityHash64(vv)"), meta)
    with pytest.raises(MigrateError, match=r"002_fill\.backfill\.sql: .*vv"):
        migrator_for(db, migrations.root).up()
    assert "w" not in [r[0] for r in ch_client.query(f"DESCRIBE {db}.dst").result_rows]
    assert f"_{db}" not in str(ch_client.query("SHOW DATABASES").result_rows) and \
        ch_client.command("SELECT count() FROM system.databases WHERE name LIKE '_migrate_check_%'") == 0
    migrations(2, "fill", alter, "SELECT 1", fill.replace("{wcol}", "cityHash64(v)"), meta)
    assert migrator_for(db, migrations.root).up() == [2]


def test_run_and_dry_run_plan_the_first_range_before_writing(ch_client, db, migrations, migrator_for):
    """The SQL file changed after `up`: `run --dry-run` and `run` stop in one line naming it, no retries."""
    root = migrations(1, "copy", UP, "SELECT 1", GOOD, META)
    migrator_for(db, root).up()
    (root / "001_copy.backfill.sql").write_text(GOOD.replace("SELECT a, b, v", "SELECT a, b, v, v"))
    sleeps = []
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root, sleep=sleeps.append)
    for kwargs in ({"dry_run": True}, {}):
        with pytest.raises(BackfillError, match=r"001_copy\.backfill\.sql: .*NUMBER_OF_COLUMNS_DOESNT_MATCH"):
            mgr.run_backfill(db, 1, **kwargs)
    assert sleeps == [] and ch_client.command(f"SELECT count() FROM {db}.dst") == 0


class Flip:
    """A placeholder that plans fine ({x} = 0 when the preflight renders) and fails on the batch itself."""

    def __init__(self, value):
        self.value, self.calls = value, None  # None: not armed (the check at `up` renders it too)

    @hookimpl
    def backfill_placeholders(self, backfill, checkpoint):
        self.calls = None if self.calls is None else self.calls + 1
        return {"x": self.value if self.calls and self.calls > 1 else 0}


@pytest.mark.parametrize("value, sql, retried", [
    ("no_such_column", "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND b >= {x}", False),
    (1, "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND throwIf({x} = 1, 'flaky') = 0",
     True),
], ids=["unknown-identifier-not-retried", "other-error-retried"])
def test_errors_no_retry_can_mend_are_not_retried(ch_client, db, migrations, migrator_for, value, sql, retried):
    root = migrations(1, "copy", UP, "SELECT 1", sql, META)
    flip, sleeps = Flip(value), []
    pm.register(flip, name="test-flip")
    try:
        migrator_for(db, root).up()
        flip.calls = 0
        with pytest.raises(BackfillError) as err:
            ClickHouseBackfillManager(ch_client, migrations_dir=root, sleep=sleeps.append).run_backfill(db, 1)
    finally:
        pm.unregister(name="test-flip")
    if retried:
        assert sleeps == [1, 2, 4] and "failed 4 times" in str(err.value)
    else:
        assert sleeps == [] and "001_copy.backfill.sql" in str(err.value) and "UNKNOWN_IDENTIFIER" in str(err.value)


def test_permanent_codes_are_the_engines_own(ch_client):
    """Each code the retry loop treats as permanent has the name the engine gives it."""
    names = dict(ch_client.query("SELECT number, errorCodeToName(toUInt32(number)) FROM numbers(1000) "
                                 "WHERE number IN {c:Array(UInt32)}", parameters={"c": list(PERMANENT_CODES)}).result_rows)
    assert names == PERMANENT_CODES


def test_up_does_not_judge_what_the_empty_copy_cannot_show(ch_client, db, migrations, migrator_for):
    """A function the up file creates (not copied to the scratch schema) and a param read from rows the
    empty copy does not have: `up` checks the syntax only, and the run plans the SQL on the real tables."""
    up = UP + "CREATE FUNCTION {db}_twice AS (x) -> x * 2;"
    sql = ("INSERT INTO {db}.dst SELECT a, b, toString({db}_twice(b)) FROM {db}.src "
           "WHERE {batch_range} AND b >= toUInt32('{low}')")
    meta = {**META, "params": {"low": {"sql": "SELECT b FROM {db}.src ORDER BY b LIMIT 1"}}}
    root = migrations(1, "copy", up, "SELECT 1", sql, meta)
    try:
        assert migrator_for(db, root).up() == [1]
        assert ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)["status"] == "completed"
        assert ch_client.command(f"SELECT sum(toUInt64(v) = 2 * b) FROM {db}.dst") == 500
    finally:
        ch_client.command(f"DROP FUNCTION IF EXISTS {db}_twice")
