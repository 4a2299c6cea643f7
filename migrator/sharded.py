"""`migrate up/down/status/force` with `--shards`: the single-server Migrator on each shard in turn.

Each shard's tracking table records its own version, so a re-run continues where each shard stands;
`up` stops at the first shard that fails and names it. With `--cluster` the DDL goes ON CLUSTER
through `--url` as on one server, then every shard's tracking table is brought to the version and
the applied versions' hooks (backfill registration) run once per shard, on that shard.
"""

from __future__ import annotations

import sys

from . import connection, shards, tracking
from .errors import MigrateError
from .plugins import pm
from .runner import Context, Migrator


def shard_context(app, shard: shards.Shard, dry_run: bool = False, echo=print) -> Context:
    """The context of one shard: its own client and target, no ON CLUSTER."""
    client = shard.client or shards.connect(shard, sys.argv)
    return Context(
        client=client,
        database=app.database,
        migrations_dir=app.migrations_dir,
        cluster=None,
        dry_run=dry_run,
        echo=lambda line: echo(f"{shard.label}: {line}"),
        extra={"app": app, "shard": shard, "target": connection.resolve(shard.url)},
    )


def _each(app, step, verb: str, dry_run: bool = False, echo=print) -> list:
    """`step(migrator, shard)` on each shard in turn; the first failure stops and names its shard."""
    out = []
    mapped = shards.for_app(app)
    for i, shard in enumerate(mapped):
        try:
            migrator = Migrator(shard_context(app, shard, dry_run, echo))
            out.append(step(migrator, shard))
        except MigrateError as exc:
            done = f"shards {', '.join(str(s.num) for s in mapped[:i])} are done; " if i else ""
            raise MigrateError(
                f"{verb} stopped at shard {shard.num} ({connection.redact(shard.url or shard.replicas[0])}): "
                f"{exc}. {done}re-run 'migrate {verb}' to continue where each shard stands"
            ) from exc
    return out


def up(app, to, dry_run: bool, echo=print, allow_missing: bool = False) -> list[list[int]]:
    """Apply pending versions on each shard in turn (versions applied, per shard)."""
    return _each(app, lambda m, s: m.up(to, allow_missing), "up", dry_run, echo)


def down(app, to, dry_run: bool, echo=print) -> list[list[int]]:
    return _each(app, lambda m, s: m.down(to), "down", dry_run, echo)


def force(app, version: int, echo=print) -> None:
    _each(app, lambda m, s: m.force(version), "force", echo=echo)


def status(app) -> dict:
    """Each shard's status document, and whether the shards agree (an unreachable shard is reported, not fatal)."""
    entries = []
    for shard in shards.for_app(app):
        entry = {"shard": shard.num, "url": connection.redact(shard.url or shard.replicas[0])}
        try:
            entry.update(Migrator(shard_context(app, shard)).status())
        except MigrateError as exc:
            entry["error"] = str(exc)
        entries.append(entry)
    versions = {(e.get("current_version"), e.get("dirty")) for e in entries if "error" not in e}
    agree = len(versions) <= 1 and all("error" not in e for e in entries)
    return {
        "database": app.database,
        "shards": entries,
        "agree": agree,
        "current_versions": sorted({e["current_version"] for e in entries if "error" not in e}),
    }


def after_cluster_up(app, applied: list[int], echo=print) -> None:
    """--cluster on several shards: the DDL went ON CLUSTER through --url; bring every shard's tracking
    table to the version and run each applied version's hooks there (registration in each shard's table)."""
    mapped = shards.for_app(app)
    if not mapped or not applied:
        return
    migrations = Migrator(
        Context(
            client=app.client, database=app.database, migrations_dir=app.migrations_dir, cluster=app.cluster, echo=echo
        )
    ).migrations
    state = tracking.read_state(app.client, app.database)
    for shard in mapped:
        ctx = shard_context(app, shard, echo=echo)
        if tracking.read_state(ctx.client, app.database).curr_version < state.curr_version:
            tracking.ensure_schema(ctx.client)
            tracking.ensure_applied_column(ctx.client)
            tracking.write_state(ctx.client, app.database, state)
        for version in applied:
            mig = migrations[version]
            if mig.has_backfill:
                for line in pm.hook.register_backfill(context=ctx, migration=mig):
                    if line:
                        ctx.echo(line)
