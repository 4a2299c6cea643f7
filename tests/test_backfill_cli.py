"""`migrate backfill ...` as operators use it: output, JSON contract, errors, the embedded control channel."""
from __future__ import annotations

import json
import signal
import time

import pytest
from click.testing import CliRunner

from migrator.cli import build
from tests.conftest import assert_copied_exactly, assert_store_copied_exactly, run_migrate, start_migrate

LIST_KEYS = {"migration_version", "backfill_id", "db_name", "description", "status", "rows_processed",
             "batches_completed", "current_batch_size", "progress_percent", "started_at", "updated_at",
             "rows_remaining", "rows_remaining_estimated", "published", "published_at"}
STATUS_KEYS = LIST_KEYS | {"checkpoint", "error_log", "rows_per_second", "eta_seconds", "lease"}

UP = """CREATE TABLE {db}.src (k UInt64, v String) ENGINE = MergeTree ORDER BY k;
INSERT INTO {db}.src SELECT number, toString(number) FROM numbers(5000);
CREATE TABLE {db}.dst (k UInt64, v String) ENGINE = MergeTree ORDER BY k
    SETTINGS non_replicated_deduplication_window = 1000"""
SQL = "INSERT INTO {db}.dst SELECT k, v FROM {db}.src WHERE {batch_range}"
META = {"migration_version": 1, "batch_size": 500, "checkpoint_columns": ["k"], "source_table": "src",
        "description": "copy src", "min_batch_size": 1}


@pytest.fixture
def invoke(store_url, db, migrations):
    """CliRunner over the test process's own store (an embedded store is one per process)."""
    root = migrations(1, "copy", UP, "DROP TABLE {db}.src; DROP TABLE {db}.dst", SQL, META)
    runner = CliRunner()

    def call(*args):
        return runner.invoke(build(), ["--url", store_url, "--database", db, "--migrations-dir", str(root), *args])
    call.root = root
    return call


def test_list_json_shows_discovered_then_registered(invoke):
    before = json.loads(invoke("backfill", "list", "--json").output)
    assert [(i["migration_version"], i["status"]) for i in before] == [(1, "not registered")]
    assert set(before[0]) == LIST_KEYS
    assert before[0]["rows_remaining"] is None and before[0]["progress_percent"] is None  # no source table yet
    assert invoke("up").exit_code == 0
    after = json.loads(invoke("backfill", "list", "--json").output)
    assert after[0]["status"] == "pending" and after[0]["description"] == "copy src"
    # A pending backfill has a progress now: an estimate from the primary index, or a count with --exact.
    assert (after[0]["rows_remaining"] >= 5000, after[0]["rows_remaining_estimated"], after[0]["progress_percent"]) \
        == (True, True, 0.0)
    exact = json.loads(invoke("backfill", "list", "--json", "--exact").output)
    assert (exact[0]["rows_remaining"], exact[0]["rows_remaining_estimated"]) == (5000, False)
    table = invoke("backfill", "list").output
    assert "~0.0%" in table
    for header in ("Version", "Description", "Status", "Progress", "Rows", "Started", "Updated"):
        assert header in table


def test_run_prints_a_line_per_batch_and_status_json_contract(invoke):
    assert invoke("up").exit_code == 0
    result = invoke("backfill", "run", "1", "--max-batches", "3")
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.output.splitlines() if line.startswith("batch ")] == \
        ["batch 1", "batch 2", "batch 3"]
    status = json.loads(invoke("backfill", "status", "1", "--json", "--exact").output)
    assert STATUS_KEYS <= set(status)
    assert (status["status"], status["rows_processed"], status["progress_percent"]) == ("paused", 1500, 30.0)
    assert (status["rows_remaining"], status["rows_remaining_estimated"]) == (3500, False)
    # Without --exact the primary index answers: whole granules, so never fewer rows than remain.
    estimated = json.loads(invoke("backfill", "status", "1", "--json").output)
    assert estimated["rows_remaining_estimated"] is True and estimated["rows_remaining"] >= 3500
    assert status["rows_per_second"] > 0 and status["eta_seconds"] >= 0
    assert status["checkpoint"]["position"] == [1499]
    done = invoke("backfill", "run", "1")
    assert done.exit_code == 0 and "completed" in done.output
    status = json.loads(invoke("backfill", "status", "1", "--json").output)
    assert (status["status"], status["progress_percent"], status["eta_seconds"]) == ("completed", 100.0, 0.0)


def test_dry_run_shows_scope_range_and_sql(invoke, ch_client, db):
    invoke("up")
    out = invoke("backfill", "run", "1", "--dry-run").output
    assert "5,000 source rows past the position" in out
    assert "up to and including [499]" in out
    assert f"INSERT INTO {db}.dst SELECT k, v FROM {db}.src WHERE (k <= 499" in out
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_pause_resume_reset(invoke, ch_client, db):
    invoke("up")
    invoke("backfill", "run", "1", "--max-batches", "1")
    assert "paused" in json.loads(invoke("backfill", "status", "1", "--json").output)["status"]
    assert invoke("backfill", "resume", "1").exit_code == 0
    assert_copied_exactly(ch_client, db, 5000, keys="k")
    assert invoke("backfill", "reset", "1", "--yes").exit_code == 0
    assert json.loads(invoke("backfill", "status", "1", "--json").output)["rows_processed"] == 0


