"""The fault plugin `exactly_once` loads into a `migrate` subprocess: kill -9 of its own process at
one phase of the batch protocol, chosen by BACKFILL_KILL_AT (unset: the plugin does nothing).

It is registered only in the subprocess's environment (a dist-info on its PYTHONPATH, see
`harness.fault_site`), never for the package's users. Phases, with N the batch (1 = the first):
- claimed: the runner has claimed the backfill and written nothing of a range yet;
- written_ahead:N: batch N's range is written ahead and its INSERT not sent;
- committed:N: batch N's INSERT committed and its completion not yet saved.
"""
from __future__ import annotations

import json
import os
import signal

from migrator import hookimpl

_renders = 0
_claimed = False


def _wanted() -> tuple[str, int]:
    phase, _, number = os.environ.get("BACKFILL_KILL_AT", "").partition(":")
    return phase, int(number or 1)


def _die(in_flight=None) -> None:
    """Note the range in flight for the harness (BACKFILL_KILL_REPORT), then die as a crashed host does."""
    report = os.environ.get("BACKFILL_KILL_REPORT")
    if report:
        with open(report, "w") as out:
            json.dump({"in_flight": in_flight}, out, default=str)
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup


@hookimpl
def backfill_status_changed(backfill, status, error):
    global _claimed
    if status == "running":
        _claimed = True
        if _wanted()[0] == "claimed":
            _die()


@hookimpl
def backfill_placeholders(backfill, checkpoint):
    """Called right before a batch's SQL is rendered and sent, after its range was written ahead."""
    global _renders
    phase, number = _wanted()
    if phase == "written_ahead" and _claimed and checkpoint.get("in_flight"):
        _renders += 1
        if _renders == number:
            _die(checkpoint.get("in_flight"))
    return None


@hookimpl
def backfill_batch_completed(backfill, batch):
    phase, number = _wanted()
    if phase == "committed" and batch["number"] - _first_number(batch) + 1 == number:
        _die({"start": batch["range_start"], "end": batch["range_end"]})


def _first_number(batch) -> int:
    """Batch numbers count the backfill's batches; N counts this run's (the first completed here is 1)."""
    global _base
    if _base is None:
        _base = batch["number"]
    return _base


_base = None
