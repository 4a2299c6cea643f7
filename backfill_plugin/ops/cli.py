"""`migrate backfill ...`: the operator's interface for multi-hour backfills."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from migrator import connection
from migrator.cli import App, pass_app
from migrator.plugins import pm

from ..errors import BackfillError
from ..protocol import repair
from ..protocol import status as status_
from ..protocol.checkpoint import STATUSES, backfill_id
from ..protocol.run import BackfillView
from ..spec.meta import PACING, find_spec, parse_override
from . import history as history_
from . import shards
from .control import ControlChannel, manager_for
from .publish import publish, refuse_reset_if_published, unpublish
from .signals import Signals
from .validate import Validation


def control_for(app: App) -> ControlChannel | None:
    """The flag-file channel beside an embedded store (None for a server)."""
    directory = connection.control_dir(app.target)
    return ControlChannel(directory) if directory else None


def manager(app: App):
    """The manager for this command line's target, built the same way the hooks build it."""
    return manager_for(app.client, app.migrations_dir, app.cluster, app.target)


def _fmt(value, unknown="unknown") -> str:
    return unknown if value is None else str(value)


def _progress(info: dict) -> str:
    """`12.5%`, with `~` when it rests on an estimate of the remaining rows."""
    if info["progress_percent"] is None:
        return "unknown"
    return f"{'~' if info.get('rows_remaining_estimated') else ''}{info['progress_percent']:.1f}%"


def _remaining(info: dict) -> str:
    if info.get("rows_remaining") is None:
        return "unknown"
    how = "estimated from the primary index; --exact counts" if info.get("rows_remaining_estimated") else "counted"
    return f"{info['rows_remaining']:,} source rows ({how})"


def _throttled(info: dict) -> str:
    t = info.get("throttled")
    if not t:
        return "-"
    return f"{t['reason']} (value {t['value']}, limit {t['limit']}, for {time.time() - t['since']:.0f}s)"


def _published(info: dict) -> str:
    if info.get("published"):
        return str(info["published_at"])[:19]
    return "no" if info.get("publish_mode") else "-"


def _secs(value) -> str:
    return "unknown" if value is None else f"{value:.0f}s"


@click.group()
def backfill():
    """Resumable, checkpointed data backfills."""


