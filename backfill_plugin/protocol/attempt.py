"""Attempts of one batch: never two at once, each one findable on the server, retried until it commits.

On a server a query outlives the client that sent it (an HTTP read timeout, a second Ctrl-C,
kill -9 of the runner, a pod restart): only read-only HTTP queries are cancelled when the client
goes away. So every attempt carries a marker comment that `system.processes` shows on every backend
(and a query_id where the backend takes one), and before a retry, a replay or a takeover the earlier
attempts of the backfill are killed (`KILL QUERY ... SYNC`, on every replica of a cluster) and
confirmed gone. If that cannot be confirmed the batch does not run.
"""
from __future__ import annotations

import logging
import time
import uuid

from ..errors import BackfillError, error_code, is_permanent, one_line
from .batch import Batch
from .dedup import batch_settings

log = logging.getLogger("backfill")
OOM = 241
MARKER = "migrate-backfill"
KILL_WAIT_SECONDS = 30.0
# A batch reads one bounded key range, often less of each part than the engine's defaults for reading a part
# on several threads (163,840 rows or 24 MiB), so a 100k-row batch from one merged part ran on one thread
# (fixed 100k batches over the 2M bench data merged into one part: 0.91x the time with these). The meta's
# own `settings` win over them.
BATCH_READ = {"merge_tree_min_rows_for_concurrent_read": 8192, "merge_tree_min_bytes_for_concurrent_read": 1 << 20}


def marker(backfill_id: str) -> str:
    """The text every attempt of a backfill starts with (and nothing else does)."""
    return f"/* {MARKER} {backfill_id} "


def tagged(sql: str, backfill_id: str, token: str, attempt: int, owner: str) -> str:
    """Prefix the SQL with the marker that makes this attempt findable in system.processes."""
    return f"{marker(backfill_id)}range={token} attempt={attempt} owner={owner} */\n{sql}"


def untagged(sql: str) -> str:
    """The batch SQL without its attempt marker (the same for every attempt of a range)."""
    if sql.startswith(f"/* {MARKER} "):
        return sql.split("*/\n", 1)[1]
    return sql


class Attempts:
    """Find and kill a backfill's running attempts on the server (on every replica of `cluster`)."""

    def __init__(self, client, cluster: str | None = None, sleep=time.sleep):
        self.client, self.cluster, self.sleep = client, cluster, sleep

    def _processes(self) -> str:
        return f"clusterAllReplicas({self.cluster}, system.processes)" if self.cluster else "system.processes"

    def running(self, backfill_id: str) -> list[str]:
        """query_ids of this backfill's attempts still executing anywhere."""
        rows = self.client.query(
            f"SELECT DISTINCT query_id FROM {self._processes()} "
            "WHERE startsWith(query, {m:String}) AND query_id != queryID()",
            parameters={"m": marker(backfill_id)}).result_rows
        return [r[0] for r in rows]

    def kill_earlier(self, backfill_id: str) -> int:
        """Kill every running attempt of the backfill and wait until none is listed; returns how many.

        Raises BackfillError when the server cannot be asked or the attempts do not go away: running
        the batch next to an earlier attempt would copy its rows twice.
        """
        try:
            ids = self.running(backfill_id)
            if not ids:
                return 0
            on_cluster = f" ON CLUSTER {self.cluster}" if self.cluster else ""
            log.warning("killing %s earlier attempt(s) of backfill %s before running its batch", len(ids), backfill_id)
            self.client.command(f"KILL QUERY{on_cluster} WHERE query_id IN {{ids:Array(String)}} SYNC",
                                parameters={"ids": ids})
            deadline = time.monotonic() + KILL_WAIT_SECONDS
            while self.running(backfill_id):
                if time.monotonic() > deadline:
                    raise BackfillError(f"earlier attempts of backfill {backfill_id} ({', '.join(ids)}) are still "
                                        f"running {KILL_WAIT_SECONDS:.0f}s after KILL QUERY; not running the batch "
                                        f"next to them")
                self.sleep(0.2)
            return len(ids)
        except BackfillError:
            raise
        except Exception as exc:
            raise BackfillError(f"cannot confirm that no earlier attempt of backfill {backfill_id} is still running "
                                f"({one_line(exc)}); not running the batch") from exc


