"""Benchmark data made inside the engine: `INSERT ... SELECT FROM numbers()`, a few statements per million calls.

The Python generator (`backfill_plugin.ops.demo`) needs about 15 minutes for 10M calls; this one writes the
same kind of data (50 projects of Zipf-like sizes, random UUID ids, traces of a few calls) about 30x
faster. Every value of call `n` is a hash of (seed, n), so two runs give identical data. Like a trace
server, it writes one INSERT of start parts, one of end parts (for ~90% of calls) and one of later
rename parts (~5%), so `calls_merged` holds unmerged parts of one key that the 021 backfill must
finalise. The calls go out in key slices of about `chunk` calls (one key range per INSERT, random key
order inside it), so the parts overlapping a key range stay as few at 20M calls as at 2M.

By default the rows go straight into `calls_merged`, exactly as the materialized view would write them
(each key occurs once per INSERT, so the view's GROUP BY folds nothing); `--via parts` writes
`call_parts` and lets the view do it (identical content, about 3x slower).

Shapes: `realistic` (payloads 50..2000 characters, log-uniform, refs, renames, as the demo) and
`narrow` (payloads of 10..30 characters, a start and an end part per call, no renames, no refs), where
the fixed cost of a batch weighs more.

    python bench/datagen.py --url chdb:///tmp/store --database bench --calls 2000000 --shape narrow
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from backfill_plugin.ops.demo import OP_NAMES, PROJECTS, WORDS  # the same vocabulary as the demo data

TRACE_BLOCK = 16  # traces never cross a block of 16 consecutive calls


@dataclass(frozen=True)
class Shape:
    """What one call looks like: payload widths and the shares of incomplete calls and renames."""
    payload_min: int
    payload_max: int
    incomplete_share: float
    rename_share: float
    refs: bool
    attributes: bool


SHAPES = {
    "realistic": Shape(50, 2000, 0.10, 0.05, refs=True, attributes=True),
    "narrow": Shape(10, 30, 0.02, 0.0, refs=False, attributes=False),
}


def _q(text: str) -> str:
    """A ClickHouse string literal (the generator's own constants only)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _arr(items) -> str:
    return "[" + ", ".join(_q(i) if isinstance(i, str) else _arr(i) if isinstance(i, list) else repr(i)
                           for i in items) + "]"


def _constants(seed: int) -> dict:
    """Project names (shuffled, so key order and size are unrelated), Zipf weights, users, digests, text."""
    rng = random.Random(seed)
    names = [f"entity-{k % 7}/project-{k:02d}-{rng.getrandbits(24):06x}" for k in range(PROJECTS)]
    rng.shuffle(names)
    cum, total = [], 0.0
    for rank in range(PROJECTS):
        total += 1.0 / (rank + 1) ** 1.1
        cum.append(total)
    users = [f"user-{rng.getrandbits(32):08x}" for _ in range(40)]
    share = {name: (cum[i] - (cum[i - 1] if i else 0.0)) / total for i, name in enumerate(names)}
    project_users = {name: rng.sample(users, 3) for name in names}
    ordered = sorted(names)  # key order: projects by name, then ids
    key_hi, below = [], 0.0
    for name in ordered:
        below += share[name]
        key_hi.append(below)
    key_hi[-1] = 1.0
    return {
        "projects": ordered, "key_hi": key_hi, "key_share": [share[n] for n in ordered],
        "project_users": [project_users[n] for n in ordered],
        "digests": [f"{rng.getrandbits(64):016x}" for _ in OP_NAMES],
        "pool": " ".join(rng.choice(WORDS) for _ in range(20_000)),
        "now": datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(days=seed % 365, seconds=seed % 86400),
    }


def _u(seed: int, tag: str, *key: str) -> str:
    """Uniform in [0, 1) from (seed, tag, key)."""
    return f"(cityHash64({seed}, '{tag}', {', '.join(key)}) / 18446744073709551616.)"


def _h(seed: int, tag: str, *key: str) -> str:
    return f"cityHash64({seed}, '{tag}', {', '.join(key)})"


def _uuid(seed: int, tag: str, key: str, a: str | None = None) -> str:
    """A random-looking UUID v4 text; its first 16 hex digits are `a` (a UInt64) when given."""
    a = f"leftPad(lower(hex({a or _h(seed, tag + '.a', key)})), 16, '0')"
    b = f"leftPad(lower(hex({_h(seed, tag + '.b', key)})), 16, '0')"
    return (f"concat(substring({a}, 1, 8), '-', substring({a}, 9, 4), '-4', substring({a}, 14, 3), '-', "
            f"substring('89ab', toUInt8({_h(seed, tag + '.v', key)} % 4) + 1, 1), substring({b}, 2, 3), '-', "
            f"substring({b}, 5, 12))")


def _calls_subquery(seed: int, shape: Shape, first: int, end: int, part: int, parts: int, c: dict) -> str:
    """One row per call n in [first, end), the calls of key slice `part` of `parts`, with every value
    their parts need.

    Keys map monotonically onto [0, 1): projects in name order, each over its (Zipf) share of the
    calls, and within a project the id's leading 64 bits. Slice `part` holds the keys in
    [part / parts, (part + 1) / parts): each trace draws a point in that interval (which fixes its
    project, so projects keep their Zipf shares), and each call a random id inside the part of its
    project that lies in the interval. Every INSERT thus writes one key range, in random key order.
    """
    u = lambda tag, *key: _u(seed, tag, *key)  # noqa: E731
    h = lambda tag, *key: _h(seed, tag, *key)  # noqa: E731
    ratio = shape.payload_max / shape.payload_min
    now_ms = int(c["now"].timestamp() * 1000)

    def id_a(m: str) -> str:  # the leading 64 bits of call m's id (m in the same trace as n)
        return (f"(toUInt64(((slice_lo + (slice_hi - slice_lo) * {u('id.q', m)}) - project_lo) / project_share "
                f"* 4503599627370496) * 4096 + {h('id.low', m)} % 4096)")

    def uuid(tag: str, key: str) -> str:
        return _uuid(seed, tag, key, id_a(key) if tag == "id" else None)

    # Trace boundaries: in each block of 16 calls, position q > 0 opens a new trace when both of two
    # hash bits are zero (p = 0.25, ~3.3 calls per trace); a call's root is the last opener at or before it.
    openers = (f"bitOr(bitAnd(bitAnd(bitNot({h('root1', 'blk')}), bitNot({h('root2', 'blk')})), "
               f"{(1 << TRACE_BLOCK) - 2}), 1)")
    return f"""
    SELECT *,
        projects[project_ix] AS project,
        {uuid('id', 'n')} AS call_id,
        {uuid('trace', 'tk')} AS trace_id,
        if({u('thread', 'tk')} < 0.3, {uuid('thread', 'tk')}, NULL) AS thread_id,
        if(thread_id IS NULL, NULL, {uuid('id', 'tk')}) AS turn_id,
        if(k = 0, NULL, {uuid('id', f"(tk + {h('parent', 'n')} % k)")}) AS parent_id,
        project_users[project_ix][{h('user', 'tk')} % 3 + 1] AS wb_user_id,
        if({u('run', 'tk')} < 0.3,
           concat(splitByChar('/', project)[1], '/run-', leftPad(lower(hex({h('run.id', 'tk')} % 1048576)), 5, '0')),
           NULL) AS wb_run_id,
        {h('op', 'n')} % {len(OP_NAMES)} + 1 AS op_ix,
        CAST(fromUnixTimestamp64Milli(toInt64({now_ms} - {u('tstart', 'tk')} * {30 * 86400 * 1000}
                                              + k * ({h('step', 'n')} % 2000 + 1)), 'UTC'), 'DateTime64(3)') AS started,
        started + toIntervalMillisecond(toInt64(exp(6.5 + 1.5 * sqrt(-2 * log(1 - {u('dur1', 'n')}))
                                                * cos(2 * pi() * {u('dur2', 'n')}))) + 1) AS ended,
        toUInt32({shape.payload_min} * pow({ratio}, {u('inlen', 'n')})) AS in_len,
        toUInt32({shape.payload_min} * pow({ratio}, {u('outlen', 'n')})) AS out_len,
        {u('incomplete', 'n')} >= {shape.incomplete_share} AS complete,
        {u('failed', 'n')} < 0.03 AS failed,
        {u('rename', 'n')} < {shape.rename_share} AS renamed
    FROM
    (
        SELECT *,
            key_hi[project_ix] - key_share[project_ix] AS project_lo,
            key_share[project_ix] AS project_share,
            greatest({part / parts!r}, project_lo) AS slice_lo,
            least({(part + 1) / parts!r}, key_hi[project_ix]) AS slice_hi
        FROM
        (
            SELECT
                number AS n,
                intDiv(n, {TRACE_BLOCK}) AS blk,
                n % {TRACE_BLOCK} AS pos,
                toUInt64(floor(log2(bitAnd({openers}, bitShiftLeft(toUInt64(2), pos) - 1)))) AS root_pos,
                blk * {TRACE_BLOCK} + root_pos AS tk,
                pos - root_pos AS k,
                -- The trace's point in this slice picks its project.
                arrayFirstIndex(x -> x > ({part} + {u('trace.q', 'tk')}) / {parts}, key_hi) AS project_ix
            FROM numbers({first}, {end - first})
        )
    )
    """


def _with(c: dict) -> str:
    return (f"WITH {_arr(c['projects'])} AS projects, "
            f"{_arr(c['key_hi'])} AS key_hi, {_arr(c['key_share'])} AS key_share, "
            f"{_arr(c['project_users'])} AS project_users, {_arr(c['digests'])} AS digests, "
            f"{_arr(list(OP_NAMES))} AS op_names, {_q(c['pool'])} AS pool\n")


def _text(seed: int, tag: str, length: str) -> str:
    """A slice of the word pool of `length` characters at a hashed offset."""
    return f"substring(pool, toUInt32(cityHash64({seed}, '{tag}', n) % (length(pool) - {length})) + 1, {length})"


def part_selects(seed: int, shape: Shape) -> dict[str, dict[str, str]]:
    """Per part kind (start, end, rename): call_parts column -> expression over the calls subquery."""
    ref = ("arrayMap(i -> concat('weave:///', project, '/object/{kind}:', "
           "leftPad(lower(hex(cityHash64({seed}, '{tag}', n, i))), 16, '0')), range({count}))")
    empty = "CAST([], 'Array(String)')"
    input_refs = (ref.format(kind="Dataset", seed=seed, tag="iref",
                             count=f"[0, 0, 1, 1, 2, 3][cityHash64({seed}, 'irefs', n) % 6 + 1]")
                  if shape.refs else empty)
    output_refs = (ref.format(kind="Result", seed=seed, tag="oref",
                              count=f"[0, 0, 0, 1, 2][cityHash64({seed}, 'orefs', n) % 5 + 1]")
                   if shape.refs else empty)
    attributes = ("concat('{\"weave\": {\"client_version\": \"0.51.0\", \"os\": \"Linux\"}, \"env\": \"', "
                  f"if(cityHash64({seed}, 'env', n) % 2 = 0, 'prod', 'dev'), '\"}}')"
                  if shape.attributes else "'{}'")
    op = "op_names[op_ix]"
    start = {
        "project_id": "project", "id": "call_id", "trace_id": "trace_id", "parent_id": "parent_id",
        "thread_id": "thread_id", "turn_id": "turn_id",
        "op_name": f"concat('weave:///', project, '/op/', {op}, ':', digests[op_ix])",
        "display_name": f"CAST(if(cityHash64({seed}, 'dn', n) % 100 < 20, concat({op}, ' #', "
                        f"toString(cityHash64({seed}, 'dnk', n) % 1000)), NULL), 'Nullable(String)')",
        "started_at": "started", "attributes_dump": attributes,
        "inputs_dump": f"concat('{{\"prompt\": \"', {_text(seed, 'in', 'in_len')}, '\"}}')",
        "input_refs": input_refs, "wb_user_id": "wb_user_id", "wb_run_id": "wb_run_id",
        "wb_run_step": f"if(wb_run_id IS NULL, NULL, toInt64(cityHash64({seed}, 'rstep', n) % 10000))",
        "created_at": "started",
    }
    end = {
        "project_id": "project", "id": "call_id", "ended_at": "ended",
        "exception": "if(failed, 'TimeoutError: upstream did not answer', NULL)",
        "output_dump": f"if(failed, NULL, concat('{{\"text\": \"', {_text(seed, 'out', 'out_len')}, '\"}}'))",
        "summary_dump": ("concat('{\"usage\": {\"prompt_tokens\": ', toString(intDiv(in_len, 4)), "
                         "', \"completion_tokens\": ', toString(intDiv(out_len, 4)), '}}')"),
        "output_refs": output_refs,
        "wb_run_step_end": f"if(wb_run_id IS NULL, NULL, toInt64(cityHash64({seed}, 'rstepe', n) % 10000))",
        "created_at": "ended",
    }
    rename = {
        "project_id": "project", "id": "call_id",
        "display_name": f"CAST(concat('renamed ', {op}, ' ', toString(cityHash64({seed}, 'rn', n) % 1000)), 'Nullable(String)')",
        "created_at": f"ended + toIntervalSecond(cityHash64({seed}, 'rnt', n) % 3600 + 1)",
    }
    return {"start": start, "end": end, "rename": rename}


WHERE = {"start": "1", "end": "complete", "rename": "complete AND renamed"}


def _as_merged(cols: dict[str, str]) -> dict[str, str]:
    """The row the materialized view writes for one part (each key once per INSERT, so no GROUP BY):
    SimpleAggregateFunction states are the plain values, display_name is an argMax state."""
    out = {k: v for k, v in cols.items() if k not in ("display_name", "created_at")}
    if "display_name" in cols:
        out["display_name"] = f"initializeAggregation('argMaxState', {cols['display_name']}, {cols['created_at']})"
    first = cols.get("started_at") or cols.get("ended_at") or cols["created_at"]
    out["sortable_datetime"] = first
    return out


def chunk_statements(db: str, seed: int, shape: Shape, first: int, end: int, part: int, parts: int, c: dict,
                     via: str = "direct") -> list[str]:
    """The INSERTs (start, end, rename parts) for calls [first, end), key slice `part` of `parts`, in the
    order a server writes them.

    via='parts' writes `call_parts` (the materialized view folds each INSERT into `calls_merged`);
    via='direct' writes the very rows the view would write straight into `calls_merged`, about 3x faster.
    """
    calls_sql = _calls_subquery(seed, shape, first, end, part, parts, c)
    out = []
    for kind, cols in part_selects(seed, shape).items():
        if kind == "rename" and shape.rename_share <= 0:
            continue
        table = "call_parts"
        if via == "direct":
            cols, table = _as_merged(cols), "calls_merged"
        out.append(f"INSERT INTO {db}.{table} ({', '.join(cols)})\n{_with(c)}"
                   f"SELECT {', '.join(cols.values())}\nFROM ({calls_sql}) WHERE {WHERE[kind]}")
    return out


SETTINGS = {
    "async_insert": 0,
    "max_query_size": 1 << 20,  # the word pool is a literal of ~150 kB
    # Each key occurs once per INSERT, so the AggregatingMergeTree's merge of the block on insert would
    # find nothing to fold: skipping it halves the cost of the write.
    "optimize_on_insert": 0,
    # One part per large block: fewer, larger parts in calls_merged for the same data.
    "min_insert_block_size_rows": 1_048_576,
    "min_insert_block_size_bytes": 256 << 20,
}


def generate(client, db: str, calls: int, shape: str = "realistic", seed: int = 42, chunk: int = 1_000_000,
             via: str = "direct", echo=None) -> dict:
    """Write `calls` calls of `shape`; return counts of calls, complete calls and parts written.

    The calls are written in key slices of about `chunk` calls, so the parts overlapping any key
    range stay as few at 20M calls as at 2M: a benchmark at 10x then measures the backfill, not read
    amplification over ten times more overlapping unmerged parts. The data depends on (calls, shape,
    seed, chunk). Stop merges on the tables first if the part layout must be exact.
    """
    spec = SHAPES[shape]
    consts = _constants(seed)
    began = time.perf_counter()
    slices = max(1, -(-calls // chunk))
    table = "call_parts" if via == "parts" else "calls_merged"
    parts = int(client.command(f"SELECT count() FROM {db}.{table}"))
    complete = int(client.command(f"SELECT countIf(ended_at IS NOT NULL) FROM {db}.{table}"))
    bounds = [j * calls // slices // TRACE_BLOCK * TRACE_BLOCK for j in range(slices)] + [calls]
    for j in range(slices):
        for sql in chunk_statements(db, seed, spec, bounds[j], bounds[j + 1], j, slices, consts, via):
            client.command(sql, settings=SETTINGS)
        if echo:
            echo(f"generated key slice {j + 1} / {slices} of {calls:,} calls ({time.perf_counter() - began:.0f} s)")
    return {"calls": calls, "shape": shape, "seed": seed, "key_slices": slices,
            "complete": int(client.command(f"SELECT countIf(ended_at IS NOT NULL) FROM {db}.{table}")) - complete,
            "parts": int(client.command(f"SELECT count() FROM {db}.{table}")) - parts,
            "generate_seconds": round(time.perf_counter() - began, 2)}


def main(argv: list[str] | None = None) -> int:
    """CLI: fill a database (with migration 001 applied) with benchmark calls."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="chdb:///abs/path")
    ap.add_argument("--database", default="bench")
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="realistic")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--chunk", type=int, default=1_000_000, help="calls per key-space slice (one INSERT per part kind)")
    ap.add_argument("--via", choices=("direct", "parts"), default="direct",
                    help="direct: the view's rows straight into calls_merged; parts: through call_parts and the view")
    args = ap.parse_args(argv)
    if args.calls < 0 or args.chunk < 1:
        ap.error("--calls must be >= 0 and --chunk >= 1")
    import clickhouse_connect
    client = clickhouse_connect.get_client(dsn=args.url)
    table = "call_parts" if args.via == "parts" else "calls_merged"
    if str(client.command(f"EXISTS TABLE {args.database}.{table}")).strip() != "1":
        print(f"error: {args.database}.{table} does not exist: run `migrate up` first", file=sys.stderr)
        return 1
    print(json.dumps(generate(client, args.database, args.calls, args.shape, args.seed, args.chunk, args.via,
                              echo=lambda s: print(s, file=sys.stderr))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