@backfill.command("list")
@click.option("--status", type=click.Choice(STATUSES + ("not registered",)), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--exact", is_flag=True, help="count remaining source rows instead of estimating them from the index")
@pass_app
def list_cmd(app: App, status, as_json, exact):
    """Backfills of the database, registered or only discovered."""
    if shards.shard_map(app) is not None:
        return _print_shard_list(shards.list_doc(app, status, exact), as_json)
    items = manager(app).list_backfills(app.database, status, exact=exact)
    if as_json:
        keys = ["migration_version", "backfill_id", "db_name", "description", "status", "rows_processed",
                "batches_completed", "current_batch_size", "rows_remaining", "rows_remaining_estimated",
                "progress_percent", "started_at", "updated_at", "published", "published_at"]
        click.echo(json.dumps([{k: i[k] for k in keys} for i in items], indent=2, default=str))
        return
    table = Table("Version", "Description", "Status", "Progress", "Rows", "Started", "Updated", "Published")
    for i in items:
        progress = _progress(i)
        table.add_row(str(i["migration_version"]), i["description"], i["status"], progress,
                      f"{i['rows_processed']:,}", _fmt(i["started_at"], "-")[:19], _fmt(i["updated_at"], "-")[:19],
                      _published(i))
    Console(width=160).print(table)


def _print_shard_list(items: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(items, indent=2, default=str))
        return
    table = Table("Version", "Description", "Status", "Progress", "Rows", "Shards done")
    for i in items:
        pct = "unknown" if i["progress_percent"] is None else f"{i['progress_percent']:.1f}%"
        table.add_row(str(i["migration_version"]), i["description"], i["status"], pct, f"{i['rows_processed']:,}",
                      f"{len(i['shards_completed'])}/{i['shards_total']}")
    Console(width=160).print(table)


SHARD_OPTIONS = [click.option("--shard", type=click.IntRange(min=1), default=None, metavar="K",
                              help="on shards: run only shard K (its lease keeps a second runner off it)"),
                 click.option("--parallel", type=click.IntRange(min=1), default=None, metavar="N",
                              help="on shards: walk at most N shards at once (default: every shard)")]


def shard_options(command):
    for option in reversed(SHARD_OPTIONS):
        command = option(command)
    return command


@contextlib.contextmanager
def _plugin_contexts(app: App, version: int, options: dict):
    """What plugins hold while the run lasts (`backfill_run_context`: e.g. the metrics endpoint), on shards
    too (one endpoint for every walk: each series carries its shard label)."""
    meta = find_spec(Path(app.migrations_dir), version).meta
    view = BackfillView(backfill_id(app.database, version), version, app.database, meta)
    with contextlib.ExitStack() as held:
        for ctx in pm.hook.backfill_run_context(backfill=view, options=options):
            if ctx is not None:
                held.enter_context(ctx)
        yield


def _run(app: App, version: int, resume: bool, options: dict | None = None, **kwargs) -> None:
    mgr = manager(app)
    tty = sys.stdout.isatty()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
                        TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(),
                        TextColumn("batch {task.fields[size]}"), disable=not tty)
    task = None

    def on_throttle(throttle):
        if tty and task is not None:
            progress.update(task, description=f"backfill {version} [yellow]throttled" if throttle else f"backfill {version}")
        if throttle is not None:
            click.echo(f"throttled: {throttle.reason}; no batch starts until it clears", err=True)
        else:
            click.echo("throttle cleared; going on", err=True)

    def on_batch(summary, event):
        nonlocal task
        summary = status_.after_batch(summary, event)
        if tty:
            total = summary["rows_processed"] + (summary["rows_remaining"] or 0)
            if task is None:
                task = progress.add_task(f"backfill {version}", total=total, rate="-", size="-")
            progress.update(task, completed=summary["rows_processed"], total=total,
                            rate=_fmt(summary["rows_per_second"], "-"), size=summary["current_batch_size"])
        else:
            click.echo(f"batch {event['number']}: {event['rows']} rows in {event['seconds']}s, "
                       f"total {summary['rows_processed']:,} ({_fmt(summary['progress_percent'])}%), "
                       f"{_fmt(summary['rows_per_second'])} rows/s, eta {_secs(summary['eta_seconds'])}, "
                       f"next batch size {summary['current_batch_size']}")

    started = time.time()
    with Signals("stopping after the current batch (send again to stop now; the interrupted batch is replayed "
                 "on resume)", f"stopped inside a batch; its range is replayed on resume. Resume with 'migrate "
                 f"backfill resume {version}'", mgr.request_stop, mgr.abandon_batch) as signals, \
            _plugin_contexts(app, version, options or {}), progress:
        call = mgr.resume_backfill if resume else mgr.run_backfill
        result = call(app.database, version, on_batch=on_batch, on_throttle=on_throttle, **kwargs)
    elapsed = time.time() - started
    stopped = result.get("stopped")
    if stopped == "repaired":
        fixed = result["repair"]
        click.echo(f"backfill {version}: range {json.dumps(fixed['start'])}..{json.dumps(fixed['end'])} replayed, "
                   f"{fixed['rows_processed']:,} source rows in {fixed['batches_completed']} batches, {elapsed:.1f}s; "
                   f"the backfill is {result['status']} again")
        return
    why = f" ({stopped})" if stopped and stopped != result["status"] else ""
    done = " (100%)" if result["status"] == "completed" else ""  # known done: exact, not an estimate
    click.echo(f"backfill {version}: {result['status']}{why}; {result['rows_processed']:,} rows processed{done}, "
               f"{result['batches_completed']} batches, batch size {result['current_batch_size']}, {elapsed:.1f}s")
    if stopped == "stop requested":
        click.echo(f"paused at a batch boundary; resume with 'migrate backfill resume {version}'", err=True)
        sys.exit(signals.exit_code)
    if stopped in ("paused", "max batches"):
        click.echo(f"resume with 'migrate backfill resume {version}'")
    if stopped == "lease lost":
        raise BackfillError(f"backfill {version}: another runner took over the lease; this one stopped")


