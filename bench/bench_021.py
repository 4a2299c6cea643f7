"""Benchmark: the 021 backfill against one single INSERT ... SELECT of the same rows, same store.

Each phase runs in its own process (chDB lets one process hold a store at a time), one after the
other on the same store, so peak RSS (ru_maxrss) is per phase. Ratios are measured in this run;
this is a script, not a timed test. The data comes from bench/datagen.py (in the engine, seeded).

    python bench/bench_021.py [--calls 2000000] [--shape realistic|narrow] [--batch-size N |
        --target-batch-seconds S] [--variants 100000,target=5] [--skip-single] [--scale] [--json]

--scale runs the same shape at --calls and at 10x --calls and prints both side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
SEED = 42


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def phase(name: str, store: str, args: dict) -> dict:
    """Run one phase in a fresh process; return its result plus that process's peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--store", store, "--args", json.dumps(args)],
                         capture_output=True, text=True, cwd=str(REPO))
    if out.returncode != 0:
        sys.exit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def validate_phase(store: str) -> dict:
    """`validate 21` through the CLI, in its own process: its wall time, peak RSS (wait4) and verdict."""
    env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": DB}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "backfill_plugin", "validate", "21", "--json"],
                                stdout=out, stderr=err, cwd=str(REPO), env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result = {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "exit_code": proc.returncode,
              "passed": proc.returncode == 0}
    if proc.returncode != 0:
        result["error"] = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["?"])[-1][:300]
    return result


def _client(store: str):
    import clickhouse_connect
    return clickhouse_connect.get_client(dsn=f"chdb://{store}")


def _single_insert_sql(client) -> str:
    """The 021 SQL over the whole key range, into a twin table: the yardstick."""
    from backfill_plugin.protocol.manager import ClickHouseBackfillManager
    from backfill_plugin.spec.render import Raw, render
    mgr = ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations")
    spec = mgr.spec(21)
    params = json.loads(client.command(
        f"SELECT checkpoint_data FROM db_management.backfills WHERE backfill_id = '{DB}_21' "
        f"ORDER BY version DESC LIMIT 1"))["params"]
    sql, _ = render(spec.sql_path.read_text(), {**params, "db": DB, "batch_range": Raw("1"), "retry_count": 0,
                                                "batch_size": 0}, spec.sql_path)
    return sql.replace(f"INSERT INTO {DB}.calls_complete", f"INSERT INTO {DB}.calls_complete_single", 1)


def _one_line(exc: BaseException) -> str:
    """The engine's error, short: 'Code: 241. ... maximum: 14.1 GiB (MEMORY_LIMIT_EXCEEDED)'."""
    lines = str(exc).strip().splitlines()
    line = next((x for x in lines if "Code:" in x), lines[0] if lines else type(exc).__name__)
    name = re.search(r"\(([A-Z_]{6,})\)\s*$", line)
    line = re.split(r":? \(while |: While ", line)[0][line.find("Code:") if "Code:" in line else 0:]
    return (line[:300] + (f" ({name.group(1)})" if name and name.group(1) not in line else "")).strip()


# Both set to 1 byte: no part is small enough to merge.
FROZEN = ("max_bytes_to_merge_at_max_space_in_pool", "max_bytes_to_merge_at_min_space_in_pool")


def freeze(client, *tables: str) -> None:
    """No background merge of these tables from now on, in any later process (a table setting).

    The source's part layout stays as generated in every phase, so no merge folds the unmerged parts
    between the single statement, the backfill and validate, or competes with any of them; the
    target's merges run (they are the backfill's cost). `SYSTEM STOP MERGES` would not do: it holds
    for one process, and chDB schedules merges as soon as a process opens the store, so before it
    lands a merge of the 160 generated parts at 20M calls has already taken 4 GB of that process's
    memory (it showed as validate's peak RSS: 3.3x the 2M figure, against 1.06x once held this way).
    """
    for table in tables:
        client.command(f"ALTER TABLE {DB}.{table} MODIFY SETTING " + ", ".join(f"{s} = 1" for s in FROZEN))


def thaw(client, table: str) -> None:
    """The table merges again as its own settings say (undoes `freeze`)."""
    client.command(f"ALTER TABLE {DB}.{table} RESET SETTING {', '.join(FROZEN)}")


def active_parts(client, table: str) -> int:
    return client.command(f"SELECT count() FROM system.parts WHERE database = '{DB}' AND table = '{table}' AND active")


