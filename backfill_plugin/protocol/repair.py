"""`run --range START..END`: replay one key range exactly once, e.g. a range `validate` reported.

A repair walks (start, end] in batches with the same protocol as the backfill (write-ahead,
lease, kill-before-replay), but every batch is a replay: the SQL reads `{retry_count}` > 0 and
skips the rows the range already holds. Its position lives in `checkpoint["repair"]`, so the
backfill's own position never moves, and an interrupted repair continues when run again.
"""
from __future__ import annotations

import json

from ..errors import BackfillError
from .checkpoint import Row, utcnow
from .run import Run

HISTORY = 10  # finished repairs kept in the checkpoint


def parse(text: str) -> tuple[list | None, list]:
    """`START..END` with START and END JSON arrays as `status --json` shows `position`; START may be empty."""
    decoder, text = json.JSONDecoder(), text.strip()
    try:
        if text.startswith(".."):
            start, rest = None, text[2:]
        else:
            start, used = decoder.raw_decode(text)
            rest = text[used:].lstrip()
            if not rest.startswith(".."):
                raise ValueError("no '..' after the start")
            rest = rest[2:]
        end = json.loads(rest)
    except ValueError as exc:
        raise BackfillError(f"--range {text!r}: expected START..END, each a JSON array of key values such as "
                            f"'[\"p1\", \"id9\"]..[\"p2\", \"id3\"]' (START may be empty) ({exc})") from None
    return start, end


def start(run: Run, key_range: tuple | None) -> None:
    """Check the range and record it in the checkpoint; the manager saves it with the claim. Without
    a range, a repair left unfinished must be finished first (its rows are half replayed)."""
    row, cp, keys, bid = run.row, run.row.checkpoint, run.keys, run.row.backfill_id
    if key_range is None:
        if cp.get("repair"):
            raise BackfillError(f"backfill {bid} has an unfinished repair of ({cp['repair']['start']}, "
                                f"{cp['repair']['end']}]; finish it first with the same 'run --range'")
        return
    first, end = key_range
    if cp.get("params") is None:
        raise BackfillError(f"backfill {bid} has not started; there is no range to repair")
    if not run.skips_existing:
        raise BackfillError(f"{run.spec.sql_path.name} does not read {{retry_count}}, so it cannot skip the rows a "
                            f"range already holds; a repair would copy them twice")
    for name, point in (("start", first), ("end", end)):
        if point is not None and (not isinstance(point, list) or len(point) != len(keys.columns)):
            raise BackfillError(f"--range {name} {json.dumps(point)}: expected a JSON array of {len(keys.columns)} "
                                f"values ({', '.join(keys.columns)}), as 'position' shows in 'status --json'")
    if first is not None and not keys.ordered(run.client, first, end):
        raise BackfillError(f"--range {json.dumps(first)}..{json.dumps(end)}: the start is not before the end")
    if row.status != "completed" and (cp.get("position") is None
                                      or not keys.at_or_before(run.client, end, cp["position"])):
        raise BackfillError(f"--range end {json.dumps(end)} lies past the backfill's position "
                            f"{json.dumps(cp.get('position'))}; the backfill itself copies those keys")
    pending = cp.get("repair")
    if pending and (pending["start"], pending["end"]) != (first, end):
        raise BackfillError(f"backfill {bid} has an unfinished repair of {json.dumps(pending['start'])}.."
                            f"{json.dumps(pending['end'])}; run that range first")
    cp["repair"] = pending or {"start": first, "end": end, "position": first, "in_flight": None,
                               "rows_processed": 0, "batches_completed": 0, "recent": [],
                               "current_batch_size": cp["current_batch_size"], "previous_status": row.status}
    run.scope, run.until = "repair", end


def finish(row: Row, writer: str) -> dict:
    """The range is done: the backfill gets back the status it had; the repair goes into its history."""
    cp, row.writer = row.checkpoint, writer
    done = cp.pop("repair")
    cp["repairs"] = (cp.get("repairs") or [])[-(HISTORY - 1):] + [
        {"start": done["start"], "end": done["end"], "rows": done["rows_processed"], "at": utcnow().isoformat()}]
    cp.pop("lease", None)
    row.status = done["previous_status"]
    return done
