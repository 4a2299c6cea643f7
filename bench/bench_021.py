"""Benchmark: the 021 backfill against one single INSERT ... SELECT of the same rows, same store.

Each phase runs in its own process (chDB lets one process hold a store at a time), one after the
other on the same store, so peak RSS (ru_maxrss) is per phase. Ratios are measured in this run;
this is a script, not a timed test. Usage: python bench/bench_021.py [--calls 2000000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DB = "bench"


def phase(name: str, store: str, args: dict) -> dict:
    """Run one phase in a fresh process; return its result plus that process's peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--store", store, "--args", json.dumps(args)],
                         capture_output=True, text=True, cwd=str(REPO))
    if out.returncode != 0:
        sys.exit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _client(store: str):
    import clickhouse_connect
    return clickhouse_connect.get_client(dsn=f"chdb://{store}")


def _single_insert_sql(client) -> str:
    """The 021 SQL over the whole key range, into a twin table: the yardstick."""
    from backfill_plugin.manager import ClickHouseBackfillManager
    from backfill_plugin.render import Raw, render
    mgr = ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations")
    spec = mgr.spec(21)
    params = json.loads(client.command(
        f"SELECT checkpoint_data FROM db_management.backfills WHERE backfill_id = '{DB}_21' "
        f"ORDER BY version DESC LIMIT 1"))["params"]
    sql, _ = render(spec.sql_path.read_text(), {**params, "db": DB, "batch_range": Raw("1"), "retry_count": 0,
                                                "batch_size": 0}, spec.sql_path)
    return sql.replace(f"INSERT INTO {DB}.calls_complete", f"INSERT INTO {DB}.calls_complete_single", 1)


def run_phase(name: str, store: str, args: dict) -> dict:
    sys.path.insert(0, str(REPO))
    client = _client(store)
    if name in ("single", "backfill"):
        # Both measured phases read the same part layout: no background merge competes with either.
        client.command(f"SYSTEM STOP MERGES {DB}.calls_merged")
    started = time.perf_counter()
    result: dict = {}
    if name == "setup":
        from backfill_plugin.demo import generate_calls
        from migrator.runner import Context, Migrator
        Migrator(Context(client, DB, REPO / "migrations", echo=lambda s: None)).up()
        result = generate_calls(client, DB, args["calls"], seed=42)
        client.command(f"CREATE TABLE {DB}.calls_complete_single AS {DB}.calls_complete")
        # Fix the cutover now (first start), with zero batches run, so both phases see the same params.
        from backfill_plugin import ClickHouseBackfillManager
        ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations").run_backfill(DB, 21, max_batches=0)
        result["source_rows"] = client.command(f"SELECT count() FROM {DB}.calls_merged")
    elif name == "idle":
        client.command("SELECT 1")
    elif name == "warm":
        client.command(f"SELECT sum(length(toString(tuple(*)))) FROM {DB}.calls_merged FORMAT Null")
    elif name == "single":
        client.command(_single_insert_sql(client))
        result["rows"] = client.command(f"SELECT count() FROM {DB}.calls_complete_single")
    elif name == "backfill":
        from backfill_plugin import ClickHouseBackfillManager
        times = []
        last = [time.perf_counter()]

        def on_batch(summary, event):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
        from migrator import hookimpl
        from migrator.plugins import pm

        class StartClock:  # batch 1's interval starts when the runner is running, not at process start
            @hookimpl
            def backfill_status_changed(self, backfill, status, error):
                if status == "running":
                    last[0] = time.perf_counter()
        mgr = ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations")
        pm.register(StartClock())
        if args.get("batch_size"):
            mgr.run_backfill(DB, 21, max_batches=0, batch_size=args["batch_size"])
        started = time.perf_counter()
        status = mgr.run_backfill(DB, 21, on_batch=on_batch)
        result = {"rows": client.command(f"SELECT count() FROM {DB}.calls_complete"), "batch_times": times,
                  "status": status["status"], "batch_size": status["current_batch_size"]}
    elif name == "compare":
        fp = "SELECT count(), sum(cityHash64(project_id, id, display_name, started_at, ended_at, output_dump, input_refs))"
        result = {"equal": client.query(f"{fp} FROM {DB}.calls_complete").result_rows ==
                  client.query(f"{fp} FROM {DB}.calls_complete_single").result_rows,
                  "dupes": client.command(f"SELECT count() - uniqExact(project_id, id) FROM {DB}.calls_complete")}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2_000_000)
    ap.add_argument("--batch-size", type=int, default=None, help="override the meta batch_size")
    ap.add_argument("--store", default=None)
    ap.add_argument("--phase", default=None)
    ap.add_argument("--args", default="{}")
    opts = ap.parse_args()
    if opts.phase:
        print(json.dumps(run_phase(opts.phase, opts.store, json.loads(opts.args))))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench021-"))
    store = str(workdir / "store")
    try:
        setup = phase("setup", store, {"calls": opts.calls})
        idle = phase("idle", store, {})
        phase("warm", store, {})
        single = phase("single", store, {})
        phase("warm", store, {})
        bf = phase("backfill", store, {"batch_size": opts.batch_size})
        cmp = phase("compare", store, {})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    times = bf["batch_times"]
    tenth = max(1, len(times) // 10)
    first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
    rows = [
        ("calls generated", f"{setup['calls']:,} ({setup['complete']:,} complete), {setup['source_rows']:,} source rows"),
        ("rows copied (single / backfill)", f"{single['rows']:,} / {bf['rows']:,}"),
        ("targets equal, duplicate keys", f"{cmp['equal']}, {cmp['dupes']}"),
        ("single INSERT wall time", f"{single['seconds']:.2f} s"),
        ("backfill wall time", f"{bf['seconds']:.2f} s in {len(times)} batches of {bf['batch_size']:,}"),
        ("time ratio (target <= 1.25)", f"{bf['seconds'] / single['seconds']:.2f}"),
        ("peak RSS idle / single / backfill", f"{idle['peak_rss_mb']:.0f} / {single['peak_rss_mb']:.0f} / {bf['peak_rss_mb']:.0f} MB"),
        ("memory ratio (target <= 0.5)", f"{bf['peak_rss_mb'] / single['peak_rss_mb']:.2f} "
                                          f"(above idle: {(bf['peak_rss_mb'] - idle['peak_rss_mb']) / max(1, single['peak_rss_mb'] - idle['peak_rss_mb']):.2f})"),
        ("flatness, median batch last/first tenth (target <= 1.3)", f"{last / first:.2f} ({last:.3f}s / {first:.3f}s)"),
    ]
    print(f"bench_021 on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