# -- the error contract, as a user sees it: subprocesses ---------------------------------------

@pytest.fixture
def project(tmp_path, migrations):
    root = migrations(1, "copy", UP, "DROP TABLE {db}.src; DROP TABLE {db}.dst", SQL, META)
    store = tmp_path / "store"
    return lambda *args, **kw: run_migrate(args, store, database="d", migrations_dir=root, **kw)


@pytest.mark.parametrize("args, message", [
    (["backfill", "run", "7"], "error: no backfill for version 7 in"),
    (["backfill", "reset", "1"], "error: reset forgets all progress of backfill 1; add --yes to confirm"),
    (["backfill", "resume", "1"], "error: backfill d_1 is pending; only a paused or failed backfill (or one whose runner died) can be resumed"),
])
def test_errors_are_one_line(project, args, message):
    assert project("up").returncode == 0
    result = project(*args)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_resume_of_completed_is_refused(project):
    project("up")
    assert project("backfill", "run", "1").returncode == 0
    result = project("backfill", "resume", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: backfill d_1 is completed; only a paused or failed backfill (or one whose runner died) can be resumed"


def _start_slow_run(tmp_path, migrations, batches=40):
    slow = SQL + " AND sleepEachRow(0.002) = 0"  # ~1 s per batch of 500 rows
    root = migrations(1, "copy", UP, "DROP TABLE {db}.src; DROP TABLE {db}.dst", slow, META)
    store = tmp_path / "store"
    assert run_migrate(["up"], store, migrations_dir=root).returncode == 0
    proc = start_migrate(["backfill", "run", "1"], store, migrations_dir=root)
    status_file = store.with_name("store.control") / "status-d_1.json"
    deadline = time.time() + 60
    while not (status_file.exists() and json.loads(status_file.read_text()).get("batches_completed", 0) >= 1):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    return proc, store, root


def test_status_and_pause_from_a_second_process_on_the_embedded_store(tmp_path, migrations):
    proc, store, root = _start_slow_run(tmp_path, migrations)
    try:
        live = run_migrate(["backfill", "status", "1", "--json"], store, migrations_dir=root)
        assert live.returncode == 0, live.stderr
        info = json.loads(live.stdout)
        assert info["status"] == "running" and info["rows_processed"] >= 500
        assert info["source"].startswith("control channel") and info["runner_pid"] == proc.pid
        held = run_migrate(["status"], store, migrations_dir=root)
        assert held.returncode == 1 and f"is held by pid {proc.pid}" in held.stderr
        assert len(held.stderr.strip().splitlines()) == 1
        paused = run_migrate(["backfill", "pause", "1"], store, migrations_dir=root)
        assert paused.returncode == 0 and "pause requested" in paused.stdout
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "backfill 1: paused;" in out and "resume with 'migrate backfill resume 1'" in out
    final = json.loads(run_migrate(["backfill", "status", "1", "--json"], store, migrations_dir=root).stdout)
    assert final["status"] == "paused" and final["rows_processed"] < 5000
    assert run_migrate(["backfill", "resume", "1"], store, migrations_dir=root).returncode == 0
    final = json.loads(run_migrate(["backfill", "status", "1", "--json"], store, migrations_dir=root).stdout)
    assert (final["status"], final["rows_processed"]) == ("completed", 5000)
    assert_store_copied_exactly(store, 5000, keys="k")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_pauses_at_batch_boundary(tmp_path, migrations, sig, code):
    proc, store, root = _start_slow_run(tmp_path, migrations)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "resume with 'migrate backfill resume 1'" in err and "Traceback" not in err
    status = json.loads(run_migrate(["backfill", "status", "1", "--json"], store, migrations_dir=root).stdout)
    assert status["status"] == "paused" and status["checkpoint"]["in_flight"] is None


@pytest.mark.parametrize("batch_size, last_batch", [(50000, "total 5,000 (100.0%)"), (500, "total 5,000 (100.0%)")],
                         ids=["one-batch", "exact-multiple"])
def test_progress_is_exact_once_the_run_knows_it_is_done(invoke, batch_size, last_batch):
    """A batch with fewer rows than its size took every row left, so it shows 100%; a batch that ends
    exactly at the last key shows 100% too: near the end the runner counts the rows left instead of
    trusting the index's estimate (status.refine_total); the completed run's last line says 100% either way."""
    assert invoke("up").exit_code == 0
    run = invoke("backfill", "run", "1", "--batch-size", str(batch_size))
    assert run.exit_code == 0, run.output
    lines = run.output.strip().splitlines()
    assert last_batch in lines[-2], lines
    assert lines[-1].startswith("backfill 1: completed; 5,000 rows processed (100%), "), lines
