"""`db_management.backfills`: insert-only versioned rows; the newest version is the state.

A checkpoint write is one single-row INSERT, so it is atomic; history stays for audit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from migrator import transport
from migrator.tracking import LATEST_READ, QUORUM_WRITE, ensure_schema, insert_row, next_version

from ..errors import BackfillError
from ..spec.render import RAW_BYTE

TABLE = "db_management.backfills"
SCHEMA = [
    "CREATE DATABASE IF NOT EXISTS db_management",
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        backfill_id String,
        migration_version UInt64,
        db_name String,
        status String,
        checkpoint_data String,
        rows_processed UInt64,
        started_at Nullable(DateTime64(3)),
        updated_at DateTime64(3) DEFAULT now64(3),
        completed_at Nullable(DateTime64(3)),
        error_log Nullable(String),
        version UInt64,
        writer String DEFAULT ''
    ) ENGINE = MergeTree ORDER BY (db_name, migration_version, version)""",
]
TYPES = {"backfill_id": "String", "migration_version": "UInt64", "db_name": "String", "status": "String",
         "checkpoint_data": "String", "rows_processed": "UInt64", "started_at": "Nullable(DateTime64(3))",
         "updated_at": "DateTime64(3)", "completed_at": "Nullable(DateTime64(3))", "error_log": "Nullable(String)",
         "version": "UInt64", "writer": "String"}
COLUMNS = list(TYPES)
STATUSES = ("pending", "running", "paused", "completed", "failed")


def backfill_id(database: str, version: int) -> str:
    """One id per database and version: the key of every tracking row."""
    return f"{database}_{version}"


def utcnow() -> datetime:
    """Naive UTC, as DateTime64 columns store it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_checkpoint(spec) -> dict:
    """The checkpoint of a backfill that has not run: no position, the meta's batch size."""
    return {"position": None, "in_flight": None, "rows_processed": 0, "batches_completed": 0,
            "current_batch_size": spec.meta["batch_size"], "started_at": None, "last_updated": None,
            "params": None, "recent": []}


def state_client(client):
    """Checkpoint writes (the heartbeat's too) need their own chDB handle: a handle runs one query
    at a time, and a batch may hold it for minutes. Server clients without a session are shared."""
    path = getattr(client, "path", None)
    if type(client).__name__ == "ChdbClient" and path and path != ":memory:":
        import clickhouse_connect
        return clickhouse_connect.get_client(dsn=f"chdb://{path}")
    return client


@dataclass
class Row:
    """One version of a backfill's state."""

    backfill_id: str
    migration_version: int
    db_name: str
    status: str = "pending"
    checkpoint: dict = field(default_factory=dict)
    rows_processed: int = 0
    started_at: datetime | None = None
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    error_log: str | None = None
    version: int = 0
    writer: str = ""


def _is_range(batch) -> bool:
    return (isinstance(batch, dict) and isinstance(batch.get("end"), list)
            and (batch.get("start") is None or isinstance(batch.get("start"), list)))


def _check_shape(cp: dict) -> None:
    """Wrong types would not fail loudly later: a text position is iterated as characters."""
    if cp.get("position") is not None and not isinstance(cp["position"], list):
        raise ValueError("position is not a list of key values")
    if cp.get("in_flight") is not None and not _is_range(cp["in_flight"]):
        raise ValueError("in_flight is not a key range")
    for key in ("rows_processed", "batches_completed", "current_batch_size"):
        if cp.get(key) is not None and (isinstance(cp[key], bool) or not isinstance(cp[key], int)):
            raise ValueError(f"{key} is not an integer")
    if cp.get("lease") is not None and not isinstance(cp["lease"], dict):
        raise ValueError("lease is not an object")


