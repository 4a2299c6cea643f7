"""`migrate backfill validate N`: a backfill's own checks, walked over the key space in ranges.

The checks live in `NNN_name.backfill.validate.sql`. A statement that uses `{batch_range}` runs once
per range of about `range_rows` source rows, the ranges found exactly as the backfill finds its
batches, so memory depends on the range size, never on the table size. A statement without it runs
once, after the walk. Every statement returns rows `check, expected, actual, ok`. Progress (the
position, the per-check totals, the differing ranges) is kept in the backfill's own state row under
`checkpoint["validation"]`, so a stopped validation goes on where it stopped.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from migrator.discovery import read_text
from migrator.sqltext import split_statements

from ..errors import BackfillError
from ..protocol.checkpoint import backfill_id, utcnow
from ..protocol.lease import holder
from ..spec.render import Raw, placeholders, render

# 500k source rows a range, measured on the 021 demo data at 2M calls (2.1M source rows, about 1.1 KB
# of payload a call, 2 cores): validate peaks at 0.66 GB RSS with 250k ranges, 0.80 GB with 500k and
# 1.26 GB with 1M, in about the same time (23-30 s, within the noise), against 1.16 GB for the old
# whole-table checks. The peak follows the range size, never the table size; the fixed cost of a
# range (its range-end lookup, a state read and a one-row state write) is small against 500k rows.
DEFAULT_RANGE_ROWS = 500_000
KEPT_DIFFERENCES = 100  # differing ranges kept in the state row (all of them are counted)
ROW_SHAPE = ("check", "expected", "actual", "ok")


@dataclass
class Statement:
    """One statement of the validate file: per range when it uses `{batch_range}`, else once."""

    sql: str
    ranged: bool


def load_statements(path) -> list[Statement]:
    """The statements of a validate file, each marked per-range or once."""
    return [Statement(s, "batch_range" in placeholders(s)) for s in split_statements(read_text(path))]


def estimate_total(manager, keys, row, limit) -> int:
    """Source rows the walk will cover, for progress and ETA only (never for a result).

    Up to the position of an unfinished backfill that is exactly what it walked; for a completed one
    its walked rows too (the source may have grown since: progress may then pass the estimate).
    """
    walked = int(row.checkpoint.get("rows_processed") or 0)
    if walked or limit is not None:
        return walked
    return keys.estimate(manager.ch_client, None)  # the primary index: no scan of a huge table


def _readable(state) -> bool:
    """A stored validation a resume can go on from (hand-edited or foreign state starts over)."""
    shapes = {"range_rows": int, "ranges_checked": int, "rows_walked": int, "checks": list, "differences": list,
              "differences_total": int, "once": list, "finished": bool, "basis": dict}
    return (isinstance(state, dict) and all(isinstance(state.get(k), t) for k, t in shapes.items())
            and (state.get("position") is None or isinstance(state["position"], list)))


def _add(total, value):
    if isinstance(total, int) and isinstance(value, int) and not isinstance(value, bool):
        return total + value
    return value


class Validation:
    """One validation of one backfill: resumed from its state row when the basis still holds."""

    def __init__(self, manager, database: str, version: int, range_rows: int | None = None,
                 restart: bool = False):
        self.manager, self.database, self.version = manager, database, version
        self.spec = spec = manager.spec(version)
        self.bid = bid = backfill_id(database, version)
        if spec.validate_path is None:
            name = spec.sql_path.name.replace(".sql", ".validate.sql")
            raise BackfillError(f"version {version} ships no {name}: write one beside {spec.sql_path.name} "
                                f"('migrate new NAME --backfill' scaffolds one to copy; see 'The validate SQL' in "
                                f"docs/backfill_developer_guide.md)")
        row = manager.store.load(bid)
        if row is None or row.checkpoint.get("params") is None:
            raise BackfillError(f"backfill {bid} has not started; nothing to validate")
        other = holder(row.checkpoint.get("lease"), manager.owner) if row.status in ("running", "paused") else None
        if other:
            raise BackfillError(f"backfill {bid} is running ({other['owner']}); validate it once it has stopped "
                                f"(pause it, or wait for it to complete)")
        self.row, self.statements = row, load_statements(spec.validate_path)
        bad = [s for s in self.statements if not s.sql.strip()]
        if not self.statements or bad:
            raise BackfillError(f"{spec.validate_path}: holds no SQL statement")
        self.keys = manager.keyspace(spec, database)
        self.limit = None if row.status == "completed" else row.checkpoint.get("position")
        if row.status != "completed" and self.limit is None:
            raise BackfillError(f"backfill {bid} is {row.status} and has not completed a batch; nothing to validate")
        self.basis = {"status": row.status, "position": row.checkpoint.get("position"),
                      "rows_processed": int(row.checkpoint.get("rows_processed") or 0)}
        stored, self.note = row.checkpoint.get("validation") or {}, None
        if stored and not _readable(stored):
            stored, self.note = {}, "the stored validation state is unreadable: starting over"
        unfinished = bool(stored) and not restart and not stored.get("finished")
        # Without --range-rows a stopped validation goes on with its own range size.
        size = int(range_rows or (stored.get("range_rows") if unfinished else None) or DEFAULT_RANGE_ROWS)
        if unfinished:
            if stored.get("basis") != self.basis:
                self.note = "the backfill moved on since the stored validation: starting over"
            elif stored.get("range_rows") != size:
                self.note = f"range size {size} differs from the stored validation's {stored.get('range_rows')}: starting over"
        self.resumed = unfinished and self.note is None
        self.state = stored if self.resumed else self._fresh(size)
        self.values = {k: v for k, v in row.checkpoint.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
        self.values.update(row.checkpoint["params"] or {})
        self.values["db"] = database
        self.estimate = estimate_total(manager, self.keys, row, self.limit)

    def _fresh(self, size: int) -> dict:
        return {"position": None, "range_rows": size, "ranges_checked": 0, "rows_walked": 0, "checks": [],
                "differences": [], "differences_total": 0, "once": [], "finished": False, "basis": self.basis,
                "started_at": utcnow().isoformat(), "updated_at": None}

    # -- running -------------------------------------------------------------------------
    def _query(self, stmt: Statement, batch_range: str | None) -> list[dict]:
        values = dict(self.values, batch_range=Raw(batch_range)) if batch_range is not None else self.values
        sql, params = render(stmt.sql, values, self.spec.validate_path)
        result = self.manager.ch_client.query(sql, parameters=params or None)
        if not result.result_rows:  # no rows is no check: it must never read as a pass
            where = "" if batch_range is None else f" for the range {batch_range}"
            raise BackfillError(f"{self.spec.validate_path}: statement {self.statements.index(stmt) + 1} returned no "
                                f"rows{where}; each must return one row per check ({', '.join(ROW_SHAPE)}), "
                                f"and a validation with no checks never passes")
        missing = [c for c in ROW_SHAPE if c not in result.column_names]
        if missing:
            raise BackfillError(f"{self.spec.validate_path}: a statement returns no column {', '.join(missing)} "
                                f"(each row must be {', '.join(ROW_SHAPE)})")
        return [{"check": str(item["check"]), "expected": item["expected"], "actual": item["actual"],
                 "ok": bool(item["ok"])}
                for item in (dict(zip(result.column_names, r)) for r in result.result_rows)]

    def _tally(self, rows: list[dict]) -> None:
        checks = {c["check"]: c for c in self.state["checks"]}
        for r in rows:
            c = checks.get(r["check"])
            if c is None:
                c = checks[r["check"]] = {"check": r["check"], "expected": 0, "actual": 0, "ok": True, "ranges_failed": 0}
                self.state["checks"].append(c)
            c["expected"], c["actual"] = _add(c["expected"], r["expected"]), _add(c["actual"], r["actual"])
            if not r["ok"]:
                c["ok"], c["ranges_failed"] = False, c["ranges_failed"] + 1

    def _next_range(self, position) -> tuple[list | None, int, bool] | None:
        """(end, source rows, open above) of the next range, clamped to the position of an unfinished backfill.

        Over the whole key space (a completed backfill) the last range has no upper bound, as the first
        has no lower one, so target rows past the last source key are in a range too; an empty source
        is one range with no bound at all (end None). Once past the last range, None.
        """
        client, keys = self.manager.ch_client, self.keys
        if self.limit is not None and position == self.limit:
            return None
        if position is None and self.state["ranges_checked"] and self.limit is None:
            return None  # the one unbounded range of an empty source was checked
        found = keys.next_batch(client, position, self.state["range_rows"])
        if found is None:
            if position is None and self.limit is None:  # an empty source: every target row is extra
                return None, 0, True
            return None
        end, rows = found
        if self.limit is None:
            return end, rows, keys.next_batch(client, end, 1) is None  # the last range is open above
        if end == self.limit or keys.at_or_before(client, end, self.limit):
            return end, rows, False
        end = self.limit
        rows = int(client.command(f"SELECT count() FROM {keys.database}.{keys.table} "
                                  f"WHERE {keys.range_predicate(position, end)}"))
        return end, rows, False

    def run(self, on_range=None, should_stop=lambda: False) -> dict:
        """Walk the remaining ranges, then the once-statements; returns the result document."""
        st, ranged = self.state, [s for s in self.statements if s.ranged]
        while not st["finished"]:
            if should_stop():
                return self.result("interrupted")
            step = self._next_range(st["position"]) if ranged else None
            if step is None:
                for stmt in (s for s in self.statements if not s.ranged):
                    rows = self._query(stmt, None)
                    st["once"].extend(rows)
                    self._tally(rows)
                st["finished"] = True
                self._persist()
                break
            end, count, open_above = step
            start = st["position"]
            where = self.keys.after(start) if open_above else self.keys.range_predicate(start, end)
            rows = []
            for stmt in ranged:
                rows.extend(self._query(stmt, where))
            self._tally(rows)
            if not all(r["ok"] for r in rows):
                st["differences_total"] += 1
                if len(st["differences"]) < KEPT_DIFFERENCES:
                    st["differences"].append({"start": start, "end": None if open_above else end, "rows": count,
                                              "checks": rows})
            st["position"], st["ranges_checked"], st["rows_walked"] = end, st["ranges_checked"] + 1, st["rows_walked"] + count
            self._persist()
            if on_range:
                on_range(self, {"start": start, "end": None if open_above else end, "rows": count,
                                "ok": all(r["ok"] for r in rows)})
        return self.result(None)

    def _persist(self) -> None:
        """Save the state into a new version of the backfill's row; stop if anyone else wrote it meanwhile."""
        self.state["updated_at"] = utcnow().isoformat()
        fresh = self.manager.store.load(self.bid)
        if fresh is None or fresh.version != self.row.version:
            raise BackfillError(f"backfill {self.bid} changed while it was being validated (a runner started?); "
                                f"validation stopped after {self.state['ranges_checked']} ranges; run validate again "
                                f"once the backfill has stopped")
        fresh.checkpoint["validation"] = self.state
        fresh.writer = self.manager.owner
        self.row = self.manager.store.save(fresh)

    # -- the result ----------------------------------------------------------------------
    def result(self, stopped: str | None) -> dict:
        """The stable document of `validate --json` (see the runbook)."""
        st = self.state
        checks = [dict(c) for c in st["checks"]]
        ok = st["finished"] and all(c["ok"] for c in checks)
        return {"backfill_id": self.bid, "migration_version": self.version, "backfill_status": self.basis["status"],
                "scope": "whole key space" if self.limit is None else "up to the backfill's position",
                "scope_end": self.limit, "ok": bool(ok), "finished": st["finished"], "stopped": stopped,
                "resumed": self.resumed, "range_rows": st["range_rows"], "ranges_checked": st["ranges_checked"],
                "rows_walked": st["rows_walked"], "rows_estimate": self.estimate, "checks": checks,
                "differing_ranges_total": st["differences_total"],
                "differing_ranges": [dict(d, repair=repair_command(self.version, d["start"], d["end"]))
                                     for d in st["differences"]],
                "once": list(st["once"])}


def repair_command(version: int, start, end) -> str:
    """The command that replays exactly the range (start, end]: keys as `status --json` prints a position;
    an open bound (None) stays empty. A replay copies missing source rows again; it never removes target
    rows the source does not have (an extra key is deleted from the target by hand)."""
    bound = f"{'' if start is None else json.dumps(start)}..{'' if end is None else json.dumps(end)}"
    return f"migrate backfill run {version} --range {shlex.quote(bound)}"


def validate(manager, database: str, version: int, range_rows: int | None = None, restart: bool = False,
             on_range=None, should_stop=lambda: False) -> dict:
    """Validate a backfill in ranges (resuming a stopped validation); returns the result document."""
    return Validation(manager, database, version, range_rows, restart).run(on_range, should_stop)
