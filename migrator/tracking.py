"""`db_management.migrations` and the advisory lock, both as insert-only versioned rows.

Every write is a single-row INSERT of a new version of the row (no mutations), so a crash can
never leave a half-updated row and the newest version is the truth.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import MigrateError
from .sqltext import on_cluster

_clock_lock = threading.Lock()
_last_version = 0


def next_version() -> int:
    """A strictly increasing nanosecond stamp: two writes in one millisecond still order."""
    global _last_version
    with _clock_lock:
        _last_version = max(time.time_ns(), _last_version + 1)
        return _last_version


def insert_row(client, table: str, types: dict[str, str], values: dict) -> None:
    """One row as a parameterised INSERT ... SELECT: escaping is the server's, and it is cheaper than
    a client-side block insert for a single row."""
    cols = ", ".join(types)
    select = ", ".join(f"{{{name}:{typ}}}" for name, typ in types.items())
    client.command(f"INSERT INTO {table} ({cols}) SELECT {select}", parameters={k: values[k] for k in types})


def owner_id() -> str:
    """host:pid:random, so a lease names a process an operator can find."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


SCHEMA = [
    "CREATE DATABASE IF NOT EXISTS db_management",
    """CREATE TABLE IF NOT EXISTS db_management.migrations (
        db_name String,
        curr_version UInt64,
        partially_applied_version Nullable(UInt64),
        updated_at DateTime64(3) DEFAULT now64(3),
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY db_name""",
    """CREATE TABLE IF NOT EXISTS db_management.migration_locks (
        db_name String,
        owner String,
        claim UInt64,
        expires_at_ms UInt64,
        released UInt8,
        version UInt64
    ) ENGINE = MergeTree ORDER BY (db_name, owner, version)""",
]


def ensure_schema(client, cluster: str | None = None) -> None:
    """Create the tracking tables (replicated under --cluster) if they are missing."""
    for stmt in SCHEMA:
        client.command(on_cluster(stmt, cluster) if cluster else stmt)


@dataclass
class State:
    """What `status` reports: the applied version and a dirty (partially applied) marker."""

    curr_version: int = 0
    partially_applied_version: int | None = None

    @property
    def dirty(self) -> bool:
        return self.partially_applied_version is not None


def read_state(client, db_name: str) -> State:
    rows = client.query(
        "SELECT curr_version, partially_applied_version FROM db_management.migrations "
        "WHERE db_name = {db:String} ORDER BY version DESC LIMIT 1", parameters={"db": db_name}).result_rows
    return State(*rows[0]) if rows else State()


def write_state(client, db_name: str, state: State) -> None:
    insert_row(client, "db_management.migrations",
               {"db_name": "String", "curr_version": "UInt64", "partially_applied_version": "Nullable(UInt64)",
                "version": "UInt64"},
               {"db_name": db_name, "curr_version": state.curr_version,
                "partially_applied_version": state.partially_applied_version, "version": next_version()})


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
        insert_row(self.client, "db_management.migration_locks",
                   {"db_name": "String", "owner": "String", "claim": "UInt64", "expires_at_ms": "UInt64",
                    "released": "UInt8", "version": "UInt64"},
                   {"db_name": self.db_name, "owner": self.owner, "claim": self.claim, "expires_at_ms": expires,
                    "released": released, "version": next_version()})

    def _holder(self) -> tuple[str, int] | None:
        rows = self.client.query(
            "SELECT owner, argMax(claim, version), argMax(expires_at_ms, version), argMax(released, version) "
            "FROM db_management.migration_locks WHERE db_name = {db:String} GROUP BY owner",
            parameters={"db": self.db_name}).result_rows
        now_ms = time.time() * 1000
        live = [(claim, owner, exp) for owner, claim, exp, released in rows if not released and exp > now_ms]
        if not live:
            return None
        claim, owner, exp = min(live)
        return owner, exp

    def acquire(self) -> "AdvisoryLock":
        self.claim = next_version()
        self._write(0)
        for _ in range(2):
            holder = self._holder()
            if holder and holder[0] != self.owner:
                self._write(1)
                left = max(0, int(holder[1] / 1000 - time.time()))
                raise MigrateError(f"database {self.db_name!r} is locked by another migrate ({holder[0]}); "
                                   f"it finishes or its lease expires in {left}s")
            time.sleep(self.grace_seconds)
        return self

    def renew(self) -> None:
        self._write(0)

    def release(self) -> None:
        self._write(1)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# Reads that decide writes see the newest committed rows on replicated and load-balanced servers, and
# writes reach a quorum of replicas before they count (docs/backfill_runbook.md, "Servers and clusters").
LATEST_READ = {"select_sequential_consistency": 1}
QUORUM_WRITE = {"insert_quorum": "auto", "insert_quorum_parallel": 0}
