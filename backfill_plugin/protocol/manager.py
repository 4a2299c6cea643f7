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
from migrator.discovery import discover
from migrator.plugins import declare_hookspecs, pm
from migrator.sqltext import check_identifier

from .. import hookspecs
from ..errors import BackfillError, LeaseLost, one_line
from ..pacing.pacer import Pacer
from ..spec import params as params_
from ..spec.meta import BackfillSpec, check_source, load_spec
from ..spec.render import read_template
from . import dedup, preflight, repair
from .attempt import Attempts, BatchExecution
from .batch import Batch
from .checkpoint import CheckpointStore, Row, backfill_id, new_checkpoint, state_client, utcnow
from .keys import WALK_SETTINGS, KeySpace
from .lease import Heartbeat, holder, new_lease
from .lookahead import Lookahead
from .run import BackfillView, Run
from .status import summarize

log = logging.getLogger("backfill")
RECENT = 20  # batches the rate and ETA are computed over


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

    # -- discovery -----------------------------------------------------------------------
    def _discover_backfill_files(self) -> dict[int, BackfillSpec]:
        return {v: load_spec(m) for v, m in discover(self.migrations_dir).items() if m.has_backfill}

    def spec(self, version: int) -> BackfillSpec:
        """The validated files of one version's backfill; a one-line error if there are none."""
        for v, mig in discover(self.migrations_dir).items():
            if v == version and mig.has_backfill:
                return load_spec(mig)
        raise BackfillError(f"no backfill for version {version} in {self.migrations_dir} "
                            f"(expected {version:03d}_name.backfill.sql + .backfill.meta)")

    def keyspace(self, spec: BackfillSpec, database: str) -> KeySpace:
        """The source's checkpoint columns, checked against the table before anything runs.

        Every walk (a run, `validate`, a dry run) reads range ends the cheap way this server allows:
        from the primary index, else in small unbuffered blocks, so memory never follows the number
        of source parts (asked once per manager).
        """
        if self._walk is None:
            self._walk = (dedup.known_settings(self.ch_client, also=WALK_SETTINGS),
                          preflight.has_table_function(self.ch_client, "mergeTreeIndex"))
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
        view = BackfillView(row.backfill_id, row.migration_version, row.db_name, self._spec.meta if self._spec else {})
        pm.hook.backfill_status_changed(backfill=view, status=status, error=error)
        self._publish(row)
        return row

    def _publish(self, row: Row) -> None:
        if self.control is not None:
            self.control.write_status(row.backfill_id, self.summary(row, self._spec))

    # -- public API ----------------------------------------------------------------------
    def register_pending_backfills(self, db_name: str, migration_versions: list[int]) -> list[str]:
        """Insert a pending row for each version that ships a backfill; run `run_on_startup` ones inline."""
        specs, lines = self._discover_backfill_files(), []
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
        return self.summary(row)

    def resume_backfill(self, database: str, version: int, **kwargs) -> dict:
        """Continue a paused or failed backfill (or one whose runner died) from its checkpoint."""
        row = self.store.load(backfill_id(database, version))
        crashed = row is not None and row.status == "running" and not holder(row.checkpoint.get("lease"), self.owner)
        if row is None or row.status not in ("paused", "failed") and not crashed:
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
        rows = {r.backfill_id: r for r in self.store.load_all(database)}
        specs = self._discover_backfill_files() if self.migrations_dir.is_dir() else {}
        if database:
            for version, spec in specs.items():
                if backfill_id(database, version) not in rows:
                    rows[backfill_id(database, version)] = Row(backfill_id(database, version), version, database,
                                                               "not registered", new_checkpoint(spec))
        out = []
        for r in rows.values():
            spec, remaining = specs.get(r.migration_version), None
            if spec is not None and r.status != "completed" and r.status != "running":
                remaining = self._remaining_or_none(spec, r, exact)
            out.append(self.summary(r, spec, remaining, estimated=not exact))
        out.sort(key=lambda s: (s["db_name"], s["migration_version"]))
        return [s for s in out if status is None or s["status"] == status]

    def _remaining(self, keys: KeySpace, position, exact: bool, until=None) -> int:
        """Source rows past the position (up to `until`): counted, or from the primary index."""
        return (keys.remaining if exact else keys.estimate)(self.ch_client, position, until)

    def _remaining_or_none(self, spec: BackfillSpec, row: Row, exact: bool) -> int | None:
        """None when the source cannot be read yet (a version not applied): progress is then unknown."""
        try:
            return self._remaining(self.keyspace(spec, row.db_name), row.checkpoint.get("position"), exact)
        except Exception as exc:
            log.debug("no progress estimate for %s: %s", row.backfill_id, one_line(exc))
            return None

    def get_status(self, database: str, version: int, live_counts: bool = True, exact: bool = False) -> dict:
        """The whole state of one backfill; remaining rows from the primary index unless `exact`."""
        spec, bid = self.spec(version), backfill_id(database, version)
        row = self.store.load(bid) or Row(bid, version, database, "not registered", new_checkpoint(spec))
        remaining = None
        if live_counts and row.status not in ("completed", "not registered"):
            remaining = self._remaining(self.keyspace(spec, database), row.checkpoint.get("position"), exact)
        return self.summary(row, spec, remaining, estimated=not exact)

    def summary(self, row: Row, spec: BackfillSpec | None = None, remaining: int | None = None,
                estimated: bool = True) -> dict:
        """The stable status document (`status --json`, `list --json`, the live status file)."""
        return summarize(row, spec, remaining, estimated)

    # -- running -------------------------------------------------------------------------
    def run_backfill(self, database: str, version: int, max_batches: int | None = None,
                     batch_size: int | None = None, params: dict | None = None,
                     dry_run: bool = False, on_batch=None, exact: bool = False, key_range: tuple | None = None,
                     pacing: dict | None = None, on_throttle=None) -> dict:
        """Run from the checkpoint until complete, paused, stopped or `max_batches` more batches.

        `key_range` (start or None, end): replay only the keys in (start, end], each exactly once,
        e.g. a range that `validate` reported; the backfill's own position does not move.
        `pacing` overrides the meta's pacing fields for this run (`target_batch_seconds`, limits, ...);
        `on_throttle(throttle or None)` hears when the runner starts and stops waiting on a health signal.
        """
        check_identifier(database)
        spec, bid = self.spec(version), backfill_id(database, version)
        if tracking.read_state(self.ch_client, database).curr_version < version:
            raise BackfillError(f"version {version} is not applied to database {database!r}; run 'migrate up' first")
        row = self.store.load(bid) or Row(bid, version, database, "pending", new_checkpoint(spec))
        row.checkpoint = row.checkpoint or new_checkpoint(spec)
        run = Run(self.ch_client, spec, self.keyspace(spec, database), read_template(spec.sql_path), row, exact=exact)
        if dry_run:
            return self._dry_run(run, params, batch_size)
        cp = row.checkpoint
        if key_range is not None:
            repair.start(run, *key_range)
        elif cp.get("repair"):
            raise BackfillError(f"backfill {bid} has an unfinished repair of ({cp['repair']['start']}, "
                                f"{cp['repair']['end']}]; finish it first with the same 'run --range'")
        cp["params"] = params_.resolve(self.ch_client, spec, database, params, cp.get("params"), cp.get("previous_params"))
        if row.status == "completed" and key_range is None:
            return {**self.summary(row, spec), "stopped": "already completed"}
        other = holder(cp.get("lease"), self.owner) if row.status in ("running", "paused") else None
        if other:  # a paused row still carrying a live lease: its runner has not reached the boundary yet
            raise BackfillError(f"backfill {bid} is already running ({other['owner']}, heartbeat "
                                f"{time.time() - other['heartbeat']:.0f}s ago); refusing a second runner")
        preflight.check(run, self.cluster)  # renders a preview first: unknown placeholders fail before any write
        self.store.ensure_schema()
        if batch_size:
            run.checkpoint["current_batch_size"] = int(batch_size)
        if self.control is not None:
            self.control.take_pause_request(bid)  # a request left while no runner was there is stale
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
        """Take the lease; a runner that claimed at the same instant makes exactly one side back off."""
        row, cp = run.row, run.checkpoint
        self._spec = run.spec
        row.checkpoint["lease"] = new_lease(self.owner)
        # The rate window starts at the claim, so the first batch already has a rate and an ETA.
        cp.update(recent=[[time.time(), cp.get("rows_processed", 0)]], started_at=cp.get("started_at") or utcnow().isoformat())
        self._estimate_total(run)
        row.started_at = row.started_at or utcnow()
        row.error_log = None
        self._set_status(row, "running")
        time.sleep(0.2)  # let a runner that claimed at the same instant land its row, then re-check
        claimant = (self.store.load(row.backfill_id).checkpoint.get("lease") or {}).get("owner")
        if claimant != self.owner:
            raise BackfillError(f"backfill {row.backfill_id} was claimed at the same time by {claimant}; "
                                f"refusing a second runner")

    def _estimate_total(self, run: Run) -> None:
        """Rows done plus rows left: from the primary index unless the run asked for an exact count."""
        cp = run.checkpoint
        cp["rows_total"] = cp.get("rows_processed", 0) + self._remaining(run.keys, cp.get("position"), run.exact, run.until)
        cp["rows_total_estimated"] = not run.exact

    def _finish_repair(self, run: Run) -> dict:
        """The range is done: the backfill goes back to the status it had, the repair into its history."""
        row = run.row
        done = repair.finish(row)
        row.writer = self.owner
        self._save(row)
        self._publish(row)
        return {**self.summary(row, run.spec), "stopped": "repaired", "repair": done}

    def _confirm_lease(self, bid: str) -> None:
        """Before a retry or replay: a runner that lost its lease must not kill its successor's attempt."""
        lease = (self.store.load(bid).checkpoint.get("lease") or {})
        if lease.get("owner") != self.owner:
            raise LeaseLost(f"backfill {bid}: another runner ({lease.get('owner', 'unknown')}) took over the lease; "
                            f"this one stopped without running the batch")

    def _loop(self, run: Run, ahead: Lookahead, max_batches, on_batch, pacing=None, on_throttle=None) -> dict:
        row, cp, since, done, reason = run.row, run.checkpoint, run.row.version, 0, None
        execution = BatchExecution(run, self.attempts, lambda: self._save(row),
                                   lambda: self._confirm_lease(row.backfill_id), self.owner, self.sleep)
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
                    self._check_nothing_skipped(run)
                    self._set_status(row, "completed")
                    return {**self.summary(row, run.spec), "stopped": "completed"}
                reason = reason or pacer.before_batch(should_stop)  # only when a batch would start
                if reason:
                    if reason != "lease lost":
                        self._set_status(row, "paused")
                    return {**self.summary(row, run.spec), "stopped": reason}
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
                run.in_flight = None
                cp.update(position=batch.end, last_updated=utcnow().isoformat(),
                          rows_processed=int(cp.get("rows_processed", 0)) + batch.rows,
                          batches_completed=int(cp.get("batches_completed", 0)) + 1)
                cp["recent"] = (cp.get("recent") or [])[-(RECENT - 1):] + [[time.time(), cp["rows_processed"]]]
            done += 1
            if cp["rows_processed"] >= cp.get("rows_total", 0):  # the estimate ran out before the keys did
                self._estimate_total(run)
            next_size = pacer.sized(batch, seconds)
            event = {"number": cp["batches_completed"], "range_start": batch.start, "range_end": batch.end,
                     "rows": batch.rows, "seconds": round(seconds, 3), "batch_size": batch.batch_size,
                     "next_batch_size": next_size, "rows_processed": cp["rows_processed"]}
            pm.hook.backfill_batch_completed(backfill=run.view, batch=event)
            self._publish(row)
            if on_batch:  # a repair reports its own range's progress
                on_batch(self.summary(replace(row, checkpoint=cp) if run.scope else row, run.spec), event)
            reason = pacer.hold_rate(batch, should_stop)  # a pause that ends the wait is honoured, not lost

    def _check_nothing_skipped(self, run: Run) -> None:
        """`completed` only when every source row lies in the walked key space."""
        cp = run.checkpoint
        missing, example = run.keys.unwalked(self.ch_client, cp.get("position"), cp.get("rows_processed", 0))
        if missing:
            raise BackfillError(f"{missing:,} rows of {run.keys.database}.{run.keys.table} lie outside the walked key "
                                f"space (e.g. key {example}): no comparison with the checkpoint columns "
                                f"{', '.join(run.keys.columns)} selects them; not marking backfill "
                                f"{run.row.backfill_id} completed")

    def _throttled(self, row: Row, throttle, on_throttle) -> None:
        """Record (or clear) the health signal the runner waits on: `status` and the live file show it."""
        with self._lock:
            before = row.checkpoint.get("throttled")
            if throttle is None:
                row.checkpoint.pop("throttled", None)
            else:
                since = before["since"] if before and before["signal"] == throttle.signal else time.time()
                row.checkpoint["throttled"] = {**throttle.to_json(), "since": since}
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

    def _dry_run(self, run: Run, params, batch_size) -> dict:
        row, spec, keys = run.row, run.spec, run.keys
        cp = row.checkpoint = dict(row.checkpoint)  # a private copy: nothing here is saved
        cp["params"] = params_.resolve(self.ch_client, spec, row.db_name, params, cp.get("params"), cp.get("previous_params"))
        size = int(batch_size or cp["current_batch_size"])
        batch = run.in_flight
        if batch is None:
            found = keys.next_batch(self.ch_client, cp.get("position"), size)
            batch = found and Batch(cp.get("position"), found[0], found[1], size)
        out = {**self.summary(row, spec), "rows_remaining": self._remaining(keys, cp.get("position"), run.exact),
               "rows_remaining_estimated": not run.exact,
               "first_batch": batch.to_json() if batch else None, "sql": None, "sql_parameters": None}
        if batch:
            out["sql"], out["sql_parameters"] = run.render(batch, 0)
        return out
