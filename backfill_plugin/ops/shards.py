"""`migrate backfill ...` on a sharded cluster: one walk per shard, driven at once, summed into one status.

Each shard gets its own client (HTTP to that shard) and its own manager, which runs the single-server
protocol unchanged on the shard's local tables: checkpoint, lease, write-ahead, dedup token and
retries all live in that shard's own `db_management.backfills`. Exactly once per shard is exactly
once for the table. A shard that cannot be reached, or fails, ends only its own walk; the command
says which, exits non-zero, and the next `run` completes only the shards left unfinished.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import click
from clickhouse_connect.driver.exceptions import Error as ClickHouseError
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from migrator import connection, tracking
from migrator import shards as shardmap
from migrator.cli import App
from migrator.errors import MigrateError

from ..errors import BackfillError, one_line
from ..protocol import status as status_
from ..protocol.checkpoint import backfill_id
from ..spec import sqlast
from ..spec.render import read_template
from .control import manager_for
from .signals import Signals
from .upcheck import stand_in_render

DISTRIBUTED_ARGS = re.compile(r"Distributed\(\s*'?([^',\s)]*)'?\s*,\s*'?([^',\s)]*)'?\s*,\s*'?([^',\s)]+)'?")


NETWORK = (
    ("Connection refused", "connection refused"),
    ("Connection reset", "connection reset"),
    ("RemoteDisconnected", "connection closed without an answer"),
    ("Read timed out", "read timeout"),
    ("Name or service not known", "host name not resolved"),
)


def describe_error(exc: BaseException) -> str:
    """One short line: a network failure named as one (not the driver's 500 characters of URL), else the
    server's or the SQL's own message."""
    text = str(exc)
    for needle, words in NETWORK:
        if needle in text:
            head = text.split(": ", 1)[0] + ": " if text.startswith("batch after") else ""
            return f"{head}network: {words}"
    return connection.redact(one_line(exc))


class ShardPrefix(logging.Filter):
    """The runner's warnings ("batch failed ...; retry 1 of 3") name the shard whose thread logged them."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = threading.current_thread().name
        if name.startswith("shard ") and not str(record.msg).startswith("shard "):
            record.msg, record.args = f"{name}: {record.getMessage()}", None
        return True


def shard_map(app: App) -> list[shardmap.Shard] | None:
    """The shards this command line names (None: one server). An embedded store is one server."""
    if not getattr(app, "shards", None) and (not app.cluster or app.target.embedded):
        return None
    return shardmap.for_app(app)


def refuse_shard_option(app: App, shard: int | None) -> None:
    if shard is not None and shard_map(app) is None:
        raise BackfillError(
            f"--shard {shard}: there are no shards to choose from; name them with --shards "
            f"URL,URL,... or --cluster NAME"
        )


@dataclass
class Walk:
    """One shard's side of a fanned-out command: its manager, or why it has none; its outcome."""

    shard: shardmap.Shard
    manager: object = None
    error: str | None = None
    result: dict | None = None
    summary: dict | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.shard.label


def shard_app(app: App, shard: shardmap.Shard) -> App:
    """An App for one shard: the single-server commands run on it unchanged."""
    one = App(shard.url, app.database, app.migrations_dir, None, app.debug)
    one._client = shard.client
    return one


def open_walks(app: App, only: int | None = None) -> list[Walk]:
    """Connect to every shard (or shard `only`); an unreachable one is a walk with its error, not a stop."""
    found = shard_map(app)
    if only is not None and only not in [s.num for s in found]:
        raise BackfillError(
            f"--shard {only}: no such shard; the shard map has shards {', '.join(str(s.num) for s in found)}"
        )
    walks = []
    for shard in [s for s in found if only is None or s.num == only]:
        try:
            client = shardmap.connect(shard, sys.argv)
        except MigrateError as exc:
            walks.append(Walk(shard, error=str(exc)))
            continue
        mgr = manager_for(client, app.migrations_dir, None, connection.resolve(shard.url))
        mgr.shard = str(shard.num)  # history rows and metric labels name the shard
        walks.append(Walk(shard, mgr))
    return walks


def local_table(engine_full: str) -> str | None:
    """The local table a Distributed table forwards to: `Distributed(cluster, db, table, ...)`."""
    match = DISTRIBUTED_ARGS.search(engine_full or "")
    if not match:
        return None
    db, table = match.group(2), match.group(3)
    return f"{db}.{table}" if db else table


def schema_problems(walk: Walk, database: str, version: int) -> list[str]:
    """Why this shard cannot walk: version not applied, a table missing, a Distributed table named."""
    mgr = walk.manager
    spec = mgr.spec(version)
    state = tracking.read_state(mgr.ch_client, database)
    if state.curr_version < version:
        return [
            f"{walk.label}: version {version} is not applied there (it is at {state.curr_version}); "
            f"run 'migrate up' with the same shards"
        ]
    template = read_template(spec.sql_path)
    target = sqlast.parse(mgr.ch_client, stand_in_render(template, database), None, spec.sql_path).target_in(database)
    tables = [("source", (database, spec.meta["source_table"]))] + ([("target", target)] if target else [])
    out = []
    for role, (db, name) in tables:
        rows = mgr.ch_client.query(
            "SELECT engine, engine_full FROM system.tables WHERE database = {d:String} AND name = {t:String}",
            parameters={"d": db, "t": name},
        ).result_rows
        if not rows:
            out.append(f"{walk.label}: {role} table {db}.{name} does not exist there")
        elif rows[0][0] == "Distributed":
            local = local_table(rows[0][1]) or "its local table"
            out.append(
                f"{walk.label}: {role} table {db}.{name} is Distributed; name the shard's local table "
                f"{local} instead (each shard's walk reads and writes its own data)"
            )
    return out


def check_ready(walks: list[Walk], database: str, version: int) -> None:
    """Before any batch on any shard: a shard whose schema is behind is refused by name."""
    problems = []
    for walk in walks:
        if walk.error:
            continue
        try:
            problems += schema_problems(walk, database, version)
        except BackfillError:
            raise  # the version's files themselves are wrong: the same on every shard
        except ClickHouseError as exc:  # the shard went away meanwhile: its walk ends, not the others'
            walk.error = f"{walk.label}: {describe_error(exc)}"
    if problems:
        raise BackfillError(f"backfill {version} refused before any batch on any shard: " + "; ".join(problems))


class Board:
    """One progress display for every shard's walk and their total (plain lines when not on a terminal)."""

    def __init__(self, version: int, walks: list[Walk]):
        self.version, self.walks, self.tty = version, walks, sys.stdout.isatty()
        self.lock = threading.Lock()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeRemainingColumn(),
            disable=not self.tty,
        )
        self.total = self.progress.add_task(f"backfill {version}: all shards", total=None, rate="-")
        self.tasks = {
            w.shard.num: self.progress.add_task(f"  shard {w.shard.num}", total=None, rate="-")
            for w in walks
            if not w.error
        }

    def on_batch(self, walk: Walk):
        def hook(summary, event):
            summary = status_.after_batch(summary, event)
            with self.lock:
                walk.summary = summary
                done = sum((w.summary or {}).get("rows_processed", 0) for w in self.walks)
                left = [(w.summary or {}).get("rows_remaining") for w in self.walks if w.summary]
                rate = sum((w.summary or {}).get("rows_per_second") or 0 for w in self.walks)
                if self.tty:
                    mine = summary["rows_processed"] + (summary["rows_remaining"] or 0)
                    self.progress.update(
                        self.tasks[walk.shard.num],
                        completed=summary["rows_processed"],
                        total=mine,
                        rate=status_fmt(summary["rows_per_second"]),
                    )
                    self.progress.update(
                        self.total,
                        completed=done,
                        total=done + sum(x or 0 for x in left),
                        rate=status_fmt(round(rate, 1) or None),
                    )
                    return
                click.echo(
                    f"shard {walk.shard.num}: batch {event['number']}: {event['rows']} rows in "
                    f"{event['seconds']}s, shard total {summary['rows_processed']:,} "
                    f"({status_fmt(summary['progress_percent'])}%), {status_fmt(summary['rows_per_second'])} "
                    f"rows/s, eta {secs(summary['eta_seconds'])}; all shards {done:,} rows, "
                    f"{rate:,.0f} rows/s"
                )

        return hook


