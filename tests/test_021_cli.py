"""Migration 021 end to end through the CLI, as a new user runs it: up, generate, run, validate;
calls_complete must equal the finalised completed-before-cutover calls of calls_merged, row for row,
with rows the new write path wrote kept as they are."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_migrate, store_query

_AGG = {  # how each calls_complete column finalises from calls_merged's parts
    "trace_id": "ifNull(any(trace_id), '')", "parent_id": "any(parent_id)", "thread_id": "any(thread_id)",
    "turn_id": "any(turn_id)", "op_name": "ifNull(any(op_name), '')", "display_name": "argMaxMerge(display_name)",
    "started_at": "any(started_at)", "ended_at": "any(ended_at)", "exception": "any(exception)",
    "attributes_dump": "any(attributes_dump)", "inputs_dump": "any(inputs_dump)", "output_dump": "any(output_dump)",
    "summary_dump": "any(summary_dump)", "input_refs": "array_concat_agg(input_refs)",
    "output_refs": "array_concat_agg(output_refs)", "wb_user_id": "any(wb_user_id)", "wb_run_id": "any(wb_run_id)",
    "wb_run_step": "any(wb_run_step)", "wb_run_step_end": "any(wb_run_step_end)"}
# Aggregates get f_ names inside, plain names outside: a plain alias inside would shadow its column.
FINAL = ("SELECT project_id, id, " + ", ".join(
    f"assumeNotNull(f_{c}) AS {c}" if c in ("started_at", "ended_at") else f"f_{c} AS {c}" for c in _AGG)
    + " FROM (SELECT project_id, id, " + ", ".join(f"{e} AS f_{c}" for c, e in _AGG.items())
    + " FROM d.calls_merged GROUP BY project_id, id) WHERE f_ended_at IS NOT NULL"
    " AND f_started_at < parseDateTime64BestEffort('{cutover}', 3, 'UTC')")
COLS = ("project_id, id, trace_id, parent_id, thread_id, turn_id, op_name, display_name, started_at, ended_at, "
        "exception, attributes_dump, inputs_dump, output_dump, summary_dump, input_refs, output_refs, wb_user_id, "
        "wb_run_id, wb_run_step, wb_run_step_end")
sql = store_query  # statements against the store, in a subprocess (the store is one process's at a time)


@pytest.fixture
def store(tmp_path):
    store = tmp_path / "store"
    assert run_migrate(["up"], store).returncode == 0
    gen = subprocess.run([sys.executable, "-m", "backfill_plugin.ops.demo", "--calls", "20000", "--seed", "3"],
                         env={**__import__("os").environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": "d"},
                         capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert gen.returncode == 0, gen.stderr
    return store


def new_path_write(store, which: str) -> list:
    """The new write path writes a completed call straight into calls_complete (its own output)."""
    pick = f"SELECT project_id, id, toString(started_at, 'UTC') FROM ({FINAL.format(cutover='2100-01-01')}) " \
           f"ORDER BY started_at {which} LIMIT 1"
    key = sql(store, pick)[0][0]  # [project_id, id, started_at text]
    sql(store, f"INSERT INTO d.calls_complete ({COLS}) SELECT {COLS.replace('output_dump', chr(39) + 'new path' + chr(39))} "
               f"FROM ({FINAL.format(cutover='2100-01-01')}) WHERE project_id = '{key[0]}' AND id = '{key[1]}'")
    return key


def assert_row_for_row(store, cutover: str, new_key) -> None:
    final = FINAL.format(cutover=cutover)
    backfilled = f"SELECT {COLS} FROM d.calls_complete WHERE output_dump IS NULL OR output_dump != 'new path'"
    missing, extra, dupes, kept = sql(
        store,
        f"SELECT count() FROM (SELECT {COLS} FROM ({final}) WHERE (project_id, id) != ('{new_key[0]}', '{new_key[1]}') "
        f"EXCEPT {backfilled})",
        f"SELECT count() FROM ({backfilled} EXCEPT SELECT {COLS} FROM ({final}))",
        "SELECT count() - uniqExact(project_id, id) FROM d.calls_complete",
        "SELECT count() FROM d.calls_complete WHERE output_dump = 'new path'")
    assert (missing, extra, dupes, kept) == ([[0]], [[0]], [[0]], [[1]])


def test_run_5000_then_validate_default_cutover_from_the_new_write_path(store):
    """Default cutover: the earliest started_at the new write path already put in calls_complete."""
    key = new_path_write(store, "DESC")  # the newest call: the cutover becomes its started_at
    run = run_migrate(["backfill", "run", "21", "--batch-size", "5000"], store)
    assert run.returncode == 0, run.stderr
    status = json.loads(run_migrate(["backfill", "status", "21", "--json"], store).stdout)
    cutover = status["checkpoint"]["params"]["cutover_timestamp"]
    assert cutover == key[2] and status["checkpoint"]["params"]["dedup_window_seconds"] == 3600
    check = run_migrate(["backfill", "validate", "21"], store)
    assert check.returncode == 0 and "validation of backfill 21 passed" in check.stdout, check.stdout + check.stderr
    assert_row_for_row(store, cutover, key)


def test_explicit_cutover_and_a_call_the_new_path_wrote_within_the_window(store):
    """The new path wrote a call that started 10 minutes before the explicit cutover: never duplicated,
    never overwritten; everything else before the cutover is copied."""
    key = new_path_write(store, "DESC")
    cutover = sql(store, f"SELECT toString(parseDateTime64BestEffort('{key[2]}', 3, 'UTC') + INTERVAL 10 MINUTE, 'UTC')")[0][0][0]
    run = run_migrate(["backfill", "run", "21", "--batch-size", "5000", "--param", f"cutover_timestamp={cutover}"], store)
    assert run.returncode == 0, run.stderr
    assert run_migrate(["backfill", "validate", "21"], store).returncode == 0
    assert_row_for_row(store, cutover, key)


def test_validate_fails_on_a_missing_or_duplicated_row(store):
    """One row taken out, then (restored and) one row written twice: validate names each."""
    assert run_migrate(["backfill", "run", "21"], store).returncode == 0
    assert run_migrate(["backfill", "validate", "21"], store).returncode == 0
    first = "SELECT * FROM d.calls_complete ORDER BY project_id, id LIMIT 1"
    sql(store, "CREATE TABLE d.kept AS d.calls_complete", f"INSERT INTO d.kept {first}",
        "DELETE FROM d.calls_complete WHERE (project_id, id) IN (SELECT project_id, id FROM d.kept)")
    check = run_migrate(["backfill", "validate", "21"], store)
    assert check.returncode == 1 and "MISMATCH" in check.stdout
    assert check.stderr.startswith("error: validation of backfill 21 failed: missing_in_calls_complete"), check.stderr
    # In small ranges: exactly one range differs, it holds the removed key, and its repair command is printed.
    removed = sql(store, "SELECT project_id, id FROM d.kept")[0][0]
    check = run_migrate(["backfill", "validate", "21", "--range-rows", "3000", "--json"], store)
    assert check.returncode == 1, check.stderr
    out = json.loads(check.stdout)
    assert out["ranges_checked"] > 5 and out["differing_ranges_total"] == 1 and not out["ok"]
    (diff,) = out["differing_ranges"]
    assert diff["start"] is None and diff["end"] >= removed  # the first key: the first range
    assert diff["repair"] == f"migrate backfill run 21 --range '..{json.dumps(diff['end'])}'"
    text = run_migrate(["backfill", "validate", "21", "--range-rows", "3000"], store)
    assert "differing ranges: 1; the first 1 (start exclusive, end inclusive):" in text.stdout, text.stdout
    assert f"  repair: {diff['repair']}" in text.stdout
    sql(store, "INSERT INTO d.calls_complete SELECT * FROM d.kept", "INSERT INTO d.calls_complete SELECT * FROM d.kept")
    check = run_migrate(["backfill", "validate", "21"], store)
    assert check.returncode == 1 and "MISMATCH" in check.stdout
    assert check.stderr.startswith("error: validation of backfill 21 failed: duplicate_keys_in_calls_complete"), \
        check.stderr
    assert "missing_in_calls_complete" not in check.stderr
