"""The whole online rebuild through the CLI: `migrate new --rebuild`, `up`, `backfill run`, `validate`,
`publish`; the live table ends with the new sorting key and exactly the old rows, also when kill -9
lands during `run` and during `publish`. 100k rows by default, 1M under `-m slow`.
"""
from __future__ import annotations

import random
import re
import signal
import threading

import pytest

from tests.conftest import Lines, report, run_migrate, start_migrate, store_query

EVENTS = """
CREATE TABLE {{db}}.events (k UInt64, g UInt32, t DateTime, v String, n Nullable(Int64), tags Array(String))
ENGINE = MergeTree PARTITION BY toYYYYMM(t) ORDER BY k;
INSERT INTO {{db}}.events SELECT intDiv(number, 2), number % 97, toDateTime('2024-01-01 00:00:00') + number * 60,
    toString(cityHash64(number)), if(number % 5 = 0, NULL, toInt64(number)), [toString(number % 3)]
FROM numbers({rows});
CREATE TABLE {{db}}.orig AS {{db}}.events;
INSERT INTO {{db}}.orig SELECT * FROM {{db}}.events
"""
FP = "SELECT count(), sum(cityHash64(k, g, t, v, n, tags)), groupBitXor(cityHash64(k, g, t, v, n, tags)) FROM d.{}"


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def kill_while(store, root, args, after_prefix: str, kills: int, rng, delay=(0.0, 0.5)) -> int:
    """Start `migrate args` and kill -9 it a random moment after its first `after_prefix` line, up to
    `kills` times; then let one run finish. Returns how many kills landed."""
    landed = 0
    while True:
        proc = start_migrate(args, store, migrations_dir=root)
        lines, ended = Lines(proc), False
        try:
            lines.wait_for(after_prefix, 1, timeout=240) if after_prefix else None
        except AssertionError:
            ended = True
        if not ended and landed < kills:
            threading.Event().wait(rng.uniform(*delay))
            proc.kill()
            proc.wait()
            if proc.returncode == -signal.SIGKILL:
                landed += 1
                continue
        err = proc.stderr.read() if ended else lines.rest(timeout=600)[1]
        assert proc.wait() == 0, err
        return landed


def rebuild_through_cli(request, tmp_path, migrations, rows: int, kills: int):
    root = migrations(1, "events", EVENTS.format(rows=rows), "DROP TABLE {db}.events; DROP TABLE {db}.orig")
    store = tmp_path / "store"
    ok(run_migrate(["up"], store, migrations_dir=root))
    out = ok(run_migrate(["new", "rebuild_events", "--backfill", "--rebuild", "events"], store, migrations_dir=root))
    assert "created" in out.stdout and "002_rebuild_events.backfill.meta" in out.stdout
    up = root / "002_rebuild_events.up.sql"
    text = up.read_text()
    assert "CREATE TABLE {db}.events_rebuild_2" in text and "ORDER BY k" in text
    up.write_text(re.sub(r"\nORDER BY k\b", "\nORDER BY (g, k)", text))  # what the operator edits
    ok(run_migrate(["up"], store, migrations_dir=root))
    rng = random.Random(2026)
    run = ["backfill", "run", "2", "--batch-size", str(max(rows // 10, 1000))]
    killed_run = kill_while(store, root, run, "batch ", kills, rng) if kills else ok(run_migrate(run, store, migrations_dir=root)) and 0
    ok(run_migrate(["backfill", "validate", "2"], store, migrations_dir=root))
    publish = ["backfill", "publish", "2"]
    killed_publish = kill_while(store, root, publish, "", kills, rng, delay=(0.8, 2.5)) if kills else 0
    if not kills:
        out = ok(run_migrate(publish, store, migrations_dir=root))
        assert "published backfill 2: d.events is the rebuilt table; the old one is d.events_kept_2" in out.stdout
    live, old, kept, sorting = store_query(store, FP.format("events"), FP.format("orig"), FP.format("events_kept_2"),
                                           "SELECT sorting_key FROM system.tables WHERE database = 'd' AND name = 'events'")
    assert sorting == [["g, k"]]
    assert live == old and live[0][0] == rows, "the live table does not hold exactly the old rows"
    assert kept == old
    report(request, f"\nrebuild of {rows:,} rows: kill -9 landed {killed_run} times during run, "
                    f"{killed_publish} times during publish; exact")


def test_rebuild_changes_the_sorting_key_through_the_cli(request, tmp_path, migrations):
    rebuild_through_cli(request, tmp_path, migrations, 100_000, kills=0)


def test_rebuild_with_kill_9_during_run_and_publish(request, tmp_path, migrations):
    rebuild_through_cli(request, tmp_path, migrations, 100_000, kills=3)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rebuild_of_1m_rows_with_kill_9_during_run_and_publish(request, tmp_path, migrations):
    rebuild_through_cli(request, tmp_path, migrations, 1_000_000, kills=4)


@pytest.mark.parametrize("args, table, message", [
    (["new", "r", "--rebuild", "events"], "CREATE TABLE {db}.events (k UInt64) ENGINE = MergeTree ORDER BY k",
     "error: --rebuild needs --backfill: the rebuild is a backfill into a staging table"),
    (["new", "r", "--backfill", "--rebuild", "nope"], "CREATE TABLE {db}.events (k UInt64) ENGINE = MergeTree ORDER BY k",
     "error: --rebuild nope: table d.nope does not exist"),
    (["new", "r", "--backfill", "--rebuild", "events"],
     "CREATE TABLE {db}.events (k UInt64) ENGINE = MergeTree ORDER BY intHash32(k)",
     "error: --rebuild events: its sorting key (intHash32(k)) does not start with a plain column to walk by; "
     "scaffold with --backfill alone and write the copy by hand"),
    (["new", "r", "--backfill", "--rebuild", "events"], "CREATE TABLE {db}.events (k UInt64) ENGINE = Memory",
     "error: --rebuild events: it is Memory; only MergeTree tables are walked by key"),
])
def test_rebuild_scaffold_refusals_are_one_line_and_write_nothing(tmp_path, migrations, args, table, message):
    root = migrations(1, "events", table, "DROP TABLE {db}.events")
    store = tmp_path / "store"
    ok(run_migrate(["up"], store, migrations_dir=root))
    proc = run_migrate(args, store, migrations_dir=root)
    assert proc.returncode == 1 and proc.stderr.strip() == message, proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["001_events.down.sql", "001_events.up.sql"]
