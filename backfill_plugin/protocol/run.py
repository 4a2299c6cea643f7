"""One run of one backfill: its spec, key space, SQL template and state row, and how a batch renders."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import cached_property

from migrator.plugins import pm

from ..spec import params as params_
from ..spec import sqlcheck
from ..spec.meta import BackfillSpec
from ..spec.render import Raw, placeholders, render
from . import dedup
from .batch import Batch
from .checkpoint import Row, utcnow
from .keys import KeySpace
from .status import after_batch, remaining, summarize

RECENT = 20  # batches the rate and ETA are computed over


@dataclass
class BackfillView:
    """What hooks see of a backfill: enough to label metrics or compute placeholders."""

    backfill_id: str
    version: int
    database: str
    metadata: dict
    client: object = None  # the client that holds this backfill's checkpoint (on a shard: that shard's)
    shard: str = ""  # the shard the walk runs on; empty when the backfill is not sharded


def view_of(row: Row, spec, client=None, shard: str = "") -> BackfillView:
    """The view of a backfill's row, for hooks called outside a run's batches (status changes)."""
    return BackfillView(row.backfill_id, row.migration_version, row.db_name, spec.meta if spec else {}, client, shard)


@dataclass
class Run:
    """Everything a batch needs, built once per `run_backfill` instead of passed around piecemeal."""

    client: object
    spec: BackfillSpec
    keys: KeySpace
    template: str
    row: Row
    read_settings: dict = field(default_factory=dict)
    write_settings: dict = field(default_factory=dict)
    known_settings: set = field(default_factory=set)
    target: tuple | None = None  # (database, table) the SQL inserts into, when it can be read
    window: dict | None = None  # the target's dedup window (token-only SQL)
    exact: bool = False  # progress from an exact count of the source instead of the primary index
    scope: str | None = None  # "repair": batches walk checkpoint["repair"], not the backfill's own position
    until: list | None = None  # the last key this run may reach (a repair range's end)
    state_client: object = None  # the checkpoint's client: hooks write beside it (the batch history)
    shard: str = ""  # the shard this walk runs on (hooks label metrics and history with it); "" unsharded

    @property
    def backfill_id(self) -> str:
        return self.row.backfill_id

    @property
    def checkpoint(self) -> dict:
        """Where this run keeps its position and in-flight range (a repair has its own)."""
        return self.row.checkpoint[self.scope] if self.scope else self.row.checkpoint

    @cached_property
    def view(self) -> BackfillView:
        return BackfillView(self.row.backfill_id, self.spec.version, self.row.db_name, self.spec.meta,
                            self.state_client or self.client, self.shard)

    @cached_property
    def skips_existing(self) -> bool:
        """SQL that reads `{retry_count}` anti-joins the target on retries instead of trusting the token."""
        return "retry_count" in placeholders(self.template)

    @property
    def in_flight(self) -> Batch | None:
        data = self.checkpoint.get("in_flight")
        return Batch.from_json(data) if data else None

    @in_flight.setter
    def in_flight(self, batch: Batch | None) -> None:
        self.checkpoint["in_flight"] = batch.to_json() if batch else None

    def start_clock(self) -> None:
        """The rate window starts at the claim, so the first batch already has a rate and an ETA."""
        cp = self.checkpoint
        cp.update(recent=[[time.time(), cp.get("rows_processed", 0)]], started_at=cp.get("started_at") or utcnow().isoformat())

    def advance(self, batch: Batch) -> None:
        """The batch committed: the position moves to its end and its rows count, in one checkpoint state."""
        cp, self.in_flight = self.checkpoint, None
        cp.update(position=batch.end, last_updated=utcnow().isoformat(),
                  rows_processed=int(cp.get("rows_processed", 0)) + batch.rows,
                  batches_completed=int(cp.get("batches_completed", 0)) + 1)
        cp["recent"] = (cp.get("recent") or [])[-(RECENT - 1):] + [[time.time(), cp["rows_processed"]]]

    def attempted(self, outcome: str, batch: Batch | None = None, attempt: int = 0, seconds: float = 0.0,
                  replay: bool = False, error: str | None = None, signal: str | None = None, waiting: bool = False,
                  started_at: float | None = None) -> None:
        """Tell `backfill_batch_attempted` hooks of one attempt of the next batch (or of a throttle wait before
        it, `batch` None): the batch history and the metrics are built from these events."""
        cp = self.checkpoint
        event = {"number": int(cp.get("batches_completed", 0)) + 1, "attempt": attempt, "outcome": outcome,
                 "replay": bool(replay), "range_start": batch.start if batch else cp.get("position"),
                 "range_end": batch.end if batch else None, "rows": batch.rows if batch else 0,
                 "batch_size": batch.batch_size if batch else int(cp.get("current_batch_size") or 0),
                 "seconds": round(seconds, 3), "error": error, "signal": signal, "waiting": waiting,
                 "started_at": started_at or time.time(), "runner": self.row.writer, "scope": self.scope,
                 "backfill_started_at": self.row.checkpoint.get("started_at")}
        pm.hook.backfill_batch_attempted(backfill=self.view, event=event)

    def completed(self, batch: Batch, seconds: float, next_batch_size: int) -> dict:
        """Tell `backfill_batch_completed` hooks of the batch just advanced over; returns the event, with the
        progress and ETA `status` would show (100% once the batch took every row left)."""
        cp = self.checkpoint
        event = batch.event(cp["batches_completed"], seconds, next_batch_size, cp["rows_processed"])
        info = after_batch(summarize(replace(self.row, checkpoint=cp) if self.scope else self.row, self.spec), event)
        event.update({k: info[k] for k in ("rows_remaining", "progress_percent", "rows_per_second", "eta_seconds")})
        pm.hook.backfill_batch_completed(backfill=self.view, batch=event)
        return event

    def preview_batch(self) -> Batch:
        """A stand-in range (the keys' defaults) to render the SQL before anything runs."""
        return Batch(None, [self.keys.default(c) for c in self.keys.columns], 1, 1)

    def check_batch(self) -> Batch:
        """The range the SQL is checked with before anything runs: the in-flight one, else the next one,
        else (no key left, or an empty source at `up`) a stand-in of the key types' default values."""
        if self.in_flight:
            return self.in_flight
        cp = self.checkpoint
        size = int(cp.get("current_batch_size") or self.spec.meta["batch_size"])
        found = self.keys.next_batch(self.client, cp.get("position"), size, until=self.until)
        if found:
            return Batch(cp.get("position"), found[0], found[1], size)
        return Batch(None, self.keys.stand_in(self.client), 1, size)

    def render(self, batch: Batch, retry_count: int) -> tuple[str, dict]:
        """The SQL and server-side parameters of exactly this batch's range."""
        cp, keys = self.row.checkpoint, self.keys  # params and values are the backfill's, also in a repair
        values = {k: v for k, v in cp.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
        values.update(cp.get("params") or {})
        for extra in pm.hook.backfill_placeholders(backfill=self.view, checkpoint=cp):
            values.update(extra or {})
        values.update({"db": self.row.db_name, "batch_size": batch.batch_size, "retry_count": retry_count,
                       "batch_range": Raw(keys.range_predicate(batch.start, batch.end))})
        for i, col in enumerate(keys.columns):
            values[f"checkpoint_{col}"] = batch.start[i] if batch.start else keys.default(col)
            values[f"batch_end_{col}"] = batch.end[i]
        return render(self.template, values, self.spec.sql_path)

    def dry_run(self, params, batch_size) -> dict:
        """What the next batch would be and the SQL it would run; nothing is saved or executed."""
        row, keys = self.row, self.keys
        cp = row.checkpoint = dict(row.checkpoint)  # a private copy
        cp["params"] = params_.resolve(self.client, self.spec, row.db_name, params, cp.get("params"),
                                       cp.get("previous_params"))
        size = int(batch_size or cp["current_batch_size"])
        batch, position = self.in_flight, self.checkpoint.get("position")  # a repair's own, in its range
        if batch is None:
            found = keys.next_batch(self.client, position, size, until=self.until)
            batch = found and Batch(position, found[0], found[1], size)
        out = {**summarize(row, self.spec), "rows_remaining": remaining(self.client, keys, position, self.exact,
                                                                        self.until),
               "rows_remaining_estimated": not self.exact, "repair": cp.get("repair") if self.scope else None,
               "first_batch": batch.to_json() if batch else None, "sql": None, "sql_parameters": None}
        sql, params = self.render(batch or self.check_batch(), int(bool(self.scope)))  # a repair replays every batch
        sqlcheck.explain(self.client, sql, params, self.spec.sql_path)
        if batch:
            out["sql"], out["sql_parameters"] = sql, params
        return out

    # -- what an earlier, failed attempt may have left ------------------------------------
    def mark_may_have_committed(self, batch: Batch) -> None:
        """A failed INSERT ... SELECT may have committed blocks up to its end: later ranges up to there replay."""
        limit = self.checkpoint.get("replay_until")
        if limit is None or not self.keys.at_or_before(self.client, batch.end, limit):
            self.checkpoint["replay_until"] = batch.end

    def replays(self, batch: Batch) -> bool:
        """True while the batch lies inside a range that an earlier attempt may have partly committed."""
        limit = self.checkpoint.get("replay_until")
        if limit is None:
            return False
        if self.keys.at_or_before(self.client, batch.end, limit):
            return True
        self.checkpoint.pop("replay_until")  # the walk is past it: later batches are first attempts again
        return False

    def check_replay(self, batch: Batch) -> None:
        """Token-only SQL: refuse a replay the target's dedup window no longer covers."""
        if not self.skips_existing and self.target and self.window:
            dedup.check_replay_age(self.target, self.window, batch.first_attempt_at)
