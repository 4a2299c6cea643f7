"""`db_management.migrations` and the advisory lock, both as insert-only versioned rows.

Every write is a single-row INSERT of a new version of the row (no mutations), so a crash can
never leave a half-updated row and the newest version is the truth.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from . import transport
from .cluster import replicated_databases, run_ddl
from .connection import pid_alive
from .errors import MigrateError
from .sqltext import on_cluster

log = logging.getLogger("migrator")

# Reads that decide a write must see the newest row even behind a load balancer or on a lagging
# replica; the row writes they read must be on a quorum of replicas before they count. Sent on every
# backend: a plain MergeTree accepts both and ignores them.
LATEST_READ = {"select_sequential_consistency": 1}
QUORUM_WRITE = {"insert_quorum": "auto", "insert_quorum_parallel": 0}

_clock_lock = threading.Lock()
_last_version = 0


def next_version() -> int:
    """A strictly increasing nanosecond stamp: two writes in one millisecond still order."""
    global _last_version
    with _clock_lock:
        _last_version = max(time.time_ns(), _last_version + 1)
        return _last_version


def settings_clause(settings: dict | None) -> str:
    """` SETTINGS k = v, ...` for a statement's own text. Settings in the text cost nothing extra on any
    transport; passed beside a command, the embedded client reads and restores them around every call
    (about 12 ms, once per checkpoint)."""
    if not settings:
        return ""

    def value(v) -> str:
        if isinstance(v, (bool, int, float)):
            return str(int(v) if isinstance(v, bool) else v)
        return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return " SETTINGS " + ", ".join(f"{k} = {value(v)}" for k, v in settings.items())


def insert_row(client, table: str, types: dict[str, str], values: dict, settings: dict | None = None) -> None:
    """One row as a parameterised INSERT ... SELECT: escaping is the server's, and it is cheaper than
    a client-side block insert for a single row. State rows pass QUORUM_WRITE, which goes into the
    statement itself (INSERT INTO t (...) SETTINGS ... SELECT ...)."""
    cols = ", ".join(types)
    select = ", ".join(f"{{{name}:{typ}}}" for name, typ in types.items())
    client.command(f"INSERT INTO {table} ({cols}){settings_clause(settings)} SELECT {select}",
                   parameters={k: values[k] for k in types})


def owner_id() -> str:
    """host:pid:random, so a lease names a process an operator can find."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


MIGRATIONS = "db_management.migrations"
LOCKS = "db_management.migration_locks"
SCHEMA = [
    "CREATE DATABASE IF NOT EXISTS db_management",
    f"""CREATE TABLE IF NOT EXISTS {MIGRATIONS} (
        db_name String,
        curr_version UInt64,
        partially_applied_version Nullable(UInt64),
        updated_at DateTime64(3) DEFAULT now64(3),
        version UInt64,
        applied_versions Array(UInt64)
    ) ENGINE = ReplacingMergeTree(version) ORDER BY db_name""",
    f"""CREATE TABLE IF NOT EXISTS {LOCKS} (
        db_name String,
        owner String,
        claim UInt64,
        expires_at_ms UInt64,
        released UInt8,
        version UInt64
    ) ENGINE = MergeTree ORDER BY (db_name, owner, version)""",
]
# The columns this tool reads and writes; a table of the same name with others is another migrator's.
SHAPES = {
    MIGRATIONS: {"db_name": "String", "curr_version": "UInt64", "partially_applied_version": "Nullable(UInt64)",
                 "updated_at": "DateTime64(3)", "version": "UInt64", "applied_versions": "Array(UInt64)"},
    LOCKS: {"db_name": "String", "owner": "String", "claim": "UInt64", "expires_at_ms": "UInt64",
            "released": "UInt8", "version": "UInt64"},
}
# The set of applied versions came later: a table of this tool without it is ours too, and gets the
# column (ADD COLUMN IF NOT EXISTS) from the first command that writes state (`ensure_applied_column`).
APPLIED = "applied_versions"
OLDER_SHAPES = {MIGRATIONS: {k: v for k, v in SHAPES[MIGRATIONS].items() if k != APPLIED}}
_CREATE_RE = re.compile(r"^\s*CREATE\s+(DATABASE|TABLE)\s+IF\s+NOT\s+EXISTS\s+([\w.]+)", re.IGNORECASE)


