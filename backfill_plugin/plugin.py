"""The backfill plugin, registered through the `migrator` entry point like any third-party plugin."""
from __future__ import annotations

from migrator import hookimpl

from . import hookspecs

NAME = "backfill"  # the entry point's name; library use registers the module under it too


@hookimpl
def add_hookspecs(pm):
    """Our own extension points live on the same manager as the migrator's."""
    pm.add_hookspecs(hookspecs)


def manager_for(context):
    """A manager bound to the migrator's run context (client, migrations dir, cluster, control channel)."""
    from .manager import ClickHouseBackfillManager
    app = context.extra.get("app")
    return ClickHouseBackfillManager(context.client, migrations_dir=context.migrations_dir,
                                     cluster=context.cluster, control=getattr(app, "control", None))


@hookimpl
def register_commands(cli):
    from .cli import backfill
    cli.add_command(backfill)


@hookimpl
def check_migrations(context, migrations):
    """A bad backfill meta or SQL file stops `up` before the schema is touched, not after."""
    from .meta import load_spec
    from .render import read_template
    for migration in migrations:
        if migration.has_backfill:
            read_template(load_spec(migration).sql_path)


@hookimpl
def register_backfill(context, migration):
    """Each newly applied version with backfill files gets a pending row; run_on_startup ones run now."""
    if context.dry_run:
        return None
    lines = manager_for(context).register_pending_backfills(context.database, [migration.version])
    return "\n".join(lines) or None


@hookimpl
def after_migration_rolled_back(context, migration):
    """Rolling a version back resets its backfill, so a later `up` starts it from zero."""
    if migration.has_backfill:
        manager_for(context).reset_backfill(context.database, migration.version, keep_params=False)
