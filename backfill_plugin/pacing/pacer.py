"""What the batch loop asks before and after each batch: may the next one start, and how big is it.

It joins the three controls (pacing.py, health.py): health throttling before a batch, the adaptive
size and the rate ceiling after it. The loop stays a loop; the decisions live here.
"""
from __future__ import annotations

import logging
import os
import time

from ..spec.meta import PACING
from .health import Health, Limits, wait_until_healthy
from .sizing import BatchSizer, RateCeiling

log = logging.getLogger("backfill")


def health_interval() -> float:
    """Seconds between two health checks far from every limit (BACKFILL_HEALTH_SECONDS, default 5): short
    batches pay no query each."""
    return float(os.environ.get("BACKFILL_HEALTH_SECONDS", 5))


class CheckSchedule:
    """When the next health check is due: every `health_interval()` while every signal is far from its limit,
    and before every batch once one may be within reach of it.

    Within reach: the last reading above half its limit, the target's parts counted with what the batches
    since may have added (parts per batch as seen between the last two checks, at least one). However short
    the batches, the parts then stop within one batch of their limit.
    """

    def __init__(self, clock=time.monotonic):
        self.clock, self.checked_at, self.readings = clock, None, {}
        self.batches, self.parts_per_batch = 0, 1.0  # batches started since the last check

    def projected(self, signal: str) -> float:
        value = self.readings[signal][0]
        return value + self.batches * self.parts_per_batch if signal == "target_parts" else value

    def due(self) -> bool:
        if self.checked_at is None or self.clock() - self.checked_at >= health_interval():
            return True
        return any(self.projected(signal) > limit / 2 for signal, (_, limit) in self.readings.items())

    def checked(self, readings: dict) -> None:
        """A check just read `readings` ({signal: (value, limit)})."""
        before, now = self.readings.get("target_parts"), readings.get("target_parts")
        if before and now and self.batches:
            self.parts_per_batch = max(1.0, (now[0] - before[0]) / self.batches)
        self.readings, self.batches, self.checked_at = dict(readings), 0, self.clock()


def record_throttle(checkpoint: dict, throttle) -> None:
    """Record (or clear) the health signal the runner waits on, keeping when it started waiting."""
    before = checkpoint.get("throttled")
    if throttle is None:
        checkpoint.pop("throttled", None)
    else:
        since = before["since"] if before and before["signal"] == throttle.signal else time.time()
        checkpoint["throttled"] = {**throttle.to_json(), "since": since}


class Pacer:
    """The pacing of one run: meta values, overridden for this run by the command line.

    `publish(throttle_or_None)` records the runner's throttled state (status, live file, progress).
    """

    def __init__(self, run, cluster: str | None, overrides: dict | None, publish, sleep=time.sleep,
                 clock=time.monotonic):
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(given) - set(PACING)
        if unknown:
            raise TypeError(f"unknown pacing overrides: {sorted(unknown)}")
        self.run, self.values = run, {**{f: run.spec.meta.get(f) for f in PACING}, **given}
        meta, cp = run.spec.meta, run.checkpoint
        self.sizer = BatchSizer(cp.setdefault("sizing", {}), cp["current_batch_size"], self.values["target_batch_seconds"],
                                meta["min_batch_size"], self.values["max_batch_size"])
        self.ceiling = RateCeiling(self.values["max_rows_per_second"], clock=clock, sleep=sleep)
        limits = Limits.from_meta(self.values)
        self.health = Health(run.client, *run.target, limits, cluster) if run.target else None
        if run.target is None:
            log.warning("the backfill SQL's target table could not be read: health throttling is off for this run")
        self.publish, self.sleep, self.clock = publish, sleep, clock
        self.schedule = CheckSchedule(clock)

    def before_batch(self, should_stop) -> str | None:
        """Wait while the target is over a health limit; returns a stop reason if one ends the wait."""
        if self.health is None or not self.schedule.due():
            self.schedule.batches += 1
            return None
        throttled, began = [], (time.time(), self.clock())

        def on_throttled(throttle):
            if not throttled or throttled[-1] != throttle:
                log.warning("throttled: %s", throttle.reason)
                self.publish(throttle)
            throttled.append(throttle)
            self._waited(throttle, began, None)
        reason = wait_until_healthy(self.health.check, should_stop, on_throttled, self.sleep, self.clock)
        self.schedule.checked(self.health.readings)
        self.schedule.batches += reason is None
        if throttled:
            self.publish(None)
            self._waited(throttled[-1], began, reason or "cleared")
        return reason

    def _waited(self, throttle, began: tuple, ended: str | None) -> None:
        """A throttle wait before the next batch, as an event (`backfill_batch_attempted`, outcome throttled):
        after every check still over the limit (`waiting`), and once when the wait ends (`ended`: cleared or a stop)."""
        error = throttle.reason + (f" (wait ended: {ended})" if ended else "")
        self.run.attempted("throttled", seconds=self.clock() - began[1], error=error, signal=throttle.signal,
                           waiting=ended is None, started_at=began[0])

    def sized(self, batch, seconds: float) -> int:
        """The next batch's size, from this one's statement time (waits and sleeps left out)."""
        size = self.sizer.observe(batch.rows, seconds, batch.batch_size)
        self.run.checkpoint["current_batch_size"] = size
        return size

    def hold_rate(self, batch, should_stop) -> str | None:
        """Sleep as long as the rate ceiling needs; a stop reason (pause, SIGTERM) ends the wait and is returned."""
        return self.ceiling.after_batch(batch.rows, should_stop)
