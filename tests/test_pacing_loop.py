"""Pacing inside the real batch loop: the size converges to a target duration, the runner waits on a
real health signal (active parts with merges stopped), a pause ends the wait, the rate ceiling holds.

Everything runs on the engine: `sleepEachRow` makes a statement slow, `SYSTEM STOP MERGES` makes
parts pile up in the target, and the checks compare every column of the target with the source.
"""
from __future__ import annotations

import time

from backfill_plugin import ClickHouseBackfillManager
from tests.conftest import Runner, assert_copied_exactly, fingerprint, own_client, wait_until

UP = """
CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS index_granularity = 128;
INSERT INTO {{db}}.src SELECT ['', 'x''y', 'é'][number % 3 + 1], number, toString(number * 7) FROM numbers({rows});
CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
"""
SQL = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND sleepEachRow(%s) = 0 "
       "AND (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range} AND {retry_count} > 0)")
META = {"migration_version": 1, "checkpoint_columns": ["a", "b"], "source_table": "src",
        "settings": {"max_block_size": 64, "max_threads": 1}}


def write_sql(root, seconds_per_row: float) -> None:
    (root / "001_x.backfill.sql").write_text(SQL % seconds_per_row)


def test_batch_size_converges_to_the_target_and_shrinks_when_batches_slow_down(ch_client, db, shared_store_backfill):
    """1 ms a row and a 0.3 s target: about 300 rows meet it; then 3 ms a row: about 100."""
    root = shared_store_backfill(UP.format(rows=20000), SQL % 0.001,
                                 {**META, "batch_size": 40, "min_batch_size": 10, "max_batch_size": 4000,
                                  "target_batch_seconds": 0.3})
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    sizes = []
    mgr.run_backfill(db, 1, max_batches=14, on_batch=lambda s, e: sizes.append((e["batch_size"], e["seconds"])))
    assert sizes[0][0] == 40 and all(a <= b * 1.5 + 1 for (a, _), (b, _) in zip(sizes[1:], sizes))  # bounded steps
    settled = [size for size, _ in sizes[-3:]]
    assert all(150 <= size <= 600 for size in settled), sizes  # within 2x of the 300 rows that take 0.3 s
    write_sql(root, 0.003)  # the statement gets three times slower per row
    slower = []
    mgr.run_backfill(db, 1, max_batches=10, on_batch=lambda s, e: slower.append((e["batch_size"], e["seconds"])))
    assert all(50 <= size <= 200 for size, _ in slower[-3:]), slower  # within 2x of 100
    assert slower[-1][0] < settled[-1]
    status = mgr.get_status(db, 1)
    assert "target 0.3 s" in status["batch_size_reason"], status["batch_size_reason"]


def test_runner_waits_while_the_target_has_too_many_parts_then_finishes_exactly(
        ch_client, db, store_url, shared_store_backfill, monkeypatch):
    """7 batches of 300 rows, at most 3 active parts: with merges stopped the runner holds after 4.

    chDB's background merge selector leaves a handful of tiny parts alone for a long time, so the
    merges catching up are an OPTIMIZE ... FINAL once merges are started again."""
    monkeypatch.setenv("BACKFILL_HEALTH_SECONDS", "0")  # check before every batch
    root = shared_store_backfill(UP.format(rows=2100), SQL % 0, {**META, "batch_size": 300, "max_target_parts": 3})
    ch_client.command(f"SYSTEM STOP MERGES {db}.dst")  # every batch leaves its own part
    runner = Runner(ClickHouseBackfillManager(ch_client, migrations_dir=root), db)
    runner.start()
    operator = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    wait_until(lambda: (operator.get_status(db, 1, live_counts=False)["throttled"] or {}).get("signal") == "target_parts")
    held = operator.get_status(db, 1, live_counts=False)
    assert held["status"] == "running" and held["throttled"]["value"] == 4 and held["throttled"]["limit"] == 3
    copied = fingerprint(operator.ch_client, f"{db}.dst")
    time.sleep(2.5)  # several health checks later: still waiting, and no batch started meanwhile
    assert fingerprint(operator.ch_client, f"{db}.dst") == copied
    assert operator.get_status(db, 1, live_counts=False)["batches_completed"] == held["batches_completed"] == 4
    operator.ch_client.command(f"SYSTEM START MERGES {db}.dst")
    operator.ch_client.command(f"OPTIMIZE TABLE {db}.dst FINAL")
    runner.join(120)
    assert runner.error is None and runner.result["status"] == "completed"
    assert operator.get_status(db, 1)["throttled"] is None
    assert_copied_exactly(ch_client, db, rows=2100)


