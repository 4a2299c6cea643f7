"""The whole online rebuild through the CLI: `migrate new --rebuild`, `up`, `backfill run`, `validate`,
`publish`; the live table ends with the new sorting key and exactly the old rows, also when kill -9
lands during `run` and during `publish`. 100k rows by default, 1M under `-m slow`.
"""
from __future__ import annotations

import json
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


def kill_once(store, root, args, after_prefix: str, delay: tuple) -> bool:
    """Start `migrate args`, kill -9 it a random moment after its first `after_prefix` line (or after its
    start); True when the kill landed, False when the command had already ended (successfully)."""
    proc = start_migrate(args, store, migrations_dir=root)
    lines, ended = Lines(proc), False
    try:
        if after_prefix:
            lines.wait_for(after_prefix, 1, timeout=240)
    except AssertionError:
        ended = True
    if not ended:
        threading.Event().wait(random.uniform(*delay))
        proc.kill()
    code = proc.wait(timeout=600)
    if code == -signal.SIGKILL:
        return True
    err = proc.stderr.read() if ended else lines.rest()[1]
    assert code == 0, err
    return False


def publish_phase(store) -> str:
    """Where a killed exchange publish stopped, from its state row and the tables' UUIDs."""
    state, tables = store_query(store, "SELECT checkpoint_data FROM db_management.backfills ORDER BY version DESC LIMIT 1",
                                "SELECT name, toString(uuid) FROM system.tables WHERE database = 'd'")
    st, uuids = json.loads(state[0][0]).get("publish") or {}, dict(tables)
    if st.get("published"):
        return "published"
    if not st.get("swap"):
        return "before the swap was recorded"
    if uuids["events"] == st["swap"]["live_uuid"]:
        return "swap recorded, not swapped"
    return "swapped, not renamed" if "events_rebuild_2" in uuids else "renamed, not recorded"


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
    random.seed(2026)
    run = ["backfill", "run", "2", "--batch-size", str(max(rows // 10, 1000))]
    killed_run = sum(kill_once(store, root, run, "batch ", (0.0, 0.5)) for _ in range(kills))
    ok(run_migrate(run + ["--max-batches", "1000"], store, migrations_dir=root))  # run or resume to the end
    ok(run_migrate(["backfill", "validate", "2"], store, migrations_dir=root))
    publish, phases = ["backfill", "publish", "2"], []
    # Random instants (mostly in start-up, before the swap), then right after
    # the swap's own line; the exact instant between EXCHANGE and its record is test_publish's business.
    for prefix, delay in [("", (0.1, 0.7))] * kills + [("exchanged", (0.0, 0.002))] * bool(kills):
        if kill_once(store, root, publish, prefix, delay):
            phases.append(publish_phase(store))
    out = ok(run_migrate(publish, store, migrations_dir=root))
    assert "published backfill 2: d.events is the rebuilt table; the old one is d.events_kept_2" in out.stdout \
        or "already published" in out.stdout
    if kills:  # the aimed kill landed after the swap: live was already the new table when the process died
        assert phases and phases[-1] in ("swapped, not renamed", "renamed, not recorded", "published"), phases
    live, old, kept, sorting = store_query(store, FP.format("events"), FP.format("orig"), FP.format("events_kept_2"),
                                           "SELECT sorting_key FROM system.tables WHERE database = 'd' AND name = 'events'")
    assert sorting == [["g, k"]]
    assert live == old and live[0][0] == rows, "the live table does not hold exactly the old rows"
    assert kept == old
    report(request, f"\nrebuild of {rows:,} rows: kill -9 landed {killed_run} times during run and during "
                    f"publish at: {', '.join(phases) or 'none'}; exact")


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
