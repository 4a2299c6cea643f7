"""`validate` walks the key space in ranges: it names exactly the damaged ranges, a resumed walk gives the
result of an uninterrupted one, a clean backfill passes, and it refuses while a runner holds the lease.

Migration 021 on demo data, applied and backfilled in-process on the shared store (real engine)."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys

import pytest

from backfill_plugin.errors import BackfillError
from backfill_plugin.ops.demo import generate_calls
from backfill_plugin.ops.validate import DEFAULT_RANGE_ROWS, Validation, repair_command, validate
from backfill_plugin.protocol.checkpoint import backfill_id
from backfill_plugin.protocol.lease import new_lease
from backfill_plugin.protocol.manager import ClickHouseBackfillManager
from tests.conftest import REPO, Lines, migrate_env, start_migrate

RANGE_ROWS = 150  # about 2,000 source rows: a dozen ranges


@pytest.fixture
def backfilled(ch_client, db, project_migrations, migrator_for):
    """Migrations 001 to 021 applied, 1,400 demo calls, the 021 backfill completed; returns the manager."""
    migrator_for(db, project_migrations).up()
    generate_calls(ch_client, db, 1400, seed=9, batch=500)
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=project_migrations, sleep=lambda s: None)
    assert mgr.run_backfill(db, 21, params={"cutover_timestamp": "2100-01-01 00:00:00"})["status"] == "completed"
    return mgr


def _contains(client, rng: dict, key: tuple) -> bool:
    """The test's own reading of (start, end]: tuple comparison in the engine, not the framework's predicate
    (an end None is open above)."""
    above = rng["start"] is None or client.command(
        "SELECT tuple({k0:String}, {k1:String}) > tuple({s0:String}, {s1:String})",
        parameters={"k0": key[0], "k1": key[1], "s0": rng["start"][0], "s1": rng["start"][1]})
    below = rng["end"] is None or client.command(  # the last range is open above
        "SELECT tuple({k0:String}, {k1:String}) <= tuple({e0:String}, {e1:String})",
        parameters={"k0": key[0], "k1": key[1], "e0": rng["end"][0], "e1": rng["end"][1]})
    return bool(above) and bool(below)


def _damage(client, db) -> dict:
    """One missing row, one duplicated key and one wrong value in one column, far apart in key order."""
    keys = [tuple(r) for r in client.query(f"SELECT project_id, id FROM {db}.calls_complete "
                                           f"ORDER BY project_id, id").result_rows]
    missing, duplicated, altered = keys[50], keys[len(keys) // 2], keys[-50]
    where = "project_id = {p:String} AND id = {i:String}"
    sync = {"mutations_sync": 2}
    client.command(f"DELETE FROM {db}.calls_complete WHERE {where}",
                   parameters={"p": missing[0], "i": missing[1]}, settings=sync)
    client.command(f"INSERT INTO {db}.calls_complete SELECT * FROM {db}.calls_complete WHERE {where}",
                   parameters={"p": duplicated[0], "i": duplicated[1]})
    client.command(f"ALTER TABLE {db}.calls_complete UPDATE wb_run_step_end = ifNull(wb_run_step_end, 0) + 1 "
                   f"WHERE {where}", parameters={"p": altered[0], "i": altered[1]}, settings=sync)
    return {"missing": missing, "duplicated": duplicated, "altered": altered}


def test_reports_exactly_the_three_damaged_ranges(ch_client, db, backfilled):
    damaged = _damage(ch_client, db)
    out = validate(backfilled, db, 21, range_rows=RANGE_ROWS)
    assert out["finished"] and not out["ok"] and out["ranges_checked"] > 8
    assert out["differing_ranges_total"] == 3 == len(out["differing_ranges"])
    first, second, third = out["differing_ranges"]
    assert _contains(ch_client, first, damaged["missing"])
    assert _contains(ch_client, second, damaged["duplicated"])
    assert _contains(ch_client, third, damaged["altered"])
    failing = [{c["check"] for c in d["checks"] if not c["ok"]} for d in out["differing_ranges"]]
    assert failing == [{"missing_in_calls_complete", "source_count_equals_target_rows", "rows_equal_source"},
                       {"duplicate_keys_in_calls_complete", "source_count_equals_target_rows"},
                       {"rows_equal_source"}]
    totals = {c["check"]: (c["expected"], c["actual"], c["ranges_failed"]) for c in out["checks"]}
    assert totals["missing_in_calls_complete"] == (0, 1, 1)
    assert totals["duplicate_keys_in_calls_complete"] == (0, 1, 1)
    calls = ch_client.command(f"SELECT count() FROM (SELECT 1 FROM {db}.calls_merged GROUP BY project_id, id "
                              f"HAVING any(ended_at) IS NOT NULL AND any(started_at) IS NOT NULL)")
    assert totals["source_count_equals_target_rows"] == (calls, calls, 2)  # one row less, one more
    assert totals["rows_equal_source"] == (calls, calls - 2, 2)
    assert out["rows_walked"] == ch_client.command(f"SELECT count() FROM {db}.calls_merged")
    # The repair command names the range with the keys as `status --json` prints a position.
    cmd = shlex.split(third["repair"])
    assert cmd[:5] == ["migrate", "backfill", "run", "21", "--range"]
    start, end = cmd[5].split("..")
    assert json.loads(start) == third["start"] and third["end"] is None and end == ""  # the last range: open above
    assert repair_command(21, None, ["p", "x"]) == "migrate backfill run 21 --range '..[\"p\", \"x\"]'"


class Interrupt(BaseException):
    """Stands for Ctrl-C after k ranges (raised from the per-range callback)."""


@pytest.mark.parametrize("after", [1, 6])
def test_a_resumed_validation_gives_the_uninterrupted_result(ch_client, db, backfilled, after):
    _damage(ch_client, db)
    whole = validate(backfilled, db, 21, range_rows=RANGE_ROWS, restart=True)

    def stop_after(val, rng):
        if val.state["ranges_checked"] == after:
            raise Interrupt()
    with pytest.raises(Interrupt):
        validate(backfilled, db, 21, range_rows=RANGE_ROWS, restart=True, on_range=stop_after)
    saved = backfilled.store.load(backfill_id(db, 21)).checkpoint["validation"]
    assert saved["ranges_checked"] == after and not saved["finished"]
    again = Validation(backfilled, db, 21)  # no --range-rows: the stored range size is resumed
    assert again.resumed and again.state["range_rows"] == RANGE_ROWS
    resumed = again.run()
    assert resumed["resumed"]
    keys = ("ok", "checks", "differing_ranges", "differing_ranges_total", "ranges_checked", "rows_walked")
    assert {k: resumed[k] for k in keys} == {k: whole[k] for k in keys}
    # A finished validation runs again from scratch, with the default range size unless told otherwise.
    fresh = Validation(backfilled, db, 21)
    assert not fresh.resumed and fresh.state["range_rows"] == DEFAULT_RANGE_ROWS and fresh.state["ranges_checked"] == 0


def test_a_clean_backfill_passes_and_the_status_row_is_untouched(ch_client, db, backfilled):
    before = backfilled.get_status(db, 21)
    out = validate(backfilled, db, 21, range_rows=RANGE_ROWS)
    assert out["ok"] and out["finished"] and out["differing_ranges"] == [] and out["ranges_checked"] > 8
    assert all(c["ok"] and c["ranges_failed"] == 0 for c in out["checks"])
    after = backfilled.get_status(db, 21)
    assert {k: after[k] for k in ("status", "position", "rows_processed")} == \
        {k: before[k] for k in ("status", "position", "rows_processed")}


def test_an_unfinished_backfill_is_validated_only_up_to_its_position(ch_client, db, project_migrations, migrator_for):
    migrator_for(db, project_migrations).up()
    generate_calls(ch_client, db, 600, seed=4, batch=300)
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=project_migrations, sleep=lambda s: None)
    mgr.run_backfill(db, 21, max_batches=2, batch_size=200, params={"cutover_timestamp": "2100-01-01 00:00:00"},
                     pacing={"target_batch_seconds": "off"})  # two fixed batches: 400 of the 610 source rows
    done = mgr.store.load(backfill_id(db, 21)).checkpoint
    out = validate(mgr, db, 21, range_rows=70)
    assert out["ok"] and out["scope_end"] == done["position"] and out["scope"] == "up to the backfill's position"
    source = ch_client.command(f"SELECT count() FROM {db}.calls_merged")
    assert out["rows_walked"] == done["rows_processed"] == 400 < source and out["differing_ranges"] == []


def test_refuses_while_a_runner_holds_the_lease(ch_client, db, backfilled):
    row = backfilled.store.load(backfill_id(db, 21))
    row.status, row.checkpoint["lease"] = "running", new_lease("otherhost:1:abcd")
    backfilled.store.save(row)
    with pytest.raises(BackfillError, match=r"is running \(otherhost:1:abcd\); validate it once it has stopped"):
        validate(backfilled, db, 21, range_rows=RANGE_ROWS)


def test_not_started_is_a_one_line_error(ch_client, db, project_migrations, migrator_for):
    migrator_for(db, project_migrations).up()
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=project_migrations)
    with pytest.raises(BackfillError, match=f"backfill {db}_21 has not started; nothing to validate"):
        validate(mgr, db, 21)


def test_ctrl_c_saves_the_position_and_the_next_validate_resumes(cli):
    """SIGINT to `migrate backfill validate` in a subprocess: exit 130 after the current range, then resume."""
    assert cli("up").returncode == 0
    gen = subprocess.run([sys.executable, "-m", "backfill_plugin.ops.demo", "--calls", "1000", "--seed", "2"],
                         env=migrate_env(cli.store), capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert cli("backfill", "run", "21").returncode == 0
    whole = cli("backfill", "validate", "21", "--range-rows", "100", "--json")  # about 20 ranges
    assert whole.returncode == 0, whole.stderr
    proc = start_migrate(["backfill", "validate", "21", "--range-rows", "100", "--restart"], cli.store)
    lines = Lines(proc)
    lines.wait_for("range ", count=3)
    proc.send_signal(signal.SIGINT)
    out, err = lines.rest()
    assert proc.returncode == 130, err
    assert "position saved; resume with 'migrate backfill validate 21'" in err
    again = cli("backfill", "validate", "21", "--json")
    assert again.returncode == 0, again.stderr
    assert "resuming the validation of backfill 21 after" in again.stderr
    first, second = json.loads(whole.stdout), json.loads(again.stdout)
    assert second["resumed"] and not first["resumed"] and second["range_rows"] == 100
    keys = ("ok", "checks", "differing_ranges", "ranges_checked", "rows_walked")
    assert {k: second[k] for k in keys} == {k: first[k] for k in keys}


def test_a_validation_state_that_is_not_ours_starts_over(ch_client, db, backfilled):
    row = backfilled.store.load(backfill_id(db, 21))
    row.checkpoint["validation"] = {"position": "not a key", "finished": False}
    backfilled.store.save(row)
    val = Validation(backfilled, db, 21, range_rows=RANGE_ROWS)
    assert not val.resumed and val.note == "the stored validation state is unreadable: starting over"
    assert val.run()["ok"]


def test_run_range_repairs_exactly_the_reported_range(ch_client, db, backfilled):
    """The repair command validate prints, parsed as the CLI parses it and run: the missing call comes
    back, nothing else is written, and a fresh validation passes."""
    from backfill_plugin.protocol.repair import parse
    keys = [tuple(r) for r in ch_client.query(f"SELECT project_id, id FROM {db}.calls_complete "
                                              f"ORDER BY project_id, id").result_rows]
    gone = keys[len(keys) // 3]
    ch_client.command(f"DELETE FROM {db}.calls_complete WHERE project_id = {{p:String}} AND id = {{i:String}}",
                      parameters={"p": gone[0], "i": gone[1]}, settings={"mutations_sync": 2})
    out = validate(backfilled, db, 21, range_rows=RANGE_ROWS)
    assert out["differing_ranges_total"] == 1
    reported = out["differing_ranges"][0]
    start, end = parse(shlex.split(reported["repair"])[5])
    assert (start, end) == (reported["start"], reported["end"])
    before = ch_client.command(f"SELECT count() FROM {db}.calls_complete")
    result = backfilled.run_backfill(db, 21, key_range=(start, end))
    assert result["stopped"] == "repaired" and result["status"] == "completed"
    assert ch_client.command(f"SELECT count() FROM {db}.calls_complete") == before + 1
    again = validate(backfilled, db, 21, range_rows=RANGE_ROWS)
    assert again["ok"] and again["differing_ranges_total"] == 0 and not again["resumed"]