PACING_HELP = {
    "target_batch_seconds": "adapt the batch size so a batch takes about this long (or off)",
    "max_batch_size": "upper bound for the adaptive batch size",
    "max_rows_per_second": "ceiling on the average rate, source rows per second (or off)",
    "max_target_parts": "wait while a target partition has more active parts (auto: parts_to_delay_insert; off)",
    "max_pending_mutations": "wait while more mutations are pending on the target (or off)",
    "max_replica_delay_seconds": "wait while a replica of the target lags more (or off)",
}


def pacing_options(command):
    """`--target-batch-seconds`, `--max-rows-per-second` and the health limits, for this run only."""
    for field in reversed(PACING):
        command = click.option("--" + field.replace("_", "-"), field, default=None, metavar="VALUE",
                               help=PACING_HELP[field])(command)
    return command


def add_plugin_options() -> None:
    """The options plugins add to `run` and `resume` (`backfill_run_options`), added once; their values reach
    `backfill_run_context`, not the pacing."""
    if hasattr(run, "plugin_options"):
        return
    run.plugin_options = resume.plugin_options = []
    for options in pm.hook.backfill_run_options():
        for option in options or []:
            run.params.append(option)
            resume.params.append(option)
            run.plugin_options.append(option.name)


def _plugin_values(values: dict) -> dict:
    """Take the plugin options' values out of the command's keyword arguments."""
    return {name: values.pop(name) for name in getattr(run, "plugin_options", []) if name in values}


def _pacing(values: dict) -> dict:
    """Command-line pacing values, checked like the meta's (one line naming the option)."""
    out = {}
    for field, text in values.items():
        if text is not None:
            try:
                out[field] = parse_override(field, text)
            except ValueError as exc:
                raise BackfillError(str(exc)) from None
    return out


def _params(values) -> dict:
    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="--param")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


@backfill.command()
@click.argument("version", type=int)
@click.option("--max-batches", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="override the current batch size")
@click.option("--param", "params", multiple=True, help="key=value; fixes a param on the first run")
@click.option("--dry-run", is_flag=True, help="show scope, first range and SQL; write nothing")
@click.option("--range", "key_range", metavar="START..END", default=None,
              help="replay only the keys in (START, END], JSON arrays as 'position' shows them (either may be "
                   "empty: open)")
@click.option("--yes", is_flag=True, help="with --range: confirm a range that replays every key of the source")
@click.option("--exact", is_flag=True, help="count the remaining source rows for progress instead of estimating")
@pacing_options
@shard_options
@pass_app
def run(app: App, version, max_batches, batch_size, params, dry_run, key_range, yes, exact, shard, parallel,
        **pacing):
    """Run (or continue) a backfill until it completes, or replay one key range of it."""
    shards.refuse_shard_option(app, shard)
    key_range = repair.parse(key_range, whole=yes) if key_range is not None else None
    if shards.shard_map(app) is not None:
        kwargs = dict(batch_size=batch_size, params=_params(params), exact=exact)
        if dry_run:
            return shards.dry_run(app, version, shard, dict(kwargs, key_range=key_range), _print_dry_run)
        with _plugin_contexts(app, version, _plugin_values(pacing)):
            return shards.run(app, version, shard, parallel, dict(
                kwargs, max_batches=max_batches, key_range=key_range, pacing=_pacing(pacing)))
    options = _plugin_values(pacing)
    if dry_run:
        _print_dry_run(version, manager(app).run_backfill(app.database, version, batch_size=batch_size,
                                                          params=_params(params), dry_run=True, exact=exact,
                                                          key_range=key_range))
        return
    _run(app, version, resume=False, max_batches=max_batches, batch_size=batch_size, params=_params(params),
         exact=exact, key_range=key_range, pacing=_pacing(pacing), options=options)