def missing_statements(client, schema: list[str] = SCHEMA) -> list[str]:
    """The CREATE ... IF NOT EXISTS statements of `schema` whose object does not exist yet (read-only)."""
    out = []
    for stmt in schema:
        m = _CREATE_RE.match(stmt)
        if not m:
            raise ValueError(f"not a CREATE DATABASE/TABLE IF NOT EXISTS statement: {stmt[:60]!r}")
        if not int(client.command(f"EXISTS {m.group(1).upper()} {m.group(2)}")):
            out.append(stmt)
    return out


def ensure_schema(client, cluster: str | None = None, schema: list[str] = SCHEMA) -> None:
    """Create the objects of `schema` that are missing (ON CLUSTER and replicated under --cluster).

    Existence is checked first, so a store that has them gets no DDL at all: with a host down,
    `CREATE ... IF NOT EXISTS ... ON CLUSTER` would otherwise wait out the distributed DDL timeout.
    """
    todo = missing_statements(client, schema)
    replicated = replicated_databases(client) if todo and cluster else frozenset()
    for stmt in todo:
        run_ddl(client, on_cluster(stmt, cluster, replicated))


def table_columns(client, table: str) -> dict[str, str]:
    """name -> type of an existing table, in column order; {} when the table does not exist."""
    database, name = table.split(".")
    rows = client.query("SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String} "
                        "ORDER BY position", parameters={"d": database, "t": name}).result_rows
    return dict(rows)


def foreign_tables(client) -> dict[str, dict[str, str]]:
    """Tracking tables that exist under our names with another shape: another migrator wrote them."""
    found = {}
    for table, shape in SHAPES.items():
        cols = table_columns(client, table)
        if cols and cols != shape and cols != OLDER_SHAPES.get(table):
            found[table] = cols
    return found


def describe_columns(cols: dict[str, str]) -> str:
    return ", ".join(f"{name} {typ}" for name, typ in cols.items())


def require_own_schema(client) -> None:
    """Refuse to read or write state in another migrator's tables: one line that says how to convert them."""
    found = foreign_tables(client)
    if found:
        tables = " and ".join(f"{t} ({describe_columns(c)})" for t, c in found.items())
        raise MigrateError(f"another migrator wrote {tables}; run 'migrate adopt' to convert "
                           f"{'them' if len(found) > 1 else 'it'} to this tool's tracking tables")


@dataclass
class State:
    """What `status` reports: the applied version, a dirty (partially applied) marker, and which
    versions are applied (None: not recorded, a row written before this tool kept the set)."""

    curr_version: int = 0
    partially_applied_version: int | None = None
    applied: tuple[int, ...] | None = None

    @property
    def dirty(self) -> bool:
        return self.partially_applied_version is not None


def applied_set(state: State, on_disk) -> frozenset[int]:
    """The versions applied to a database. A row that records no set (written before the set was kept,
    or by an older copy of this tool) is read as golang-migrate reads it: every version on disk up to
    the current one is assumed applied, and the current one is."""
    if state.applied is not None:
        return frozenset(state.applied)
    return frozenset(v for v in on_disk if v <= state.curr_version) | ({state.curr_version} - {0})


def with_applied(state: State, applied) -> State:
    """`state` with an explicit applied set; the current version follows it (its highest, 0 when empty)."""
    done = tuple(sorted(set(applied)))
    return State(max(done, default=0), state.partially_applied_version, done)


def read_state(client, db_name: str) -> State:
    """The newest state row; no table yet means nothing applied (and creates nothing)."""
    require_own_schema(client)
    cols = table_columns(client, MIGRATIONS)
    if not cols:
        return State()
    # A row with versions applied records them all; an empty set there is an older row (`applied_set`).
    applied = APPLIED if APPLIED in cols else "CAST([], 'Array(UInt64)')"
    rows = client.query(
        f"SELECT curr_version, partially_applied_version, {applied} FROM {MIGRATIONS} "
        "WHERE db_name = {db:String} ORDER BY version DESC LIMIT 1", parameters={"db": db_name},
        settings=LATEST_READ).result_rows
    if not rows:
        return State()
    curr, partial, versions = rows[0]
    return State(curr, partial, tuple(sorted(versions)) if versions else None)


