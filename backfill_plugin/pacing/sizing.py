"""How fast a backfill goes: a batch size that adapts to a target duration, and a rate ceiling.

Both keep their state small: the sizer's lives in a JSON dict the checkpoint stores (it survives a
restart, and `status` shows why the size last changed); the rate ceiling's is per run (the average
over a run is what the operator caps). Health throttling is in health.py.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone

from ..spec.meta import OFF

ALPHA = 0.3  # weight of the newest batch in the seconds-per-row average
MAX_UP, MAX_DOWN = 1.5, 2.0  # per-step bounds: at most x1.5 up, /2 down
DEAD_BAND = 0.1  # moves smaller than 10% are not worth a change (and a status line)
OOM_BATCHES, OOM_UP, OOM_CAP = 20, 1.2, 0.75  # after an OOM: 20 batches below 3/4 of the failed size, x1.2 steps
NAP = 1.0  # longest sleep between two should_stop() calls


def _off(value) -> bool:
    return value is None or value == OFF


def _n(value: int) -> str:
    return f"{value:,}"


def nap(seconds: float, should_stop=None, sleep=time.sleep, clock=time.monotonic) -> str | None:
    """Sleep `seconds` in slices of at most a second, asking `should_stop()` before each; its reason ends it."""
    deadline = clock() + seconds
    while True:
        reason = should_stop() if should_stop else None
        if reason:
            return reason
        left = deadline - clock()
        if left <= 0:
            return None
        sleep(min(NAP, left))


class BatchSizer:
    """The next batch size: toward the size that takes `target_seconds`, smoothed and bounded per step.

    `state` is the checkpoint's JSON dict (`checkpoint.setdefault("sizing", {})`), updated in place;
    `size` is the current size (`checkpoint["current_batch_size"]`): when it differs from the state's
    (an operator's `--batch-size`), the sizer starts from it. Without a target the size stays fixed.
    """

    def __init__(self, state: dict, size: int, target_seconds, min_size: int, max_size: int, now=None):
        self.state, self.min, self.max = state, int(min_size), int(max(max_size, min_size))
        self.target = None if _off(target_seconds) else float(target_seconds)
        self._now = now or (lambda: datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds"))
        state.setdefault("seconds_per_row", None)
        state.setdefault("oom", None)
        state.setdefault("reason", None)
        state.setdefault("changed_at", None)
        if state.get("size") != int(size):
            if state.get("size") is not None:
                self._change(state["size"], int(size), f"set to {_n(int(size))} by the operator")
            state["size"] = int(size)

    @property
    def size(self) -> int:
        """The size the next batch should use."""
        return self.state["size"]

    def _change(self, old: int, new: int, reason: str) -> int:
        self.state.update(size=new, reason=reason, changed_at=self._now())
        return new

    def oom(self, failed_size: int, new_size: int) -> int:
        """Out of memory at `failed_size`, halved to `new_size`: grow back only slowly, and below the failed size."""
        oom = self.state.get("oom") or {}
        failed = min(int(failed_size), oom.get("failed_size") or int(failed_size))
        self.state["oom"] = {"failed_size": failed, "batches_left": OOM_BATCHES, "halved_batch": True}
        hold = f", then at most {_n(int(failed * OOM_CAP))} for {OOM_BATCHES} batches" if self.target else ""
        return self._change(self.state["size"], int(new_size),
                            f"out of memory at {_n(int(failed_size))}: halved to {_n(int(new_size))}{hold}")

    def observe(self, rows: int, seconds: float, size: int) -> int:
        """Record a committed batch (source rows, seconds, the size it ran with); returns the next size.

        A size below the one proposed means the batch was halved on out-of-memory on the way
        (attempt.py): that counts as `oom()` when the caller did not report it, and its time, which
        includes the failed attempts, does not enter the average.
        """
        state, size = self.state, int(size)
        if size < state["size"]:
            self.oom(state["size"], size)
        if state["oom"] and state["oom"].pop("halved_batch", False):
            return state["size"]  # its time includes the failed attempts: keep the halved size, learn nothing
        if size > state["size"]:
            state["size"] = size
        else:
            self._learn(rows, seconds, size)
        if state["oom"]:
            state["oom"]["batches_left"] -= 1
            if state["oom"]["batches_left"] <= 0:
                state["oom"] = None
        if self.target is None or not state["seconds_per_row"]:
            return state["size"]
        return self._resize(seconds)

    def _learn(self, rows: int, seconds: float, size: int) -> None:
        if rows <= 0 or seconds <= 0:
            return
        sample, old = seconds / rows, self.state["seconds_per_row"]
        weight = ALPHA * min(1.0, rows / max(size, 1))  # the short last batch carries its fixed cost: less weight
        self.state["seconds_per_row"] = sample if old is None else old + weight * (sample - old)

    def _resize(self, seconds: float) -> int:
        state, size = self.state, self.state["size"]
        ideal = self.target / state["seconds_per_row"]
        oom = state["oom"]
        up = OOM_UP if oom else MAX_UP
        top = min(self.max, int(oom["failed_size"] * OOM_CAP)) if oom else self.max
        new = int(min(max(ideal, math.ceil(size / MAX_DOWN)), size * up))
        new = max(self.min, min(top, new))
        if new == size or abs(new - size) < DEAD_BAND * size and self.min < new < top:
            return size
        why = f"batch {seconds:.1f} s vs target {self.target:g} s"
        if oom and new == top and top < ideal:
            why += f", held below the size that ran out of memory ({_n(oom['failed_size'])})"
        return self._change(size, new, f"{why}: {_n(size)} -> {_n(new)}")


class RateCeiling:
    """At most `rows_per_second` on average: after each batch, sleep until its rows fit under the ceiling.

    Each batch's rows are scheduled from the later of the last batch's schedule and the moment the
    batch started, so a slow stretch earns no credit for a burst later (a bucket that holds nothing).
    """

    def __init__(self, rows_per_second, clock=time.monotonic, sleep=time.sleep):
        self.rate = None if _off(rows_per_second) else float(rows_per_second)
        self.clock, self.sleep = clock, sleep
        self.started = self.allowed_at = clock()  # the first batch starts now

    def after_batch(self, rows: int, should_stop=None) -> str | None:
        """Wait until `rows` more keep the run at the ceiling; returns should_stop()'s reason if it ends the wait."""
        if self.rate is None:
            return None
        self.allowed_at = max(self.allowed_at, self.started) + rows / self.rate
        reason = nap(self.allowed_at - self.clock(), should_stop, self.sleep, self.clock)
        self.started = self.clock()  # the next batch starts when this wait ends
        return reason
