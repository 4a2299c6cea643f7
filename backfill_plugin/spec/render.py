"""Render a backfill's SQL for one batch: literal placeholders escaped, typed ones bound server-side."""
from __future__ import annotations

import re
from pathlib import Path

from migrator.discovery import read_text
from migrator.sqltext import split_statements

from ..errors import BackfillError

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]+))?\}")
RAW_BYTE = re.compile("[\udc80-\udcff]")  # a key byte that is not UTF-8, kept by 'surrogateescape'


class Raw(str):
    """A value that is already SQL (e.g. batch_range) and must not be quoted or escaped."""


def escape(value) -> str:
    """Text safe to put inside '...' in ClickHouse SQL; numbers must really be numbers."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BackfillError(f"placeholder value {value!r} is neither text nor a number")
    # Newlines too: a value is also safe where a template put it in a `--` comment.
    text = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return RAW_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02X}", text)


def literal(value) -> str:
    """A complete SQL literal: a number as is, anything else quoted."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return f"'{escape(value)}'"


def render(template: str, values: dict, source: Path | str = "backfill SQL") -> tuple[str, dict]:
    """Return (sql, server-side parameters). An unknown `{name}` is an error naming it and the file."""
    params: dict = {}

    def sub(match: re.Match) -> str:
        name, typ = match.group(1), match.group(2)
        if name not in values:
            raise BackfillError(f"{source}: unknown placeholder {{{name}}} (known: {', '.join(sorted(values))})")
        if typ:
            value = values[name]
            params[name] = str(value) if isinstance(value, Raw) else value
            if isinstance(value, str) and RAW_BYTE.search(value):
                params[name] = value.encode("utf-8", "surrogateescape")
            return match.group(0)
        return escape(values[name])

    return PLACEHOLDER.sub(sub, template), params


def placeholders(template: str) -> set[str]:
    """Every `{name}` a template uses (for --dry-run and validation before the first batch)."""
    return {m.group(1) for m in PLACEHOLDER.finditer(template)}


def read_template(path: Path) -> str:
    """A backfill's SQL: one statement, since each batch sends exactly one query."""
    text = read_text(path)
    found = len(split_statements(text))
    if found != 1:
        raise BackfillError(f"{path}: must hold exactly one SQL statement (found {found})")
    return text
