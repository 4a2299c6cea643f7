"""`make mutation-check`: break one guarantee at a time in a copy of the repo and make sure a test fails.

Each mutation replaces one line of the product in a temporary copy, runs the tests that guard that
guarantee, and must make at least one of them fail by an assertion or a product error, never by a
timeout. Exit 1 when a mutation survives (or the mutated text is not found: the check went stale).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T = "tests/"

# (name, file, original text, mutated text, tests that must catch it)
MUTATIONS = [
    ("write-ahead save removed", "backfill_plugin/protocol/manager.py",
     "                self._save(row)\n                ahead.after", "                ahead.after",
     [T + "test_protocol_guards.py::test_write_ahead_alone_makes_a_kill_between_insert_and_checkpoint_exact"]),
    ("range lower bound inclusive (>= on the last key column)", "backfill_plugin/protocol/keys.py",
     'this_op = op if (strict_last or not last) else op + "="', 'this_op = op if not last else op + "="',
     [T + "test_backfill_engine.py", "-k", "hostile_composite_keys"]),
    ("range upper bound exclusive", "backfill_plugin/protocol/keys.py",
     'return self._compare(end, "<", strict_last=False)', 'return self._compare(end, "<", strict_last=True)',
     [T + "test_backfill_engine.py", "-k", "hostile_composite_keys"]),
    ("kill-before-replay removed", "backfill_plugin/protocol/attempt.py",
     "            ids = self.running(backfill_id)\n", "            ids = []\n",
     [T + "test_attempts.py", "-k", "anti-join"]),
    ("dedup token differs per attempt", "backfill_plugin/protocol/dedup.py",
     '"insert_deduplication_token": token}', '"insert_deduplication_token": token + str(time.time())}',
     [T + "test_faults.py", "-k", "crash_between_insert_and_checkpoint and token"]),
    ("OOM not halved (retried like any error)", "backfill_plugin/protocol/attempt.py",
     "if error_code(exc) == OOM:", "if False:",
     [T + "test_backfill_engine.py", "-k", "real_oom_halves"]),
    ("lease never held by another runner", "backfill_plugin/protocol/lease.py",
     '    if not lease or lease.get("owner") == me:\n        return None',
     '    if True:\n        return None',
     [T + "test_faults.py", "-k", "second_runner_refused_while_the_first_runs"]),
    ("repair batches run as first attempts", "backfill_plugin/protocol/manager.py",
     "replay=bool(run.scope)", "replay=False",
     [T + "test_repair_range.py", "-k", "restores_exactly_the_range"]),
    ("lookahead used for a range it was not started from", "backfill_plugin/protocol/lookahead.py",
     "if pending is not None and pending[0] == (position, int(batch_size), until):", "if pending is not None:",
     [T + "test_lookahead.py"]),
    ("NaN branch of a Float key removed", "backfill_plugin/protocol/keys.py",
     'if op in (">", ">=") and nan_above:', "if False:",
     [T + "test_float_keys.py", "-k", "copied_exactly_once"]),
    ("completion without the skipped-rows check", "backfill_plugin/protocol/keys.py",
     "        if missing:\n            raise BackfillError(", "        if False:\n            raise BackfillError(",
     [T + "test_float_keys.py", "-k", "not_completed"]),
    ("DateTime key kept as local wall-clock text", "backfill_plugin/spec/keytypes.py",
     '"datetime": f"toUnixTimestamp({expr})",', '"datetime": f"toString({expr})",',
     [T + "test_key_types.py", "-k", "repeated_hour"]),
    ("wide integer key written as a bare number (read as Float64)", "backfill_plugin/spec/keytypes.py",
     'return f"CAST({literal(str(_number(value, ch_type)))}, {typ})"', "return str(_number(value, ch_type))",
     [T + "test_key_types.py", "-k", "uint128"]),
    ("a key type the walk cannot hold accepted", "backfill_plugin/spec/meta.py",
     "if keytypes.kind(types[col]) is None:", "if False:",
     [T + "test_key_types.py", "-k", "cannot_hold"]),
    # The server path: caught only by the suites that run through clickhouse-connect's HTTP client.
    ("server path: one HTTP session per client (autogenerate_session_id on)", "migrator/connection.py",
     "autogenerate_session_id=False,", "autogenerate_session_id=True,",
     [T + "test_http_endpoint.py", "-k", "heartbeat_and_the_batch"]),
    ("server path: no kill of an orphaned attempt left running on the server", "backfill_plugin/protocol/attempt.py",
     "            ids = self.running(backfill_id)\n", "            ids = []\n",
     [T + "test_http_endpoint.py", "-k", "runner_killed"]),
    ("health never checked", "backfill_plugin/pacing/pacer.py",
     "if self.health is None or", "if True or",
     [T + "test_pacing_loop.py", "-k", "too_many_parts"]),
    ("a runner whose lease was taken goes on", "backfill_plugin/protocol/manager.py",
     'if claimed:\n            return "lease lost"', 'if False:\n            return "lease lost"',
     [T + "test_takeover_and_halving.py", "-k", "lease_was_taken"]),
    ("halved batch not written ahead", "backfill_plugin/protocol/attempt.py",
     "first_attempt_at=batch.first_attempt_at)\n        self.save()", "first_attempt_at=batch.first_attempt_at)",
     [T + "test_takeover_and_halving.py", "-k", "halved"]),
    ("health checked only every interval, even near a limit", "backfill_plugin/pacing/pacer.py",
     "return any(self.projected(signal) > limit / 2", "return False and any(self.projected(signal) > limit / 2",
     [T + "test_pacing_loop.py", "-k", "within_one_batch"]),
    ("backfill SQL not planned by the engine", "backfill_plugin/spec/sqlcheck.py",
     '        client.command(f"EXPLAIN {kind} {sql}", parameters=params or None,\n'
     '                       settings={"use_index_for_in_with_subqueries": 0, "optimize_move_to_prewhere": 0})\n',
     "        pass\n",
     [T + "test_sql_checks.py", "-k", "before_applying_anything or plan"]),
    ("errors in the SQL retried like any other", "backfill_plugin/errors.py",
     "    return error_code(exc) in PERMANENT_CODES", "    return False",
     [T + "test_sql_checks.py", "-k", "not_retried"]),
    ("exactly_once blind to duplicates", "backfill_plugin/testing/harness.py",
     "        if fp == self.reference:", "        if True:",
     [T + "test_pytest_plugin.py", "-k", "wheel"]),
    ("publish without the validation requirement", "backfill_plugin/protocol/publish.py",
     "    failed = [c.get(\"check\") for c in val.get(\"checks\") or [] if not c.get(\"ok\")]",
     "    failed = []",
     [T + "test_publish.py", "-k", "refused_before_completion"]),
    ("a partition found replaced is replaced again", "backfill_plugin/protocol/publish.py",
     "if not (replay and self._same(self.live, self.staging, pid)):", "if True:",
     [T + "test_publish.py", "-k", "replaced_before_its_record"]),
    ("exchange without the recorded UUIDs (swapped whatever live is)", "backfill_plugin/protocol/publish.py",
     "        if now == before:", "        if True:",
     [T + "test_publish.py", "-k", "killed_after_the_swap"]),
    ("kept copy taken again on a replay", "backfill_plugin/protocol/publish.py",
     'flight["live_had_it"] and not flight.get("kept"):', 'flight["live_had_it"]:',
     [T + "test_publish.py", "-k", "half_replaced"]),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def main(only: str = "") -> int:
    """Every mutation, or those whose name contains `only` (while writing a new one)."""
    survived, chosen = [], [m for m in MUTATIONS if only in m[0]]
    for name, path, old, new, tests in chosen:
        with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
            root = Path(tmp)
            copy_repo(root)
            target = root / path
            text = target.read_text()
            if text.count(old) != 1:
                print(f"STALE   {name}: the text to mutate is not in {path} exactly once")
                survived.append(name)
                continue
            target.write_text(text.replace(old, new))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   "-o", "addopts=", "--timeout=300", *tests], cwd=root, capture_output=True,
                                  text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            out = proc.stdout + proc.stderr
            timed_out = "Timeout" in out and "+++++" in out
            if proc.returncode == 0:
                print(f"SURVIVED {name}: {' '.join(tests)} passed")
                survived.append(name)
            elif timed_out or proc.returncode not in (1,):
                print(f"BAD     {name}: the tests did not fail by an assertion (exit {proc.returncode})")
                survived.append(name)
            else:
                failed = next((line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))), "?")
                print(f"caught  {name}: {failed[:160]}")
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:])))
