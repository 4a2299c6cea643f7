"""kill -9 of the flagship 021 backfill at random and at chosen points, rerun until completed;
calls_complete must equal an uninterrupted run's, row for row.

Deterministic kills between the INSERT and the checkpoint write come from a real plugin (a
dist-info on PYTHONPATH, loaded through the `migrator` entry point) that SIGKILLs its own process
from `backfill_batch_completed`, which fires after a batch's INSERT and before its completion is
written. Random kills land wherever the run happens to be: range computation, the write-ahead
save, the INSERT, the heartbeat.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import MIGRATE, REPO

CUTOVER = "2031-01-01 00:00:00.000"  # after every generated call: the whole history is backfilled
FINGERPRINT = """
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
cols = "project_id, id, trace_id, parent_id, op_name, display_name, started_at, ended_at, exception, " \\
       "inputs_dump, output_dump, summary_dump, input_refs, output_refs, wb_run_step"
h = f"cityHash64(toString(tuple({cols})))"
row = c.query(f"SELECT count(), uniqExact(project_id, id), sum({h}), groupBitXor({h}) "
              "FROM d.calls_complete").result_rows[0]
print(json.dumps([int(v) for v in row]))
"""


@pytest.fixture(scope="module")
def fault_plugin(tmp_path_factory):
    """A real installed plugin: SIGKILL after the INSERT of the batch numbered in $KILL_AFTER_BATCH."""
    root = tmp_path_factory.mktemp("fault_plugin")
    (root / "kill_plugin.py").write_text(textwrap.dedent('''
        import os, signal
        from migrator import hookimpl

        @hookimpl
        def backfill_batch_completed(backfill, batch):
            if os.environ.get("KILL_AFTER_BATCH") == str(batch["number"]):
                os.kill(os.getpid(), signal.SIGKILL)
    '''))
    dist = root / "kill_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kill-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[migrator]\nkill = kill_plugin\n")
    return root


def _env(store: Path, plugin: Path, **extra) -> dict:
    return {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": "d",
            "MIGRATE_DIR": str(REPO / "migrations"),
            "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def _prepare(store: Path, plugin: Path, calls: int) -> None:
    env = _env(store, plugin)
    for cmd in (MIGRATE + ["up"], [sys.executable, "-m", "backfill_plugin.demo", "--calls", str(calls), "--seed", "7"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
        assert out.returncode == 0, out.stderr


def _run(store, plugin, batch_size, **env):
    return subprocess.Popen(MIGRATE + ["backfill", "run", "21", "--batch-size", str(batch_size),
                                       "--param", f"cutover_timestamp={CUTOVER}"],
                            env=_env(store, plugin, **env), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fingerprint(store: Path) -> list[int]:
    out = subprocess.run([sys.executable, "-c", FINGERPRINT, str(store)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _kill_until_complete(store, plugin, batch_size, random_kills, chosen_kills, seed, startup, span) -> int:
    """Kill -9 at chosen batch boundaries, then at random instants spread so that each kill eats only
    a slice of the work (`span` seconds of batches after `startup`); return the kills survived."""
    rng, kills = random.Random(seed), 0
    slice_ = max(span - startup, 0.5) / (random_kills + 1)
    plan = [("batch", n) for n in chosen_kills] + [("random", startup + rng.uniform(0.05, 1.0) * slice_)
                                                   for _ in range(random_kills)]
    for kind, value in plan:
        if kind == "batch":
            proc = _run(store, plugin, batch_size, KILL_AFTER_BATCH=str(value))
            proc.communicate(timeout=300)
        else:
            proc = _run(store, plugin, batch_size)
            time.sleep(value)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        elif proc.returncode == 0:
            break  # finished before the kill landed: nothing left to interrupt
    proc = _run(store, plugin, batch_size)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "completed" in out, err
    return kills


def _scenario(tmp_path, plugin, calls, batch_size, random_kills, chosen_kills, seed):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for store in (clean, killed):
        _prepare(store, plugin, calls)
    began = time.time()
    proc = _run(clean, plugin, batch_size)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    span, began = time.time() - began, time.time()
    _run(clean, plugin, batch_size).communicate(timeout=120)  # a no-op run: what starting alone costs
    startup = time.time() - began
    kills = _kill_until_complete(killed, plugin, batch_size, random_kills, chosen_kills, seed, startup, span)
    want, got = _fingerprint(clean), _fingerprint(killed)
    assert got == want
    assert got[0] == got[1] > 0.8 * calls  # no duplicate keys; ~90% of calls are complete
    print(f"\n021 kill -9: survived {kills} kill points; compared {got[0]:,} calls row for row")
    return kills


def test_021_survives_kill9_between_insert_and_checkpoint_and_at_random(tmp_path, fault_plugin):
    kills = _scenario(tmp_path, fault_plugin, calls=6000, batch_size=300,
                      random_kills=3, chosen_kills=[1, 3], seed=11)
    assert kills >= 4


@pytest.mark.slow
def test_021_survives_many_kill9_points(tmp_path, fault_plugin):
    kills = _scenario(tmp_path, fault_plugin, calls=60000, batch_size=1000,
                      random_kills=12, chosen_kills=[1, 5, 9, 20], seed=2026)
    assert kills >= 10