def _print_dry_run(version: int, out: dict) -> None:
    """Scope, the first batch's range, the params and the exact SQL of `run --dry-run`."""
    about = "about " if out["rows_remaining_estimated"] else ""
    fixing = out.get("repair")
    if fixing:  # a repair walks its own range; the backfill's position does not move
        click.echo(f"backfill {version}: status {out['status']}; repair of the range "
                   f"{_range_text(fixing['start'], fixing['end'])}, {about}{out['rows_remaining']:,} source rows "
                   f"left in it (replayed: rows the target holds are skipped)")
    else:
        click.echo(f"backfill {version}: status {out['status']}, {about}{out['rows_remaining']:,} source rows past "
                   f"the position")
    fb = out["first_batch"]
    if fb is None:
        click.echo("nothing left to do")
        return
    after = "from the start" if fb["start"] is None else f"after {fb['start']}"
    click.echo(f"first batch: {after} up to and including {fb['end']} ({fb['rows']:,} rows)")
    fixed = "fixed" if out["status"] not in ("pending", "not registered") else "preview; fixed at first start"
    click.echo(f"params ({fixed}): {json.dumps(out['checkpoint'].get('params') or {}, default=str)}")
    if out.get("sql_parameters"):
        click.echo(f"bound server-side: {json.dumps(out['sql_parameters'], default=str)}")
    click.echo("-- rendered SQL")
    click.echo(out["sql"])


@backfill.command()
@click.argument("version", type=int)
@click.option("--max-batches", type=click.IntRange(min=1), default=None)
@pacing_options
@shard_options
@pass_app
def resume(app: App, version, max_batches, shard, parallel, **pacing):
    """Continue a paused or failed backfill from its checkpoint."""
    shards.refuse_shard_option(app, shard)
    if shards.shard_map(app) is not None:
        with _plugin_contexts(app, version, _plugin_values(pacing)):
            return shards.run(app, version, shard, parallel, dict(max_batches=max_batches, pacing=_pacing(pacing)))
    if _held_by_other(app):  # the store's holder runs it (nothing to resume) or another one: one line either way
        bid, owner = backfill_id(app.database, version), connection.store_owner(app.target) or {}
        info = control_for(app).live(bid, owner)
        raise BackfillError(f"backfill {bid} is {info.get('status')} in runner pid {owner.get('pid')}; nothing to "
                            f"resume while it holds the store")
    options = _plugin_values(pacing)
    _run(app, version, resume=True, options=options, max_batches=max_batches, pacing=_pacing(pacing))


def _held_by_other(app: App) -> bool:
    """True when an embedded store is open in another process (then only the control channel works)."""
    if not app.target.embedded:
        return False
    try:
        app.client  # noqa: B018 - opening the store is the test
        return False
    except connection.StoreHeld:
        return True


@backfill.command()
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.option("--exact", is_flag=True, help="count remaining source rows instead of estimating them from the index")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="redraw every SECONDS (default 2) until the backfill stops; exit 0 completed, "
                                       "3 paused, 4 failed (put it after VERSION)")
@pass_app
def status(app: App, version, as_json, exact, watch):
    """Position, rows, batch size, progress, rate, ETA, last error and lease."""
    if shards.shard_map(app) is not None:
        doc = shards.status_doc(app, version, exact)
        return click.echo(json.dumps(doc, indent=2, default=str)) if as_json else shards.print_status(doc)
    if watch is not None:
        sys.exit(_watch(app, version, exact, watch))
    info = _status_info(app, version, exact)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(_status_text(info))


WATCH_EXIT = {"completed": 0, "paused": 3, "failed": 4}  # how `status --watch` ends: the backfill's outcome