def granule_rows(client, mgr, ranges) -> int:
    """Source rows in the granules the batches' ranges select (index only, after the clock stopped).

    A range cuts a granule in every source part it overlaps; both batches beside the cut read that
    granule whole, so the fewer rows a batch has, the more it reads per row it copies.
    """
    keys = mgr.keyspace(mgr.spec(21), DB)
    return sum(keys.estimate(client, start, until=end) for start, end in ranges)  # EXPLAIN ESTIMATE of (start, end]


def run_phase(name: str, store: str, args: dict) -> dict:
    sys.path.insert(0, str(REPO))
    client = _client(store)
    started = time.perf_counter()
    result: dict = {}
    if name == "setup":
        from bench.datagen import generate
        from migrator.runner import Context, Migrator
        Migrator(Context(client, DB, REPO / "migrations", echo=lambda s: None)).up()
        freeze(client, "calls_merged", "call_parts")
        result = generate(client, DB, args["calls"], args["shape"], seed=SEED, chunk=args["chunk"])
        client.command(f"CREATE TABLE {DB}.calls_complete_single AS {DB}.calls_complete")
        # Fix the cutover now (first start), with zero batches run, so both phases see the same params.
        from backfill_plugin import ClickHouseBackfillManager
        ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations").run_backfill(DB, 21, max_batches=0)
        result["source_rows"] = client.command(f"SELECT count() FROM {DB}.calls_merged")
        result["source_parts"] = active_parts(client, "calls_merged")
    elif name == "idle":
        client.command("SELECT 1")
    elif name == "warm":
        client.command(f"SELECT sum(length(toString(tuple(*)))) FROM {DB}.calls_merged FORMAT Null")
    elif name == "single":
        limit = args["max_memory_usage"]
        try:
            client.command(_single_insert_sql(client), settings={"max_memory_usage": limit})
            result["rows"] = client.command(f"SELECT count() FROM {DB}.calls_complete_single")
            freeze(client, "calls_complete_single")  # its merges would otherwise run in the phases after it
        except Exception as exc:  # the engine's own error (e.g. MEMORY_LIMIT_EXCEEDED) is the result
            result["error"] = _one_line(exc)
            client.command(f"TRUNCATE TABLE {DB}.calls_complete_single")
        result["max_memory_usage"] = limit
    elif name == "backfill":
        from backfill_plugin import ClickHouseBackfillManager
        times, per_row, ranges = [], [], []
        last = [time.perf_counter()]

        def on_batch(summary, event):
            ranges.append((event["range_start"], event["range_end"]))
            now = time.perf_counter()
            times.append(now - last[0])
            per_row.append((now - last[0]) / max(1, event["rows"]))
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
        if args.get("defer_target_merges"):  # a diagnostic: the backfill's own cost, without the target's merges
            freeze(client, "calls_complete")
        if args.get("batch_size"):
            mgr.run_backfill(DB, 21, max_batches=0, batch_size=args["batch_size"])
        extra = {}
        if args.get("target_batch_seconds") is not None:  # the size adapts from the meta's batch_size
            extra["pacing"] = {"target_batch_seconds": args["target_batch_seconds"]}
        elif args.get("batch_size"):  # a fixed size: the meta's target duration is off for this run
            extra["pacing"] = {"target_batch_seconds": "off"}
        started = time.perf_counter()
        status = mgr.run_backfill(DB, 21, on_batch=on_batch, **extra)
        result = {"rows": client.command(f"SELECT count() FROM {DB}.calls_complete"), "batch_times": times,
                  "seconds_per_row": per_row,
                  "status": status["status"], "batch_size": status["current_batch_size"],
                  "source_rows": status.get("rows_processed"),
                  "target_parts": active_parts(client, "calls_complete"),
                  "granule_rows": granule_rows(client, mgr, ranges)}
        if args.get("defer_target_merges"):
            thaw(client, "calls_complete")
    elif name == "reset":  # another backfill variant on the same data: an empty target, the same params
        from backfill_plugin import ClickHouseBackfillManager
        client.command(f"TRUNCATE TABLE {DB}.calls_complete")
        ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations").reset_backfill(DB, 21)
    elif name == "compare":
        fp = ("SELECT count(), sum(cityHash64(project_id, id, display_name, started_at, ended_at, output_dump, "
              "input_refs))")
        result = {"dupes": client.command(f"SELECT count() - uniqExact(project_id, id) FROM {DB}.calls_complete"),
                  "source_rows": client.command(f"SELECT count() FROM {DB}.calls_merged")}
        if args.get("single_ok"):
            result["equal"] = (client.query(f"{fp} FROM {DB}.calls_complete").result_rows ==
                               client.query(f"{fp} FROM {DB}.calls_complete_single").result_rows)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_size(calls: int, opts, echo) -> dict:
    """Every phase at one size, on a fresh store that is removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="bench021-"))
    store = str(workdir / "store")
    res: dict = {"calls": calls}
    try:
        echo(f"[{calls:,} calls, {opts.shape}] generating")
        res["setup"] = phase("setup", store, {"calls": calls, "shape": opts.shape, "chunk": opts.chunk})
        res["idle"] = phase("idle", store, {})
        if not opts.skip_single:
            echo(f"[{calls:,} calls] single INSERT ... SELECT")
            phase("warm", store, {})
            res["single"] = phase("single", store, {"max_memory_usage": opts.max_memory_usage})
        echo(f"[{calls:,} calls] backfill")
        phase("warm", store, {})
        main_sizing = {"batch_size": opts.batch_size, "target_batch_seconds": opts.target_batch_seconds}
        res["backfill"] = phase("backfill", store, main_sizing)
        echo(f"[{calls:,} calls] validate")
        res["validate"] = validate_phase(store)
        single_ok = "single" in res and "error" not in res["single"]
        res["compare"] = phase("compare", store, {"single_ok": single_ok})
        res["variants"] = []
        for variant in opts.variants:  # more backfills of the same data: ratios without noise from new data
            echo(f"[{calls:,} calls] backfill variant {variant}")
            phase("reset", store, {})
            phase("warm", store, {})
            # N, target=S or deferred (the main run's sizing); +deferred holds the target's merges until it ends
            sizing, plus, _ = variant.partition("+")
            target = sizing.startswith("target=")
            args = (main_sizing if sizing == "deferred" else
                    {"batch_size": None if target else int(sizing),
                     "target_batch_seconds": float(sizing[7:]) if target else None})
            run = phase("backfill", store, {**args, "defer_target_merges": sizing == "deferred" or bool(plus)})
            run["variant"], run["compare"] = variant, phase("compare", store, {"single_ok": single_ok})
            res["variants"].append(run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def _mb(value: float) -> str:
    return f"{value / 1024:.2f} GB" if value >= 1024 else f"{value:.0f} MB"


def rows_for(r: dict) -> list[tuple[str, str]]:
    """The report rows of one size."""
    setup, idle, bf, val, cmp = r["setup"], r["idle"], r["backfill"], r["validate"], r["compare"]
    single = r.get("single")
    # Per source row, so that growing batches (a target duration) compare too; the short last batch is left out.
    times = (bf["seconds_per_row"][:-1] if len(bf["seconds_per_row"]) > 2 else bf["seconds_per_row"]) or [float("nan")]
    tenth = max(1, len(times) // 10)
    first, last = statistics.median(times[:tenth]) * 1e6, statistics.median(times[-tenth:]) * 1e6
    source_rows = setup["source_rows"]
    rows = [
        ("calls / complete / source rows (parts)",
         f"{setup['calls']:,} / {setup['complete']:,} / {source_rows:,} ({setup['source_parts']} parts), "
         f"generated in {setup['generate_seconds']:.0f} s"),
    ]
    if single is None:
        rows.append(("single INSERT ... SELECT", "skipped"))
    elif "error" in single:
        rows.append(("single INSERT ... SELECT",
                     f"FAILED after {single['seconds']:.1f} s, peak RSS {_mb(single['peak_rss_mb'])} "
                     f"(max_memory_usage {single['max_memory_usage'] / 2**30:.2f} GiB): {single['error']}"))
    else:
        rows.append(("single INSERT ... SELECT", f"{single['seconds']:.2f} s, peak RSS {_mb(single['peak_rss_mb'])}, "
                                                 f"{single['rows']:,} rows"))
    rows += [
        ("021 backfill", f"{bf['seconds']:.2f} s in {len(bf['batch_times'])} batches (last size "
                         f"{bf['batch_size']:,}), peak RSS {_mb(bf['peak_rss_mb'])}, {bf['rows']:,} rows, "
                         f"{bf['status']}"),
        ("source rows per second (backfill)", f"{source_rows / bf['seconds']:,.0f}"),
        ("source rows read per row copied (whole granules)", f"{bf['granule_rows'] / source_rows:.2f}"),
    ]
    if single is not None and "error" not in single:
        rows += [
            ("time ratio backfill / single (target <= 1.1)", f"{bf['seconds'] / single['seconds']:.2f}"),
            ("memory ratio backfill / single (target <= 0.5)",
             f"{bf['peak_rss_mb'] / single['peak_rss_mb']:.2f} (above idle: "
             f"{(bf['peak_rss_mb'] - idle['peak_rss_mb']) / max(1, single['peak_rss_mb'] - idle['peak_rss_mb']):.2f})"),
            ("targets equal", "yes" if cmp.get("equal") else "NO"),
        ]
    rows += [
        ("duplicate keys in calls_complete", f"{cmp['dupes']}"),
        ("flatness, time per source row, last/first tenth of batches (target <= 1.3)",
         f"{last / first:.2f} ({last:.1f} / {first:.1f} us per row)"),
        ("validate 21 (CLI)", f"{'passed' if val['passed'] else 'FAILED'} in {val['seconds']:.2f} s, "
                              f"peak RSS {_mb(val['peak_rss_mb'])}" + (f": {val['error']}" if 'error' in val else "")),
        ("peak RSS of an idle process", _mb(idle["peak_rss_mb"])),
    ]
    for v in r.get("variants", []):
        label = f"variant {v['variant']}: {len(v['batch_times'])} batches, last size {v['batch_size']:,}"
        ratio = f", ratio {v['seconds'] / single['seconds']:.2f}" if single is not None and "error" not in single else ""
        equal = "" if v["compare"].get("equal") is None else f", targets equal {'yes' if v['compare']['equal'] else 'NO'}"
        rows.append((label, f"{v['seconds']:.2f} s{ratio}, vs main run {v['seconds'] / bf['seconds']:.2f}, "
                            f"peak RSS {_mb(v['peak_rss_mb'])}, reads {v['granule_rows'] / source_rows:.2f} rows per row, "
                            f"duplicate keys {v['compare']['dupes']}{equal}"))
    if cmp["source_rows"] != source_rows:
        rows.append(("WARNING", f"calls_merged changed from {source_rows:,} to {cmp['source_rows']:,} rows during the run"))
    return rows


def scale_rows(small: dict, big: dict) -> list[tuple[str, str, str, str]]:
    """Side-by-side rows of a --scale run: value at N, at 10N, and the ratio 10N / N."""
    def rps(r):
        return r["setup"]["source_rows"] / r["backfill"]["seconds"]

    def single(r):
        s = r.get("single")
        if s is None:
            return "skipped"
        if "error" in s:
            code = re.search(r"\(([A-Z_]{6,})\)$", s["error"])
            return f"failed after {s['seconds']:.0f} s, {_mb(s['peak_rss_mb'])}: {code.group(1) if code else 'error'}"
        return f"{s['seconds']:.1f} s, {_mb(s['peak_rss_mb'])}"
    rows = [
        ("source rows", f"{small['setup']['source_rows']:,}", f"{big['setup']['source_rows']:,}",
         f"{big['setup']['source_rows'] / small['setup']['source_rows']:.2f}x"),
        ("backfill peak RSS (target <= 1.3x)", _mb(small["backfill"]["peak_rss_mb"]), _mb(big["backfill"]["peak_rss_mb"]),
         f"{big['backfill']['peak_rss_mb'] / small['backfill']['peak_rss_mb']:.2f}x"),
        ("validate peak RSS (target <= 1.3x)", _mb(small["validate"]["peak_rss_mb"]), _mb(big["validate"]["peak_rss_mb"]),
         f"{big['validate']['peak_rss_mb'] / small['validate']['peak_rss_mb']:.2f}x"),
        ("source rows/s of the backfill (target >= 0.9x)", f"{rps(small):,.0f}", f"{rps(big):,.0f}",
         f"{rps(big) / rps(small):.2f}x"),
        *deferred_rows(small, big),
        ("backfill wall time", f"{small['backfill']['seconds']:.1f} s", f"{big['backfill']['seconds']:.1f} s",
         f"{big['backfill']['seconds'] / small['backfill']['seconds']:.2f}x"),
        ("validate wall time", f"{small['validate']['seconds']:.1f} s", f"{big['validate']['seconds']:.1f} s",
         f"{big['validate']['seconds'] / small['validate']['seconds']:.2f}x"),
        ("validate passed", str(small["validate"]["passed"]), str(big["validate"]["passed"]), ""),
        ("single INSERT ... SELECT", single(small), single(big), ""),
    ]
    return rows


def deferred_rows(small: dict, big: dict) -> list[tuple[str, str, str, str]]:
    """With a `deferred` variant at both sizes: rows/s without the target's merges, and parts left behind."""
    runs = [next((v for v in r.get("variants", []) if v["variant"] == "deferred"), None) for r in (small, big)]
    if None in runs:
        return []
    own = [r["setup"]["source_rows"] / v["seconds"] for r, v in zip((small, big), runs)]
    return [("source rows/s, target merges deferred (diagnostic)", f"{own[0]:,.0f}", f"{own[1]:,.0f}",
             f"{own[1] / own[0]:.2f}x"),
            ("target parts at the end: merging / deferred",
             f"{small['backfill']['target_parts']} / {runs[0]['target_parts']}",
             f"{big['backfill']['target_parts']} / {runs[1]['target_parts']}", "")]


