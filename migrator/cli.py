"""`migrate`: global options, the core commands, and the commands plugins add."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from . import connection, transport
from .discovery import next_migration_number
from .errors import MigrateError, one_line
from .plugins import describe, load_plugins, pm
from .runner import Context, Migrator
from .sqltext import check_identifier


class App:
    """Resolved global options plus a lazily opened client (status and pause may never open it)."""

    def __init__(self, url, database, migrations_dir, cluster, debug, shards=None):
        self.url, self.database, self.cluster, self.debug = url, database, cluster, debug
        self.shards = shards  # --shards text; migrator/shards.py reads it (and --cluster) into the shard map
        self.migrations_dir = Path(migrations_dir)
        self._target = None
        self._client = None

    @property
    def target(self) -> connection.Target:
        if self._target is None:
            self._target = connection.resolve(self.url)
        return self._target

    @property
    def client(self):
        if self._client is None:
            check_identifier(self.database)
            self._client = connection.connect(self.target, sys.argv)
        return self._client

    def context(self, dry_run: bool = False) -> Context:
        return Context(client=self.client, database=check_identifier(self.database),
                       migrations_dir=self.migrations_dir, cluster=self.cluster, dry_run=dry_run,
                       echo=click.echo, extra={"app": self})

    def migrator(self, dry_run: bool = False) -> Migrator:
        return Migrator(self.context(dry_run))


def global_options(func):
    """The options every entry point (`migrate`, `python -m backfill_plugin`) accepts."""
    @click.option("--url", envvar="CLICKHOUSE_URL", default=None,
                  help="chdb:///abs/path (embedded, default ./.chdb) or http(s)://user@host:port")
    @click.option("--database", "-d", envvar="MIGRATE_DATABASE", default="default", show_default=True)
    @click.option("--migrations-dir", envvar="MIGRATE_DIR", default="migrations", show_default=True)
    @click.option("--cluster", envvar="MIGRATE_CLUSTER", default=None, help="ON CLUSTER name; replicated engines")
    @click.option("--shards", envvar="MIGRATE_SHARDS", default=None, metavar="URL,URL,...",
                  help="one http(s) URL per shard, replicas of a shard separated by '|'")
    @click.option("--debug", is_flag=True, envvar="MIGRATE_DEBUG", help="show tracebacks")
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx, url, database, migrations_dir, cluster, shards, debug, **kwargs):
        ctx.obj = App(url, database, migrations_dir, cluster, debug, shards)
        return ctx.invoke(func, **kwargs)
    return wrapper


pass_app = click.make_pass_decorator(App)


@click.group()
@global_options
def cli():
    """ClickHouse schema migrations with resumable backfills."""


@cli.command()
@click.option("--to", type=int, default=None, help="stop after this version")
@click.option("--allow-missing", is_flag=True,
              help="also apply versions below the current one that were never applied (in version order)")
@click.option("--dry-run", is_flag=True, help="print the SQL, change nothing")
@pass_app
def up(app: App, to, allow_missing, dry_run):
    """Apply pending migrations."""
    if app.shards:
        from . import sharded
        applied = [v for done in sharded.up(app, to, dry_run, click.echo, allow_missing) for v in done]
    else:
        applied = app.migrator(dry_run).up(to, allow_missing)
        if app.cluster and not dry_run:
            from . import sharded
            sharded.after_cluster_up(app, applied, click.echo)
    if not dry_run and not applied:
        click.echo("nothing to apply")


@cli.command()
@click.option("--to", type=int, required=True, help="roll back every version above this one")
@click.option("--dry-run", is_flag=True, help="print the SQL, change nothing")
@pass_app
def down(app: App, to, dry_run):
    """Roll back migrations above --to."""
    if app.shards:
        from . import sharded
        done = [v for vs in sharded.down(app, to, dry_run, click.echo) for v in vs]
    else:
        done = app.migrator(dry_run).down(to)
    if not dry_run and not done:
        click.echo("nothing to roll back")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_app
def status(app: App, as_json):
    """Applied version, pending versions and the dirty flag."""
    if app.shards:
        from . import sharded
        return _print_shard_status(app, sharded.status(app), as_json)
    st = app.migrator().status()
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(f"database:  {st['database']}")
    click.echo(f"version:   {st['current_version']}" + ("  (DIRTY: partially applied "
                                                         f"{st['partially_applied_version']})" if st["dirty"] else ""))
    click.echo(f"pending:   {', '.join(map(str, st['pending_versions'])) or 'none'}")
    if st["missing_versions"]:  # below the current version, never applied: `up` refuses to skip them silently
        missing = ", ".join(map(str, st["missing_versions"]))
        click.echo(f"missing:   {missing} (never applied, below version {st['current_version']}; "
                   f"'migrate up --allow-missing' applies, 'migrate force {st['missing_versions'][0]}' marks applied)")
    if app.cluster and not app.target.embedded:
        from .shards import describe, for_app
        mapped = for_app(app)
        for line in describe(mapped) if mapped else []:
            click.echo(line)


def _print_shard_status(app: App, doc: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(doc))
        return
    from .shards import describe, for_app
    for line in describe(for_app(app)):
        click.echo(line)
    click.echo(f"database:  {doc['database']}")
    for e in doc["shards"]:
        if "error" in e:
            click.echo(f"shard {e['shard']} ({e['url']}): unreachable: {e['error']}")
            continue
        dirty = f"  (DIRTY: partially applied {e['partially_applied_version']})" if e["dirty"] else ""
        click.echo(f"shard {e['shard']} ({e['url']}): version {e['current_version']}{dirty}, pending "
                   f"{', '.join(map(str, e['pending_versions'])) or 'none'}")
    if not doc["agree"]:
        click.echo(f"the shards disagree (versions {', '.join(map(str, doc['current_versions']))}); "
                   f"'migrate up' with the same shards brings each one to the latest")


@cli.command()
@click.argument("version", type=int)
@pass_app
def force(app: App, version):
    """Mark VERSION as applied and clear the dirty flag (after a manual repair)."""
    if app.shards:
        from . import sharded
        sharded.force(app, version, click.echo)
        click.echo(f"forced {app.database} to version {version} on every shard")
        return
    st = app.migrator().force(version)
    marked = f"; version {version} marked applied (its up file was not run)" if st.curr_version != version else ""
    click.echo(f"forced {app.database} to version {st.curr_version}{marked}")


@cli.command()
@pass_app
def adopt(app: App):
    """Take over the tracking state another migrator wrote in db_management (idempotent)."""
    from .adopt import adopt as run_adopt
    for line in run_adopt(app.client, app.cluster):
        click.echo(line)


@cli.command()
@click.argument("name")
@click.option("--backfill", is_flag=True, help="also scaffold .backfill.sql, .backfill.meta and .backfill.validate.sql")
@click.option("--rebuild", "table", metavar="TABLE", default=None,
              help="with --backfill: rebuild TABLE online (staging table from its definition, copy, validate, publish)")
@click.option("--from", "source", metavar="TABLE", default=None,
              help="with --backfill: copy TABLE into a new table NAME (TABLE's columns and sorting key, a dedup "
                   "window; SQL, meta and validation by its key, ready to run)")
@pass_app
def new(app: App, name, backfill, table, source):
    """Scaffold NNN_NAME files with the next version."""
    from .scaffold import scaffold, table_definition
    if table is not None and source is not None:
        raise MigrateError("--rebuild and --from exclude each other: a rebuild replaces TABLE, --from copies it "
                           "into a new table NAME")
    found = {}
    for option, what, needs in (("--rebuild", table, "the rebuild is a backfill into a staging table"),
                                ("--from", source, "the copy is a backfill into the new table")):
        if what is None:
            continue
        if not backfill:
            raise MigrateError(f"{option} needs --backfill: {needs}")
        # The definition comes through the migrator's own client: no import of the backfill plugin.
        found[option] = {"table": what, "definition": table_definition(
            app.client, check_identifier(app.database), check_identifier(what, "table"), option)}
    for path in scaffold(app.migrations_dir, next_migration_number(app.migrations_dir), name, backfill,
                         found.get("--rebuild"), found.get("--from")):
        click.echo(f"created {path}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json):
    """Installed plugins and the hooks they implement."""
    info = describe()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for p in info:
        click.echo(f"{p['name']}: {', '.join(p['hooks']) or '(no hooks)'}")


class _RedactedRecord(logging.LogRecord):
    """A log record whose message passes through redact(): a driver's or a retry's line may quote a URL."""

    def getMessage(self) -> str:  # noqa: N802 - logging's name
        return connection.redact(super().getMessage())


def redact_logs() -> None:
    """Every log line of this process, from any logger, with URL passwords masked."""
    logging.setLogRecordFactory(_RedactedRecord)


def _debug_exit(exc: BaseException) -> None:
    """--debug: the traceback, masked like every other message (an exception's text may quote a URL)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    click.echo(connection.redact(text), err=True, nl=False)
    sys.exit(1)


def run(group: click.Group, argv=None) -> None:
    """Run a click group with the project's error contract: one line on stderr, no traceback."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("MIGRATE_DEBUG")
    redact_logs()
    if not debug:  # the driver logs its own copy of a connection error; ours is the one line
        logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    try:
        group.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MigrateError as exc:
        if debug:
            _debug_exit(exc)
        click.echo(f"error: {connection.redact(str(exc))}", err=True)
        sys.exit(1)
    except Exception as exc:  # an unexpected failure still gets one line unless --debug
        if debug:
            _debug_exit(exc)
        kind = "" if transport.cause(exc) else f"{type(exc).__name__}: "  # "network error: ..." names itself
        click.echo(f"error: {kind}{connection.redact(one_line(exc))} (rerun with --debug for details)", err=True)
        sys.exit(1)


_commands_added = False


def build() -> click.Group:
    """Load plugins and let them add their commands, once."""
    global _commands_added
    load_plugins()
    if not _commands_added:
        _commands_added = True
        pm.hook.register_commands(cli=cli)
    return cli


def main(argv=None) -> None:
    """The `migrate` console script: plugins loaded first, then the one-line error contract."""
    try:
        group = build()
    except Exception as exc:
        if os.environ.get("MIGRATE_DEBUG") or "--debug" in sys.argv:
            raise
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # pluggy's are multi-line
        click.echo(f"error: loading plugins failed: {detail or type(exc).__name__}", err=True)
        sys.exit(1)
    run(group, argv)
