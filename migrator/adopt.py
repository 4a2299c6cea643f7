"""`migrate adopt`: take over the tracking state of the migrator this tool replaces.

The old migrator kept `db_management.migrations (db_name, curr_version, partially_applied_version)` as
a plain MergeTree updated in place with `ALTER TABLE ... UPDATE`. Adoption copies each database's
applied and partially applied version into a table of this tool's shape built beside it, then swaps
the two with one RENAME; the old table stays, renamed, for audit and for rolling back. Every step
can be interrupted and `adopt` run again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import tracking
from .cluster import check_macros, replicated_databases, run_ddl
from .errors import MigrateError
from .sqltext import on_cluster

STAGING = "db_management.migrations_adopting"
OLD_COLUMNS = ("db_name", "curr_version", "partially_applied_version")


@dataclass
class Plan:
    """The DDL that adoption sends, in order; `states` are written into STAGING after `before`."""

    before: list[str] = field(default_factory=list)
    states: dict[str, tracking.State] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)
    report: list[str] = field(default_factory=list)


def aside_name(table: str, stamp: str) -> str:
    """Where an adopted table is kept: beside ours, named for when it was adopted."""
    return f"{table}_pre_adopt_{stamp}"


def read_old_state(client, columns: dict[str, str]) -> dict[str, tracking.State]:
    """Each database's (applied, partially applied) version from the old table, refused when ambiguous."""
    table = tracking.MIGRATIONS
    missing = [c for c in OLD_COLUMNS if c not in columns]
    if missing:
        raise MigrateError(f"cannot adopt {table} ({tracking.describe_columns(columns)}): it has no column "
                           f"{missing[0]}; convert it by hand")
    running = int(client.command("SELECT count() FROM system.mutations WHERE database = 'db_management' "
                                 "AND table = 'migrations' AND NOT is_done"))
    if running:
        raise MigrateError(f"cannot adopt {table}: {running} of its ALTER ... UPDATE mutations are not done "
                           "(system.mutations); stop the old migrator and wait for them, then rerun 'migrate adopt'")
    rows = client.query(f"SELECT db_name, groupUniqArray((curr_version, partially_applied_version)) FROM {table} "
                        "GROUP BY db_name ORDER BY db_name", settings=tracking.LATEST_READ).result_rows
    states = {}
    for db_name, versions in rows:
        if len(versions) != 1:
            raise MigrateError(f"cannot adopt {table}: database {db_name!r} has {len(versions)} different rows "
                               f"{sorted(versions, key=str)}; keep the true one, then rerun 'migrate adopt'")
        states[db_name] = tracking.State(*versions[0])
    return states


def staging_schema() -> str:
    """Our migrations table's DDL under the staging name."""
    return tracking.SCHEMA[1].replace(tracking.MIGRATIONS, STAGING, 1)


def plan(client, stamp: str) -> Plan:
    """What adoption would do to this store (read-only)."""
    found = tracking.foreign_tables(client)
    out = Plan()
    if tracking.MIGRATIONS in found:
        out.states = read_old_state(client, found[tracking.MIGRATIONS])
        aside = aside_name(tracking.MIGRATIONS, stamp)
        out.before = [f"DROP TABLE IF EXISTS {STAGING} SYNC", staging_schema()]  # a crashed adopt's leftover
        out.after = [f"RENAME TABLE {tracking.MIGRATIONS} TO {aside}, {STAGING} TO {tracking.MIGRATIONS}"]
        summary = "; ".join(f"{db} at version {st.curr_version}" +
                            (f" (dirty: {st.partially_applied_version} partially applied)" if st.dirty else "")
                            for db, st in out.states.items()) or "no databases"
        out.report += [f"adopted {tracking.MIGRATIONS}: {summary}", f"the old table is kept as {aside}"]
    elif not tracking.table_columns(client, tracking.MIGRATIONS) and tracking.table_columns(client, STAGING):
        out.after = [f"RENAME TABLE {STAGING} TO {tracking.MIGRATIONS}"]  # crashed between the two renames
        out.report.append(f"finished an interrupted adoption: {STAGING} is now {tracking.MIGRATIONS}")
    if tracking.LOCKS in found:
        aside = aside_name(tracking.LOCKS, stamp)
        out.after.append(f"RENAME TABLE {tracking.LOCKS} TO {aside}")
        out.report.append(f"the old lock table {tracking.LOCKS} "
                          f"({tracking.describe_columns(found[tracking.LOCKS])}) is kept as {aside}")
    return out


def adopt(client, cluster: str | None = None, stamp: str | None = None) -> list[str]:
    """Convert another migrator's tracking tables to ours, keeping versions and dirty flags; idempotent."""
    stamp = stamp or time.strftime("%Y%m%d_%H%M%S", time.gmtime())
    todo = plan(client, stamp)
    if not todo.before and not todo.after:
        return [f"nothing to adopt: {tracking.MIGRATIONS} and {tracking.LOCKS} are missing or already this "
                "tool's; nothing changed"]
    replicated = replicated_databases(client) if cluster else frozenset()

    def clustered(stmts: list[str]) -> list[str]:
        return [on_cluster(s, cluster, replicated) for s in stmts]

    if cluster:
        check_macros(client, clustered(todo.before + tracking.SCHEMA))
    for stmt in clustered(todo.before):
        run_ddl(client, stmt)
    for db_name, st in todo.states.items():
        tracking.write_state(client, db_name, st, table=STAGING)
    for stmt in clustered(todo.after):
        run_ddl(client, stmt)
    tracking.ensure_schema(client, cluster)  # our lock table, if the old one was set aside
    return todo.report
