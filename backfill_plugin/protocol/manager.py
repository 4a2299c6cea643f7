"""ClickHouseBackfillManager: the batch loop that owns the key range and makes replays exactly-once.

Per batch (DESIGN.md, "The batch protocol"): find the batch's last key on the source, write the
in-flight range ahead, run the SQL for exactly that range with a deterministic dedup token, then
advance. Migration-specific logic stays in the SQL; this file only keeps position and promises.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from migrator import tracking
from migrator.plugins import declare_hookspecs, pm
from migrator.sqltext import check_identifier

from .. import hookspecs
from ..errors import BackfillError, LeaseLost, one_line
from ..pacing.pacer import Pacer, record_throttle
from ..spec import params as params_
from ..spec.meta import BackfillSpec, all_specs, check_source, find_spec
from ..spec.render import read_template
from . import lease, preflight, repair
from . import status as status_
from .attempt import Attempts, BatchExecution
from .batch import Batch
from .checkpoint import CheckpointStore, Row, backfill_id, new_checkpoint, state_client, utcnow
from .keys import KeySpace, probe_walk
from .lease import Heartbeat, holder
from .lookahead import Lookahead
from .run import Run, view_of
from .status import summarize

log = logging.getLogger("backfill")


class ClickHouseBackfillManager:
    """Run, inspect and control backfills of one ClickHouse client.

    Examples:
        manager = ClickHouseBackfillManager(client, migrations_dir="migrations")
        manager.run_backfill(database="weave", version=21)
        manager.get_status(database="weave", version=21)
    """

    def __init__(self, ch_client, replicated: bool | None = None, migrations_dir=None,
                 cluster: str | None = None, control=None, sleep=time.sleep):
        declare_hookspecs(hookspecs)  # the hooks this calls, also when entry points are off
        self.ch_client = ch_client
        self.cluster = cluster if replicated is not False else None
        self.migrations_dir = Path(migrations_dir or "migrations")
        self.control = control  # ControlChannel for an embedded store, else None
        self.shard = ""  # the shard this manager walks, set by the fan-out: hooks label their events with it
        self.sleep = sleep
        self.store = CheckpointStore(state_client(ch_client), self.cluster)
        self.attempts = Attempts(ch_client, self.cluster, sleep)
        self.owner = tracking.owner_id()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._row: Row | None = None
        self._lookup_client = None  # the lookahead's own handle (embedded engine), made by the first run
        self._spec: BackfillSpec | None = None
        self._walk: tuple | None = None  # (known settings, has mergeTreeIndex) of this server

    def spec(self, version: int) -> BackfillSpec:
        """The validated files of one version's backfill; a one-line error if there are none."""
        return find_spec(self.migrations_dir, version)

    def keyspace(self, spec: BackfillSpec, database: str) -> KeySpace:
        """The source's checkpoint columns, checked against the table before anything runs; how this
        server lets a walk read range ends is asked once per manager (`probe_walk`)."""
        self._walk = self._walk or probe_walk(self.ch_client)
        return KeySpace(database, spec.meta["source_table"], check_source(self.ch_client, spec, database), *self._walk)

    # -- state helpers -------------------------------------------------------------------
    def _save(self, row: Row) -> Row:
        with self._lock:
            self._row = self.store.save(row)
            return self._row

    def _beat(self) -> None:
        with self._lock:
            if self._row is not None and self._row.status == "running":
                self._row.checkpoint["lease"]["heartbeat"] = time.time()
                self.store.save(self._row)

    def _set_status(self, row: Row, status: str, error: str | None = None) -> Row:
        row.status, row.writer = status, self.owner
        if error is not None:
            row.error_log = error
        if status == "completed":
            row.completed_at = utcnow()
        if status != "running":
            row.checkpoint.pop("lease", None)
            row.checkpoint.pop("throttled", None)
        self._save(row)
        view = view_of(row, self._spec, self.store.client, self.shard)
        pm.hook.backfill_status_changed(backfill=view, status=status, error=error)
        self._publish(row)
        return row

    def _publish(self, row: Row) -> None:
        if self.control is not None:
            self.control.write_status(row.backfill_id, summarize(row, self._spec))

    # -- public API ----------------------------------------------------------------------
    def register_pending_backfills(self, db_name: str, migration_versions: list[int]) -> list[str]:
        """Insert a pending row for each version that ships a backfill; run `run_on_startup` ones inline."""
        specs, lines = all_specs(self.migrations_dir), []
        self.store.ensure_schema()
        for version in migration_versions:
            spec = specs.get(version)
            if spec is None:
                continue
            bid = backfill_id(db_name, version)
            row = self.store.load(bid)
            if row is None or row.status == "pending" and not row.checkpoint:
                row = Row(bid, version, db_name, "pending", new_checkpoint(spec), writer=self.owner)
                self._save(row)
            if spec.meta["run_on_startup"]:
                result = self.run_backfill(db_name, version)
                lines.append(f"backfill {version} ({spec.description}): {result['status']}, "
                             f"{result['rows_processed']} rows")
            else:
                lines.append(f"backfill {version} registered (pending): run 'migrate backfill run {version}'")
        return lines

    def reset_backfill(self, database: str, version: int, keep_params: bool = True) -> None:
        """Forget progress: a new pending row with a fresh checkpoint (history rows stay).

        The params fixed at first start (021's cutover) become the next run's defaults: recomputed
        after a partial copy they would describe the copy, not the deploy. `--param` still overrides.
        """
        spec, bid = self.spec(version), backfill_id(database, version)
        try:
            row = self.store.load(bid)
        except BackfillError:  # a corrupt checkpoint is exactly what reset is for
            row = None
        if row is not None and row.status in ("running", "paused") and holder(row.checkpoint.get("lease"), self.owner):
            raise BackfillError(f"backfill {bid} is running ({row.checkpoint['lease']['owner']}); pause it "
                                f"and wait for it to stop first")
        self.attempts.kill_earlier(bid)  # an orphaned attempt must not write into the restarted backfill
        self.store.ensure_schema()
        cp = new_checkpoint(spec)
        if keep_params and row is not None:
            cp["previous_params"] = row.checkpoint.get("params") or row.checkpoint.get("previous_params")
        self._save(Row(bid, version, database, "pending", cp, writer=self.owner))
        if self.control is not None:
            self.control.take_pause_request(bid)

    def pause_backfill(self, database: str, version: int) -> dict:
        """Ask a running backfill to stop at its next batch boundary (a paused row it will see)."""
        bid = backfill_id(database, version)
        row = self.store.load(bid)
        if row is None:
            raise BackfillError(f"backfill {bid} is not registered; nothing to pause")
        if row.status not in ("running", "pending"):
            raise BackfillError(f"backfill {bid} is {row.status}; only a running or pending backfill can be paused")
        row.status, row.writer = "paused", self.owner
        self.store.save(row)
        return summarize(row)

    def resume_backfill(self, database: str, version: int, **kwargs) -> dict:
        """Continue a paused or failed backfill (or one whose runner died) from its checkpoint."""
        row = self.store.load(backfill_id(database, version))
        if row is None or row.status not in ("paused", "failed") and not lease.runner_died(row, self.owner):
            state = row.status if row else "not registered"
            raise BackfillError(f"backfill {backfill_id(database, version)} is {state}; "
                                f"only a paused or failed backfill (or one whose runner died) can be resumed")
        return self.run_backfill(database, version, **kwargs)

    def request_stop(self) -> None:
        """Stop at the next batch boundary (signal handlers call this)."""
        self._stop.set()

    def abandon_batch(self) -> None:
        """Record `paused` while a batch still runs (a second signal): its range stays in flight and is replayed."""
        row = self._row
        if row is not None and row.status == "running":
            self._set_status(row, "paused")

    def list_backfills(self, database: str | None = None, status: str | None = None, exact: bool = False) -> list[dict]:
        """Registered backfills plus the ones discovered in the migrations directory but not registered.

        Progress of unfinished ones comes from the primary index (one EXPLAIN ESTIMATE each), or
        from an exact count with `exact`.
        """
        specs = all_specs(self.migrations_dir) if self.migrations_dir.is_dir() else {}

        def remaining_of(spec, row):
            return status_.remaining_or_none(self.ch_client, lambda: self.keyspace(spec, row.db_name), row, exact)
        out = status_.listing(self.store.load_all(database), specs, database, remaining_of, exact)
        return [s for s in out if status is None or s["status"] == status]

    def get_status(self, database: str, version: int, live_counts: bool = True, exact: bool = False) -> dict:
        """The whole state of one backfill; remaining rows from the primary index unless `exact`."""
        spec, bid = self.spec(version), backfill_id(database, version)
        row = self.store.load(bid) or Row(bid, version, database, "not registered", new_checkpoint(spec))
        remaining = None
        if live_counts and row.status not in ("completed", "not registered"):
            remaining = status_.remaining(self.ch_client, self.keyspace(spec, database), row.checkpoint.get("position"),
                                          exact)
        return summarize(row, spec, remaining, estimated=not exact)

    # -- running -------------------------------------------------------------------------
    def run_backfill(self, database: str, version: int, max_batches: int | None = None,
                     batch_size: int | None = None, params: dict | None = None,
                     dry_run: bool = False, on_batch=None, exact: bool = False, key_range: tuple | None = None,
                     pacing: dict | None = None, on_throttle=None) -> dict:
        """Run from the checkpoint until complete, paused, stopped or `max_batches` more batches.

        `key_range` (start, end; None is open): replay only the keys in (start, end], each exactly once,
        e.g. a range that `validate` reported; the backfill's own position does not move.
        `pacing` overrides the meta's pacing fields for this run (`target_batch_seconds`, limits, ...);
        `on_throttle(throttle or None)` hears when the runner starts and stops waiting on a health signal.
        """
        check_identifier(database)
        spec, bid = self.spec(version), backfill_id(database, version)
        if version not in tracking.applied_set(tracking.read_state(self.ch_client, database), [version]):
            raise BackfillError(f"version {version} is not applied to database {database!r}; run 'migrate up' first")
        row = self.store.load(bid) or Row(bid, version, database, "pending", new_checkpoint(spec))
        row.checkpoint = row.checkpoint or new_checkpoint(spec)
        run = Run(self.ch_client, spec, self.keyspace(spec, database), read_template(spec.sql_path), row, exact=exact)
        run.state_client, run.shard = self.store.client, self.shard  # hooks write beside the checkpoint, by shard
        cp = row.checkpoint
        repair.start(run, key_range)  # a dry run of a range shows that range (nothing is saved)
        if dry_run:
            return run.dry_run(params, batch_size)
        cp["params"] = params_.resolve(self.ch_client, spec, database, params, cp.get("params"), cp.get("previous_params"))
        if row.status == "completed" and key_range is None:
            return {**summarize(row, spec), "stopped": "already completed"}
        lease.refuse_second_runner(row, self.owner)
        preflight.check(run, self.cluster)  # renders a preview first: unknown placeholders fail before any write
        self.store.ensure_schema()
        if batch_size:
            run.checkpoint["current_batch_size"] = int(batch_size)
        if self.control is not None:
            self.control.discard_stale_pause(bid)  # for a runner that is gone: said, then dropped
        self._claim(run)
        heartbeat = Heartbeat(self._beat)
        heartbeat.start()
        if self._lookup_client is None:  # one per manager: a chDB handle of its own, a server client shared
            self._lookup_client = state_client(self.ch_client)
        ahead = Lookahead(run.keys, self._lookup_client)
        try:
            return self._loop(run, ahead, max_batches, on_batch, pacing, on_throttle)
        except LeaseLost:
            raise  # the new runner owns the row now: write nothing
        except BaseException as exc:
            if row.status == "running":  # interrupted inside a batch: the in-flight range stays for replay
                interrupted = isinstance(exc, KeyboardInterrupt)
                self._set_status(row, "paused" if interrupted else "failed", None if interrupted else one_line(exc))
            raise
        finally:
            ahead.close()
            heartbeat.stop()
            self._stop.clear()  # a stop request ends one run; cleared only after it was honoured

    def _claim(self, run: Run) -> None:
        """Take the lease; the rate window starts here, so the first batch already has a rate and an ETA."""
        row, self._spec = run.row, run.spec
        run.start_clock()
        status_.estimate_total(run)
        row.started_at, row.error_log = row.started_at or utcnow(), None
        lease.claim(self.store, row, self.owner, lambda r: self._set_status(r, "running"))

    def _finish_repair(self, run: Run) -> dict:
        """The range is done: the backfill goes back to the status it had, the repair into its history."""
        row, done = run.row, repair.finish(run.row, self.owner)
        self._save(row)
        self._publish(row)
        return {**summarize(row, run.spec), "stopped": "repaired", "repair": done}

    def _loop(self, run: Run, ahead: Lookahead, max_batches, on_batch, pacing=None, on_throttle=None) -> dict:
        row, cp, since, done, reason = run.row, run.checkpoint, run.row.version, 0, None
        execution = BatchExecution(run, self.attempts, lambda: self._save(row),
                                   lambda: lease.confirm(self.store, row.backfill_id, self.owner), self.owner,
                                   self.sleep)
        pacer = Pacer(run, self.cluster, pacing, lambda t: self._throttled(row, t, on_throttle), self.sleep)

        def should_stop():
            return self._should_stop(row, since, max_batches, done)
        while True:
            batch = run.in_flight
            if batch is None:
                reason = reason or should_stop()
                found = None if reason else ahead.next_batch(self.ch_client, cp.get("position"),
                                                             cp["current_batch_size"], run.until)
                if found is None and not reason and run.scope:
                    return self._finish_repair(run)
                if found is None and not reason:
                    run.keys.check_all_walked(self.ch_client, cp.get("position"), cp.get("rows_processed", 0),
                                              row.backfill_id)
                    self._set_status(row, "completed")
                    return {**summarize(row, run.spec), "stopped": "completed"}
                reason = reason or pacer.before_batch(should_stop)  # only when a batch would start
                if reason:
                    if reason != "lease lost":
                        self._set_status(row, "paused")
                    return {**summarize(row, run.spec), "stopped": reason}
                # A repair replays every batch: the SQL skips the rows its range already holds.
                run.in_flight = Batch(cp.get("position"), found[0], found[1], cp["current_batch_size"],
                                      replay=bool(run.scope), first_attempt_at=time.time())  # a late replay is detectable
                # Write-ahead: from here a crash replays exactly this range. The same row also
                # persists the previous batch's completion (one write per batch, not two).
                self._save(row)
                ahead.after_write_ahead(found[0], cp["current_batch_size"], run.until)  # beside the INSERT
            else:
                batch.replay = True
                run.in_flight = batch
            started = time.time()
            batch = execution.execute()
            seconds = time.time() - started
            with self._lock:  # the heartbeat may save meanwhile: it must see a consistent checkpoint
                run.advance(batch)
            done += 1
            status_.refine_total(run)  # the estimate ran out before the keys did, or the end is within reach
            event = run.completed(batch, seconds, pacer.sized(batch, seconds))
            self._publish(row)
            if on_batch:  # a repair reports its own range's progress
                on_batch(summarize(replace(row, checkpoint=cp) if run.scope else row, run.spec), event)
            reason = pacer.hold_rate(batch, should_stop)  # a pause that ends the wait is honoured, not lost

    def _throttled(self, row: Row, throttle, on_throttle) -> None:
        """Record (or clear) the health signal the runner waits on: `status` and the live file show it."""
        with self._lock:
            record_throttle(row.checkpoint, throttle)
            self.store.save(row)
        self._publish(row)
        if on_throttle:
            on_throttle(throttle)

    def _should_stop(self, row: Row, since: int, max_batches, done: int) -> str | None:
        if self._stop.is_set():
            return "stop requested"
        if self.control is not None and self.control.take_pause_request(row.backfill_id):
            return "paused"
        paused, claimed = self.store.others_since(row.backfill_id, since, self.owner)
        if paused:
            return "paused"
        if claimed:
            return "lease lost"
        if max_batches is not None and done >= max_batches:
            return "max batches"
        return None
