"""The key types a walk holds exactly, and how a key value of each is read, stored and written back.

A position goes from the engine into the checkpoint's JSON and back into SQL, and must come back as
exactly the value it was taken from. Text does not always: local wall-clock time is ambiguous in the
hour a clock change repeats, and a bare number past 64 bits is read by the engine as Float64. So a
value is kept as what the engine stores where text could mislead (DateTime as epoch seconds,
DateTime64 as ticks of its scale, Enum as its number), as exact text where text is exact (Float,
Decimal, Date, UUID, IP), as bytes for strings, and it is only ever compared through a constant of
its column's own type. Positions in the text form an older version stored (a DateTime as
'2025-10-26 02:30:00', an Enum as its name) still read back: a JSON string where a number is now
kept is cast from text, as that version did.
"""

from __future__ import annotations

import re

from ..errors import BackfillError
from .render import literal

_INT = re.compile(r"U?Int(8|16|32|64|128|256)")
_TEXT = ("Date", "Date32", "UUID", "IPv4", "IPv6")  # exact, unambiguous text, cast back to the type
SUPPORTED = (
    "Int/UInt 8-256, Float32/64, BFloat16, Decimal, Bool, Date, Date32, DateTime, DateTime64, String, "
    "FixedString, UUID, IPv4, IPv6, Enum8/16, LowCardinality of these"
)


def base(ch_type: str) -> str:
    """The type a LowCardinality(...) column compares as."""
    if ch_type.startswith("LowCardinality(") and ch_type.endswith(")"):
        return ch_type[len("LowCardinality(") : -1]
    return ch_type


def kind(ch_type: str) -> str | None:
    """How a key of this type is held: int, wide, bool, float, text, datetime, datetime64, enum, bytes;
    None for a type the walk cannot hold exactly (it is refused before any write)."""
    b = base(ch_type)
    if _INT.fullmatch(b):
        return "wide" if b.endswith(("128", "256")) else "int"
    if b == "Bool":
        return "bool"
    if b in ("Float32", "Float64", "BFloat16"):
        return "float"
    if b in _TEXT or re.fullmatch(r"Decimal(32|64|128|256)?\(.*\)", b):
        return "text"
    if b == "DateTime" or b.startswith("DateTime("):
        return "datetime"
    if b.startswith("DateTime64("):
        return "datetime64"
    if b.startswith(("Enum8(", "Enum16(")):
        return "enum"
    if b == "String" or re.fullmatch(r"FixedString\(\d+\)", b):
        return "bytes"
    return None


def is_float(ch_type: str) -> bool:
    return kind(ch_type) == "float"


def read(ch_type: str, expr: str) -> str:
    """SQL that reads a key value of `expr` in the form the checkpoint keeps."""
    k, b = kind(ch_type), base(ch_type)
    if b != ch_type and k != "bytes":
        expr = f"CAST({expr}, {literal(b)})"
    return {
        "float": f"toString({expr})",
        "text": f"toString({expr})",
        "datetime": f"toUnixTimestamp({expr})",
        "datetime64": f"reinterpretAsInt64({expr})",
        "enum": f"CAST({expr}, 'Int16')",
    }.get(k, expr)


def _number(value, ch_type: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"-?\d+", str(value).strip()):
        raise BackfillError(f"key value {value!r} is not an integer, as a {ch_type} key is held")
    return int(value)


def sql(ch_type: str, value) -> str:
    """A constant of the column's own type that is exactly `value` (a checkpoint's form of a key)."""
    k, b = kind(ch_type), base(ch_type)
    typ = literal(b)
    if k == "bytes":
        return literal(value)
    if k == "bool":
        text = str(value).strip().lower()
        return "true" if value is True or text in ("true", "1") else "false"
    if k == "int":
        return str(_number(value, ch_type))
    if k == "wide":  # a bare literal past 64 bits is Float64: 2^64 + 5 <= 2^64 + 5 would be false
        return f"CAST({literal(str(_number(value, ch_type)))}, {typ})"
    if k in ("datetime", "datetime64", "enum") and not isinstance(value, str):
        number = _number(value, ch_type)
        if k == "datetime64":
            return f"reinterpret(toInt64({number}), {typ})"
        return f"CAST({'toInt16' if k == 'enum' else 'toUInt32'}({number}), {typ})"
    if k == "float" and isinstance(value, float):
        value = repr(value)
    return f"CAST({literal(str(value))}, {typ})"  # float, text, and the older text form of the kinds above


def default(ch_type: str):
    """What `{checkpoint_<col>}` shows before the first batch: 0 where keys are numbers, else ''."""
    numbers = ("int", "wide", "bool", "float", "datetime", "datetime64", "enum")
    return 0 if kind(ch_type) in numbers or base(ch_type).startswith("Decimal") else ""


def sorting_columns(sorting_key: str) -> list[str]:
    """The sorting key's parts (system.tables.sorting_key), split at top-level commas."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in sorting_key:
        if quote:
            quote = None if ch == quote and not current.endswith("\\") else quote
        elif ch in "'`\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    parts.append(current.strip())
    return [_bare(p) for p in parts if p]


def _bare(part: str) -> str:
    """`(at)` is the column at, as is `` `at` ``: the engine keeps the parentheses the DDL had."""
    while part.startswith("(") and part.endswith(")") and _closes_last(part):
        part = part[1:-1].strip()
    return part[1:-1] if len(part) > 1 and part[0] == part[-1] == "`" else part


def _closes_last(part: str) -> bool:
    depth = 0
    for i, ch in enumerate(part):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i == len(part) - 1
    return False
