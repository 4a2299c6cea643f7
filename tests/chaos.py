"""A seeded random schedule of transport faults for tests/chhttp.py, and what each request's SQL is.

`python -m tests.chhttp --chaos SEED:RATE` (or `POST /__chaos` {seed, rate, kinds?, statements?,
max_seconds?, boost?}) injects, on a seeded random fraction of the requests (RATE, more on each
statement kind's first requests: see Weighting), one of the endpoint's transport faults: `refuse`
(502 or 503 before running), `stall` (wait, then run), `late` (run, then wait before answering),
`drop` (run, close without answering), `reset` (run, send half the answer, reset). `kinds` limits
the fault kinds, `statements` the statement kinds (STATEMENTS) that may be hit. `GET /__chaos`
returns the schedule, every fault injected (with the statement kind it hit) and the coverage table;
`DELETE /__chaos` turns it off (the log stays until the next POST).

Weighting, so that a run covers every pair of fault kind and statement kind: a flat rate lands
almost only on the kinds that get most requests (status reads, 'other'), and a kind that gets a
handful per run (completion check, migration DDL, EXPLAIN, validation, lease claim) may go a whole
soak without some fault. So the n-th request of a kind (n from 0) is faulted with probability
`max(rate, min(CAP, boost / (n + 1)))`: a kind's first requests are faulted often, whatever the
rate, and the rate takes over after a dozen or so (`boost` 0 gives the flat rate). And the fault
kind is not drawn but dealt in turn: the i-th fault on a kind is `kinds[(seed + STATEMENTS.index(kind)
+ i) % len(kinds)]`, so five faults on a kind cover the five fault kinds, and consecutive seeds (the
rounds of `make soak`) start the turn one fault kind further on: a kind hit at least once in each
round is hit by every fault kind within five rounds.

Which pairs apply: all of them (NOT_APPLICABLE is empty, on purpose). Every fault is the endpoint's,
at the HTTP layer, before the engine runs the statement (refuse, stall) or after (late, drop,
reset), whatever the SQL; each statement kind is sent as its own HTTP request, so each can meet each
fault, and each meeting has its own outcome (docs/backfill_runbook.md, "Transient faults"): a
refused DDL did not run, a dropped one did and the version is dirty; a stalled or late answer
(within the client's read timeout) is only slow, which for a heartbeat or a lease claim is the case
to cover. `make soak` fails if any applicable pair was never hit (`missing`).

Reproducing a run: the decision for a request depends only on the seed, the request's statement
kind and how many requests of that kind came before it (`random.Random(f"{seed}:{kind}:{n}")`, and
the turn of fault kinds, which counts the faults dealt to that kind's earlier requests, themselves
decided the same way). A single process replays exactly; with several processes at once the order
of requests within a kind follows the scheduler, so the same seed gives the same faults to the same
per-kind request numbers, and the log names which request each hit.

Classification reads the SQL text and, for rows written to db_management.backfills, the bound
parameters: a `running` row that names a new lease owner (or follows a row of another status) is a
lease claim, one that differs from the previous row only in the heartbeat is a heartbeat, one that
changes the `validation` state is validation, anything else a checkpoint write.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time

FAULTS = ("refuse", "stall", "late", "drop", "reset")
STATEMENTS = (
    "batch INSERT",
    "checkpoint write",
    "lease claim or heartbeat",
    "status read",
    "health read",
    "EXPLAIN",
    "completion check",
    "validation",
    "migration DDL",
    "other",
)
# Pairs (statement kind, fault kind) that cannot occur, with why: none (module docstring, "Which pairs apply").
NOT_APPLICABLE: dict[tuple[str, str], str] = {}
APPLICABLE = tuple((s, f) for s in STATEMENTS for f in FAULTS if (s, f) not in NOT_APPLICABLE)
BOOST, CAP = 1.5, 0.5  # a kind's n-th request is faulted with probability max(rate, min(CAP, boost / (n + 1)))
MARKER = "/* migrate-backfill "
_COMMENTS = re.compile(r"\A(?:\s+|/\*.*?\*/|--[^\n]*\n)*", re.DOTALL)
_DDL = re.compile(r"(CREATE|ALTER|DROP|RENAME|TRUNCATE|EXCHANGE|OPTIMIZE|ATTACH|DETACH)\b", re.IGNORECASE)
_TRACKING_ROW = re.compile(r"INSERT\s+INTO\s+db_management\.backfills\b", re.IGNORECASE)
_MIGRATION_ROW = re.compile(r"INSERT\s+INTO\s+db_management\.(migrations|migration_locks)\b", re.IGNORECASE)
_HEALTH = re.compile(
    r"\bsystem\.(parts|mutations|replicas)\b|clusterAllReplicas\(\s*\w+\s*,\s*system\.(parts|mutations"
    r"|replicas)",
    re.IGNORECASE,
)
_COMPLETION = re.compile(r"^SELECT\s+count\(\)(?:\s*,\s*countIf\(.*)?\s+FROM\s+[\w.`]+\s*$", re.IGNORECASE | re.DOTALL)
_VALIDATION = re.compile(r"\bAS\s+ok\b", re.IGNORECASE)


def _json(value: str | None) -> dict:
    if not value:
        return {}
    for text in (value, value.replace("\\'", "'").replace("\\\\", "\\")):
        try:
            out = json.loads(text)
            return out if isinstance(out, dict) else {}
        except ValueError:
            continue
    return {}


class Classifier:
    """Names the statement kind of each request (stateful only for tracking rows: see the module doc)."""

    def __init__(self):
        self.last: dict[str, tuple[str, dict]] = {}  # backfill_id -> (status, checkpoint) of its last row

    def __call__(self, sql: str, params: dict | None = None) -> str:
        params = params or {}
        if sql.startswith(MARKER):
            return "batch INSERT"
        text = sql[_COMMENTS.match(sql).end() :]
        head = text[:12].upper()
        if _TRACKING_ROW.match(text):
            return self._row(params)
        if _MIGRATION_ROW.match(text) or _DDL.match(text):
            return "migration DDL"
        if head.startswith("EXPLAIN"):
            return "other" if text[7:].lstrip().upper().startswith("ESTIMATE") else "EXPLAIN"
        if head.startswith("INSERT"):
            return "migration DDL"  # an INSERT of a migration's own statements (`migrate up`)
        if "db_management." in text:
            return "status read"
        if _HEALTH.search(text):
            return "health read"
        if _COMPLETION.match(text.strip()):
            return "completion check"
        if _VALIDATION.search(text):
            return "validation"
        return "other"

    def _row(self, params: dict) -> str:
        bid, status = params.get("param_backfill_id", ""), params.get("param_status", "")
        cp = _json(params.get("param_checkpoint_data"))
        before = self.last.get(bid)
        self.last[bid] = (status, cp)
        if before is not None and cp.get("validation") != before[1].get("validation"):
            return "validation"
        if status != "running":
            return "checkpoint write"
        if before is None or before[0] != "running":
            return "lease claim or heartbeat"
        lease, old = (cp.get("lease") or {}), (before[1].get("lease") or {})
        if lease.get("owner") != old.get("owner"):
            return "lease claim or heartbeat"
        same = {k: v for k, v in cp.items() if k != "lease"} == {k: v for k, v in before[1].items() if k != "lease"}
        return "lease claim or heartbeat" if same else "checkpoint write"


def parse(spec: str) -> dict:
    """`SEED:RATE` (the --chaos option) -> the POST /__chaos document."""
    seed, sep, rate = spec.partition(":")
    if not sep:
        raise ValueError(f"--chaos {spec!r}: expected SEED:RATE, e.g. 7:0.05")
    return {"seed": int(seed), "rate": float(rate)}


class Chaos:
    """The schedule: which request gets which fault; the log of every fault injected."""

    def __init__(
        self, seed: int, rate: float, kinds=None, statements=None, max_seconds: float = 1.0, boost: float = BOOST
    ):
        kinds, statements = list(kinds or FAULTS), list(statements or STATEMENTS)
        for name in kinds:
            if name not in FAULTS:
                raise ValueError(f"unknown fault kind {name!r} (known: {', '.join(FAULTS)})")
        for name in statements:
            if name not in STATEMENTS:
                raise ValueError(f"unknown statement kind {name!r} (known: {', '.join(STATEMENTS)})")
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rate {rate!r} must be within 0..1")
        if float(boost) < 0:
            raise ValueError(f"boost {boost!r} must be 0 or more")
        self.seed, self.rate, self.kinds, self.statements = int(seed), float(rate), kinds, statements
        self.max_seconds, self.boost, self.on = float(max_seconds), float(boost), True
        self.classify, self.lock = Classifier(), threading.Lock()
        self.seen = {k: 0 for k in STATEMENTS}
        self.dealt = {k: 0 for k in STATEMENTS}  # faults given to each statement kind so far (the turn of fault kinds)
        self.log: list[dict] = []

    def chance(self, n: int) -> float:
        """The probability that a kind's n-th request (from 0) is faulted: high for a kind's first requests, so
        that kinds with few requests are hit too (module docstring)."""
        return max(self.rate, min(CAP, self.boost / (n + 1))) if self.rate > 0 else 0.0

    def take(self, sql: str, params: dict) -> tuple[str, dict | None]:
        """(statement kind, the fault spec for this request or None), logging an injected fault."""
        with self.lock:
            kind = self.classify(sql, params)
            n = self.seen[kind]
            self.seen[kind] = n + 1
            if not self.on or kind not in self.statements:
                return kind, None
            rng = random.Random(f"{self.seed}:{kind}:{n}")
            if rng.random() >= self.chance(n):
                return kind, None
            turn = self.seed + STATEMENTS.index(kind) + self.dealt[kind]
            self.dealt[kind] += 1
            fault = {
                "kind": self.kinds[turn % len(self.kinds)],
                "status": rng.choice((502, 503)),
                "seconds": round(rng.uniform(0.05, self.max_seconds), 3),
            }
            self.log.append(
                {
                    "statement": kind,
                    "n": n,
                    "fault": fault["kind"],
                    "status": fault["status"],
                    "seconds": fault["seconds"],
                    "at": time.time(),
                    "query": sql[:160],
                }
            )
            return kind, fault

    def report(self) -> dict:
        with self.lock:
            table: dict[str, dict[str, int]] = {}
            for item in self.log:
                row = table.setdefault(item["statement"], {})
                row[item["fault"]] = row.get(item["fault"], 0) + 1
            return {
                "seed": self.seed,
                "rate": self.rate,
                "boost": self.boost,
                "on": self.on,
                "kinds": self.kinds,
                "statements": self.statements,
                "max_seconds": self.max_seconds,
                "requests": dict(self.seen),
                "injected": len(self.log),
                "coverage": table,
                "log": list(self.log),
            }


def control(server, method: str, body: bytes) -> tuple[int, dict]:
    """The /__chaos test control of tests/chhttp.py: POST arms, GET reports, DELETE turns it off."""
    if method == "POST":
        try:
            spec = json.loads(body or b"{}")
            server.chaos = Chaos(
                spec["seed"],
                spec["rate"],
                spec.get("kinds"),
                spec.get("statements"),
                spec.get("max_seconds", 1.0),
                spec.get("boost", BOOST),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return 400, {"error": f"{type(exc).__name__}: {exc}"}
        return 200, {"ok": True}
    if server.chaos is None:
        return 200, {"on": False, "injected": 0, "coverage": {}, "log": [], "requests": {}}
    if method == "DELETE":
        server.chaos.on = False
    return 200, server.chaos.report()


def table(report: dict) -> str:
    """The coverage as text: faults injected by statement kind (rows) and fault kind (columns)."""
    cov, kinds = report["coverage"], FAULTS
    width = max(len(s) for s in STATEMENTS)
    lines = [f"{'statement kind':<{width}}  {'requests':>8}  " + "  ".join(f"{k:>6}" for k in kinds) + "   total"]
    for s in STATEMENTS:
        row = cov.get(s, {})
        lines.append(
            f"{s:<{width}}  {report['requests'].get(s, 0):>8}  "
            + "  ".join(f"{row.get(k, 0):>6}" for k in kinds)
            + f"  {sum(row.values()):>6}"
        )
    totals = [sum(cov.get(s, {}).get(k, 0) for s in STATEMENTS) for k in kinds]
    lines.append(
        f"{'total':<{width}}  {sum(report['requests'].values()):>8}  "
        + "  ".join(f"{t:>6}" for t in totals)
        + f"  {sum(totals):>6}"
    )
    return "\n".join(lines)


def tally(report: dict, totals: dict | None = None) -> dict:
    """Adds a run's coverage (a report) to `totals` {"coverage": ..., "requests": ...}, the shape table() reads,
    so that several runs (the rounds of `make soak`) print and check as one."""
    totals = totals if totals is not None else {"coverage": {}, "requests": {}}
    for s, row in report["coverage"].items():
        into = totals["coverage"].setdefault(s, {})
        for f, count in row.items():
            into[f] = into.get(f, 0) + count
    for s, count in report["requests"].items():
        totals["requests"][s] = totals["requests"].get(s, 0) + count
    return totals


def missing(report: dict) -> list[tuple[str, str]]:
    """The applicable (statement kind, fault kind) pairs a run (or a tally) never hit."""
    return [(s, f) for s, f in APPLICABLE if not report["coverage"].get(s, {}).get(f)]


def inject(schedule: Chaos | None, sql: str, params: dict, entry: dict) -> dict | None:
    """The chhttp.py call site: the fault the schedule gives this request (None: none), noted in its log entry."""
    if schedule is None:
        return None
    entry["statement"], fault = schedule.take(sql, params)
    if fault:
        entry["chaos"] = fault["kind"]
    return fault