def ensure_applied_column(client, cluster: str | None = None) -> None:
    """Give a tracking table of this tool's older shape the applied set (no DDL when it has it)."""
    cols = table_columns(client, MIGRATIONS)
    if cols and APPLIED not in cols:
        stmt = f"ALTER TABLE {MIGRATIONS} ADD COLUMN IF NOT EXISTS {APPLIED} Array(UInt64)"
        run_ddl(client, on_cluster(stmt, cluster, replicated_databases(client) if cluster else frozenset()))


def write_state(client, db_name: str, state: State, table: str = MIGRATIONS) -> None:
    """A new version of the database's row (never a mutation), with its applied set when it has one."""
    insert_row(client, table,
               {"db_name": "String", "curr_version": "UInt64", "partially_applied_version": "Nullable(UInt64)",
                "version": "UInt64", APPLIED: "Array(UInt64)"},
               {"db_name": db_name, "curr_version": state.curr_version,
                "partially_applied_version": state.partially_applied_version, "version": next_version(),
                APPLIED: list(state.applied or ())},
               settings=QUORUM_WRITE)


def _exited_here(owner: str) -> bool:
    """A claim of a process on this host that no longer exists (`host:pid:random`, see owner_id): it holds
    nothing, whatever its lease says (a migrate killed -9, or one whose release never reached the server)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and int(pid) > 0 and not pid_alive(int(pid))


class AdvisoryLock:
    """One `migrate up/down/force` per database at a time, with a lease that a crash lets expire.

    Claims are rows; among live claims the oldest wins. A winner re-checks after a grace period,
    so a claim stamped earlier but written later still makes exactly one side back off.
    """

    def __init__(self, client, db_name: str, lease_seconds: float = 600.0, grace_seconds: float = 0.3):
        self.client, self.db_name = client, db_name
        self.lease_seconds, self.grace_seconds = lease_seconds, grace_seconds
        self.owner = owner_id()
        self.claim = 0

    def _write(self, released: int) -> None:
        expires = int((time.time() + self.lease_seconds) * 1000)
        insert_row(self.client, LOCKS,
                   {"db_name": "String", "owner": "String", "claim": "UInt64", "expires_at_ms": "UInt64",
                    "released": "UInt8", "version": "UInt64"},
                   {"db_name": self.db_name, "owner": self.owner, "claim": self.claim, "expires_at_ms": expires,
                    "released": released, "version": next_version()}, settings=QUORUM_WRITE)

    def _holder(self) -> tuple[str, int] | None:
        rows = self.client.query(
            "SELECT owner, argMax(claim, version), argMax(expires_at_ms, version), argMax(released, version) "
            f"FROM {LOCKS} WHERE db_name = {{db:String}} GROUP BY owner",
            parameters={"db": self.db_name}, settings=LATEST_READ).result_rows
        now_ms = time.time() * 1000
        live = [(claim, owner, exp) for owner, claim, exp, released in rows
                if not released and exp > now_ms and not _exited_here(owner)]
        if not live:
            return None
        claim, owner, exp = min(live)
        return owner, exp

    def acquire(self) -> "AdvisoryLock":
        """Claim the lock; a one-line error naming the holder if another migrate has it."""
        self.claim = next_version()
        try:
            self._write(0)
            for _ in range(2):
                holder = self._holder()
                if holder and holder[0] != self.owner:
                    self._write(1)
                    left = max(0, int(holder[1] / 1000 - time.time()))
                    raise MigrateError(f"database {self.db_name!r} is locked by another migrate ({holder[0]}); "
                                       f"it finishes or its lease expires in {left}s")
                time.sleep(self.grace_seconds)
        except MigrateError:
            raise
        except BaseException:
            self._give_back()
            raise
        return self

    def _give_back(self) -> None:
        """A claim whose answer was lost may have landed all the same: release it, so that the next migrate
        does not wait out its lease (if even that fails, a claim of this host's exited process is not live)."""
        try:
            transport.retry(lambda: self._write(1), "release of the migrate lock")
        except Exception as exc:  # the error that stopped the claim is the one to report
            log.warning("could not release the migrate lock claim %s: %s", self.owner, exc)

    def renew(self) -> None:
        """Extend the lease while a long migration runs."""
        self._write(0)

    def release(self) -> None:
        """Give the lock up so the next migrate does not wait for the lease to expire."""
        self._write(1)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
