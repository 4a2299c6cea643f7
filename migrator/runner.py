"""Apply and roll back migrations, with golang-migrate's honesty about a half-applied version."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import cluster as clustering
from . import tracking
from .discovery import Migration, discover, read_text
from .errors import MigrateError, one_line
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


@dataclass(frozen=True)
class Direction:
    """What differs between `up` and `down`; the apply loop itself is shared (golang-migrate's runMigrations)."""

    name: str  # "up" / "down": which file of a migration runs
    verb: str  # echoed per version
    marker: Callable[[tracking.State, Migration], tracking.State]  # written before the first statement
    done: Callable[[Migration, dict], tracking.State]  # written after the last one
    pending: Callable[[Migration, tracking.State], bool]  # still to do, given the state re-read under the lock


UP = Direction("up", "applied",
               marker=lambda st, mig: tracking.State(st.curr_version, mig.version),
               done=lambda mig, _migrations: tracking.State(mig.version, None),
               pending=lambda mig, st: mig.version > st.curr_version)
DOWN = Direction("down", "rolled back",
                 marker=lambda st, mig: tracking.State(mig.version, mig.version),
                 done=lambda mig, migrations: tracking.State(
                     max([v for v in migrations if v < mig.version], default=0), None),
                 pending=lambda mig, st: mig.version <= st.curr_version)


class Migrator:
    """`up`, `down`, `force` and `status` for one database."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        load_plugins()  # library use gets the same plugins as the CLI
        check_identifier(ctx.database)
        self.migrations = discover(ctx.migrations_dir)
        self._replicated: frozenset[str] | None = None

    # -- reading (no DDL, not even the tracking tables) ---------------------------------------
    def state(self) -> tracking.State:
        """The tracking state; reading it creates nothing (version 0 when the tables are missing)."""
        return tracking.read_state(self.ctx.client, self.ctx.database)

    def status(self) -> dict:
        """The document `migrate status --json` prints."""
        st = self.state()
        return {
            "database": self.ctx.database,
            "current_version": st.curr_version,
            "dirty": st.dirty,
            "partially_applied_version": st.partially_applied_version,
            "pending_versions": [v for v in self.migrations if v > st.curr_version],
            "available_versions": list(self.migrations),
        }

    def replicated_databases(self) -> frozenset[str]:
        """Databases whose engine is Replicated (only asked under --cluster): their DDL gets no ON CLUSTER."""
        if self._replicated is None:
            self._replicated = clustering.replicated_databases(self.ctx.client) if self.ctx.cluster else frozenset()
        return self._replicated

    def statements(self, path: Path) -> list[str]:
        """The exact statements `up`/`down` send for a file (what --dry-run prints)."""
        stmts = split_statements(substitute_db(read_text(path), self.ctx.database))
        if not self.ctx.cluster:
            return stmts
        replicated = self.replicated_databases()
        return [on_cluster(s, self.ctx.cluster, replicated, self.ctx.database) for s in stmts]

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
                    clustering.run_ddl(client, stmt)
                except Exception as exc:
                    raise MigrateError(f"{path.name}: version {mig.version} failed: {one_line(exc)}") from exc
                lock.renew()
        finally:
            client.database = previous_db

    def _prepare(self, paths: list[Path]) -> None:
        """Before the lock and the first statement: cluster macros checked, tracking tables and the target
        database created if (and only if) they are missing."""
        if self.ctx.cluster:
            tracked = [on_cluster(s, self.ctx.cluster, self.replicated_databases())
                       for s in tracking.missing_statements(self.ctx.client)]
            clustering.check_macros(self.ctx.client, tracked + [s for p in paths for s in self.statements(p)])
        tracking.ensure_schema(self.ctx.client, self.ctx.cluster)
        if paths:
            tracking.ensure_schema(self.ctx.client, self.ctx.cluster,
                                   schema=[f"CREATE DATABASE IF NOT EXISTS {self.ctx.database}"])

    def _print_sql(self, paths: list[Path]) -> list[int]:
        """--dry-run: the exact statements, nothing executed."""
        for path in paths:
            self.ctx.echo(f"-- {path.name}")
            for stmt in self.statements(path):
                self.ctx.echo(stmt + ";")
        return []

    def _migrate(self, direction: Direction, todo: list[Migration]) -> list[int]:
        """The one apply loop: lock, re-read, refuse dirty, then per version marker, statements, done, hooks."""
        paths = [getattr(mig, direction.name) for mig in todo]
        if self.ctx.dry_run:
            return self._print_sql(paths)
        if not todo:
            return []
        self._prepare(paths)
        done = []
        with tracking.AdvisoryLock(self.ctx.client, self.ctx.database) as lock:
            st = self.state()  # re-read under the lock: another runner may have moved on
            self._refuse_dirty(st)
            for mig in [m for m in todo if direction.pending(m, st)]:
                tracking.write_state(self.ctx.client, self.ctx.database, direction.marker(st, mig))
                self._execute(mig, getattr(mig, direction.name), lock)
                st = direction.done(mig, self.migrations)
                tracking.write_state(self.ctx.client, self.ctx.database, st)
                done.append(mig.version)
                self.ctx.echo(f"{direction.verb} {mig.version} {mig.name}")
                self._after(direction, mig)
        return done

    def _after(self, direction: Direction, mig: Migration) -> None:
        if direction is DOWN:
            pm.hook.after_migration_rolled_back(context=self.ctx, migration=mig)
            return
        pm.hook.after_migration_applied(context=self.ctx, migration=mig)
        if mig.has_backfill:
            for line in pm.hook.register_backfill(context=self.ctx, migration=mig):
                if line:
                    self.ctx.echo(line)

    def _check_target(self, to: int, verb: str) -> None:
        if to != 0 and to not in self.migrations:
            raise MigrateError(f"{verb} {to}: no migration with that version")

    def up(self, to: int | None = None) -> list[int]:
        """Apply pending versions in order up to `to`; returns the versions applied."""
        st = self.state()
        self._refuse_dirty(st)
        if to is not None:
            self._check_target(to, "--to")
        todo = [m for v, m in self.migrations.items() if v > st.curr_version and (to is None or v <= to)]
        pm.hook.check_migrations(context=self.ctx, migrations=todo)  # refuse before anything is applied
        return self._migrate(UP, todo)

    def down(self, to: int) -> list[int]:
        """Roll back applied versions above `to`, newest first; returns the versions rolled back."""
        st = self.state()
        self._refuse_dirty(st)
        self._check_target(to, "--to")
        todo = [m for v, m in sorted(self.migrations.items(), reverse=True) if to < v <= st.curr_version]
        return self._migrate(DOWN, todo)

    def force(self, version: int) -> None:
        """Declare `version` as fully applied and clear the dirty marker (after a manual repair)."""
        self._check_target(version, "force")
        tracking.require_own_schema(self.ctx.client)
        self._prepare([])
        with tracking.AdvisoryLock(self.ctx.client, self.ctx.database):
            tracking.write_state(self.ctx.client, self.ctx.database, tracking.State(version, None))
