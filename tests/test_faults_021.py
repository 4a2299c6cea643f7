"""kill -9 of the flagship 021 backfill at random and at chosen points, rerun until completed;
calls_complete must equal an uninterrupted run's, row for row: a hash of every column of every row,
and no key twice.

Deterministic kills between the INSERT and the checkpoint write come from a real plugin (a
dist-info on PYTHONPATH, loaded through the `migrator` entry point) that SIGKILLs its own process
from `backfill_batch_completed`, which fires after a batch's INSERT and before its completion is
written. Random kills land wherever the run happens to be after its claim: range computation, the
write-ahead save, the INSERT, the heartbeat. Where each kill landed is read from the store; a kill
during interpreter start-up is not a kill point, and each required phase must be hit.
`make test` runs a bounded size; `-m slow` runs many more kill points over 60k calls.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import (
    MIGRATE,
    REPO,
    assert_phases,
    kill_phase,
    migrate_env,
    report,
    start_migrate,
    store_fingerprint,
    wait_for_claim,
)

CUTOVER = "2031-01-01 00:00:00.000"  # after every generated call: the whole history is backfilled
KEYS = "project_id, id"
KEY_TYPES = [["project_id", "String"], ["id", "String"]]


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


def _env(plugin: Path, **extra) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def _prepare(store: Path, plugin: Path, calls: int) -> None:
    env = migrate_env(store, env=_env(plugin))
    for cmd in (MIGRATE + ["up"], [sys.executable, "-m", "backfill_plugin.ops.demo", "--calls", str(calls), "--seed", "7"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
        assert out.returncode == 0, out.stderr


def _run(store, plugin, batch_size, **env):
    # A fixed size (the meta's 5 s target would grow the batches and leave few boundaries to kill at).
    return start_migrate(["backfill", "run", "21", "--batch-size", str(batch_size), "--target-batch-seconds", "off",
                          "--param", f"cutover_timestamp={CUTOVER}"], store, env=_env(plugin, **env))


def _phase(store: Path, pid: int) -> str:
    return kill_phase(store, pid, target="calls_complete", keys=KEY_TYPES, rows_are_source_rows=False)


def _kill_until_complete(store, plugin, batch_size, random_kills, chosen_kills, seed, span) -> list[str]:
    """Kill -9 at chosen batch boundaries, then at random instants after the runner's claim, spread so
    that each kill eats only a slice of the work (`span` seconds of batches); the first random kill
    comes right at the claim. Runs on (at most 3 x the plan) until every planned kill landed in a named
    phase and each required phase was hit; returns where each kill landed."""
    rng, phases = random.Random(seed), []
    slice_ = max(span, 0.5) / (random_kills + 1)
    plan = [("batch", n) for n in chosen_kills] + [("random", 0.0)] + [
        ("random", rng.uniform(0.05, 1.0) * slice_) for _ in range(random_kills - 1)]

    def counted():
        return [p for p in phases if p != "startup"]

    def short():
        return len(counted()) < len(plan) or not {"claimed", "insert", "committed"} <= set(phases)

    runs = 0
    while short() and runs < 3 * len(plan):
        kind, value = plan[runs] if runs < len(plan) else ("random", rng.uniform(0.0, 1.0) * slice_)
        runs += 1
        if kind == "batch":
            proc = _run(store, plugin, batch_size, KILL_AFTER_BATCH=str(value))
            proc.communicate(timeout=300)
        else:
            proc = _run(store, plugin, batch_size)
            wait_for_claim(store, proc, version=21)
            time.sleep(value if value else rng.uniform(0.0, 0.1))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=300)
        if proc.returncode == 0:
            break  # finished before the kill landed: nothing left to interrupt
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        phases.append(_phase(store, proc.pid))
    proc = _run(store, plugin, batch_size)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "completed" in out, err
    return phases


def _scenario(request, tmp_path, plugin, calls, batch_size, random_kills, chosen_kills, seed) -> int:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for store in (clean, killed):
        _prepare(store, plugin, calls)
    began = time.time()
    proc = _run(clean, plugin, batch_size)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    span = time.time() - began
    phases = _kill_until_complete(killed, plugin, batch_size, random_kills, chosen_kills, seed, span)
    want = store_fingerprint(clean, "d.calls_complete", KEYS)
    got = store_fingerprint(killed, "d.calls_complete", KEYS)
    assert got == want, f"{got} != {want} (count, hash sum, hash xor of every column, duplicated keys)"
    assert got[3] == 0 and got[0] > 0.8 * calls  # no duplicate keys; ~90% of calls are complete
    counts = assert_phases(phases)
    kills = len([p for p in phases if p != "startup"])
    report(request, f"\n021 kill -9: survived {kills} kill points; compared {got[0]:,} calls row for row "
                    f"(every column); landed: " + "; ".join(f"{n} x {p}" for p, n in counts.items()))
    return kills


@pytest.mark.timeout(600)
def test_021_survives_kill9_between_insert_and_checkpoint_and_at_random(request, tmp_path, fault_plugin):
    """The bounded kill suite `make test` runs."""
    kills = _scenario(request, tmp_path, fault_plugin, calls=6000, batch_size=300,
                      random_kills=4, chosen_kills=[1, 3], seed=11)
    assert kills >= 6


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_021_survives_many_kill9_points(request, tmp_path, fault_plugin):
    kills = _scenario(request, tmp_path, fault_plugin, calls=60000, batch_size=1000,
                      random_kills=12, chosen_kills=[1, 5, 9, 20], seed=2026)
    assert kills >= 16