def status_fmt(value) -> str:
    return "-" if value is None else str(value)


def secs(value) -> str:
    return "unknown" if value is None else f"{value:.0f}s"


def run(app: App, version: int, only: int | None, parallel: int | None, kwargs: dict) -> None:
    """`backfill run V` / `resume V` on every shard (or `--shard K`) at once: one walk per shard."""
    walks = open_walks(app, only)
    for walk in walks:
        if walk.error:
            click.echo(f"{walk.error}; its walk does not start", err=True)
    check_ready(walks, app.database, version)
    live = [w for w in walks if not w.error]
    board = Board(version, walks)
    started = time.time()

    def walk_one(walk: Walk) -> None:
        threading.current_thread().name = f"shard {walk.shard.num}"
        try:
            walk.result = walk.manager.run_backfill(app.database, version, on_batch=board.on_batch(walk), **kwargs)
        except Exception as exc:  # noqa: BLE001 - one shard's fault ends its walk, never another's
            walk.error = f"{walk.label}: {describe_error(exc)}"
            click.echo(f"{walk.error}; its walk stopped, the other shards go on", err=True)

    def stop_all():
        for w in live:
            w.manager.request_stop()

    def abandon_all():
        for w in live:
            w.manager.abandon_batch()

    prefix = ShardPrefix()
    logging.getLogger("backfill").addFilter(prefix)
    with (
        Signals(
            "stopping every shard after its current batch (send again to stop now; interrupted batches are "
            "replayed on resume)",
            f"stopped inside batches; their ranges are replayed on resume. Resume with "
            f"'migrate backfill run {version}'",
            stop_all,
            abandon_all,
        ) as signals,
        board.progress,
    ):
        with ThreadPoolExecutor(max_workers=max(1, min(parallel or len(live) or 1, len(live) or 1))) as pool:
            list(pool.map(walk_one, live))
    logging.getLogger("backfill").removeFilter(prefix)
    _report(version, walks, time.time() - started, signals)


