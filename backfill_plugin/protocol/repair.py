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


class Range(tuple):
    """A `--range` (start, end), either bound None when left open; `whole` confirms (`--yes`) a range
    that replays every key of the source. A plain (start, end) tuple confirms nothing."""

    whole: bool

    def __new__(cls, start, end, whole: bool = False):
        made = super().__new__(cls, (start, end))
        made.whole = whole
        return made


def parse(text: str, whole: bool = False) -> Range:
    """`START..END`, each a JSON array as `status --json` shows `position`, or empty for an open bound."""
    decoder, text = json.JSONDecoder(), text.strip()
    try:
        start, rest = None, text[2:]
        if not text.startswith(".."):
            start, used = decoder.raw_decode(text)
            rest = text[used:].lstrip()
            if not rest.startswith(".."):
                raise ValueError("no '..' after the start")
            rest = rest[2:]
        end = json.loads(rest) if rest.strip() else None
        null = "start" if start is None and not text.startswith("..") else "end" if end is None and rest.strip() else None
        if null:
            raise ValueError(f"the {null} is null where a key is needed; leave it empty for an open bound")
    except ValueError as exc:
        raise BackfillError(f"--range {text!r}: expected START..END, each a JSON array of key values such as "
                            f"'[\"p1\", \"id9\"]..[\"p2\", \"id3\"]', or empty for an open bound ({exc})") from None
    return Range(start, end, whole)


def _checked(run: Run, name: str, point):
    """A bound as the engine reads it in the key's types (one line naming what does not fit)."""
    keys = run.keys
    if point is None:
        return None
    if not isinstance(point, list) or len(point) != len(keys.columns):
        raise BackfillError(f"--range {name} {json.dumps(point)}: expected a JSON array of {len(keys.columns)} "
                            f"values ({', '.join(keys.columns)}), as 'position' shows in 'status --json'")
    typed, bad = keys.cast_point(run.client, point)
    if bad:
        raise BackfillError(f"--range {name} {json.dumps(point)}: {'; '.join(bad)}")
    return typed


def _whole(run: Run, first, end) -> bool:
    """True when (first, end] holds every key of the source: a replay of the whole table."""
    keys, client = run.keys, run.client
    lowest = keys.next_batch(client, None, 1)
    if lowest is None:
        return False  # an empty source: nothing to replay
    below = first is None or not keys.at_or_before(client, lowest[0], first)
    return below and (end is None or keys.next_batch(client, end, 1) is None)


def start(run: Run, key_range: tuple | None) -> None:
    """Check the range and record it in the checkpoint; the manager saves it with the claim. Without
    a range, a repair left unfinished must be finished first (its rows are half replayed)."""
    row, cp, keys, bid = run.row, run.row.checkpoint, run.keys, run.row.backfill_id
    if key_range is None:
        if cp.get("repair"):
            raise BackfillError(f"backfill {bid} has an unfinished repair of ({cp['repair']['start']}, "
                                f"{cp['repair']['end']}]; finish it first with the same 'run --range'")
        return
    if cp.get("params") is None:
        raise BackfillError(f"backfill {bid} has not started; there is no range to repair")
    if not run.skips_existing:
        raise BackfillError(f"{run.spec.sql_path.name} does not read {{retry_count}}, so it cannot skip the rows a "
                            f"range already holds; a repair would copy them twice")
    first, end = _checked(run, "start", key_range[0]), _checked(run, "end", key_range[1])
    shown = f"{'' if first is None else json.dumps(first)}..{'' if end is None else json.dumps(end)}"
    if first is not None and end is not None and not keys.ordered(run.client, first, end):
        raise BackfillError(f"--range {shown}: the start is not before the end")
    if row.status != "completed" and (cp.get("position") is None or end is None
                                      or not keys.at_or_before(run.client, end, cp["position"])):
        raise BackfillError(f"--range end {'(open)' if end is None else json.dumps(end)} lies past the backfill's "
                            f"position {json.dumps(cp.get('position'))}; the backfill itself copies those keys")
    if not getattr(key_range, "whole", False) and not cp.get("repair") and _whole(run, first, end):
        raise BackfillError(f"--range {shown} holds every key of {keys.database}.{keys.table}: it replays the "
                            f"whole table; add --yes to confirm")
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
