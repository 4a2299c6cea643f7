"""A backfill's custom placeholders (`params` in the meta): fixed at first start, then persisted.

A param like 021's `cutover_timestamp` describes the deploy, so it is computed once, when the
backfill first starts, and kept in the checkpoint; recomputing it later would describe the copy.
"""
from __future__ import annotations

from ..errors import BackfillError
from .meta import BackfillSpec
from .render import render


def coerce(value: str):
    """`--param k=v` arrives as text; numbers become numbers so they render as numbers."""
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def plain(value):
    """A value read from ClickHouse as something a placeholder can render (dates as text)."""
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:23] if hasattr(value, "microsecond") else str(value)
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return str(value)


def compute(client, sql: str, database: str, source) -> object:
    """A `{"sql": ...}` param's value, read in `database` (its first row's first column; None: no row)."""
    rows = client.query(render(sql, {"db": database}, source)[0]).result_rows
    return plain(rows[0][0] if rows else None)


def resolve(client, spec: BackfillSpec, database: str, overrides: dict | None, stored: dict | None,
            previous: dict | None = None) -> dict:
    """The params of this run: `stored` once fixed (an override that differs is refused), else the
    `--param` overrides, the values kept from before a reset (`previous`), or the meta's own values
    (`{"sql": ...}` evaluated now)."""
    declared = spec.meta["params"]
    overrides = {k: coerce(v) if isinstance(v, str) else v for k, v in (overrides or {}).items()}
    for name in overrides:
        if name not in declared:
            raise BackfillError(f"--param {name}: {spec.meta_path} declares no such param "
                                f"(declared: {', '.join(declared) or 'none'})")
    if stored is not None:
        for name, value in overrides.items():
            if stored.get(name) != value:
                raise BackfillError(f"--param {name}: fixed at first start as {stored.get(name)!r}; "
                                    f"'migrate backfill reset {spec.version} --yes' to start over with a new value")
        return stored
    values = {}
    for name, value in declared.items():
        if name in overrides:
            values[name] = overrides[name]
        elif name in (previous or {}):
            values[name] = previous[name]
        elif isinstance(value, dict):
            values[name] = compute(client, value["sql"], database, spec.meta_path)
        else:
            values[name] = value
    return values