def _report(version: int, walks: list[Walk], elapsed: float, signals) -> None:
    stopped_by_signal = False
    for walk in walks:
        if walk.result is None:
            continue
        r = walk.result
        why = f" ({r['stopped']})" if r.get("stopped") and r["stopped"] != r["status"] else ""
        stopped_by_signal |= r.get("stopped") == "stop requested"
        click.echo(
            f"{walk.label}: {r['status']}{why}; {r['rows_processed']:,} rows processed, "
            f"{r['batches_completed']} batches, batch size {r['current_batch_size']}"
        )
    done = [w for w in walks if w.result and w.result["status"] == "completed"]
    rows = sum(w.result["rows_processed"] for w in walks if w.result)
    click.echo(
        f"backfill {version}: {len(done)} of {len(walks)} shards completed; {rows:,} rows processed on them "
        f"in all, {elapsed:.1f}s"
    )
    failed = [w for w in walks if w.error]
    if stopped_by_signal:
        click.echo(f"paused at batch boundaries; resume with 'migrate backfill run {version}'", err=True)
        sys.exit(signals.exit_code)
    if failed:
        raise BackfillError(
            f"backfill {version}: {len(failed)} of {len(walks)} shards did not finish "
            f"({', '.join(w.label for w in failed)}); run 'migrate backfill run {version}' again "
            f"to complete only the unfinished shards"
        )
    if any(w.result and w.result.get("stopped") in ("paused", "max batches") for w in walks):
        click.echo(f"resume with 'migrate backfill run {version}'")