class BatchExecution:
    """Run the in-flight batch of `run` until it commits: halve on OOM, back off and retry other errors.

    `run` is the manager's Run (spec, keys, row, render); `save` persists the checkpoint (a halved
    range is written ahead like any other); `confirm_lease` raises when another runner took over.
    """

    def __init__(self, run, attempts: Attempts, save, confirm_lease, owner: str, sleep=time.sleep):
        self.run, self.attempts, self.save, self.confirm_lease = run, attempts, save, confirm_lease
        self.owner, self.sleep = owner, sleep

    def execute(self) -> Batch:
        """Attempts until one commits; returns the batch that committed (smaller after an OOM)."""
        run, meta, tries = self.run, self.run.spec.meta, 0
        number = 0  # attempts of this batch by this runner (the marker names it)
        while True:
            batch = run.in_flight
            retry = tries or int(batch.replay or run.replays(batch))
            number += 1
            if retry:  # an earlier attempt may still run on the server: it must be gone first
                try:
                    self.confirm_lease()
                    self.attempts.kill_earlier(run.backfill_id)
                    run.check_replay(batch)
                except Exception as exc:
                    run.attempted("refused", batch, number, replay=True, error=one_line(exc))
                    raise
            if batch.first_attempt_at is None:  # a range written ahead by an older version
                batch.first_attempt_at = time.time()
                run.in_flight = batch
            sql, params = run.render(batch, retry)
            token = batch.token(run.backfill_id)
            settings = {**BATCH_READ, **meta["settings"], "max_execution_time": meta["timeout_seconds"], **run.write_settings,
                        **(run.read_settings if retry else {}),
                        **batch_settings(token, retry, run.skips_existing, run.known_settings),
                        "query_id": f"{run.backfill_id}-{token[9:21]}-{number}-{uuid.uuid4().hex[:8]}"}
            started = time.time()
            try:
                run.client.command(tagged(sql, run.backfill_id, token, number, self.owner),
                                   parameters=params or None, settings=settings)
            except Exception as exc:
                run.mark_may_have_committed(batch)
                seconds, said = time.time() - started, one_line(exc)
                if error_code(exc) == OOM and run.checkpoint["current_batch_size"] // 2 >= meta["min_batch_size"]:
                    outcome = "halved"
                else:
                    final = error_code(exc) == OOM or is_permanent(exc) or tries >= meta["max_retries"]
                    outcome = "failed" if final else "retried"
                run.attempted(outcome, batch, number, seconds, bool(retry), said, started_at=started)
                if error_code(exc) == OOM:
                    self._halve(batch, exc)
                    continue
                if is_permanent(exc):  # an error in the SQL: every retry would fail the same way
                    raise BackfillError(f"{run.spec.sql_path}: batch after {batch.start or 'the start'} failed: "
                                        f"{said}") from exc
                if tries >= meta["max_retries"]:
                    raise BackfillError(f"batch after {batch.start or 'the start'} failed {tries + 1} times: "
                                        f"{said}") from exc
                log.warning("batch failed (%s); retry %s of %s", said, tries + 1, meta["max_retries"])
                self.sleep(min(2 ** tries, 60))
                tries += 1
            else:  # outside the try: a hook's error is not the batch's
                run.attempted("committed", batch, number, time.time() - started, bool(retry), started_at=started)
                return batch

    def _halve(self, batch: Batch, exc: Exception) -> None:
        """Out of memory: the same start, half the rows; the smaller range is written ahead before it runs."""
        run, minimum = self.run, self.run.spec.meta["min_batch_size"]
        smaller = run.checkpoint["current_batch_size"] // 2
        if smaller < minimum:
            raise BackfillError(f"out of memory at batch size {run.checkpoint['current_batch_size']}; halving would "
                                f"go below min_batch_size {minimum}: {one_line(exc)}") from exc
        log.warning("memory limit at batch size %s; halving to %s", run.checkpoint["current_batch_size"], smaller)
        run.checkpoint["current_batch_size"] = smaller
        end, rows = run.keys.next_batch(run.client, batch.start, smaller)
        run.in_flight = Batch(batch.start, end, rows, smaller, replay=True, first_attempt_at=batch.first_attempt_at)
        self.save()