def _settings_line(opts) -> str:
    mode = (f"target {opts.target_batch_seconds} s per batch" if opts.target_batch_seconds is not None
            else f"batch size {opts.batch_size:,}" if opts.batch_size else "meta batch size")
    return (f"bench_021 {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
            f"{_mem_total_bytes() / 2**30:.0f} GiB, Python {platform.python_version()}; shape {opts.shape}, {mode}, "
            f"seed {SEED}, single statement max_memory_usage {opts.max_memory_usage / 2**30:.2f} GiB")


def _print_table(rows, header=None) -> None:
    cols = len(rows[0])
    table = ([header] if header else []) + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(cols - 1)]
    for r in table:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2_000_000, help="calls to generate (default 2000000)")
    ap.add_argument("--shape", choices=("realistic", "narrow"), default="realistic",
                    help="realistic: payloads 50..2000 chars, renames; narrow: payloads 10..30 chars, start+end only")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, default=None, help="fixed batch size (overrides the meta)")
    size.add_argument("--target-batch-seconds", type=float, default=None,
                      help="size batches to this duration instead of a fixed size")
    ap.add_argument("--skip-single", action="store_true", help="do not run the single INSERT ... SELECT")
    ap.add_argument("--variants", default="", metavar="V,V",
                    help="more backfills of the same data after the main one: batch sizes and/or target=S "
                         "(e.g. 100000,target=5), each reported against the single statement and the main run; "
                         "deferred: the main run again with the target's merges held until it ends (its own cost); "
                         "N+deferred, target=S+deferred: the same for that sizing")
    ap.add_argument("--scale", action="store_true", help="run at --calls and at 10x --calls, side by side")
    ap.add_argument("--chunk", type=int, default=1_000_000, help="calls per generated key slice (default 1000000)")
    ap.add_argument("--single-max-memory-gb", type=float, default=None,
                    help="max_memory_usage of the single statement (default 60%% of RAM)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.phase:
        print(json.dumps(run_phase(opts.phase, opts.store, json.loads(opts.args))))
        return
    opts.variants = [v.strip() for v in opts.variants.split(",") if v.strip()]
    for v in opts.variants:
        if not (v == "deferred" or re.fullmatch(r"(\d+|target=\d+(\.\d+)?)(\+deferred)?", v)):
            ap.error(f"--variants: {v!r} is neither a batch size, target=SECONDS nor deferred (either may end in +deferred)")
    if opts.calls < 1000:
        ap.error("--calls must be at least 1000")
    # The single statement must fail with the engine's MEMORY_LIMIT_EXCEEDED, never bring in the OOM killer.
    opts.max_memory_usage = (int(opts.single_max_memory_gb * 2**30) if opts.single_max_memory_gb
                             else int(_mem_total_bytes() * 0.6))

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
    sizes = [opts.calls, opts.calls * 10] if opts.scale else [opts.calls]
    results = [run_size(n, opts, echo) for n in sizes]
    if opts.json:
        print(json.dumps({"settings": {"shape": opts.shape, "batch_size": opts.batch_size,
                                       "target_batch_seconds": opts.target_batch_seconds, "seed": SEED,
                                       "chunk": opts.chunk, "cores": os.cpu_count(),
                                       "mem_total_bytes": _mem_total_bytes(),
                                       "max_memory_usage": opts.max_memory_usage,
                                       "date": time.strftime("%Y-%m-%d %H:%M")},
                          "results": results}, indent=2))
        return
    print(_settings_line(opts))
    for r in results:
        print(f"\n{r['calls']:,} calls")
        _print_table(rows_for(r))
    if opts.scale:
        small, big = results
        print(f"\nscale: {small['calls']:,} vs {big['calls']:,} calls")
        _print_table(scale_rows(small, big), header=("measure", f"{small['calls']:,}", f"{big['calls']:,}", "ratio"))


if __name__ == "__main__":
    main()
