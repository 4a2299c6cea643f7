"""The status document: one dict shape for `status --json`, `list --json` and the live status file.

Its keys are a documented contract (docs/backfill_runbook.md, "JSON contract").
"""
from __future__ import annotations

import logging

from ..errors import one_line
from .checkpoint import Row, backfill_id, new_checkpoint

log = logging.getLogger("backfill")


def summarize(row: Row, spec=None, remaining: int | None = None, estimated: bool = True) -> dict:
    """Progress and ETA come from source positions and the recent rate, never from target counts.

    `remaining` is source rows past the position: an estimate from the primary index unless
    counted (`estimated` False); None means unknown. An estimate never shows 100% before the end.
    """
    cp = row.checkpoint
    published = cp.get("publish") or {}
    done = int(cp.get("rows_processed", row.rows_processed))
    if remaining is None and cp.get("rows_total") is not None:
        remaining = max(0, int(cp["rows_total"]) - done)
        estimated = bool(cp.get("rows_total_estimated", False))
    if row.status == "completed":
        remaining, estimated = 0, False
    rate = _rate(cp.get("recent") or [])
    total = done + remaining if remaining is not None else None
    percent = round(100.0 * done / total, 2) if total else (100.0 if total == 0 else None)
    if percent is not None and estimated and row.status != "completed":
        percent = min(percent, 99.9)
    return {
        "migration_version": row.migration_version, "backfill_id": row.backfill_id, "db_name": row.db_name,
        "description": spec.description if spec else "",
        "status": row.status, "rows_processed": done, "batches_completed": int(cp.get("batches_completed", 0)),
        "current_batch_size": cp.get("current_batch_size"), "position": cp.get("position"),
        "rows_remaining": remaining, "rows_remaining_estimated": estimated if remaining is not None else None,
        "progress_percent": percent,
        "rows_per_second": round(rate, 1) if rate else None,
        "eta_seconds": round(remaining / rate, 1) if rate and remaining is not None else None,
        "started_at": _iso(row.started_at), "updated_at": _iso(row.updated_at),
        "completed_at": _iso(row.completed_at), "error_log": row.error_log,
        "lease": cp.get("lease"), "checkpoint": cp,
        # While the runner waits on a health signal: {signal, value, limit, reason, since}; else None.
        "throttled": cp.get("throttled") if row.status == "running" else None,
        "batch_size_reason": (cp.get("sizing") or {}).get("reason"),
        # A rebuild (meta `publish`): whether and when the staging table replaced the live one.
        "published": bool(published.get("published")), "published_at": published.get("published_at"),
        "publish_mode": (spec.meta.get("publish") or {}).get("mode") if spec else published.get("mode"),
    }


def after_batch(summary: dict, event: dict) -> dict:
    """A batch that took fewer rows than its size took every row left (its rows are counted, not
    estimated): the run knows it is at the end, so progress shows 100%, not an estimate capped at 99.9%."""
    if event["rows"] < event["batch_size"] and summary["progress_percent"] is not None:
        return {**summary, "rows_remaining": 0, "rows_remaining_estimated": False, "progress_percent": 100.0,
                "eta_seconds": 0.0}
    return summary


def _rate(recent: list) -> float | None:
    if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
        return None
    return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


def _iso(value):
    return value.isoformat(sep=" ") if value is not None else None


def remaining(client, keys, position, exact: bool, until=None) -> int:
    """Source rows past the position (up to `until`): counted, or from the primary index."""
    return (keys.remaining if exact else keys.estimate)(client, position, until)


def remaining_or_none(client, keyspace, row: Row, exact: bool) -> int | None:
    """None when the source cannot be read yet (a version not applied): progress is then unknown."""
    try:
        return remaining(client, keyspace(), row.checkpoint.get("position"), exact)
    except Exception as exc:
        log.debug("no progress estimate for %s: %s", row.backfill_id, one_line(exc))
        return None


def estimate_total(run) -> None:
    """Rows done plus rows left: from the primary index unless the run asked for an exact count."""
    cp = run.checkpoint
    cp["rows_total"] = cp.get("rows_processed", 0) + remaining(run.client, run.keys, cp.get("position"), run.exact,
                                                                run.until)
    cp["rows_total_estimated"] = not run.exact


# Near the end an estimate from the primary index is high by up to a granule per part at the bound: while at most
# one batch plus this many rows seem left, the runner counts them instead (a read of only the rows past the position).
NEAR_END_ROWS = 131072


def refine_total(run) -> None:
    """After a batch: estimate the total again when the rows done passed it; near the end, count what is left, so
    the last batch's progress reads 100% instead of an estimate's 99.7% (an exact count never overshoots)."""
    cp = run.checkpoint
    if int(cp.get("rows_total") or 0) <= int(cp.get("rows_processed", 0)):
        estimate_total(run)
    left = int(cp["rows_total"]) - int(cp.get("rows_processed", 0))
    if cp.get("rows_total_estimated") and left <= int(cp.get("current_batch_size") or 0) + NEAR_END_ROWS:
        cp["rows_total"] = cp["rows_processed"] + remaining(run.client, run.keys, cp.get("position"), True, run.until)
        cp["rows_total_estimated"] = False


def listing(rows: list[Row], specs: dict, database: str | None, remaining_of, exact: bool) -> list[dict]:
    """Registered backfills plus those whose files exist but whose version is not registered in
    `database`; progress of unfinished ones from `remaining_of(spec, row)`."""
    by_id = {r.backfill_id: r for r in rows}
    if database:
        for version, spec in specs.items():
            row = Row(backfill_id(database, version), version, database, "not registered", new_checkpoint(spec))
            by_id.setdefault(row.backfill_id, row)
    out = []
    for r in by_id.values():
        spec, left = specs.get(r.migration_version), None
        if spec is not None and r.status not in ("completed", "running"):
            left = remaining_of(spec, r)
        out.append(summarize(r, spec, left, estimated=not exact))
    return sorted(out, key=lambda s: (s["db_name"], s["migration_version"]))