def _watch(app: App, version: int, exact: bool, seconds: float) -> int:
    """Redraw the status until the backfill is completed, paused or failed; on a terminal in place (rich Live),
    otherwise as plain blocks, one each time it changed."""
    managers = []  # one manager for the whole watch (each opens a handle on an embedded store)
    info = _status_info(app, version, exact, managers)
    if sys.stdout.isatty():
        with Live(Text(_status_text(info)), console=Console(), auto_refresh=False) as live:
            while info["status"] not in WATCH_EXIT:
                time.sleep(seconds)
                info = _status_info(app, version, exact, managers)
                live.update(Text(_status_text(info)), refresh=True)
    else:
        shown = None
        while True:
            text = _status_text(info)
            if text != shown:
                click.echo(text + "\n")
                shown = text
            if info["status"] in WATCH_EXIT:
                break
            time.sleep(seconds)
            info = _status_info(app, version, exact, managers)
    click.echo(f"backfill {version}: {info['status']}")
    return WATCH_EXIT[info["status"]]


def _status_info(app: App, version: int, exact: bool, managers: list | None = None) -> dict:
    """The status document, from the tracking table, or from the runner's live file while it holds the store.
    `managers` keeps the one manager of a watch."""
    if _held_by_other(app):  # the live file of the backfill named, when the holder runs it; else one line
        info = control_for(app).live(backfill_id(app.database, version), connection.store_owner(app.target) or {})
        info["source"] = "control channel (live file written by the runner each batch)"
    else:
        mgr = managers[0] if managers else manager(app)
        if managers is not None and not managers:
            managers.append(mgr)
        info = mgr.get_status(app.database, version, exact=exact)
        info["source"] = "tracking table"
        info["history"] = history_.read(app.client, app.database, version, last=STATUS_HISTORY)
    return info


STATUS_HISTORY = 5  # the last events `status` shows (`history` shows more)


def _status_text(info: dict) -> str:
    state = f"{info['status']} (throttled)" if info.get("throttled") else info["status"]
    rows = [("backfill", info["backfill_id"]), ("status", state),
            ("position", json.dumps(info["position"], ensure_ascii=False)),
            ("rows processed", f"{info['rows_processed']:,}"), ("batches", info["batches_completed"]),
            ("batch size", f"{info['current_batch_size']}" + (f" ({info['batch_size_reason']})" if info.get("batch_size_reason") else "")),
            ("throttled", _throttled(info)),
            ("progress", _progress(info)), ("remaining", _remaining(info)),
            ("rate", f"{_fmt(info['rows_per_second'])} rows/s"), ("eta", _secs(info["eta_seconds"])),
            ("started", _fmt(info["started_at"], "-")), ("updated", _fmt(info["updated_at"], "-")),
            ("last error", _fmt(info["error_log"], "-")), ("lease", _fmt((info.get("lease") or {}).get("owner"), "-")),
            ("params", json.dumps((info.get("checkpoint") or {}).get("params"))),
            ("published", _published(info) + (f" ({info['publish_mode']} mode)" if info.get("publish_mode") else "")),
            ("source", info["source"])]
    lines = [f"{key:15} {value}" for key, value in rows]
    if info.get("history"):
        lines.append("recent batches  (migrate backfill history for more)")
        lines += [f"  {_event_line(e)}" for e in info["history"]]
    return "\n".join(lines)


def _event_line(e: dict) -> str:
    """One history event as a line: when, which batch and attempt, what happened, rows, size, time, range."""
    if e["outcome"] == "throttled":
        return f"{e['started_at']}  before batch {e['batch_number']}: throttled {e['seconds']}s ({e['signal']}: {e['error']})"
    note = (" replay" if e["replay"] else "") + (f" ({e['error']})" if e["error"] else "")
    return (f"{e['started_at']}  batch {e['batch_number']} attempt {e['attempt']}: {e['outcome']}, {e['rows']:,} rows "
            f"(size {e['batch_size']}) in {e['seconds']}s, {_range_text(e['range_start'], e['range_end'])}{note}")


