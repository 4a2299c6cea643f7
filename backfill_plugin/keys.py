"""The framework-owned key range: where the next batch ends, and the predicate that selects it.

Batch ends are read from the *source* in sorting-key order with `LIMIT n WITH TIES`, so every
row of a key lands in one batch and the cost depends on the batch, not on how deep the walk is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BackfillError
from .render import literal

_NUMERIC = ("Int", "UInt", "Float", "Decimal", "Bool")
# Keys are read as bytes: clickhouse-connect would hand back text that is not UTF-8 as its hex
# (a position that compares wrong), and FixedString as bytes that do not render.
_RAW = {"String": "bytes", "FixedString": "bytes"}
WALK_SETTINGS = ("read_in_order_use_buffering",)  # sent only where the server has them


def _is_numeric(ch_type: str) -> bool:
    base = ch_type.replace("LowCardinality(", "")
    return base.startswith(_NUMERIC)


def _is_string(ch_type: str) -> bool:
    return ch_type.replace("LowCardinality(", "").startswith(("String", "FixedString"))


def _decoded(value):
    """Key bytes become text; bytes that are not UTF-8 survive as surrogate escapes."""
    return bytes(value).decode("utf-8", "surrogateescape") if isinstance(value, (bytes, bytearray)) else value


@dataclass
class KeySpace:
    """The checkpoint columns of one source table and their types."""

    database: str
    table: str
    types: dict[str, str]
    known_settings: set = field(default_factory=set)  # version-dependent settings this server has

    def _walk_settings(self, batch_size: int) -> dict:
        """Read in order in small blocks and without buffering: a batch end then reads about the
        batch's keys from each part, not a 65k-row block of every part (3x faster at 100k rows)."""
        out = {"max_block_size": max(1, min(int(batch_size), 8192))}
        if "read_in_order_use_buffering" in self.known_settings:
            out["read_in_order_use_buffering"] = 0
        return out

    @property
    def columns(self) -> list[str]:
        return list(self.types)

    def _exact(self, col: str, expr: str) -> str:
        typ = self.types[col]
        if _is_string(typ) or (_is_numeric(typ) and not typ.startswith(("Float", "Decimal"))):
            return expr
        return f"toString({expr})"  # dates, UUIDs, decimals: exact text that compares back

    def default(self, col: str):
        """What `{checkpoint_<col>}` shows before the first batch."""
        return 0 if _is_numeric(self.types[col]) else ""

    def after(self, position: list | None) -> str:
        """Predicate: key strictly greater than `position` (TRUE when there is none)."""
        return "1" if position is None else self._compare(position, ">", strict_last=True)

    def upto(self, end: list) -> str:
        """Predicate: key less than or equal to `end`."""
        return self._compare(end, "<", strict_last=False)

    def range_predicate(self, start: list | None, end: list) -> str:
        """Exactly the keys in (start, end]; no lower bound on the first batch."""
        return self.upto(end) if start is None else f"{self.after(start)} AND {self.upto(end)}"

    def _compare(self, point: list, op: str, strict_last: bool) -> str:
        cols, lits = self.columns, [literal(v) for v in point]
        terms = []
        for i, col in enumerate(cols):
            last = i == len(cols) - 1
            eqs = [f"{cols[j]} = {lits[j]}" for j in range(i)]
            this_op = op if (strict_last or not last) else op + "="
            terms.append("(" + " AND ".join(eqs + [f"{col} {this_op} {lits[i]}"]) + ")")
        first = f"{cols[0]} {op}= {lits[0]}"  # a plain bound on the first column lets the index prune
        return f"({first} AND ({' OR '.join(terms)}))"

    def _typed(self, point: list) -> str:
        """A key as a typed tuple, so ClickHouse compares it exactly as it sorts the table."""
        return "tuple(" + ", ".join(f"CAST({literal(v)}, {literal(self.types[c])})"
                                    for c, v in zip(self.columns, point)) + ")"

    def next_batch(self, client, position: list | None, batch_size: int,
                   until: list | None = None) -> tuple[list, int] | None:
        """(last key of the next batch, its source row count), or None when no key is left.

        `until` bounds the walk (a repair of one range: keys up to and including it). The same
        query checks that the end lies strictly past the position: a batch that would not advance
        would repeat forever, so it stops the run instead.
        """
        cols = ", ".join(self.columns)
        inner = (f"SELECT {cols} FROM {self.database}.{self.table} WHERE {self._between(position, until)} "
                 f"ORDER BY {cols} LIMIT {int(batch_size)} WITH TIES")
        picks = ", ".join(f"tupleElement(max(tuple({cols})), {i + 1}) AS _k{i}" for i in range(len(self.columns)))
        outer = ", ".join(self._exact(c, f"_k{i}") for i, c in enumerate(self.columns))
        keys = ", ".join(f"_k{i}" for i in range(len(self.columns)))
        advances = "1" if position is None else f"tuple({keys}) > {self._typed(position)}"
        row = client.query(f"SELECT {outer}, {advances} AS _advances, _n FROM (SELECT {picks}, count() AS _n FROM ({inner}))",
                           query_formats=_RAW, settings=self._walk_settings(batch_size)).result_rows[0]
        if not row[-1]:
            return None
        end = [_decoded(v) for v in row[:-2]]
        if not row[-2]:
            raise BackfillError(f"the next batch of {self.database}.{self.table} would end at {end}, not past its "
                                f"start {position}; stopping instead of repeating the range (check the "
                                f"checkpoint columns against the table's sorting key)")
        return end, int(row[-1])

    def at_or_before(self, client, key: list, limit: list) -> bool:
        """`key` <= `limit` in the table's own order (read only after a failed attempt)."""
        return bool(client.command(f"SELECT {self._typed(key)} <= {self._typed(limit)} AS within"))

    def _between(self, position: list | None, until: list | None) -> str:
        return self.after(position) if until is None else f"{self.after(position)} AND {self.upto(until)}"

    def remaining(self, client, position: list | None, until: list | None = None) -> int:
        """Source rows past the position, counted exactly: a scan of the key columns (`--exact`)."""
        return int(client.command(f"SELECT count() FROM {self.database}.{self.table} WHERE {self._between(position, until)}"))

    def estimate(self, client, position: list | None, until: list | None = None) -> int:
        """Source rows past the position from the primary index alone (whole granules, no scan).

        EXPLAIN ESTIMATE reads only the marks, so it costs the same at a billion rows as at a
        thousand; the figure is high by up to a granule per part at each bound.
        """
        result = client.query(f"EXPLAIN ESTIMATE SELECT 1 FROM {self.database}.{self.table} "
                              f"WHERE {self._between(position, until)}")
        rows = result.column_names.index("rows")
        return sum(int(r[rows]) for r in result.result_rows)

    def ordered(self, client, start: list, end: list) -> bool:
        """`start` < `end` in the table's own order (a repair range must not be empty or reversed)."""
        return bool(client.command(f"SELECT {self._typed(start)} < {self._typed(end)} AS ordered"))
