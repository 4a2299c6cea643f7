"""The batch history: every attempt of every batch (committed, retried, halved, failed, refused, replayed) and
every throttle wait before one, in `db_management.backfill_history` beside the tracking table.

A built-in plugin on the public hooks, registered through its own entry point (`backfill_history`) as a
third party's would be: it hears `backfill_batch_attempted` and writes through the client that holds the
backfill's checkpoint (`backfill.client`), so on a shard the history lands on the shard the walk runs on.

One INSERT per batch at most: the events of a batch (its throttle waits, retries, halvings) are buffered and
handed over together with its last attempt (committed, failed or refused), or when the runner stops. A writer
thread of its own, on a handle of its own, runs that INSERT beside the next batch's, so it costs the batch loop
nothing (an INSERT into a MergeTree writes a part: tens of ms on a busy machine; bench/bench_overhead.py); when
the runner stops, its rows are written before the command returns. Not `async_insert`: on the embedded store its
buffer lives in the runner's process and a kill -9 would lose every batch of its flush interval, while here a
kill -9 loses at most the rows whose INSERT had not finished (the batch it interrupted, and rarely the one
before); a replayed batch is recorded again by the next run, with `replay` true.
Insert-only MergeTree with a TTL: nothing ever updates a row, and old runs age out on their own.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import threading

from migrator import hookimpl
from migrator.tracking import ensure_schema

from ..errors import error_code
from ..protocol.checkpoint import state_client

log = logging.getLogger("backfill")

TABLE = "db_management.backfill_history"
TTL_DAYS = 90
SCHEMA = [
    "CREATE DATABASE IF NOT EXISTS db_management",
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        backfill_id String,
        db_name String,
        migration_version UInt64,
        backfill_started_at String,
        shard String,
        scope String,
        batch_number UInt64,
        attempt UInt32,
        outcome LowCardinality(String),
        replay Bool,
        range_start Nullable(String),
        range_end Nullable(String),
        rows UInt64,
        batch_size UInt64,
        seconds Float64,
        error String,
        signal String,
        runner String,
        started_at DateTime64(3),
        recorded_at DateTime64(3) DEFAULT now64(3)
    ) ENGINE = MergeTree ORDER BY (db_name, migration_version, started_at, batch_number, attempt)
    TTL toDateTime(started_at) + INTERVAL {TTL_DAYS} DAY""",
]
TYPES = {
    "backfill_id": "String",
    "db_name": "String",
    "migration_version": "UInt64",
    "backfill_started_at": "String",
    "shard": "String",
    "scope": "String",
    "batch_number": "UInt64",
    "attempt": "UInt32",
    "outcome": "String",
    "replay": "Bool",
    "range_start": "Nullable(String)",
    "range_end": "Nullable(String)",
    "rows": "UInt64",
    "batch_size": "UInt64",
    "seconds": "Float64",
    "error": "String",
    "signal": "String",
    "runner": "String",
    "started_at": "Float64",
}  # as sent: the engine makes the unix time a DateTime64
COLUMNS = list(TYPES)
STRUCTURE = ", ".join(f"{name} {typ}" for name, typ in TYPES.items())  # stated: inference would read text as dates
FINAL = ("committed", "failed", "refused")  # the last attempt of a batch: its buffered events are written then
UNKNOWN_TABLE = 60
STOP_WAIT_SECONDS = 30.0  # how long a stopping runner waits for its history rows to be written

_buffers: dict[tuple, list[dict]] = {}  # (backfill_id, shard) -> rows not handed to the writer yet


def _key(backfill) -> tuple:
    """One buffer per walk: on shards the walks of one backfill share its id, each writes to its own shard."""
    return backfill.backfill_id, getattr(backfill, "shard", "") or ""
_ready: dict[int, object] = {}  # id(client) -> client whose history table is known to exist
_handles: dict[object, tuple] = {}  # id(checkpoint client) -> (it, the writer's handle on the same store or server)


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _row(backfill, event: dict) -> dict:
    return {
        "backfill_id": backfill.backfill_id,
        "db_name": backfill.database,
        "migration_version": int(backfill.version),
        "backfill_started_at": event.get("backfill_started_at") or "",
        "shard": getattr(backfill, "shard", "") or "",
        "scope": event.get("scope") or "",
        "batch_number": int(event["number"]),
        "attempt": int(event["attempt"]),
        "outcome": event["outcome"],
        "replay": bool(event["replay"]),
        "range_start": _json(event["range_start"]),
        "range_end": _json(event["range_end"]),
        "rows": int(event["rows"] or 0),
        "batch_size": int(event["batch_size"] or 0),
        "seconds": float(event["seconds"] or 0.0),
        "error": event.get("error") or "",
        "signal": event.get("signal") or "",
        "runner": event.get("runner") or "",
        "started_at": float(event["started_at"]),
    }


def write(client, rows: list[dict]) -> None:
    """One INSERT of `rows`; the table is created by the first write of a process (only runs write: `status`,
    `list` and `history` never create it)."""
    if id(client) not in _ready:
        ensure_schema(client, None, schema=SCHEMA)
        _ready[id(client)] = client
    data = "\n".join(json.dumps({c: r[c] for c in COLUMNS}) for r in rows)
    try:
        _insert(client, data)
    except Exception as exc:
        if error_code(exc) != UNKNOWN_TABLE:
            raise
        ensure_schema(client, None, schema=SCHEMA)  # dropped since this process created it (a test, an operator)
        _insert(client, data)