def test_parts_hold_within_one_batch_of_the_limit_however_fast_the_batches(
        ch_client, db, store_url, shared_store_backfill, monkeypatch):
    """500-row batches of a few tens of ms, merges stopped, at most 6 parts, the health interval left at its
    default 5 s: the parts never pass the limit by more than the one part a batch writes (measured after
    every batch), not by the dozens of batches five seconds hold."""
    monkeypatch.delenv("BACKFILL_HEALTH_SECONDS", raising=False)
    limit = 6
    root = shared_store_backfill(UP.format(rows=30_000), SQL % 0, {**META, "batch_size": 500, "max_target_parts": limit})
    ch_client.command(f"SYSTEM STOP MERGES {db}.dst")
    sampler = own_client(store_url)
    parts = []

    def count_parts(summary, event):
        parts.append(sampler.command(f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'dst' "
                                     "AND active"))
    runner = Runner(ClickHouseBackfillManager(ch_client, migrations_dir=root), db, on_batch=count_parts)
    runner.start()
    operator = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    wait_until(lambda: (operator.get_status(db, 1, live_counts=False)["throttled"] or {}).get("signal") == "target_parts")
    operator.pause_backfill(db, 1)
    runner.join(60)
    assert runner.error is None and runner.result["stopped"] == "paused", (runner.error, runner.result)
    assert parts == list(range(1, len(parts) + 1))  # one part a batch, none merged away
    assert max(parts) <= limit + 1, parts
    ch_client.command(f"SYSTEM START MERGES {db}.dst")
    done = operator.resume_backfill(db, 1, pacing={"max_target_parts": "off"})
    assert done["status"] == "completed"
    assert_copied_exactly(ch_client, db, rows=30_000)


def test_pause_while_throttled_stops_the_runner_and_resume_finishes(
        ch_client, db, store_url, shared_store_backfill, monkeypatch):
    monkeypatch.setenv("BACKFILL_HEALTH_SECONDS", "0")
    root = shared_store_backfill(UP.format(rows=2000), SQL % 0, {**META, "batch_size": 500, "max_target_parts": 1})
    ch_client.command(f"SYSTEM STOP MERGES {db}.dst")
    runner = Runner(ClickHouseBackfillManager(ch_client, migrations_dir=root), db)
    runner.start()
    operator = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    wait_until(lambda: operator.get_status(db, 1, live_counts=False)["throttled"] is not None)
    operator.pause_backfill(db, 1)
    runner.join(30)
    assert not runner.is_alive() and runner.error is None
    assert (runner.result["stopped"], runner.result["status"]) == ("paused", "paused")
    assert operator.get_status(db, 1)["throttled"] is None
    ch_client.command(f"SYSTEM START MERGES {db}.dst")
    done = ClickHouseBackfillManager(ch_client, migrations_dir=root).resume_backfill(
        db, 1, pacing={"max_target_parts": "off"})  # a limit turned off for this run only
    assert done["status"] == "completed"
    assert_copied_exactly(ch_client, db, rows=2000)


def test_rate_ceiling_holds_within_20_percent(ch_client, db, shared_store_backfill):
    root = shared_store_backfill(UP.format(rows=2000), SQL % 0, {**META, "batch_size": 250})
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    ends = []
    started = time.monotonic()
    result = mgr.run_backfill(db, 1, pacing={"max_rows_per_second": 500},
                              on_batch=lambda s, e: ends.append((time.monotonic(), e["rows_processed"])))
    assert result["status"] == "completed" and len(ends) == 8
    # Each batch may end only when the rows so far fit under the ceiling: batch k ends no earlier than
    # (k - 1) * 0.5 s after the first; across the run the rate stays within 20% of 500 rows/s.
    rate = (ends[-1][1] - ends[0][1]) / (ends[-1][0] - ends[0][0])
    assert 400 <= rate <= 600, rate
    assert time.monotonic() - started >= 2000 / 500 * 0.8
    assert_copied_exactly(ch_client, db, rows=2000)


def test_pacing_options_are_checked_on_the_command_line(cli):
    bad = cli("backfill", "run", "1", "--target-batch-seconds", "soon")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--target-batch-seconds" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