def dry_run(app: App, version: int, only: int | None, kwargs: dict, show) -> None:
    """The shard map, then each shard's scope and first range (its SQL via `show`)."""
    for line in shardmap.describe(shard_map(app)):
        click.echo(line)
    walks = open_walks(app, only)
    check_ready(walks, app.database, version)
    for walk in walks:
        click.echo(f"-- {walk.label}")
        if walk.error:
            click.echo(f"unreachable: {walk.error}")
            continue
        show(version, walk.manager.run_backfill(app.database, version, dry_run=True, **kwargs))
    if any(w.error for w in walks):
        raise BackfillError(f"backfill {version}: {', '.join(w.label for w in walks if w.error)} unreachable")


# -- status and list: summed over the shards ----------------------------------------------------------
SHARD_KEYS = (
    "status",
    "position",
    "rows_processed",
    "rows_remaining",
    "progress_percent",
    "rows_per_second",
    "eta_seconds",
    "batches_completed",
    "current_batch_size",
    "lease",
    "error_log",
    "updated_at",
)


def _entry(walk: Walk, info: dict | None) -> dict:
    base = {"shard": walk.shard.num, "url": connection.redact(walk.shard.url or walk.shard.replicas[0])}
    if info is None:
        return {
            **base,
            "status": "unreachable",
            "position": None,
            "rows_processed": None,
            "lease": None,
            "error": walk.error,
        }
    out = {**base, **{k: info.get(k) for k in SHARD_KEYS}}
    out["error"] = out.pop("error_log")
    return out


def overall(statuses: list[str]) -> str:
    """One word for the shards together: completed only when every shard is."""
    if statuses and all(s == "completed" for s in statuses):
        return "completed"
    for word in ("running", "failed", "paused"):
        if word in statuses:
            return word
    if "unreachable" in statuses:
        return "failed"
    return "pending" if "pending" in statuses or "completed" in statuses else (statuses or ["unknown"])[0]


def totals(version: int, database: str, entries: list[dict]) -> dict:
    """The sums over the shards beside the per-shard list (`status --json`, `list --json`)."""
    known = [e for e in entries if e["status"] != "unreachable"]
    done = sum(e["rows_processed"] or 0 for e in known)
    left = [e.get("rows_remaining") for e in known]
    remaining = None if any(x is None for x in left) or len(known) < len(entries) else sum(left)
    rate = sum(e.get("rows_per_second") or 0 for e in known) or None
    total = done + remaining if remaining is not None else None
    return {
        "backfill_id": backfill_id(database, version),
        "migration_version": version,
        "db_name": database,
        "status": overall([e["status"] for e in entries]),
        "rows_processed": done,
        "rows_remaining": remaining,
        "progress_percent": round(100.0 * done / total, 2) if total else (100.0 if total == 0 else None),
        "rows_per_second": rate,
        "eta_seconds": round(remaining / rate, 1) if rate and remaining is not None else None,
        "shards_total": len(entries),
        "shards_completed": [e["shard"] for e in entries if e["status"] == "completed"],
        "shards": entries,
    }


def status_doc(app: App, version: int, exact: bool) -> dict:
    """`status V` over every shard: totals plus each shard's status, position, rows, lease and error."""
    entries = []
    for walk in open_walks(app):
        info = None
        if not walk.error:
            try:
                info = walk.manager.get_status(app.database, version, exact=exact)
            except BackfillError:
                raise
            except Exception as exc:  # noqa: BLE001 - a shard gone meanwhile is reported, not fatal
                walk.error = f"{walk.label}: {describe_error(exc)}"
        entries.append(_entry(walk, info))
    return totals(version, app.database, entries)


