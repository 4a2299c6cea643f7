"""The framework-owned key range: where the next batch ends, and the predicate that selects it.

Batch ends are read from the *source* in sorting-key order with `LIMIT n WITH TIES`, so every
row of a key lands in one batch and the cost depends on the batch, not on how deep the walk is.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from ..errors import BackfillError
from ..spec import keytypes
from ..spec.render import literal
from . import dedup, preflight

# Keys are read as bytes: clickhouse-connect would hand back text that is not UTF-8 as its hex
# (a position that compares wrong), and FixedString as bytes that do not render.
_RAW = {"String": "bytes", "FixedString": "bytes"}
WALK_SETTINGS = ("read_in_order_use_buffering",)  # sent only where the server has them
# Below this a batch is a few granules (up to 8,192 rows each, per part): too coarse a step for the index.
INDEX_MIN_ROWS = 100_000
log = logging.getLogger("backfill")


def is_nan(value) -> bool:
    """A NaN key as the checkpoint holds it: `toString` text ('nan', '-nan') or a float."""
    if isinstance(value, float):
        return value != value
    return isinstance(value, str) and value.strip().lstrip("+-").lower() == "nan"


def _decoded(value):
    """Key bytes become text; bytes that are not UTF-8 survive as surrogate escapes."""
    return bytes(value).decode("utf-8", "surrogateescape") if isinstance(value, (bytes, bytearray)) else value


def probe_walk(client) -> tuple[set, bool]:
    """(version-dependent walk settings this server has, whether it has `mergeTreeIndex`): every walk
    (a run, `validate`, a dry run) reads range ends the cheap way the server allows, from the primary
    index, else in small unbuffered blocks, so memory never follows the number of source parts."""
    return (dedup.known_settings(client, also=WALK_SETTINGS), preflight.has_table_function(client, "mergeTreeIndex"))


@dataclass
class KeySpace:
    """The checkpoint columns of one source table and their types."""

    database: str
    table: str
    types: dict[str, str]
    known_settings: set = field(default_factory=set)  # version-dependent settings this server has
    fast_ends: bool = False  # batch ends from the primary index (mergeTreeIndex), where the server has it
    index_min_rows = INDEX_MIN_ROWS  # a class attribute, so a test can lower it

    def __post_init__(self):
        for col, typ in self.types.items():  # `check_source` says it first, naming the meta file
            if keytypes.kind(typ) is None:
                raise BackfillError(f"{self.database}.{self.table}: checkpoint column {col!r} is {typ}, a type "
                                    f"the walk cannot hold exactly (it holds {keytypes.SUPPORTED})")

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
        """`expr` read in the form the checkpoint keeps (`spec/keytypes.py`): never ambiguous text."""
        return keytypes.read(self.types[col], expr)

    def lit(self, col: str, value) -> str:
        """A constant of the column's own type that is exactly the kept `value`."""
        return keytypes.sql(self.types[col], value)

    def default(self, col: str):
        """What `{checkpoint_<col>}` shows before the first batch."""
        return keytypes.default(self.types[col])

    def stand_in(self, client) -> list:
        """A key of the columns' own default values (0, '', 1970-01-01 ...) that converts to each type."""
        exprs = ", ".join(self._exact(c, f"defaultValueOfTypeName({literal(self.types[c])})") for c in self.columns)
        return [_decoded(v) for v in client.query(f"SELECT {exprs}", query_formats=_RAW).result_rows[0]]

    def after(self, position: list | None, end: list | None = None, finite_first: bool = False) -> str:
        """Predicate: key strictly greater than `position` (TRUE when there is none).

        `end`, when the caller bounds the keys by it, lets a Float column drop its NaN branch where
        the end already excludes NaN (so the primary index still prunes); `finite_first` drops it on
        the first column (the caller walks the NaN tail of that column separately).
        """
        return "1" if position is None else self._compare(position, ">", strict_last=True, end=end,
                                                          finite_first=finite_first)

    def upto(self, end: list) -> str:
        """Predicate: key less than or equal to `end`."""
        return self._compare(end, "<", strict_last=False)

    def range_predicate(self, start: list | None, end: list) -> str:
        """Exactly the keys in (start, end]; no lower bound on the first batch."""
        return self.upto(end) if start is None else f"{self.after(start, end)} AND {self.upto(end)}"

    def _cmp(self, col: str, op: str, value, nan_above: bool = True) -> str:
        """`col op value` in the table's own sort order, where NaN sorts after every number (+inf
        included) and all NaNs are equal. A plain comparison is false for NaN on either side, so a
        Float key needs its NaN branch spelled out or its NaN rows are never selected. `isNaN` is
        used rather than a negated comparison: the engine's primary index and its logical optimizer
        both assume comparisons are never NaN, and prune or fold `NOT (f <= x)` wrongly."""
        lit = self.lit(col, value)
        if not keytypes.is_float(self.types[col]):
            return f"{col} {op} {lit}"
        if is_nan(value):
            return {">": "0", ">=": f"isNaN({col})", "=": f"isNaN({col})", "<": f"NOT isNaN({col})", "<=": "1"}[op]
        if op in (">", ">=") and nan_above:
            return f"({col} {op} {lit} OR isNaN({col}))"
        return f"{col} {op} {lit}"

    def _compare(self, point: list, op: str, strict_last: bool, end: list | None = None,
                 finite_first: bool = False) -> str:
        cols = self.columns

        def nan_above(i: int) -> bool:  # can a NaN in column i still lie at or below `end`?
            if i == 0 and finite_first:
                return False
            return end is None or list(end[:i]) != list(point[:i]) or is_nan(end[i])
        terms = []
        for i, col in enumerate(cols):
            last = i == len(cols) - 1
            eqs = [self._cmp(cols[j], "=", point[j]) for j in range(i)]
            this_op = op if (strict_last or not last) else op + "="
            terms.append("(" + " AND ".join(eqs + [self._cmp(col, this_op, point[i], nan_above(i))]) + ")")
        first = self._cmp(cols[0], op + "=", point[0], nan_above(0))  # a plain bound on the first column lets the index prune
        return f"({first} AND ({' OR '.join(terms)}))"

    def _sortable(self, exprs: list[str]) -> str:
        """A tuple that compares as the table sorts: a Float becomes (isNaN, value), since tuple
        comparison and `max` treat NaN as neither greater nor smaller than anything."""
        parts = []
        for col, expr in zip(self.columns, exprs):
            parts += [f"isNaN({expr})", f"if(isNaN({expr}), 0, {expr})"] if keytypes.is_float(self.types[col]) else [expr]
        return "tuple(" + ", ".join(parts) + ")"

    def _areas(self, position: list | None, until: list | None) -> list[tuple[str, bool]]:
        """The keys past `position` (up to `until`) as (predicate, the index can place it) to walk in
        order. A Float first column is walked in two parts, its numbers and then its NaN tail: one
        predicate for both could not use the primary index, and every batch would read the table
        from its start."""
        if not keytypes.is_float(self.types[self.columns[0]]):
            return [(self._between(position, until), True)]
        col, areas = self.columns[0], []
        if position is None or not is_nan(position[0]):
            bound = "" if until is None else f" AND {self.upto(until)}"
            areas.append((f"{self.after(position, until, finite_first=True)}{bound} AND NOT isNaN({col})", True))
        if until is None or is_nan(until[0]):
            areas.append((f"{self._between(position, until)} AND isNaN({col})", False))
        return areas

    def _typed(self, point: list) -> str:
        """A key as a typed tuple, so ClickHouse compares it exactly as it sorts the table."""
        return self._sortable([self.lit(c, v) for c, v in zip(self.columns, point)])

    def next_batch(self, client, position: list | None, batch_size: int,
                   until: list | None = None) -> tuple[list, int] | None:
        """(last key of the next batch, its source row count), or None when no key is left.

        `until` bounds the walk (a repair of one range: keys up to and including it). Large batches
        take their end from the primary index (`_end_from_index`); small ones, and whatever the index
        cannot place, read the keys in order (`_end_from_rows`). Either way the end lies strictly past
        the position: a batch that would not advance would repeat forever.
        """
        for where, _ in self._areas(position, until):
            found = None
            if self.fast_ends and batch_size >= self.index_min_rows:
                try:
                    found = self._end_from_index(client, position, int(batch_size), where)
                except Exception as exc:  # no mergeTreeIndex here (an old server, not a MergeTree): read rows
                    log.info("batch ends from the primary index are off for %s.%s: %s", self.database, self.table, exc)
                    self.fast_ends = False
            found = found or self._end_from_rows(client, position, batch_size, where)
            if found is not None:
                return found
        return None

    def _end_from_index(self, client, position, batch_size: int, where: str) -> tuple[list, int] | None:
        """The first granule mark past `batch_size` rows after the position, then an exact count of (position, mark].

        The marks are the primary index in memory (`mergeTreeIndex`), so finding the end reads no
        rows: at 1M-row batches it takes milliseconds instead of half a second. The count uses the
        index too and reads only the granules at the two bounds. Any key past the position is a valid
        end (the predicate puts every row of a key in one batch); None when the marks cannot place
        one (the tail of the table, or a batch too coarse for the granules), and the rows decide.
        """
        cols = ", ".join(self.columns)
        outer = ", ".join(self._exact(c, c) for c in self.columns)
        source = f"mergeTreeIndex({literal(self.database)}, {literal(self.table)})"
        row = client.query(f"SELECT {outer} FROM (SELECT {cols}, sum(rows_in_granule) OVER (ORDER BY {cols} ROWS "
                           f"BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS _before FROM {source} "
                           f"WHERE {where}) WHERE _before >= {batch_size} "
                           f"ORDER BY {cols} LIMIT 1", query_formats=_RAW).result_rows
        if not row:
            return None
        end = [_decoded(v) for v in row[0]]
        rows = int(client.command(f"SELECT count() FROM {self.database}.{self.table} "
                                  f"WHERE {self.range_predicate(position, end)}"))
        return (end, rows) if rows <= 2 * batch_size else None

    def _end_from_rows(self, client, position, batch_size: int, where: str) -> tuple[list, int] | None:
        """The last key of the next `batch_size` rows in key order (`LIMIT n WITH TIES`), and their count."""
        cols = ", ".join(self.columns)
        inner = (f"SELECT {cols} FROM {self.database}.{self.table} WHERE {where} "
                 f"ORDER BY {cols} LIMIT {int(batch_size)} WITH TIES")
        n = len(self.columns)
        picks = ", ".join(f"tupleElement(argMax(tuple({cols}), {self._sortable(self.columns)}), {i + 1}) AS _k{i}"
                          for i in range(n))
        outer = ", ".join(self._exact(c, f"_k{i}") for i, c in enumerate(self.columns))
        keys = [f"_k{i}" for i in range(n)]
        advances = "1" if position is None else f"{self._sortable(keys)} > {self._typed(position)}"
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
        return self.after(position) if until is None else f"{self.after(position, until)} AND {self.upto(until)}"

    def remaining(self, client, position: list | None, until: list | None = None) -> int:
        """Source rows past the position, counted exactly: a scan of the key columns (`--exact`)."""
        return sum(int(client.command(f"SELECT count() FROM {self.database}.{self.table} WHERE {where}"))
                   for where, _ in self._areas(position, until))

    def estimate(self, client, position: list | None, until: list | None = None) -> int:
        """Source rows past the position from the primary index alone (whole granules, no scan).

        EXPLAIN ESTIMATE reads only the marks, so it costs the same at a billion rows as at a
        thousand; the figure is high by up to a granule per part at each bound. The NaN tail of a
        Float first column, which the index cannot place, is summed from the marks that hold NaN.
        """
        total = 0
        for where, indexed in self._areas(position, until):
            if not indexed:
                if self.fast_ends:
                    total += int(client.command(f"SELECT sum(rows_in_granule) FROM mergeTreeIndex("
                                                f"{literal(self.database)}, {literal(self.table)}) WHERE {where}"))
                continue
            result = client.query(f"EXPLAIN ESTIMATE SELECT 1 FROM {self.database}.{self.table} WHERE {where}")
            if "rows" not in result.column_names or not result.result_rows:  # no parts: no columns either
                continue
            rows = result.column_names.index("rows")
            total += sum(int(r[rows]) for r in result.result_rows)
        return total

    def unwalked(self, client, position: list | None, walked_rows: int) -> tuple[int, list | None]:
        """(source rows that no walk from the start can reach, an example key), asked before a run
        reports `completed`: a key that compares neither at-or-before nor after the final position
        (NaN under a plain comparison, say) would otherwise be skipped without a word.

        When the source holds exactly the rows the walk counted (`count()` comes from the parts'
        metadata), nothing was skipped; otherwise one scan of the key columns counts each side.
        """
        table = f"{self.database}.{self.table}"
        if int(client.command(f"SELECT count() FROM {table}")) == int(walked_rows):
            return 0, None
        reached = f"({'0' if position is None else self.upto(position)}) OR ({self.after(position)})"
        total, inside = client.query(f"SELECT count(), countIf({reached}) FROM {table}").result_rows[0]
        if total == inside:
            return 0, None
        example = client.query(f"SELECT {', '.join(self._exact(c, c) for c in self.columns)} FROM {table} "
                               f"WHERE ({reached}) = 0 LIMIT 1", query_formats=_RAW).result_rows
        return int(total) - int(inside), [_decoded(v) for v in example[0]] if example else None

    def check_all_walked(self, client, position: list | None, walked_rows: int, backfill: str) -> None:
        """`completed` only when every source row lies in the walked key space; else one line."""
        missing, example = self.unwalked(client, position, walked_rows)
        if missing:
            raise BackfillError(f"{missing:,} rows of {self.database}.{self.table} lie outside the walked key "
                                f"space (e.g. key {example}): no comparison with the checkpoint columns "
                                f"{', '.join(self.columns)} selects them; not marking backfill {backfill} completed")

    def ordered(self, client, start: list, end: list) -> bool:
        """`start` < `end` in the table's own order (a repair range must not be empty or reversed)."""
        return bool(client.command(f"SELECT {self._typed(start)} < {self._typed(end)} AS ordered"))

    def cast_point(self, client, point: list) -> tuple[list, list[str]]:
        """A key typed by hand (a `--range` bound) as the engine reads it: each value cast to its column's
        type (`accurateCastOrNull`, so -5 on a UInt64 does not wrap), in the form a position holds; and
        one phrase per value that fits no key of its column (out of range, another type, or null)."""
        exprs, params = [], {}
        for i, (col, value) in enumerate(zip(self.columns, point)):
            typ = re.sub(r"^LowCardinality\((.*)\)$", r"\1", self.types[col])  # LowCardinality cannot be Nullable
            params.update({f"v{i}": value if isinstance(value, str) else json.dumps(value), f"t{i}": typ})
            cast = f"accurateCastOrNull({{v{i}:String}}, {{t{i}:String}})"
            exprs += [f"isNull({cast})", self._exact(col, f"assumeNotNull({cast})")]
        row = client.query(f"SELECT {', '.join(exprs)}", parameters=params, query_formats=_RAW).result_rows[0]
        bad = [f"{json.dumps(value)} is {'null where a key is needed' if value is None else 'not a value'} of "
               f"{col} {self.types[col]}" for i, (col, value) in enumerate(zip(self.columns, point))
               if value is None or row[2 * i]]
        return [_decoded(v) for v in row[1::2]], bad
