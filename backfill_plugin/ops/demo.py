"""Deterministic demo data: realistic calls written into `call_parts` the way a trace server does.

Each call is a start part and, for ~90% of calls, a separate end part (a few also get a later
rename part), inserted as separate INSERTs so that `calls_merged` holds unmerged parts of the same
key, which is exactly what the 021 backfill must finalise. Everything derives from `seed`
(including the clock), so two runs with the same arguments write identical data.

    python -m backfill_plugin.ops.demo --calls 1000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

COLUMNS_START = (
    "project_id", "id", "trace_id", "parent_id", "thread_id", "turn_id", "op_name", "display_name",
    "started_at", "attributes_dump", "inputs_dump", "input_refs", "wb_user_id", "wb_run_id",
    "wb_run_step", "created_at",
)
COLUMNS_END = (
    "project_id", "id", "ended_at", "exception", "output_dump", "summary_dump", "output_refs",
    "wb_run_step_end", "created_at",
)
COLUMNS_RENAME = ("project_id", "id", "display_name", "created_at")

PROJECTS = 50
INCOMPLETE_SHARE = 0.10
RENAME_SHARE = 0.05
OP_NAMES = (
    "openai.chat.completions.create", "anthropic.Messages.create", "Evaluation.evaluate",
    "Evaluation.predict_and_score", "Model.predict", "retrieve_documents", "rerank", "embed_query",
    "score_relevance", "summarize", "tool_call", "agent_step", "parse_response", "run_pipeline",
)
WORDS = (
    "the model answered a question about retrieval augmented generation with citations and "
    "a short summary while the evaluator scored relevance faithfulness latency cost tokens "
    "prompt completion user assistant system tool context document chunk embedding vector"
).split()


def _base_time(seed: int) -> datetime:
    """A fixed 'now' derived from the seed, so the data never depends on the wall clock."""
    return datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(days=seed % 365, seconds=seed % 86400)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _projects(rng: random.Random) -> tuple[list[str], list[float]]:
    """50 projects with Zipf-like sizes: the first holds a large share, the tail very little."""
    names = [f"entity-{k % 7}/project-{k:02d}-{rng.getrandbits(24):06x}" for k in range(PROJECTS)]
    rng.shuffle(names)  # key order and size are unrelated, as in a real deployment
    cum, total = [], 0.0
    for rank in range(PROJECTS):
        total += 1.0 / (rank + 1) ** 1.1
        cum.append(total)
    return names, cum


def _payload_size(rng: random.Random) -> int:
    """50..2000 characters, log-uniform: mostly small payloads, some large ones."""
    return int(50 * 40 ** rng.random())


def generate_calls(client, database: str, calls: int, seed: int = 42, batch: int = 50_000) -> dict:
    """Write `calls` calls into `{database}.call_parts`; return counts of calls, complete calls, parts.

    Per chunk of `batch` calls: one INSERT of start parts, one of end parts, one of rename parts.
    """
    rng = random.Random(seed)
    now = _base_time(seed)
    projects, cum_weights = _projects(rng)
    text = " ".join(rng.choice(WORDS) for _ in range(20_000))  # pool sliced into payloads
    users = [f"user-{rng.getrandbits(32):08x}" for _ in range(40)]
    project_users = {p: rng.sample(users, 3) for p in projects}  # a few users per project
    digests = {op: f"{rng.getrandbits(64):016x}" for op in OP_NAMES}
    settings = {"async_insert": 0}  # keep every part a separate INSERT block, as the real writers do

    done = complete = parts = 0
    while done < calls:
        n = min(batch, calls - done)
        start = {c: [] for c in COLUMNS_START}
        end = {c: [] for c in COLUMNS_END}
        rename = {c: [] for c in COLUMNS_RENAME}
        made = 0
        while made < n:
            # One trace: a root call and its descendants, all in one project.
            project = rng.choices(projects, cum_weights=cum_weights)[0]
            size = min(n - made, 1 + int(rng.expovariate(0.25)))
            trace_id = _uuid(rng)
            thread_id = _uuid(rng) if rng.random() < 0.3 else None
            user = rng.choice(project_users[project])
            run_id = f"{project.split('/')[0]}/run-{rng.getrandbits(20):05x}" if rng.random() < 0.3 else None
            trace_start = now - timedelta(seconds=rng.uniform(0, 30 * 86400))
            ids: list[str] = []
            for k in range(size):
                call_id = _uuid(rng)
                parent = None if k == 0 else ids[rng.randrange(len(ids))]
                ids.append(call_id)
                op = rng.choice(OP_NAMES)
                started = trace_start + timedelta(milliseconds=k * rng.randint(1, 2000))
                in_len = _payload_size(rng)
                offset = rng.randrange(len(text) - in_len)
                start["project_id"].append(project)
                start["id"].append(call_id)
                start["trace_id"].append(trace_id)
                start["parent_id"].append(parent)
                start["thread_id"].append(thread_id)
                start["turn_id"].append(ids[0] if thread_id else None)
                start["op_name"].append(f"weave:///{project}/op/{op}:{digests[op]}")
                start["display_name"].append(f"{op} #{rng.randrange(1000)}" if rng.random() < 0.2 else None)
                start["started_at"].append(started)
                start["attributes_dump"].append(json.dumps(
                    {"weave": {"client_version": "0.51.0", "os": "Linux"}, "env": rng.choice(("prod", "dev"))}))
                start["inputs_dump"].append(json.dumps({"prompt": text[offset:offset + in_len]}))
                start["input_refs"].append([f"weave:///{project}/object/Dataset:{rng.getrandbits(64):016x}"
                                            for _ in range(rng.choice((0, 0, 1, 1, 2, 3)))])
                start["wb_user_id"].append(user)
                start["wb_run_id"].append(run_id)
                start["wb_run_step"].append(rng.randrange(10_000) if run_id else None)
                start["created_at"].append(started)
                if rng.random() < INCOMPLETE_SHARE:
                    continue  # still running (or its end was lost): no end part
                ended = started + timedelta(milliseconds=int(rng.lognormvariate(6.5, 1.5)) + 1)
                out_len = _payload_size(rng)
                offset = rng.randrange(len(text) - out_len)
                failed = rng.random() < 0.03
                end["project_id"].append(project)
                end["id"].append(call_id)
                end["ended_at"].append(ended)
                end["exception"].append("TimeoutError: upstream did not answer" if failed else None)
                end["output_dump"].append(None if failed else json.dumps({"text": text[offset:offset + out_len]}))
                end["summary_dump"].append(json.dumps(
                    {"usage": {"prompt_tokens": in_len // 4, "completion_tokens": out_len // 4}}))
                end["output_refs"].append([f"weave:///{project}/object/Result:{rng.getrandbits(64):016x}"
                                           for _ in range(rng.choice((0, 0, 0, 1, 2)))])
                end["wb_run_step_end"].append(rng.randrange(10_000) if run_id else None)
                end["created_at"].append(ended)
                complete += 1
                if rng.random() < RENAME_SHARE:
                    # A rename later than every other part: argMax on created_at makes it win.
                    rename["project_id"].append(project)
                    rename["id"].append(call_id)
                    rename["display_name"].append(f"renamed {op} {rng.randrange(1000)}")
                    rename["created_at"].append(ended + timedelta(seconds=rng.randint(1, 3600)))
            made += size
        for cols, data in ((COLUMNS_START, start), (COLUMNS_END, end), (COLUMNS_RENAME, rename)):
            if data["id"]:
                client.insert("call_parts", [data[c] for c in cols], column_names=list(cols),
                              database=database, column_oriented=True, settings=settings)
                parts += len(data["id"])
        done += n
    return {"calls": done, "complete": complete, "parts": parts}


def summary(client, database: str) -> str:
    """One line for the end of `make demo`: rows copied, seconds, rows per second."""
    from ..protocol.checkpoint import CheckpointStore, backfill_id
    row = CheckpointStore(client).load(backfill_id(database, 21))
    if row is None or row.status != "completed" or row.started_at is None:
        return f"backfill 21 is {row.status if row else 'not registered'}"
    copied = int(client.command(f"SELECT count() FROM {database}.calls_complete"))
    calls = int(client.command(f"SELECT uniqExact(project_id, id) FROM {database}.calls_merged"))
    seconds = max((row.completed_at - row.started_at).total_seconds(), 1e-3)
    return (f"summary: {calls:,} calls in calls_merged; backfill 21 copied {copied:,} completed calls "
            f"({row.rows_processed:,} source rows) in {seconds:.1f} s, {row.rows_processed / seconds:,.0f} source rows/s")


def main(argv: list[str] | None = None) -> int:
    """CLI: fill a database (with migration 001 applied) with demo calls."""
    parser = argparse.ArgumentParser(prog="python -m backfill_plugin.ops.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("CLICKHOUSE_URL") or "chdb://" + str(Path(".chdb").resolve()),
                        help="chdb:///abs/path or http(s)://user@host:port (env CLICKHOUSE_URL; default ./.chdb)")
    parser.add_argument("--database", default=os.environ.get("MIGRATE_DATABASE") or "default",
                        help="database holding call_parts (env MIGRATE_DATABASE; default 'default')")
    parser.add_argument("--calls", type=int, default=200_000, help="number of calls (default 200000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed; same seed, same data (default 42)")
    parser.add_argument("--summary", action="store_true",
                        help="print what backfill 21 copied and how fast, instead of generating")
    parser.add_argument("--append", action="store_true",
                        help="write even if call_parts already holds rows (use another --seed, or parts repeat)")
    args = parser.parse_args(argv)
    if args.calls < 0:
        parser.error("--calls must be >= 0")

    from migrator.connection import connect, resolve
    from migrator.errors import MigrateError
    from migrator.sqltext import check_identifier

    try:
        check_identifier(args.database)
        command = ["python", "-m", "backfill_plugin.ops.demo", *(argv if argv is not None else sys.argv[1:])]
        client = connect(resolve(args.url), command)
        if args.summary:
            print(summary(client, args.database))
            return 0
        exists = client.command(f"EXISTS TABLE {args.database}.call_parts")
        if str(exists).strip() != "1":
            raise MigrateError(f"{args.database}.call_parts does not exist: run `migrate up` first")
        existing = int(client.command(f"SELECT count() FROM {args.database}.call_parts"))
        if existing and not args.append:
            # Re-running the same seed would repeat every part (refs would be concatenated twice).
            print(f"{args.database}.call_parts already holds {existing} parts; nothing generated "
                  f"(--append to add more, with another --seed)", file=sys.stderr)
            return 0
        began = time.monotonic()
        result = generate_calls(client, args.database, args.calls, seed=args.seed)
    except MigrateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result["seconds"] = round(time.monotonic() - began, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
