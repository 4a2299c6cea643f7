"""The backfill plugin, registered through the `migrator` entry point like any third-party plugin."""
from __future__ import annotations

from migrator import hookimpl

from . import hookspecs

NAME = "backfill"  # the entry point's name; library use registers the module under it too


@hookimpl
def add_hookspecs(pm):
    """Our own extension points live on the same manager as the migrator's."""
    pm.add_hookspecs(hookspecs)


def manager_for(client, migrations_dir, cluster=None, target=None):
    """The one way hooks and CLI build a manager: an embedded store also gets its control channel,
    so `backfill status` and `pause` from another terminal reach a run inline in `migrate up` too."""
    from migrator.connection import control_dir

    from .control import ControlChannel
    from .manager import ClickHouseBackfillManager
    directory = control_dir(target) if target is not None else None
    return ClickHouseBackfillManager(client, migrations_dir=migrations_dir, cluster=cluster,
                                     control=ControlChannel(directory) if directory else None)


def _for_context(context):
    app = context.extra.get("app")
    return manager_for(context.client, context.migrations_dir, context.cluster, getattr(app, "target", None))


@hookimpl
def register_commands(cli):
    """The `migrate backfill ...` group."""
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
    lines = _for_context(context).register_pending_backfills(context.database, [migration.version])
    return "\n".join(lines) or None


@hookimpl
def after_migration_rolled_back(context, migration):
    """Rolling a version back resets its backfill, so a later `up` starts it from zero."""
    if migration.has_backfill:
        _for_context(context).reset_backfill(context.database, migration.version, keep_params=False)
