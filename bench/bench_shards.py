"""Benchmark: the same rows per shard over 1, 2 and 3 shards, each shard a tests/chhttp.py endpoint process.

Perfect scale-out keeps the wall time of `migrate backfill run` flat as shards are added (each walk runs
near its own data) and multiplies the total rows/s by the shard count. Each endpoint is pinned with
`taskset` to a core of its own when the machine has one per shard plus one for the driver; otherwise
the pinning is shared (printed). One run per shard count; ratios against one shard are printed.

    python bench/bench_shards.py [--rows-per-shard 200000] [--batch-size 20000] [--shards 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import start_endpoint  # noqa: E402 - the suite's own way to start an endpoint

UP = (
    "CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);\n"
    "CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
    "SETTINGS non_replicated_deduplication_window = 1000;\n"
)
COPY = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"


def pin(pid: int, core: int) -> bool:
    """Pin a process to one core with taskset (False when taskset is missing)."""
    if shutil.which("taskset") is None:
        return False
    return subprocess.run(["taskset", "-cp", str(core), str(pid)], capture_output=True).returncode == 0


def migrate(env: dict, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "migrator", *args], env=env, capture_output=True, text=True, cwd=str(REPO)
    )
    if proc.returncode != 0:
        raise SystemExit(f"migrate {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def one(count: int, rows: int, batch: int, tmp: Path, cores: int) -> dict:
    """Start `count` endpoints, fill each with `rows` rows, time `backfill run` over all of them."""
    root = tmp / f"m{count}"
    root.mkdir()
    (root / "001_x.up.sql").write_text(UP)
    (root / "001_x.down.sql").write_text("DROP TABLE IF EXISTS {db}.dst; DROP TABLE IF EXISTS {db}.src")
    (root / "001_x.backfill.sql").write_text(COPY)
    (root / "001_x.backfill.meta").write_text(
        json.dumps(
            {"migration_version": 1, "batch_size": batch, "checkpoint_columns": ["a", "b"], "source_table": "src"}
        )
    )
    endpoints = [start_endpoint(tmp / f"c{count}s{i}" / "store") for i in range(count)]
    pinned = []
    try:
        for i, e in enumerate(endpoints):  # core 0 is left to the driver when there are enough cores
            core = (i + 1) % cores if cores > count else i % cores
            pinned.append(core if pin(e.proc.pid, core) else None)
        env = {
            **os.environ,
            "MIGRATE_DIR": str(root),
            "MIGRATE_DATABASE": "bench",
            "PYTHONUNBUFFERED": "1",
            "MIGRATE_SHARDS": ",".join(e.url for e in endpoints),
        }
        env.pop("CLICKHOUSE_URL", None)
        migrate(env, "up")
        for e in endpoints:
            subprocess.run(
                [
                    "curl",
                    "-sf",
                    e.url,
                    "--data-binary",
                    f"INSERT INTO bench.src SELECT 'k' || toString(number % 9973), toUInt32(number), "
                    f"repeat('x', 100) FROM numbers({rows})",
                ],
                check=True,
            )
        started = time.perf_counter()
        migrate(env, "backfill", "run", "1")
        wall = time.perf_counter() - started
    finally:
        for e in endpoints:
            e.proc.kill()
            e.proc.wait()
    return {
        "shards": count,
        "rows": rows * count,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows * count / wall),
        "pinned_to": pinned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-shard", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--shards", default="1,2,3")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = [int(x) for x in args.shards.split(",")]
    print(
        f"{cores} cores; {args.rows_per_shard:,} rows per shard, batch size {args.batch_size:,}; "
        + (
            "each endpoint on a core of its own"
            if cores > max(counts)
            else f"fewer cores than shards plus the driver: endpoints share {cores} cores (not a scale-out measurement)"
        )
    )
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        results = [one(n, args.rows_per_shard, args.batch_size, Path(tmp), cores) for n in counts]
    base = results[0]
    print(
        f"{'shards':>6} {'rows':>10} {'wall s':>8} {'rows/s':>10} {'wall / 1 shard':>15} {'rows/s / 1 shard':>17}  pinned"
    )
    for r in results:
        print(
            f"{r['shards']:>6} {r['rows']:>10,} {r['wall_s']:>8} {r['rows_per_s']:>10,} "
            f"{r['wall_s'] / base['wall_s']:>15.2f} {r['rows_per_s'] / base['rows_per_s']:>17.2f}  {r['pinned_to']}"
        )


if __name__ == "__main__":
    main()