@backfill.command()
@click.argument("version", type=int)
@click.option("--last", type=click.IntRange(min=0), default=50, show_default=True, help="the newest N events (0: all)")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def history(app: App, version, last, as_json):
    """What each batch did: every attempt (committed, retried, halved, failed, refused, replayed), throttle waits."""
    if _held_by_other(app):
        raise BackfillError(f"the store is held by another process (the runner); read the history of backfill "
                            f"{backfill_id(app.database, version)} once it stops, or follow it with 'status --watch'")
    info = manager(app).get_status(app.database, version, live_counts=False)
    events = history_.read(app.client, app.database, version, last or None)
    totals = history_.totals(app.client, app.database, version, (info.get("checkpoint") or {}).get("started_at"))
    if as_json:
        click.echo(json.dumps({"backfill_id": info["backfill_id"], "status": info["status"],
                               "rows_processed": info["rows_processed"], **totals, "events": events}, indent=2,
                              default=str))
        return
    if not events:
        click.echo(f"no batch history recorded for backfill {info['backfill_id']}")
        return
    for e in events:
        click.echo(_event_line(e))
    attempts = ", ".join(f"{n} {o}" for o, n in sorted(totals["attempts"].items()))
    click.echo(f"since the backfill started: {attempts or 'no attempts'}; {totals['committed_rows']:,} source rows in "
               f"{totals['committed_ranges']} committed ranges (a replayed range counted once); rows processed "
               f"{info['rows_processed']:,}")


@backfill.command()
@click.argument("version", type=int)
@pass_app
@shards.fan_out("pause")
def pause(app: App, version):
    """Stop a running backfill at its next batch boundary."""
    bid = backfill_id(app.database, version)
    if _held_by_other(app):  # only the backfill the holder runs now; any other is refused in one line
        owner = connection.store_owner(app.target) or {}
        control_for(app).request_pause(bid, owner)
        click.echo(f"pause requested for {bid}; runner pid {owner.get('pid', '?')} stops at the next batch boundary")
        return
    manager(app).pause_backfill(app.database, version)
    click.echo(f"paused {bid} (a running runner stops at its next batch boundary)")


@backfill.command()
@click.argument("version", type=int)
@click.option("--yes", is_flag=True, help="confirm: progress is forgotten")
@pass_app
@shards.fan_out("reset")
def reset(app: App, version, yes):
    """Forget a backfill's progress so that the next run starts from the beginning."""
    if not yes:
        raise BackfillError(f"reset forgets all progress of backfill {version}; add --yes to confirm")
    mgr = manager(app)
    refuse_reset_if_published(mgr, app.database, version)
    mgr.reset_backfill(app.database, version)
    click.echo(f"reset {backfill_id(app.database, version)} to pending")


def _range_text(start, end) -> str:
    after = "from the first key" if start is None else f"after {json.dumps(start, ensure_ascii=False)}"
    if end is None:  # the last range of a validation: past the last source key too
        return f"{after} to the end of the key space"
    return f"{after} up to and including {json.dumps(end, ensure_ascii=False)}"


def _print_validation(version: int, out: dict) -> None:
    """The per-check totals and the first differing ranges, with the command that repairs each."""
    table = Table("Check", "Expected", "Actual", "Failed ranges", "Result")
    for c in out["checks"]:
        table.add_row(c["check"], str(c["expected"]), str(c["actual"]), str(c["ranges_failed"]),
                      "ok" if c["ok"] else "MISMATCH")
    Console(width=160).print(table)
    shown = out["differing_ranges"][:5]
    if shown:
        click.echo(f"differing ranges: {out['differing_ranges_total']}; the first {len(shown)} "
                   f"(start exclusive, end inclusive):")
    for d in shown:
        click.echo(f"- {_range_text(d['start'], d['end'])} ({d['rows']:,} source rows): " + "; ".join(
            f"{c['check']} expected {c['expected']} actual {c['actual']}" for c in d["checks"] if not c["ok"]))
        click.echo(f"  repair: {d['repair']}")
    for row in out["once"]:
        if not row["ok"]:
            click.echo(f"- whole table (runs once): {row['check']} expected {row['expected']} actual {row['actual']}")
    if out["differing_ranges_total"] > len(shown):
        click.echo(f"... and {out['differing_ranges_total'] - len(shown)} more differing ranges (see --json)")