def print_status(doc: dict) -> None:
    """Totals, then one line per shard."""
    click.echo(f"backfill        {doc['backfill_id']} on {doc['shards_total']} shards")
    click.echo(
        f"status          {doc['status']} ({len(doc['shards_completed'])} of {doc['shards_total']} shards "
        f"completed{': ' + ', '.join(map(str, doc['shards_completed'])) if doc['shards_completed'] else ''})"
    )
    click.echo(f"rows processed  {doc['rows_processed']:,}")
    pct = doc["progress_percent"]
    click.echo(f"progress        {'unknown' if pct is None else f'{pct:.1f}%'}")
    click.echo(f"rate            {status_fmt(doc['rows_per_second'])} rows/s, eta {secs(doc['eta_seconds'])}")
    for e in doc["shards"]:
        lease = (e.get("lease") or {}).get("owner") or "-"
        rows = "-" if e["rows_processed"] is None else f"{e['rows_processed']:,}"
        click.echo(
            f"shard {e['shard']} ({e['url']}): {e['status']}, position "
            f"{json.dumps(e['position'], ensure_ascii=False)}, {rows} rows, lease {lease}"
            + (f", error: {e['error']}" if e.get("error") else "")
        )


def list_doc(app: App, status: str | None, exact: bool) -> list[dict]:
    """`list` over every shard: per version, the totals and the shards' entries."""
    by_version: dict[int, list[dict]] = {}
    descriptions: dict[int, str] = {}
    walks = open_walks(app)
    for walk in walks:
        if walk.error:
            continue
        try:
            items = walk.manager.list_backfills(app.database, None, exact=exact)
        except Exception as exc:  # noqa: BLE001
            walk.error = f"{walk.label}: {describe_error(exc)}"
            continue
        for item in items:
            descriptions[item["migration_version"]] = item["description"]
            by_version.setdefault(item["migration_version"], []).append(_entry(walk, item))
    out = []
    for version in sorted(by_version):
        entries = by_version[version] + [_entry(w, None) for w in walks if w.error]
        doc = {
            **totals(version, app.database, sorted(entries, key=lambda e: e["shard"])),
            "description": descriptions[version],
        }
        if status is None or doc["status"] == status:
            out.append(doc)
    return out


# -- the other commands: the single-server command on each shard in turn --------------------------------
def each_shard(app: App, command, kwargs: dict, verb: str) -> None:
    """Run a single-server command on each shard in turn; one verdict naming the shards where it failed.

    With `as_json`, each shard's document is gathered into one: {"ok", "shards": [{shard, url, result, error}]}.
    """
    as_json = kwargs.get("as_json")
    docs, failed = [], []
    for walk in open_walks(app):
        entry = {
            "shard": walk.shard.num,
            "url": connection.redact(walk.shard.url or walk.shard.replicas[0]),
            "result": None,
            "error": walk.error,
        }
        if not as_json:
            click.echo(f"-- {walk.label}")
        if walk.error:
            failed.append(walk.error)
            click.echo(walk.error, err=True)
            docs.append(entry)
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out) if as_json else contextlib.nullcontext():
                command(shard_app(app, walk.shard), **kwargs)
        except (MigrateError, SystemExit) as exc:
            message = str(exc) if isinstance(exc, MigrateError) else f"exit status {exc.code}"
            entry["error"] = message
            failed.append(f"{walk.label}: {message}")
            if not as_json:
                click.echo(f"{walk.label}: {message}", err=True)
        if as_json:
            text = out.getvalue().strip()
            try:
                entry["result"] = json.loads(text) if text else None
            except ValueError:
                entry["result"] = text
        docs.append(entry)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "shards": docs}, indent=2, default=str))
    if failed:
        hint = (
            "; repair a range on its own shard: add --shard K to its repair command"
            if verb.startswith("validate")
            else ""
        )
        raise BackfillError(f"{verb} failed on {len(failed)} of {len(docs)} shards: " + "; ".join(failed) + hint)


def fan_out(verb: str):
    """Decorate a single-server command (below `pass_app`): on shards it runs on each shard in turn."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(app: App, **kwargs):
            if shard_map(app) is None:
                return func(app, **kwargs)
            return each_shard(app, func, kwargs, f"{verb} {kwargs.get('version', '')}".strip())

        return wrapper

    return decorate
