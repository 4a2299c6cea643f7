"""Who runs a backfill: a lease in checkpoint_data, refreshed by a heartbeat thread.

A second runner is refused while the lease is fresh; a lease whose heartbeat is older than
`BACKFILL_LEASE_SECONDS` (default 60), or whose process is gone on this host, can be taken over.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from migrator.connection import pid_alive

from ..errors import BackfillError, LeaseLost

log = logging.getLogger("backfill")
DEFAULT_SECONDS = 60.0


def lease_seconds() -> float:
    """How long a silent runner keeps its lease (BACKFILL_LEASE_SECONDS)."""
    return float(os.environ.get("BACKFILL_LEASE_SECONDS", DEFAULT_SECONDS))


def new_lease(owner: str) -> dict:
    """A lease naming this process, so an operator can find the runner."""
    return {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def holder(lease: dict | None, me: str, seconds: float | None = None) -> dict | None:
    """The live lease held by someone else, or None if it is ours, stale or absent."""
    if not lease or lease.get("owner") == me:
        return None
    try:
        age = time.time() - float(lease.get("heartbeat", 0))
    except (TypeError, ValueError):  # a heartbeat no runner wrote: it cannot be fresh
        return None
    if age > (seconds if seconds is not None else lease_seconds()):
        return None
    try:
        pid = int(lease.get("pid", 0))
    except (TypeError, ValueError):
        pid = 0
    if lease.get("host") == socket.gethostname() and pid > 0 and not pid_alive(pid):
        return None
    return lease


class Heartbeat(threading.Thread):
    """Re-save the current row every lease/4 seconds, so a long batch keeps its lease fresh."""

    def __init__(self, beat, seconds: float | None = None):
        super().__init__(daemon=True, name="backfill-heartbeat")
        self.beat, self.interval = beat, (seconds or lease_seconds()) / 4
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # a missed heartbeat only risks a takeover, which the lease check catches
                log.debug("heartbeat write failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()


def runner_died(row, me: str) -> bool:
    """A `running` row whose lease no live runner holds: its runner crashed and it may be resumed."""
    return row.status == "running" and not holder(row.checkpoint.get("lease"), me)


def refuse_second_runner(row, me: str) -> None:
    """A running or paused row whose lease is live belongs to another runner (a paused one has not
    reached its batch boundary yet)."""
    other = holder(row.checkpoint.get("lease"), me) if row.status in ("running", "paused") else None
    if other:
        raise BackfillError(f"backfill {row.backfill_id} is already running ({other['owner']}, heartbeat "
                            f"{time.time() - other['heartbeat']:.0f}s ago); refusing a second runner")


def claim(store, row, owner: str, set_running, settle: float = 0.2) -> None:
    """Take the lease; a runner that claimed at the same instant makes exactly one side back off.

    The claim carries the position this run read when it started. If the state changed since (another
    runner claimed and committed batches meanwhile, while this one planned its SQL), writing the claim
    would move the position back over committed batches, and a walk from there writes them again: so the
    row is read once more just before the claim, and a newer one stops this run without a write."""
    newest = store.load(row.backfill_id)
    if newest is not None and newest.version != row.version:
        refuse_second_runner(newest, owner)  # another runner holds it now: the usual refusal
        by = (newest.checkpoint.get("lease") or {}).get("owner")
        raise BackfillError(f"backfill {row.backfill_id} changed while this run was starting (another runner or "
                            f"command wrote its state: now {newest.status}{', lease ' + by if by else ''}); "
                            f"nothing was written: run again")
    row.checkpoint["lease"] = new_lease(owner)
    set_running(row)
    time.sleep(settle)  # let a runner that claimed at the same instant land its row, then re-check
    claimant = (store.load(row.backfill_id).checkpoint.get("lease") or {}).get("owner")
    if claimant != owner:
        raise BackfillError(f"backfill {row.backfill_id} was claimed at the same time by {claimant}; "
                            f"refusing a second runner")


def confirm(store, bid: str, owner: str) -> None:
    """Before a retry or replay: a runner that lost its lease must not kill its successor's attempt."""
    lease = (store.load(bid).checkpoint.get("lease") or {})
    if lease.get("owner") != owner:
        raise LeaseLost(f"backfill {bid}: another runner ({lease.get('owner', 'unknown')}) took over the lease; "
                        f"this one stopped without running the batch")
