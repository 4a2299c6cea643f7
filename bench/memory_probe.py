"""Where a backfill's peak memory goes: the 021 backfill at a fixed batch size, with the engine's memory sampled.

Generates `--calls` calls (bench/datagen.py, the same data as bench_021.py) into a fresh store, runs the 021
backfill with fixed batches, and samples every 50 ms on a handle of its own: the batch INSERT's memory
(`system.processes`), the target's merges (`system.merges`: memory and parts merged at once), the engine's
whole tracked memory (`system.metrics` MemoryTracking) and the process's RSS. Then it counts, from the
primary index (`EXPLAIN indexes = 1`), how many source parts each batch's range overlapped. One process per
size (chDB holds one store per process); a measurement script, not a test.

    python bench/memory_probe.py --calls 500000 [--shape narrow] [--batch-size 250000] [--defer-target-merges]
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import clickhouse_connect  # noqa: E402

from bench.bench_021 import DB, SEED, freeze  # noqa: E402
from bench.datagen import generate  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class Sampler(threading.Thread):
    """Peaks of the batch query's memory, the merges' memory and parts, tracked memory and RSS."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client, self.stopped = client, threading.Event()
        self.peak = {"insert_mb": 0.0, "merges_mb": 0.0, "merge_parts": 0, "tracked_mb": 0.0, "rss_mb": 0.0}

    def run(self):
        while not self.stopped.wait(0.05):
            q = self.client.query(
                "SELECT (SELECT max(peak_memory_usage) FROM system.processes WHERE query LIKE '%migrate-backfill%' "
                "AND query_id != queryID()), (SELECT sum(memory_usage) FROM system.merges), "
                "(SELECT max(num_parts) FROM system.merges), "
                "(SELECT value FROM system.metrics WHERE metric = 'MemoryTracking')").result_rows[0]
            now = {"insert_mb": (q[0] or 0) / 2**20, "merges_mb": (q[1] or 0) / 2**20, "merge_parts": q[2] or 0,
                   "tracked_mb": (q[3] or 0) / 2**20, "rss_mb": rss_mb()}
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}


def overlapped_parts(client, keys, ranges) -> list[int]:
    """Source parts each range selects, from the primary index (EXPLAIN indexes = 1)."""
    out = []
    for start, end in ranges:
        plan = client.query(f"EXPLAIN indexes = 1 SELECT count() FROM {DB}.calls_merged "
                            f"WHERE {keys.range_predicate(start, end)}").result_rows
        found = [int(m.group(1)) for (line,) in plan if (m := re.search(r"Parts: (\d+)/\d+", line))]
        out.append(found[-1])  # after the last index step
    return out


def generate_phase(store: str, args) -> dict:
    client = clickhouse_connect.get_client(dsn=f"chdb://{store}")
    from backfill_plugin import ClickHouseBackfillManager
    from migrator.runner import Context, Migrator
    Migrator(Context(client, DB, REPO / "migrations", echo=lambda s: None)).up()
    freeze(client, "calls_merged", "call_parts")
    if args.defer_target_merges:
        freeze(client, "calls_complete")
    gen = generate(client, DB, args.calls, args.shape, seed=SEED, chunk=args.chunk)
    ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations").run_backfill(
        DB, 21, max_batches=0, batch_size=args.batch_size)  # fixes the cutover and the size
    return {"source_rows": gen["parts"]}


def backfill_phase(store: str, args) -> dict:
    """In a fresh process, as bench_021.py runs it: RSS is the backfill's, not the generator's."""
    from backfill_plugin import ClickHouseBackfillManager
    client = clickhouse_connect.get_client(dsn=f"chdb://{store}")
    mgr = ClickHouseBackfillManager(client, migrations_dir=REPO / "migrations")
    before, ranges = rss_mb(), []
    sampler = Sampler(clickhouse_connect.get_client(dsn=f"chdb://{store}"))
    sampler.start()
    started = time.perf_counter()
    mgr.run_backfill(DB, 21, pacing={"target_batch_seconds": "off"},
                     on_batch=lambda s, e: ranges.append((e["range_start"], e["range_end"])))
    seconds = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    parts = overlapped_parts(client, mgr.keyspace(mgr.spec(21), DB), ranges)
    source_parts = client.command(f"SELECT count() FROM system.parts WHERE database = '{DB}' "
                                  "AND table = 'calls_merged' AND active")
    return {"source_parts": source_parts, "batches": len(ranges), "backfill_seconds": round(seconds, 1),
            "parts_per_range": {"min": min(parts), "median": statistics.median(parts), "max": max(parts)},
            "rss_at_start_mb": round(before), **{k: round(v) for k, v in sampler.peak.items()},
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, required=True)
    ap.add_argument("--shape", default="narrow", choices=("narrow", "realistic"))
    ap.add_argument("--batch-size", type=int, default=250_000)
    ap.add_argument("--chunk", type=int, default=1_000_000)
    ap.add_argument("--defer-target-merges", action="store_true")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps((generate_phase if args.phase == "generate" else backfill_phase)(args.store, args)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="memprobe-"))
    try:
        out = {"calls": args.calls, "shape": args.shape, "batch_size": args.batch_size,
               "defer_target_merges": args.defer_target_merges}
        for phase in ("generate", "backfill"):
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", phase,
                                   "--store", str(workdir / "store")], capture_output=True, text=True, check=True)
            out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(out))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
