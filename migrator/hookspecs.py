"""The migrator's extension points. Each one is documented, with an example, in docs/plugins.md."""
import pluggy

hookspec = pluggy.HookspecMarker("migrator")


@hookspec(historic=True)
def add_hookspecs(pm):
    """Declare a plugin's own hookspecs on `pm` (e.g. `pm.add_hookspecs(my_hookspecs)`).

    Historic: a plugin registered at any time, in any order, gets this call as it registers, so
    hooks it declares are known before the unknown-hook check runs after all plugins are loaded.
    """


@hookspec
def register_commands(cli):
    """Add click commands or groups to the `migrate` CLI (the backfill plugin adds `backfill`)."""


@hookspec
def check_migrations(context, migrations):
    """Called by `up` (and `up --dry-run`) before anything is applied, with the versions about to be
    applied; raise MigrateError to refuse them all (e.g. a backfill's invalid meta file)."""


@hookspec
def after_migration_applied(context, migration):
    """Called after each version commits during `migrate up`."""


@hookspec
def register_backfill(context, migration):
    """Called for each newly applied version that ships `.backfill.sql` + `.backfill.meta`.

    Return a short line for `migrate up` to print (or None).
    """


@hookspec
def after_migration_rolled_back(context, migration):
    """Called after `migrate down` has rolled a version back (its backfill state must not survive)."""
