"""A backfill's SQL checked before any batch runs: a mistake stops in one line, not after retries.

- `lint` reads the template's text and the engine's parse of it (spec/sqlast.py): no `{batch_range}`,
  a LIMIT/OFFSET, or a function the engine itself calls non-deterministic (now(), rand(), ...) breaks
  exactly-once however good the engine is. Strings, comments and quoted identifiers are not code.
- `check_form`: the engine's parser must read the SQL as one INSERT into a table whose dedup window
  can be checked; any other shape is refused, never passed unchecked.
- `explain` asks the engine about the rendered SQL of one range without running it. Measured on
  the embedded engine (26.x): `EXPLAIN PIPELINE` of the INSERT ... SELECT builds the whole plan
  and so fails on a syntax error, an unknown table, column or function, a column count that does
  not match the target, and types the INSERT could not convert; `EXPLAIN AST` catches syntax only;
  `EXPLAIN SYNTAX` misses the column count and the target table; plain `EXPLAIN`/`EXPLAIN PLAN`
  refuse an INSERT. Nothing is written by any of them.
"""
from __future__ import annotations

import logging
import os
import re

from migrator.sqltext import _lex

from ..errors import BackfillError
from . import sqlast
from .render import PLACEHOLDER, placeholders

log = logging.getLogger("backfill")
_LIMIT = re.compile(r"\b(LIMIT|OFFSET)\b", re.IGNORECASE)
_LIMIT_BY = re.compile(r"LIMIT\s+[^\s,()]+(?:\s*,\s*[^\s,()]+)?\s+BY\b", re.IGNORECASE)


def refuse(message: str, warnings: list[str] | None = None) -> None:
    """A refusal of SQL that cannot be exactly-once; BACKFILL_CHECKS=warn turns it into a warning
    (what `exactly_once(checks="warn")` uses to show what such SQL does to the target)."""
    if os.environ.get("BACKFILL_CHECKS") == "warn":
        (warnings if warnings is not None else []).append(message)
        if warnings is None:
            log.warning("warning: %s", message)
        return
    raise BackfillError(message)


def code_only(sql: str) -> str:
    """The SQL with strings, comments, quoted identifiers and placeholders blanked (same length), so a word
    in them (`offset`, 'now()') is not code."""
    out = list(sql)
    for kind, start, end in _lex(sql):
        if kind in ("string", "comment", "quoted"):
            out[start:end] = " " * (end - start)
    return PLACEHOLDER.sub(lambda m: " " * len(m.group(0)), "".join(out))


def _depth(code: str, pos: int) -> int:
    return code.count("(", 0, pos) - code.count(")", 0, pos)


def lint(template: str, path, client, shape: sqlast.Shape) -> list[str]:
    """Refuse (BackfillError) what cannot be exactly-once; return warnings for what may not be.
    `shape` is the engine's parse of the rendered template: the functions it calls."""
    names, code, warnings = placeholders(template), code_only(template), []
    if "batch_range" not in names:
        if not any(n.startswith("batch_end_") for n in names):
            refuse(f"{path}: the SQL does not use {{batch_range}}, so every batch would read every row; "
                   f"add `WHERE {{batch_range}}` (the keys of exactly this batch)", warnings)
        else:
            warnings.append(f"{path}: bounds the batch with {{batch_end_...}} instead of {{batch_range}}; "
                        f"{{batch_range}} selects exactly the batch's keys (ties and NaN included)")
    for match in _LIMIT.finditer(code):
        word = match.group(1).upper()
        if word == "LIMIT" and _LIMIT_BY.match(code, match.start()):
            continue  # LIMIT n BY key: per key, not per batch
        if _depth(code, match.start()) > 0:
            warnings.append(f"{path}: {word} inside a subquery: make sure it picks the same rows on a replay")
            continue
        refuse(f"{path}: {word} in the backfill SQL: the framework sizes each batch by its key range, and a "
               f"{word} picks different rows on a replay; remove it and select with {{batch_range}}", warnings)
    exact, any_case = sqlast.nondeterministic(client)
    for name in sorted(f for f in shape.functions if f in exact or f.lower() in any_case):
        refuse(f"{path}: {name}() gives another value when a batch is replayed; fix it once at first start with "
               f"a param in the meta, e.g. \"params\": {{\"{name.lower()}_at_start\": {{\"sql\": "
               f"\"SELECT {name}()\"}}}}, and use {{{name.lower()}_at_start}}", warnings)
    return warnings


def check_form(shape: sqlast.Shape, path, skips_existing: bool) -> None:
    """One INSERT into a table, whatever comes before it (WITH), after it (UNION ALL) or between (comments);
    token-only SQL into a table function is refused: no dedup window holds its tokens."""
    if not shape.is_insert:
        raise BackfillError(f"{path}: the engine reads this SQL as {shape.kind}, not as an INSERT; a backfill "
                            f"batch must be one INSERT INTO <table> ... SELECT ... WHERE {{batch_range}}")
    if shape.target is None and not skips_existing:
        refuse(f"{path}: the SQL inserts into table function {shape.table_function or '?'}(), which keeps no "
               f"insert tokens, so a replayed batch would be written twice; insert into a MergeTree table, or "
               f"make the SQL skip keys already in the target on a retry (read {{retry_count}})")


def explain(client, sql: str, params: dict | None, path, rename: dict | None = None,
            syntax_only: bool = False) -> None:
    """Ask the engine to plan the rendered SQL (nothing runs); a mistake is one line naming `path`.

    `rename` maps a scratch database back to the real one in the engine's message. Planning would
    build the sets of `IN (subquery)` for the primary key's analysis and for PREWHERE, that is run
    the subqueries (measured: an 8 s subquery made every preflight 8 s); with both off the plan stays
    a plan and still names every mistake it is asked for."""
    plannable = re.match(r"\s*(INSERT|SELECT|WITH)\b", code_only(sql), re.IGNORECASE)
    kind = "AST" if syntax_only or not plannable else "PIPELINE"
    try:
        client.command(f"EXPLAIN {kind} {sql}", parameters=params or None,
                       settings={"use_index_for_in_with_subqueries": 0, "optimize_move_to_prewhere": 0})
    except Exception as exc:
        raise sqlast.refusal(exc, path, rename) from None


def warn(warnings: list[str]) -> None:
    for text in warnings:
        log.warning("warning: %s", text)