@backfill.command()
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True, help="print the result document")
@click.option("--range-rows", type=click.IntRange(min=1), default=None,
              help="source rows per range (default 500000, or the stored validation's when resuming)")
@click.option("--restart", is_flag=True, help="start over instead of resuming a stopped validation")
@pass_app
@shards.fan_out("validate")
def validate(app: App, version, as_json, range_rows, restart):
    """Validate a backfill range by range (resumable); exit non-zero on any mismatch."""
    v = Validation(manager(app), app.database, version, range_rows, restart)
    say = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    st = v.state
    if v.note:
        say(f"validation of backfill {version}: {v.note}")
    if v.resumed:
        say(f"resuming the validation of backfill {version} after {json.dumps(st['position'], ensure_ascii=False)} "
            f"({st['ranges_checked']} ranges, {st['rows_walked']:,} source rows already checked; --restart to start over)")
    if v.limit is not None:
        say(f"backfill {version} is {v.basis['status']}: validating only up to its position "
            f"{json.dumps(v.limit, ensure_ascii=False)}")
    tty = (sys.stderr if as_json else sys.stdout).isatty()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"), TimeRemainingColumn(),
                        TextColumn("{task.fields[diff]} differing"),
                        console=Console(stderr=as_json), disable=not tty)
    task = progress.add_task(f"validate {version}", total=max(v.estimate, st["rows_walked"], 1),
                             completed=st["rows_walked"], diff=st["differences_total"])
    started, walked_before = time.time(), st["rows_walked"]

    def on_range(val, rng):
        total = max(val.estimate, val.state["rows_walked"])
        if tty:
            progress.update(task, completed=val.state["rows_walked"], total=total, diff=val.state["differences_total"])
            return
        rate = (val.state["rows_walked"] - walked_before) / max(time.time() - started, 1e-6)
        eta = max(total - val.state["rows_walked"], 0) / rate if rate else None
        say(f"range {val.state['ranges_checked']}: {rng['rows']:,} rows {'ok' if rng['ok'] else 'DIFFERS'}, "
            f"total {val.state['rows_walked']:,} of about {total:,} "
            f"({100 * val.state['rows_walked'] / max(total, 1):.1f}%), eta {_secs(eta)}, "
            f"{val.state['differences_total']} differing")

    with Signals("stopping after the current range (send again to stop now)",
                 f"stopped inside a range; resume with 'migrate backfill validate {version}'") as signals, progress:
        out = v.run(on_range, signals.stop_requested)
    if out["stopped"]:
        if as_json:
            click.echo(json.dumps(out, indent=2, default=str))
        click.echo(f"validation of backfill {version} stopped after {out['ranges_checked']} ranges "
                   f"({out['rows_walked']:,} source rows); position saved; resume with "
                   f"'migrate backfill validate {version}'", err=True)
        sys.exit(signals.exit_code)
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        _print_validation(version, out)
    scope = "" if out["scope_end"] is None else f", up to position {json.dumps(out['scope_end'], ensure_ascii=False)}"
    if not out["ok"]:
        failed = [c["check"] for c in out["checks"] if not c["ok"]]
        raise BackfillError(f"validation of backfill {version} failed: {', '.join(failed)} "
                            f"({out['differing_ranges_total']} differing ranges{scope})")
    click.echo(f"validation of backfill {version} passed ({len(out['checks'])} checks, {out['ranges_checked']} "
               f"ranges, {out['rows_walked']:,} source rows{scope})", err=as_json)


backfill.add_command(publish)
backfill.add_command(unpublish)