def _insert(client, data: str) -> None:
    client.command(
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT * REPLACE (toDateTime64(started_at, 3) AS "
        f"started_at) FROM format(JSONEachRow, '{STRUCTURE}', {{rows:String}})",
        parameters={"rows": data},
    )


class Writer:
    """The thread that runs the history INSERTs: rows queued while one runs go into the next, together."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def submit(self, client, rows: list[dict]) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, daemon=True, name="backfill-history")
                self.thread.start()
        self.queue.put((client, rows))

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            by_client: dict[int, tuple] = {}
            for client, rows in items:
                by_client.setdefault(id(client), (client, []))[1].extend(rows)
            for client, rows in by_client.values():
                try:
                    write(client, rows)
                except Exception as exc:  # the history is a record of the run, never a reason to stop it
                    log.warning("%s batch history rows not written: %s", len(rows), exc)
            for _ in items:
                self.queue.task_done()

    def wait(self, timeout: float = STOP_WAIT_SECONDS) -> bool:
        """Until every submitted row is written (True), or `timeout` passed."""
        done = threading.Event()
        threading.Thread(target=lambda: (self.queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)


_writer = Writer()
atexit.register(_writer.wait)  # a run that ends without a status change (a lost lease) still writes its rows


def _handle(client):
    """The writer's own handle: an embedded store's handle runs one query at a time (checkpoint.state_client);
    one per store path, however many managers a process makes. A server client is shared as it is."""
    key = getattr(client, "path", None) or id(client)
    if key not in _handles:
        _handles[key] = (client, state_client(client))
    return _handles[key][1]


def flush(backfill, wait: bool = False) -> None:
    """Hand what is buffered for `backfill` to the writer; with `wait`, return once it is written."""
    rows = _buffers.pop(_key(backfill), None)
    if rows and backfill.client is not None:
        _writer.submit(_handle(backfill.client), rows)
    if wait:
        _writer.wait()


@hookimpl
def backfill_batch_attempted(backfill, event):
    """Buffer the event (a throttle wait replaces its own earlier reading); write the batch's rows at its end."""
    rows, row = _buffers.setdefault(_key(backfill), []), _row(backfill, event)
    same_wait = (
        rows
        and row["outcome"] == "throttled"
        and rows[-1]["outcome"] == "throttled"
        and rows[-1]["started_at"] == row["started_at"]
    )
    if same_wait:
        rows[-1] = row
    else:
        rows.append(row)
    if event["outcome"] in FINAL:
        flush(backfill)


@hookimpl
def backfill_status_changed(backfill, status, error):
    """A runner that stops (a pause during a throttle wait, a signal between retries) writes what it buffered."""
    if status != "running":
        flush(backfill, wait=True)


# -- reading ---------------------------------------------------------------------------------------------
READ_COLUMNS = [
    "started_at",
    "batch_number",
    "attempt",
    "outcome",
    "replay",
    "rows",
    "batch_size",
    "seconds",
    "range_start",
    "range_end",
    "error",
    "signal",
    "scope",
    "runner",
    "shard",
    "backfill_started_at",
]


def exists(client) -> bool:
    return bool(client.command(f"EXISTS TABLE {TABLE}"))


def read(client, database: str, version: int, last: int | None = None) -> list[dict]:
    """The newest `last` events of a backfill (all with None), oldest first; [] when nothing was recorded."""
    if not exists(client):
        return []
    limit = "LIMIT {n:UInt64}" if last else ""
    rows = client.query(
        f"SELECT {', '.join(READ_COLUMNS)} FROM {TABLE} WHERE db_name = {{d:String}} AND migration_version = "
        f"{{v:UInt64}} ORDER BY started_at DESC, batch_number DESC, attempt DESC, recorded_at DESC {limit}",
        parameters={"d": database, "v": version, "n": last or 0},
    ).result_rows
    out = []
    for values in reversed(rows):
        item = dict(zip(READ_COLUMNS, values))
        item["started_at"] = item["started_at"].isoformat(sep=" ", timespec="milliseconds")
        item["range_start"], item["range_end"] = (
            json.loads(v) if v is not None else None for v in (item["range_start"], item["range_end"])
        )
        item["replay"], item["seconds"] = bool(item["replay"]), round(float(item["seconds"]), 3)
        out.append(item)
    return out


def totals(client, database: str, version: int, backfill_started_at: str | None) -> dict:
    """Attempts by outcome, and the source rows of the committed ranges (each range once: a replay of a range
    whose first commit was never recorded in the checkpoint is the same range), since the backfill's last start
    from zero (a reset starts a new one)."""
    if not exists(client) or not backfill_started_at:
        return {"attempts": {}, "committed_ranges": 0, "committed_rows": 0}
    where = (
        "db_name = {d:String} AND migration_version = {v:UInt64} AND backfill_started_at = {s:String} AND scope = ''"
    )
    params = {"d": database, "v": version, "s": backfill_started_at}
    attempts = dict(
        client.query(
            f"SELECT outcome, count() FROM {TABLE} WHERE {where} GROUP BY outcome", parameters=params
        ).result_rows
    )
    ranges, rows = client.query(
        f"SELECT count(), sum(rows) FROM (SELECT rows FROM {TABLE} WHERE {where} AND outcome = 'committed' "
        f"ORDER BY started_at DESC LIMIT 1 BY range_start, range_end)",
        parameters=params,
    ).result_rows[0]
    return {
        "attempts": {k: int(v) for k, v in attempts.items()},
        "committed_ranges": int(ranges),
        "committed_rows": int(rows or 0),
    }
