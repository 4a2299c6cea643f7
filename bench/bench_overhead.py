"""Benchmark: the framework's time between two batch INSERTs, with and without the batch history.

The gap is measured from the batch events themselves: from the end of one committed INSERT (its
`started_at` + `seconds`) to the start of the next batch's INSERT. It holds everything the runner does
between two batches: the completion and write-ahead checkpoint rows, the next range (the lookahead
usually has it), the hooks (the history's one INSERT per batch among them), the live status file.
Both variants run the same backfill on the same embedded store, one after the other, `--rounds` times
alternating; the budget is 30 ms per batch (issue 32). This is a script, not a timed test.

    python bench/bench_overhead.py [--rows 200000] [--batch-size 2000] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import clickhouse_connect  # noqa: E402

from backfill_plugin import ClickHouseBackfillManager  # noqa: E402
from migrator import hookimpl  # noqa: E402
from migrator.plugins import load_plugins, pm  # noqa: E402
from migrator.runner import Context, Migrator  # noqa: E402

BUDGET_MS = 30.0
UP = """CREATE TABLE {db}.src (k UInt64, v String) ENGINE = MergeTree ORDER BY k;
INSERT INTO {db}.src SELECT number, repeat('x', 20) FROM numbers(%d);
CREATE TABLE {db}.dst (k UInt64, v String) ENGINE = MergeTree ORDER BY k
SETTINGS non_replicated_deduplication_window = 1000;
"""
SQL = "INSERT INTO {db}.dst SELECT k, v FROM {db}.src WHERE {batch_range}"


class Gaps:
    """Records when each committed INSERT started and ended (registered last: called first)."""

    def __init__(self):
        self.spans = []

    @hookimpl
    def backfill_batch_attempted(self, backfill, event):
        if event["outcome"] == "committed":
            self.spans.append((event["started_at"], event["started_at"] + event["seconds"]))

    def gaps_ms(self) -> list[float]:
        return [1000 * (b[0] - a[1]) for a, b in zip(self.spans, self.spans[1:])]


def write_migrations(root: Path, rows: int, batch_size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "001_bench.up.sql").write_text(UP % rows)
    (root / "001_bench.down.sql").write_text("SELECT 1")
    (root / "001_bench.backfill.sql").write_text(SQL)
    meta = {"migration_version": 1, "batch_size": batch_size, "checkpoint_columns": ["k"], "source_table": "src"}
    (root / "001_bench.backfill.meta").write_text(json.dumps(meta))


def one_run(client, root: Path, database: str, history: bool) -> dict:
    Migrator(
        Context(
            client=client, database=database, migrations_dir=root, cluster=None, dry_run=False, echo=lambda line: None
        )
    ).up()
    plugin = pm.get_plugin("backfill_history")
    if not history and plugin is not None:
        pm.unregister(plugin)
    gaps = Gaps()
    pm.register(gaps)
    try:
        started = time.perf_counter()
        result = ClickHouseBackfillManager(client, migrations_dir=root).run_backfill(database, 1)
        wall = time.perf_counter() - started
    finally:
        pm.unregister(gaps)
        if not history and plugin is not None:
            pm.register(plugin, name="backfill_history")
    assert result["status"] == "completed", result
    ms = sorted(gaps.gaps_ms())
    return {
        "history": history,
        "batches": result["batches_completed"],
        "wall_s": round(wall, 2),
        "gap_median_ms": round(statistics.median(ms), 1),
        "gap_p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1),
        "gap_mean_ms": round(statistics.fmean(ms), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load_plugins()
    if pm.get_plugin("backfill_history") is None:
        sys.exit("the backfill_history entry point is not installed: pip install -e . first")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        root = Path(tmp) / "migrations"
        write_migrations(root, args.rows, args.batch_size)
        client = clickhouse_connect.get_client(dsn=f"chdb://{tmp}/store")
        results = []
        for n in range(args.rounds):
            for history in (False, True):
                results.append(one_run(client, root, f"b{n}_{int(history)}", history))
    with_h = [r for r in results if r["history"]]
    without = [r for r in results if not r["history"]]
    summary = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "runs": results,
        "median_gap_ms_without": statistics.median(r["gap_median_ms"] for r in without),
        "median_gap_ms_with": statistics.median(r["gap_median_ms"] for r in with_h),
        "p95_gap_ms_with": max(r["gap_p95_ms"] for r in with_h),
        "budget_ms": BUDGET_MS,
    }
    summary["history_cost_ms"] = round(summary["median_gap_ms_with"] - summary["median_gap_ms_without"], 1)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.rows:,} rows, batches of {args.batch_size:,}; framework time between two batch INSERTs")
    print(f"{'history':8} {'batches':>8} {'wall s':>8} {'median ms':>10} {'p95 ms':>8} {'mean ms':>8}")
    for r in results:
        print(
            f"{'on' if r['history'] else 'off':8} {r['batches']:>8} {r['wall_s']:>8} {r['gap_median_ms']:>10} "
            f"{r['gap_p95_ms']:>8} {r['gap_mean_ms']:>8}"
        )
    print(
        f"median gap: {summary['median_gap_ms_without']} ms without history, {summary['median_gap_ms_with']} ms "
        f"with (the history costs {summary['history_cost_ms']} ms a batch); budget {BUDGET_MS:.0f} ms: "
        f"{'within' if summary['median_gap_ms_with'] <= BUDGET_MS else 'OVER'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
