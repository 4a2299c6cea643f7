"""Apply and roll back migrations, with golang-migrate's honesty about a half-applied version."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import cluster as clustering
from . import tracking, transport
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
    marker: Callable[[tracking.State, Migration], tracking.State]  # written as the first statement is sent
    done: Callable[[tracking.State, Migration], tracking.State]  # written after the last one
    pending: Callable[[Migration, tracking.State], bool]  # still to do, given the state re-read under the lock


# The states below carry an explicit applied set (`Migrator.resolved`): the current version is its highest.
UP = Direction("up", "applied",
               marker=lambda st, mig: tracking.State(st.curr_version, mig.version, st.applied),
               done=lambda st, mig: tracking.with_applied(tracking.State(), {*st.applied, mig.version}),
               pending=lambda mig, st: mig.version not in st.applied)
DOWN = Direction("down", "rolled back",
                 marker=lambda st, mig: tracking.State(st.curr_version, mig.version, st.applied),
                 done=lambda st, mig: tracking.with_applied(tracking.State(), set(st.applied) - {mig.version}),
                 pending=lambda mig, st: mig.version in st.applied)


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

    def resolved(self, st: tracking.State) -> tracking.State:
        """`st` with its applied set spelled out (assumed from the files for a row that records none)."""
        return tracking.State(st.curr_version, st.partially_applied_version,
                              tuple(sorted(tracking.applied_set(st, self.migrations))))

    def missing(self, st: tracking.State) -> list[int]:
        """Versions on disk below the current one that were never applied (added later inside a gap)."""
        applied = tracking.applied_set(st, self.migrations)
        return [v for v in self.migrations if v < st.curr_version and v not in applied]

    def status(self) -> dict:
        """The document `migrate status --json` prints."""
        st = self.state()
        return {
            "database": self.ctx.database,
            "current_version": st.curr_version,
            "dirty": st.dirty,
            "partially_applied_version": st.partially_applied_version,
            "pending_versions": [v for v in self.migrations if v > st.curr_version],
            "missing_versions": self.missing(st),
            "applied_versions": sorted(tracking.applied_set(st, self.migrations)),
            "applied_recorded": st.applied is not None or st.curr_version == 0,
            "available_versions": list(self.migrations),
        }

    def refuse_missing(self, st: tracking.State) -> None:
        """One line naming the versions below the current one that were never applied, and the two ways on."""
        missing = self.missing(st)
        if missing:
            names = ", ".join(f"{v} ({self.migrations[v].up.name})" for v in missing)
            first = missing[0]
            raise MigrateError(
                f"database {self.ctx.database!r} is at version {st.curr_version} but {names} below it "
                f"{'was' if len(missing) == 1 else 'were'} never applied; 'migrate up --allow-missing' applies "
                f"{'it' if len(missing) == 1 else 'them'} now (in version order), or 'migrate force {first}' marks "
                f"version {first} applied without running it")

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

    def _execute(self, mig: Migration, path: Path, lock: tracking.AdvisoryLock, mark: Callable[[], None]) -> None:
        """The version's statements; `mark` (the dirty marker) is written just before the first is sent, so
        a failure before it (the file's text, the client) leaves the version as it was: not dirty."""
        client, statements = self.ctx.client, self.statements(path)
        previous_db = getattr(client, "database", None)
        if previous_db is None:  # chDB applies `database` with USE: None would not switch back
            previous_db = client.command("SELECT currentDatabase()")
        client.database = self.ctx.database  # unqualified names resolve to the target database
        try:
            for i, stmt in enumerate(statements):
                if i == 0:
                    mark()
                try:
                    clustering.run_ddl(client, stmt)
                except Exception as exc:
                    if transport.cause(exc):  # the way to the server failed, not the file: say so first
                        raise MigrateError(f"{one_line(exc)}; version {mig.version} ({path.name}, statement {i + 1} "
                                           f"of {len(statements)}) did not finish") from exc
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
            clustering.check_cluster(self.ctx.client, self.ctx.cluster)
        tracking.ensure_schema(self.ctx.client, self.ctx.cluster)
        tracking.ensure_applied_column(self.ctx.client, self.ctx.cluster)
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
            st = self.resolved(self.state())  # re-read under the lock: another runner may have moved on
            self._refuse_dirty(st)
            for mig in [m for m in todo if direction.pending(m, st)]:
                marker = direction.marker(st, mig)
                self._execute(mig, getattr(mig, direction.name), lock,
                              lambda m=marker: tracking.write_state(self.ctx.client, self.ctx.database, m))
                st = direction.done(st, mig)
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

    def up(self, to: int | None = None, allow_missing: bool = False) -> list[int]:
        """Apply pending versions in order up to `to`; returns the versions applied. A version below the
        current one that was never applied is refused by name, or applied first with `allow_missing`."""
        st = self.state()
        self._refuse_dirty(st)
        if to is not None:
            self._check_target(to, "--to")
        if not allow_missing:
            self.refuse_missing(st)
        applied = tracking.applied_set(st, self.migrations)
        todo = [m for v, m in self.migrations.items() if v not in applied and (to is None or v <= to)
                and (allow_missing or v > st.curr_version)]
        pm.hook.check_migrations(context=self.ctx, migrations=todo)  # refuse before anything is applied
        return self._migrate(UP, todo)

    def down(self, to: int) -> list[int]:
        """Roll back the applied versions above `to`, newest first; returns the versions rolled back. A version
        that was never applied is skipped (its down file never runs); an applied one whose files are gone
        is refused by name before anything runs."""
        st = self.state()
        self._refuse_dirty(st)
        self._check_target(to, "--to")
        targets = sorted((v for v in tracking.applied_set(st, self.migrations) if v > to), reverse=True)
        gone = [v for v in targets if v not in self.migrations]
        if gone:
            below = max((v for v in tracking.applied_set(st, self.migrations) if v < gone[0]), default=0)
            raise MigrateError(
                f"version {gone[0]} is applied to {self.ctx.database!r} but its files are gone: no "
                f"{gone[0]:03d}_*.down.sql in {self.ctx.migrations_dir}; restore them, or undo version {gone[0]} by "
                f"hand and run 'migrate force {below}'; nothing rolled back")
        return self._migrate(DOWN, [self.migrations[v] for v in targets])

    def force(self, version: int) -> tracking.State:
        """Declare `version` as fully applied and clear the dirty marker (after a manual repair); returns the
        new state. A version below the current one that was never applied is only marked applied; any other
        becomes the current version, with every version up to it applied and none above it."""
        self._check_target(version, "force")
        tracking.require_own_schema(self.ctx.client)
        self._prepare([])
        with tracking.AdvisoryLock(self.ctx.client, self.ctx.database):
            st = self.resolved(self.state())
            if 0 < version < st.curr_version and version not in st.applied:  # a gap: marked, nothing else
                applied = {*st.applied, version}
            else:
                applied = ({v for v in st.applied if v <= version} | {version}
                           | {v for v in self.migrations if st.curr_version < v <= version})
            new = tracking.with_applied(tracking.State(), applied - {0})
            tracking.write_state(self.ctx.client, self.ctx.database, new)
            return new
