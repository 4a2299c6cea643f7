"""The backfill plugin, registered through the `migrator` entry point like any third-party plugin.

The top of the package: it wires the hooks and the `backfill` command group to the layers below
(ops -> protocol -> pacing -> spec -> errors/hookspecs), and nothing below imports it.
"""
from __future__ import annotations

from migrator import hookimpl

from . import hookspecs
from .ops.cli import add_plugin_options, backfill
from .ops.control import manager_for
from .ops.upcheck import check_pending

NAME = "backfill"  # the entry point's name; library use registers the module under it too


@hookimpl
def add_hookspecs(pm):
    """Our own extension points live on the same manager as the migrator's."""
    pm.add_hookspecs(hookspecs)


def _for_context(context):
    app = context.extra.get("app")  # a shard's context names its own target (migrator/sharded.py)
    target = context.extra.get("target") or getattr(app, "target", None)
    return manager_for(context.client, context.migrations_dir, context.cluster, target)


@hookimpl
def register_commands(cli):
    """The `migrate backfill ...` group, with the options other plugins add to `run` and `resume`."""
    add_plugin_options()
    cli.add_command(backfill)


@hookimpl
def check_migrations(context, migrations):
    """A bad backfill meta or SQL file stops `up` before the schema is touched, not after: the meta is
    validated, the SQL linted and planned by the engine on the schema its version leaves (ops/upcheck.py)."""
    check_pending(context, migrations)


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
