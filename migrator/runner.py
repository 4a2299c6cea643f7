"""Apply and roll back migrations, with golang-migrate's honesty about a half-applied version."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import tracking
from .discovery import Migration, discover, read_text
from .errors import MigrateError
from .plugins import load_plugins, pm
from .sqltext import check_identifier, on_cluster, split_statements, substitute_db


@dataclass
class Context:
    """What a hook gets to know about the run: the client, the target, and where files live."""

    client: object
    database: str
    migrations_dir: Path
    cluster: str | None = None
    dry_run: bool = False
    echo: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)


class Migrator:
    """`up`, `down`, `force` and `status` for one database."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        load_plugins()  # library use gets the same plugins as the CLI
        check_identifier(ctx.database)
        self.migrations = discover(ctx.migrations_dir)

    # -- reading -------------------------------------------------------------------------
    def state(self) -> tracking.State:
        if self.ctx.dry_run and not int(self.ctx.client.command("EXISTS TABLE db_management.migrations")):
            return tracking.State()  # --dry-run changes nothing, not even the tracking tables
        tracking.ensure_schema(self.ctx.client, self.ctx.cluster)
        return tracking.read_state(self.ctx.client, self.ctx.database)

    def status(self) -> dict:
        st = self.state()
        return {
            "database": self.ctx.database,
            "current_version": st.curr_version,
            "dirty": st.dirty,
            "partially_applied_version": st.partially_applied_version,
            "pending_versions": [v for v in self.migrations if v > st.curr_version],
            "available_versions": list(self.migrations),
        }

    def statements(self, path: Path) -> list[str]:
        """The exact statements `up`/`down` send for a file (what --dry-run prints)."""
        stmts = split_statements(substitute_db(read_text(path), self.ctx.database))
        return [on_cluster(s, self.ctx.cluster) for s in stmts] if self.ctx.cluster else stmts

    # -- writing -------------------------------------------------------------------------
    def _refuse_dirty(self, st: tracking.State) -> None:
        if st.dirty:
            raise MigrateError(
                f"database {self.ctx.database!r} is dirty: version {st.partially_applied_version} was partially "
                f"applied; repair by hand, then 'migrate force VERSION' to mark the version that is really in place")

    def _execute(self, mig: Migration, path: Path, lock: tracking.AdvisoryLock) -> None:
        client = self.ctx.client
        previous_db = getattr(client, "database", None)
        if previous_db is None:  # chDB applies `database` with USE: None would not switch back
            previous_db = client.command("SELECT currentDatabase()")
        client.database = self.ctx.database  # unqualified names resolve to the target database
        try:
            for stmt in self.statements(path):
                try:
                    client.command(stmt)
                except Exception as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise MigrateError(f"{path.name}: version {mig.version} failed: {first}") from exc
                lock.renew()
        finally:
            client.database = previous_db

    def _ensure_database(self) -> None:
        stmt = f"CREATE DATABASE IF NOT EXISTS {self.ctx.database}"
        self.ctx.client.command(on_cluster(stmt, self.ctx.cluster) if self.ctx.cluster else stmt)

    def _print_sql(self, paths: list[Path]) -> list[int]:
        """--dry-run: the exact statements, nothing executed."""
        for path in paths:
            self.ctx.echo(f"-- {path.name}")
            for stmt in self.statements(path):
                self.ctx.echo(stmt + ";")
        return []

    def up(self, to: int | None = None) -> list[int]:
        """Apply pending versions in order up to `to`; returns the versions applied."""
        st = self.state()
        self._refuse_dirty(st)
        if to is not None and to not in self.migrations and to != 0:
            raise MigrateError(f"--to {to}: no migration with that version")
        todo = [m for v, m in self.migrations.items() if v > st.curr_version and (to is None or v <= to)]
        pm.hook.check_migrations(context=self.ctx, migrations=todo)  # refuse before anything is applied
        if self.ctx.dry_run:
            return self._print_sql([mig.up for mig in todo])
        applied = []
        with tracking.AdvisoryLock(self.ctx.client, self.ctx.database) as lock:
            st = self.state()  # re-read under the lock: another runner may have moved on
            self._refuse_dirty(st)
            todo = [m for m in todo if m.version > st.curr_version]
            if todo:
                self._ensure_database()
            for mig in todo:
                tracking.write_state(self.ctx.client, self.ctx.database, tracking.State(st.curr_version, mig.version))
                self._execute(mig, mig.up, lock)
                st = tracking.State(mig.version, None)
                tracking.write_state(self.ctx.client, self.ctx.database, st)
                applied.append(mig.version)
                self.ctx.echo(f"applied {mig.version} {mig.name}")
                pm.hook.after_migration_applied(context=self.ctx, migration=mig)
                if mig.has_backfill:
                    for line in pm.hook.register_backfill(context=self.ctx, migration=mig):
                        if line:
                            self.ctx.echo(line)
        return applied

    def down(self, to: int) -> list[int]:
        """Roll back applied versions above `to`, newest first; returns the versions rolled back."""
        st = self.state()
        self._refuse_dirty(st)
        if to != 0 and to not in self.migrations:
            raise MigrateError(f"--to {to}: no migration with that version")
        todo = [m for v, m in sorted(self.migrations.items(), reverse=True) if to < v <= st.curr_version]
        if self.ctx.dry_run:
            return self._print_sql([mig.down for mig in todo])
        done = []
        with tracking.AdvisoryLock(self.ctx.client, self.ctx.database) as lock:
            st = self.state()  # re-read under the lock: another runner may have rolled back already
            self._refuse_dirty(st)
            todo = [m for m in todo if m.version <= st.curr_version]
            for mig in todo:
                below = max([v for v in self.migrations if v < mig.version], default=0)
                tracking.write_state(self.ctx.client, self.ctx.database, tracking.State(mig.version, mig.version))
                self._execute(mig, mig.down, lock)
                tracking.write_state(self.ctx.client, self.ctx.database, tracking.State(below, None))
                done.append(mig.version)
                self.ctx.echo(f"rolled back {mig.version} {mig.name}")
                pm.hook.after_migration_rolled_back(context=self.ctx, migration=mig)
        return done

    def force(self, version: int) -> None:
        """Declare `version` as fully applied and clear the dirty marker (after a manual repair)."""
        if version != 0 and version not in self.migrations:
            raise MigrateError(f"force {version}: no migration with that version")
        tracking.ensure_schema(self.ctx.client, self.ctx.cluster)
        with tracking.AdvisoryLock(self.ctx.client, self.ctx.database):
            tracking.write_state(self.ctx.client, self.ctx.database, tracking.State(version, None))
