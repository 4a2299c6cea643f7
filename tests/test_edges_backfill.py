"""Backfill commands at the edges (issue 33): validation over the whole key space, an empty source, a
validation that checks nothing, `run --range` bounds, and the control channel acting on the backfill named.

In-process CLI (CliRunner) on the shared store where one process suffices; subprocesses where a second
process must meet a runner that holds its own embedded store."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from migrator.cli import build
from migrator.scaffold import validation
from tests.conftest import run_migrate
from tests.test_backfill_cli import _start_slow_run

UP = """CREATE TABLE {{db}}.src (k UInt64, v String) ENGINE = MergeTree ORDER BY k;
INSERT INTO {{db}}.src SELECT number, toString(number) FROM numbers({rows});
CREATE TABLE {{db}}.dst (k UInt64, v String) ENGINE = MergeTree ORDER BY k
    SETTINGS non_replicated_deduplication_window = 1000"""
SQL = (
    "INSERT INTO {db}.dst SELECT k, v FROM {db}.src WHERE {batch_range} "
    "AND ({retry_count} = 0 OR k NOT IN (SELECT k FROM {db}.dst WHERE {batch_range}))"
)
META = {
    "migration_version": 1,
    "batch_size": 1000,
    "checkpoint_columns": ["k"],
    "source_table": "src",
    "description": "copy src",
    "min_batch_size": 1,
}
# The scaffold's own validation (`migrate new NAME --backfill`), for these two tables.
VALIDATE = validation(
    "-- scaffolded\n", "k", "src", "dst", "tuple(*)", "missing_keys_in_target", "duplicate_keys_in_target"
)


@pytest.fixture
def copy(store_url, db, migrations):
    """`copy(rows, validate=...)`: a project of one copy backfill; returns its CliRunner `invoke`."""

    def make(rows: int, validate: str = VALIDATE):
        root = migrations(
            1, "copy", UP.format(rows=rows), "DROP TABLE {db}.src; DROP TABLE {db}.dst", SQL, META, validate
        )
        runner = CliRunner()

        def invoke(*args):
            return runner.invoke(build(), ["--url", store_url, "--database", db, "--migrations-dir", str(root), *args])

        assert invoke("up").exit_code == 0
        return invoke

    return make


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def said(result) -> str:
    """Everything the command said: its output and its one-line error (CliRunner keeps that as the exception)."""
    return result.output + ("" if result.exception is None else f"error: {result.exception}")


# -- 1. validation covers the key space past the last source key ---------------------------------


@pytest.mark.parametrize("stray", [99999, 2999 + 1])
def test_a_target_row_past_the_last_source_key_fails_validation(copy, ch_client, db, stray):
    invoke = copy(3000)
    ok(invoke("backfill", "run", "1"))
    assert (
        "passed (3 checks, 3 ranges, 3,000 source rows)"
        in ok(invoke("backfill", "validate", "1", "--range-rows", "1000")).output
    )
    ch_client.command(f"INSERT INTO {db}.dst VALUES ({stray}, 'extra')")
    result = invoke("backfill", "validate", "1", "--range-rows", "1000")
    assert result.exit_code == 1, result.output
    assert "error: validation of backfill 1 failed: duplicate_keys_in_target (1 differing ranges)" in said(result)
    assert (
        "- after [1999] to the end of the key space (1,000 source rows): duplicate_keys_in_target expected 0 "
        "actual 1" in result.output
    )
    doc = json.loads(invoke("backfill", "validate", "1", "--range-rows", "1000", "--json").stdout)
    assert [(d["start"], d["end"]) for d in doc["differing_ranges"]] == [([1999], None)]


def test_a_target_row_below_the_first_source_key_fails_validation(copy, ch_client, db):
    invoke = copy(3000)
    ok(invoke("backfill", "run", "1"))
    ch_client.command(f"ALTER TABLE {db}.src DELETE WHERE k < 10", settings={"mutations_sync": 2})
    result = invoke("backfill", "validate", "1", "--range-rows", "1000")
    assert result.exit_code == 1 and "- from the first key up to and including [1009]" in result.output, result.output


# -- 2. an empty source ----------------------------------------------------------------------------


def test_an_empty_source_completes_at_once_and_validates_its_target(copy, ch_client, db):
    invoke = copy(0)
    listed = json.loads(ok(invoke("backfill", "list", "--json")).output)
    assert (listed[0]["status"], listed[0]["rows_remaining"]) == ("pending", 0)
    assert "0 source rows past the position" in ok(invoke("backfill", "run", "1", "--dry-run")).output
    assert "backfill 1: completed; 0 rows processed (100%)" in ok(invoke("backfill", "run", "1")).output
    status = json.loads(ok(invoke("backfill", "status", "1", "--json")).output)
    assert (status["status"], status["rows_processed"], status["progress_percent"]) == ("completed", 0, 100.0)
    listed = json.loads(ok(invoke("backfill", "list", "--json")).output)
    assert (listed[0]["status"], listed[0]["rows_processed"], listed[0]["progress_percent"]) == ("completed", 0, 100.0)
    assert "passed (3 checks, 1 ranges, 0 source rows)" in ok(invoke("backfill", "validate", "1")).output
    ch_client.command(f"INSERT INTO {db}.dst VALUES (7, 'stray')")
    result = invoke("backfill", "validate", "1")
    assert result.exit_code == 1 and "failed: duplicate_keys_in_target" in said(result), said(result)
    assert "- from the first key to the end of the key space (0 source rows)" in result.output


# -- 8. a validation that checks nothing -----------------------------------------------------------


def test_a_validation_statement_with_no_rows_fails_saying_so(copy):
    invoke = copy(100, validate="SELECT 'c' AS check, 0 AS expected, 0 AS actual, 1 AS ok WHERE 0 AND {batch_range}")
    ok(invoke("backfill", "run", "1"))
    result = invoke("backfill", "validate", "1")
    assert result.exit_code == 1
    assert "statement 1 returned no rows for the range" in said(result)
    assert "a validation with no checks never passes" in said(result)


def test_an_empty_table_is_rebuilt_and_published(store_url, db, migrations, ch_client):
    """The whole rebuild of an empty table: `new --rebuild`, `up`, `run`, `validate`, `publish`."""
    root = migrations(
        1,
        "events",
        "CREATE TABLE {db}.events (k UInt64, v String) ENGINE = MergeTree ORDER BY k",
        "DROP TABLE {db}.events",
    )
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(build(), ["--url", store_url, "--database", db, "--migrations-dir", str(root), *args])

    ok(invoke("up"))
    ok(invoke("new", "rebuild_events", "--backfill", "--rebuild", "events"))
    ok(invoke("up"))
    assert "backfill 2: completed; 0 rows processed (100%)" in ok(invoke("backfill", "run", "2")).output
    assert "passed (3 checks, 1 ranges, 0 source rows)" in ok(invoke("backfill", "validate", "2")).output
    ok(invoke("backfill", "publish", "2"))
    assert json.loads(ok(invoke("backfill", "status", "2", "--json")).output)["published"] is True
    assert ch_client.command(f"SELECT count() FROM {db}.events") == 0


# -- 7. run --range: the range asked for, its bounds in the key's types, a whole-table replay confirmed --


def test_a_dry_run_of_a_range_shows_that_range(copy):
    invoke = copy(3000)
    ok(invoke("backfill", "run", "1", "--max-batches", "1", "--batch-size", "300"))  # the position is [299]
    out = ok(invoke("backfill", "run", "1", "--range", "[50]..[120]", "--dry-run", "--exact")).output
    assert "repair of the range after [50] up to and including [120], 70 source rows left in it" in out, out
    assert "first batch: after [50] up to and including [120] (70 rows)" in out
    assert "(k > 50" in out and "(k <= 120" in out and "(1 = 0 OR k NOT IN" in out  # the replay's own SQL
    assert "after [299]" not in out


@pytest.mark.parametrize(
    "bounds, message",
    [
        ("[1]..null", "the end is null where a key is needed; leave it empty for an open bound"),
        ("..null", "the end is null where a key is needed"),
        ("[-5]..[3]", "--range start [-5]: -5 is not a value of k UInt64"),
        (
            "[1]..[18446744073709551616]",
            "--range end [18446744073709551616]: 18446744073709551616 is not a value of k UInt64",
        ),
        ('["x"]..[3]', '--range start ["x"]: "x" is not a value of k UInt64'),
        ("[null]..[3]", "--range start [null]: null is null where a key is needed of k UInt64"),
        ("..", "--range .. holds every key of"),
        ("..[2999]", "--range ..[2999] holds every key of"),
    ],
)
def test_range_bounds_are_checked_in_the_keys_types_in_one_line(copy, ch_client, db, bounds, message):
    invoke = copy(3000)
    ok(invoke("backfill", "run", "1"))
    ch_client.command(f"TRUNCATE TABLE {db}.dst")
    for dry in ([], ["--dry-run"]):
        result = invoke("backfill", "run", "1", "--range", bounds, *dry)
        assert result.exit_code == 1 and message in said(result), said(result)
        assert "\n" not in str(result.exception)
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0  # nothing was replayed


def test_a_whole_table_replay_runs_with_yes(copy, ch_client, db):
    invoke = copy(3000)
    ok(invoke("backfill", "run", "1"))
    ch_client.command(f"ALTER TABLE {db}.dst DELETE WHERE k % 7 = 0", settings={"mutations_sync": 2})
    out = ok(invoke("backfill", "run", "1", "--range", "..", "--yes")).output
    assert "range null..null replayed, 3,000 source rows" in out, out
    assert ch_client.query(f"SELECT count(), uniqExact(k) FROM {db}.dst").result_rows == [(3000, 3000)]


# -- 6. the control channel acts on the backfill named, or refuses in one line ----------------------


def test_pause_status_and_resume_through_the_control_channel_act_on_the_backfill_named(tmp_path, migrations):
    """`run 1` holds the embedded store in a subprocess; other backfills, databases and verbs are refused in one
    line and leave no request behind; the pause of the running one stops it; a leftover request (a runner that
    died before its boundary, written here by hand) is discarded by the next run with a warning."""
    proc, store, root = _start_slow_run(tmp_path, migrations)
    control = store.with_name("store.control")
    try:
        refusals = {
            ("d", "pause", "99"): "error: backfill d_99 is not the one running (d_1); the store is held by pid",
            ("d", "pause", "7"): "error: backfill d_7 is not the one running (d_1)",
            ("nosuchdb", "pause", "1"): "error: backfill nosuchdb_1 is not the one running (d_1)",
            ("d", "status", "99"): "error: backfill d_99 is not the one running (d_1)",
            ("d", "resume", "1"): f"error: backfill d_1 is running in runner pid {proc.pid}; nothing to resume",
        }
        for (database, verb, version), message in refusals.items():
            result = run_migrate(["backfill", verb, version], store, database=database, migrations_dir=root)
            assert result.returncode == 1 and result.stderr.startswith(message), (verb, version, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not list(control.glob("pause-*"))
        live = run_migrate(["backfill", "status", "1", "--json"], store, migrations_dir=root)
        assert json.loads(live.stdout)["backfill_id"] == "d_1"
        paused = run_migrate(["backfill", "pause", "1"], store, migrations_dir=root)
        assert paused.returncode == 0 and paused.stdout.startswith(f"pause requested for d_1; runner pid {proc.pid}")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "backfill 1: paused;" in out, err
    (control / "pause-d_1").write_text(json.dumps({"requested_at": 0, "runner_pid": 4242}))
    resumed = run_migrate(["backfill", "resume", "1"], store, migrations_dir=root)
    assert resumed.returncode == 0 and "backfill 1: completed" in resumed.stdout, resumed.stderr
    assert "warning: discarded a pause request for d_1 made at " in resumed.stderr
    assert "for runner pid 4242, which stopped before it saw it; this run goes on" in resumed.stderr
    assert not (control / "pause-d_1").exists()