class CheckpointStore:
    """Load and save backfill rows; corrupt state is an error, never a silent restart from zero.

    Reads see the newest rows on replicated or load-balanced servers (a lease claim or a checkpoint
    read from a lagging replica would decide wrong). The table is created only by commands that
    write (`ensure_schema`): `status`, `list` and `pause` send no DDL.
    """

    def __init__(self, client, cluster: str | None = None):
        self.client, self.cluster = client, cluster
        self._exists = False

    def exists(self) -> bool:
        """Whether the tracking table is there (asked once; read-only commands must not create it)."""
        if not self._exists:
            self._exists = bool(self.client.command(f"EXISTS TABLE {TABLE}"))
        return self._exists

    def ensure_schema(self) -> None:
        """Create the tracking table (ON CLUSTER under --cluster) if it is missing; nothing otherwise."""
        if not self._exists:
            ensure_schema(self.client, self.cluster, schema=SCHEMA)  # sends DDL only for what is missing
            self._exists = True

    def _select(self, where: str, params: dict, per_id: bool = False) -> list[tuple]:
        if not self.exists():
            return []
        cols = ", ".join(COLUMNS)
        limit = "LIMIT 1 BY backfill_id" if per_id else ""
        return self.client.query(f"SELECT {cols} FROM {TABLE} WHERE {where} ORDER BY version DESC, writer DESC {limit}",
                                 parameters=params, settings=LATEST_READ).result_rows

    def _row(self, values: tuple) -> Row:
        data = dict(zip(COLUMNS, values))
        raw = data.pop("checkpoint_data")
        try:
            checkpoint = json.loads(raw) if raw else {}
            if not isinstance(checkpoint, dict):
                raise ValueError("not a JSON object")
            # Only a backfill that never ran may lack a position (a seed-style pending row, or one
            # paused before it started); otherwise starting from nothing would redo it from zero.
            if "position" not in checkpoint and (data["status"] not in ("pending", "paused") or data["rows_processed"]):
                raise ValueError("no position recorded" if raw.strip() else "empty")
            _check_shape(checkpoint)
        except ValueError as exc:
            raise BackfillError(
                f"checkpoint_data of backfill {data['backfill_id']} (row version {data['version']}) is corrupt "
                f"({exc}); nothing was run. Repair it by inserting a corrected row, or start over with "
                f"'migrate backfill reset {data['migration_version']} --yes'") from None
        return Row(checkpoint=checkpoint, **data)

    def load(self, bid: str) -> Row | None:
        """The newest row of one backfill, or None if it was never registered."""
        rows = self._select("backfill_id = {b:String}", {"b": bid})
        return self._row(rows[0]) if rows else None

    def load_all(self, database: str | None = None) -> list[Row]:
        """Newest row of each backfill (one database or all); corrupt rows raise."""
        where, params = ("db_name = {d:String}", {"d": database}) if database else ("1", {})
        return [self._row(r) for r in self._select(where, params, per_id=True)]

    def save(self, row: Row) -> Row:
        """Insert a new version; `row.version` becomes that version."""
        row.version = next_version()
        row.updated_at = utcnow()
        row.rows_processed = int(row.checkpoint.get("rows_processed", row.rows_processed))
        data = json.dumps(row.checkpoint, default=str, ensure_ascii=False)
        if RAW_BYTE.search(data):  # a key that is not UTF-8 text: keep its bytes as \udcXX escapes
            data = json.dumps(row.checkpoint, default=str)
        values = {**row.__dict__, "checkpoint_data": data}
        for col in ("started_at", "updated_at", "completed_at"):
            if values[col] is not None:
                values[col] = values[col].strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        # Written again across a network or proxy fault: a second copy of a row (same version, same content)
        # changes nothing, and a pause another process wrote meanwhile has a newer version either way.
        transport.retry(lambda: insert_row(self.client, TABLE, TYPES, values, settings=QUORUM_WRITE),
                        f"state write of backfill {row.backfill_id}")
        return row

    def others_since(self, bid: str, since_version: int, me: str) -> tuple[int, int]:
        """Rows others wrote after `since_version`: (pause requests, running claims by another runner)."""
        paused, running = self.client.query(
            f"SELECT countIf(status = 'paused'), countIf(status = 'running') FROM {TABLE} "
            f"WHERE backfill_id = {{b:String}} AND version > {{v:UInt64}} AND writer != {{w:String}}",
            parameters={"b": bid, "v": since_version, "w": me}, settings=LATEST_READ).result_rows[0]
        return int(paused), int(running)
