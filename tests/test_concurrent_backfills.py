"""Three backfills at once on one embedded store, in one process, while operators poll, pause, resume and
apply a new migration: every target ends exact and no error (a lock error above all) reaches any of them.

`make soak-embedded` runs the same with more rows for longer (SOAK_ROWS, default 200,000 per backfill).
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from tests.conftest import fingerprint, own_client, wait_until

VERSIONS = (1, 2, 3)
# Three shapes of key: a String pair, an integer and a DateTime with a tie-breaker.
UP = {
    1: """CREATE TABLE {{db}}.src1 (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {{db}}.src1 SELECT ['', 'x''y', 'é'][number % 3 + 1], number, toString(number) FROM numbers({rows});
CREATE TABLE {{db}}.dst1 AS {{db}}.src1 ENGINE = MergeTree ORDER BY (a, b);""",
    2: """CREATE TABLE {{db}}.src2 (k UInt64, v String) ENGINE = MergeTree ORDER BY k;
INSERT INTO {{db}}.src2 SELECT number * 7, repeat('v', number % 50) FROM numbers({rows});
CREATE TABLE {{db}}.dst2 AS {{db}}.src2 ENGINE = MergeTree ORDER BY k;""",
    3: """CREATE TABLE {{db}}.src3 (t DateTime, n UInt32, v UInt64) ENGINE = MergeTree ORDER BY (t, n);
INSERT INTO {{db}}.src3 SELECT toDateTime('2026-01-01 00:00:00') + intDiv(number, 10), number % 10, number
    FROM numbers({rows});
CREATE TABLE {{db}}.dst3 AS {{db}}.src3 ENGINE = MergeTree ORDER BY (t, n);""",
}
KEYS = {1: ["a", "b"], 2: ["k"], 3: ["t", "n"]}
# The anti-join on {retry_count} makes every replay exact whatever the target's dedup window.
SQL = ("INSERT INTO {{db}}.dst{v} SELECT * FROM {{db}}.src{v} WHERE {{batch_range}} AND ({keys}) NOT IN "
       "(SELECT {keys} FROM {{db}}.dst{v} WHERE {{batch_range}} AND {{retry_count}} > 0)")


def write_backfills(migrations, rows: int, batch_size: int):
    for v in VERSIONS:
        keys = ", ".join(KEYS[v])
        root = migrations(v, f"copy{v}", UP[v].format(rows=rows), f"DROP TABLE {{db}}.dst{v}; DROP TABLE {{db}}.src{v}",
                          SQL.format(v=v, keys=keys),
                          {"migration_version": v, "batch_size": batch_size, "min_batch_size": 10,
                           "checkpoint_columns": KEYS[v], "source_table": f"src{v}"})
    return root


class Loop(threading.Thread):
    """Calls `action` every `every` seconds until stopped, keeping every exception it raised."""

    def __init__(self, action, every: float = 0.1):
        super().__init__(daemon=True)
        self.action, self.every, self.stopped, self.errors, self.calls = action, every, threading.Event(), [], 0

    def run(self):
        while not self.stopped.wait(self.every):
            try:
                self.action()
                self.calls += 1
            except Exception as exc:  # noqa: BLE001 - the test asserts there are none
                self.errors.append(repr(exc))


class Backfill(threading.Thread):
    """run_backfill of one version, then resume_backfill while it comes back paused. After its third batch
    it waits at the batch boundary (`at_gate`) until the test opens `gate`: the three are then surely
    running at once, whatever the machine's speed."""

    def __init__(self, manager, db, version):
        super().__init__(daemon=True)
        self.manager, self.db, self.version, self.results, self.error = manager, db, version, [], None
        self.resume, self.at_gate, self.gate = threading.Event(), threading.Event(), threading.Event()

    def _hold(self, summary, event):
        if event["number"] == 3:
            self.at_gate.set()
            assert self.gate.wait(120)

    def run(self):
        try:
            result = self.manager.run_backfill(self.db, self.version, on_batch=self._hold)
            self.results.append(result["stopped"])
            while result["stopped"] == "paused":
                assert self.resume.wait(120)
                self.resume.clear()
                result = self.manager.resume_backfill(self.db, self.version)
                self.results.append(result["stopped"])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc


def run_three_at_once(ch_client, store_url, db, migrations, migrator_for, rows: int, batch_size: int) -> dict:
    root = write_backfills(migrations, rows, batch_size)
    migrator_for(db, root).up()
    operator = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    lister = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    pollers = [Loop(lambda v=v: operator.get_status(db, v)) for v in VERSIONS]
    pollers.append(Loop(lambda: lister.list_backfills(db)))
    runners = {v: Backfill(ClickHouseBackfillManager(own_client(store_url), migrations_dir=root), db, v)
               for v in VERSIONS}
    for thread in [*pollers, *runners.values()]:
        thread.start()

    for runner in runners.values():
        assert runner.at_gate.wait(120), (runner.version, runner.error)
    assert {s["migration_version"]: s["status"] for s in lister.list_backfills(db)} == {1: "running", 2: "running",
                                                                             3: "running"}
    operator.pause_backfill(db, 2)
    runners[2].gate.set()
    wait_until(lambda: runners[2].results == ["paused"] or not runners[2].is_alive(), timeout=120)
    assert runners[2].results == ["paused"], (runners[2].results, runners[2].error)
    migrations(4, "more", "CREATE TABLE {db}.extra (x UInt8) ENGINE = MergeTree ORDER BY x")  # a new migration
    assert migrator_for(db, root).up() == [4]  # while backfills 1 and 3 hold their leases
    runners[1].gate.set()
    runners[3].gate.set()
    runners[2].resume.set()
    for runner in runners.values():
        runner.join(600)
    for poller in pollers:
        poller.stopped.set()
        poller.join(30)
    for v, runner in runners.items():
        assert runner.error is None, (v, runner.error)
        assert runner.results[-1] == "completed", (v, runner.results)
    assert runners[2].results == ["paused", "completed"]
    assert [p.errors for p in pollers] == [[]] * len(pollers)
    assert all(p.calls > 0 for p in pollers)
    for v in VERSIONS:
        keys = ", ".join(KEYS[v])
        got = fingerprint(ch_client, f"{db}.dst{v}", keys)
        assert got == fingerprint(ch_client, f"{db}.src{v}", keys) and got[0] == rows and got[3] == 0, (v, got)
        assert operator.get_status(db, v)["status"] == "completed"
    assert ch_client.command(f"EXISTS TABLE {db}.extra") == 1
    return {"polls": sum(p.calls for p in pollers)}


def test_three_backfills_at_once_with_operators_polling_pausing_and_migrating(ch_client, store_url, db, migrations,
                                                                             migrator_for):
    run_three_at_once(ch_client, store_url, db, migrations, migrator_for, rows=6_000, batch_size=300)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_three_backfills_at_once(ch_client, store_url, db, migrations, migrator_for):
    rows = int(os.environ.get("SOAK_ROWS", 200_000))
    started = time.monotonic()
    out = run_three_at_once(ch_client, store_url, db, migrations, migrator_for, rows=rows, batch_size=1_000)
    print(f"\nsoak: 3 x {rows:,} rows, {out['polls']:,} status/list polls, {time.monotonic() - started:.0f} s")
