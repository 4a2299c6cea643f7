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
    ("a migration statement lost on the network blames its file", "migrator/runner.py",
     "                    if transport.cause(exc):  # the way to the server failed, not the file: say so first\n",
     "                    if False:\n",
     [T + "test_transport_faults.py", "-k", "migration_statement"]),
    # Found by the chaos soak: a claim on a stale read, and a lock claim whose answer was lost.
    ("a backfill claim written on a stale read (the position moves back over committed batches)",
     "backfill_plugin/protocol/lease.py",
     "    if newest is not None and newest.version != row.version:\n", "    if False:\n",
     [T + "test_takeover_and_halving.py", "-k", "stale_read"]),
    ("a migrate lock claim whose answer was lost is not given back", "migrator/tracking.py",
     "            self._give_back()\n            raise\n", "            raise\n",
     [T + "test_transport_faults.py", "-k", "lock_claim"]),
    ("a lock claim of an exited process on this host stays live for its lease", "migrator/tracking.py",
     "if not released and exp > now_ms and not _exited_here(owner)]", "if not released and exp > now_ms]",
     [T + "test_migrator.py", "-k", "killed_holder"]),
    ("a transport fault at the preflight EXPLAIN blames the SQL file", "backfill_plugin/spec/sqlast.py",
     "    if transport.cause(exc):\n        raise exc\n",
     "",
     [T + "test_transport_faults.py", "-k", "preflight_explain"]),
    ("a state write is not written again across a dropped connection", "backfill_plugin/protocol/checkpoint.py",
     "transport.retry(lambda: insert_row(", "(lambda f, _: f())(lambda: insert_row(",
     [T + "test_transport_faults.py", "-k", "state_write"]),
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
    ("server path: an error after the 200 (progress headers sent) loses its code", "migrator/transport.py",
     "            match = _EXCEPTION_BLOCK.search(partial) or _EXCEPTION_TEXT.search(partial)\n",
     "            match = None\n",
     [T + "test_http_progress.py", "-k", "memory_limit_after"]),
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
    # SQL checks read the statement as the engine's parser does (issue 29): "sql shape" mutations.
    ("sql shape: target read at up only after a leading INSERT", "backfill_plugin/ops/upcheck.py",
     "target = None if run.skips_existing else shape.target_in(scratch.name)",
     'target = None if run.skips_existing or not sql.lstrip().upper().startswith("INSERT") '
     "else shape.target_in(scratch.name)",
     [T + "test_sql_shapes.py", "-k", "refused_at_up and with-first"]),
    ("sql shape: target read at run only after a leading INSERT", "backfill_plugin/protocol/preflight.py",
     "run.target = shape.target_in(run.row.db_name)",
     'run.target = shape.target_in(run.row.db_name) if sql.lstrip().upper().startswith("INSERT") else None',
     [T + "test_sql_shapes.py", "-k", "refused_at_run"]),
    ("sql shape: a statement that is not an INSERT passes", "backfill_plugin/spec/sqlcheck.py",
     "    if not shape.is_insert:", "    if False:",
     [T + "test_sql_shapes.py", "-k", "cannot_read"]),
    ("sql shape: the lint reads quoted identifiers as code", "backfill_plugin/spec/sqlcheck.py",
     'if kind in ("string", "comment", "quoted"):', 'if kind in ("string", "comment"):',
     [T + "test_sql_shapes.py", "-k", "quoted_identifiers"]),
    ("sql shape: the lint's hand-written list instead of the engine's", "backfill_plugin/spec/sqlast.py",
     'column = next((c for c in ("deterministic", "is_deterministic") if c in columns), None)', "column = None",
     [T + "test_sql_shapes.py", "-k", "engine_calls_non_deterministic"]),
    ("sql shape: the plan at up skipped when the database holds a view", "backfill_plugin/ops/upcheck.py",
     "                self.missing.add(name)\n\n    def _run", "                self.complete = False\n\n    def _run",
     [T + "test_sql_shapes.py", "-k", "beside_views"]),
    ("sql shape: a data param computed on the empty scratch copy", "backfill_plugin/ops/upcheck.py",
     "    if not own & scratch.changed:\n        return context.database",
     "    if not own & scratch.changed:\n        return scratch.name",
     [T + "test_sql_shapes.py", "-k", "param_read_from_data and before-up"]),
    ("sql shape: an up file's INSERT ... VALUES not repeated on the scratch copy", "backfill_plugin/ops/upcheck.py",
     "if target and target[0] == self.name and not shape.has_select and self._run(stmt, target[1]):",
     "if False:",
     [T + "test_sql_shapes.py", "-k", "param_read_from_data and by-the-same-up"]),
    ("errors in the SQL retried like any other", "backfill_plugin/errors.py",
     "    return error_code(exc) in PERMANENT_CODES", "    return False",
     [T + "test_sql_checks.py", "-k", "not_retried"]),
    ("exactly_once blind to duplicates", "backfill_plugin/testing/harness.py",
     "        if fp == self.reference:", "        if True:",
     [T + "test_pytest_plugin.py", "-k", "wheel"]),
    ("exactly_once compares the key columns only", "backfill_plugin/testing/harness.py",
     '        h = "cityHash64(tuple(*))"\n', '        h = f"cityHash64({self.cols})"\n',
     [T + "test_pytest_plugin.py", "-k", "another_value"]),
    ("publish without the validation requirement", "backfill_plugin/protocol/publish.py",
     "    failed = [c.get(\"check\") for c in val.get(\"checks\") or [] if not c.get(\"ok\")]",
     "    failed = []",
     [T + "test_publish.py", "-k", "refused_before_completion"]),
    ("publish accepts a validation whose basis is not the completed run", "backfill_plugin/protocol/publish.py",
     '    if basis.get("status") != "completed" or basis.get("rows_processed") != int(cp.get("rows_processed") or 0):',
     "    if False:",
     [T + "test_publish.py", "-k", "made_before_the_run"]),
    ("publish without re-checking that the tables fit the mode", "backfill_plugin/protocol/publish.py",
     "            check_tables(self.client, self.db, self.conf, self.spec.meta_path)\n", "            pass\n",
     [T + "test_publish.py", "-k", "altered_after"]),
    ("a partition found replaced is replaced again", "backfill_plugin/protocol/publish.py",
     "or not (replay and self._same(self.live, self.staging, pid)):", "or True:",
     [T + "test_publish.py", "-k", "replaced_before_its_record"]),
    ("exchange without the recorded UUIDs (swapped whatever live is)", "backfill_plugin/protocol/publish.py",
     "        if now == before:", "        if True:",
     [T + "test_publish.py", "-k", "killed_after_the_swap"]),
    ("kept copy taken again on a replay", "backfill_plugin/protocol/publish.py",
     'flight["live_had_it"] and not flight.get("kept")\n', 'flight["live_had_it"]\n',
     [T + "test_publish.py", "-k", "half_replaced"]),
    ("a replayed partition taken as replaced when live holds as many rows (not staging's parts)",
     "backfill_plugin/protocol/publish.py", "        return self._parts(table, pid) == self._parts(other, pid)\n",
     "        return self.client.command(f\"SELECT count() FROM {table} WHERE _partition_id = '{pid}'\") == "
     "self.client.command(f\"SELECT count() FROM {other} WHERE _partition_id = '{pid}'\")\n",
     [T + "test_publish.py", "-k", "storage_only"]),
    ("a URL's password masked only where the URL parses", "migrator/connection.py",
     "    text = _USERINFO.sub(_mask, text)\n", "",
     [T + "test_security.py", "-k", "redact_masks"]),
    ("reset of a published backfill forgets its publish record", "backfill_plugin/ops/cli.py",
     "    refuse_reset_if_published(mgr, app.database, version)\n", "",
     [T + "test_publish.py", "-k", "reset_of_a_published"]),
    # Sharded clusters: one walk per shard, and one shard's fault never stops another's.
    ("a failed shard stops every shard's walk", "backfill_plugin/ops/shards.py",
     'click.echo(f"{walk.error}; its walk stopped, the other shards go on", err=True)', "stop_all()",
     [T + "test_shards.py", "-k", "shard_down_mid_run"]),
    ("a Distributed source or target walked on every shard", "backfill_plugin/ops/shards.py",
     'elif rows[0][0] == "Distributed":', "elif False:",
     [T + "test_shards.py", "-k", "discovered"]),
    # Issue 33: commands that tell the truth at the edges.
    ("last validation range bounded above again", "backfill_plugin/ops/validate.py",
     "return end, rows, keys.next_batch(client, end, 1) is None", "return end, rows, False",
     [T + "test_edges_backfill.py", "-k", "past_the_last_source_key"]),
    ("an empty source validated over no range", "backfill_plugin/ops/validate.py",
     "                return None, 0, True\n", "                return None\n",
     [T + "test_edges_backfill.py", "-k", "empty_source_completes"]),
    ("a validation statement with no rows passes", "backfill_plugin/ops/validate.py",
     "        if not result.result_rows:", "        if False:",
     [T + "test_edges_backfill.py", "-k", "no_rows_fails"]),
    ("pause channel not checking the backfill id", "backfill_plugin/ops/control.py",
     '        if info is not None and pid is not None and info.get("runner_pid") == pid:\n            return info\n',
     '        if True:\n            return info or {"status": "running"}\n',
     [T + "test_edges_backfill.py", "-k", "control_channel"]),
    ("a --range bound the key's type cannot hold goes through", "backfill_plugin/protocol/repair.py",
     "    if bad:\n", "    if False:\n",
     [T + "test_edges_backfill.py", "-k", "bounds_are_checked"]),
    ("a whole-table replay without --yes", "backfill_plugin/protocol/repair.py",
     'if not getattr(key_range, "whole", False) and not cp.get("repair") and _whole(run, first, end):', "if False:",
     [T + "test_edges_backfill.py", "-k", "bounds_are_checked"]),
    ("up skips a version missing below the current one", "migrator/runner.py",
     "        if not allow_missing:\n            self.refuse_missing(st)\n", "",
     [T + "test_edges_migrator.py", "-k", "added_inside_a_gap"]),
    ("down walks the versions on disk, not the applied ones", "migrator/runner.py",
     "targets = sorted((v for v in tracking.applied_set(st, self.migrations) if v > to), reverse=True)",
     "targets = sorted((v for v in self.migrations if to < v <= st.curr_version), reverse=True)",
     [T + "test_edges_migrator.py", "-k", "added_inside_a_gap or files_are_gone"]),
    ("dirty marker written before the version's statements are read", "migrator/runner.py",
     "        client, statements = self.ctx.client, self.statements(path)\n",
     "        mark()\n        client, statements = self.ctx.client, self.statements(path)\n",
     [T + "test_edges_migrator.py", "-k", "before_the_first_statement"]),
    ("--cluster not checked against system.clusters", "migrator/runner.py",
     "            clustering.check_cluster(self.ctx.client, self.ctx.cluster)\n", "",
     [T + "test_edges_migrator.py", "-k", "unknown_cluster"]),
    # Watching a backfill (issue 32): the history and the metrics plugin.
    ("history row of a committed batch dropped", "backfill_plugin/ops/history.py",
     "    else:\n        rows.append(row)", '    elif event["outcome"] != "committed":\n        rows.append(row)',
     [T + "test_history_metrics.py", "-k", "kill_9"]),
    ("metrics rows counter not incremented", "backfill_metrics/exporter.py",
     'self.m["rows_total"].labels(*labels).inc(batch["rows"])', 'self.m["rows_total"].labels(*labels).inc(0)',
     [T + "test_history_metrics.py", "-k", "scraped"]),
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
