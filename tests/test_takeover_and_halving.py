"""Two guarantees at a batch boundary, on the real engine: a runner whose lease another runner took starts
no further batch, and a batch halved after a real out-of-memory error is written ahead before it runs."""
from __future__ import annotations

import json
import threading
import time

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.protocol import lease
from backfill_plugin.protocol.batch import Batch
from backfill_plugin.protocol.checkpoint import CheckpointStore, backfill_id
from tests.conftest import (
    DiesAfterInsert,
    ProcessDied,
    Recording,
    Runner,
    assert_copied_exactly,
    own_client,
    wait_until,
)
from tests.test_faults import COPY_SQL, OOM_SETTINGS, OOM_SQL, OOM_UP, meta, source_sql

SLOW_COPY = COPY_SQL + " AND sleepEachRow(0.0005) = 0"  # ~50 ms a batch of 100: the new runner is still busy


def tracking_rows(client, bid: str) -> list[tuple[str, int]]:
    """(writer, version) of every tracking row of the backfill, oldest first."""
    return client.query("SELECT writer, version FROM db_management.backfills WHERE backfill_id = {b:String} "
                        "ORDER BY version", parameters={"b": bid}).result_rows


def test_runner_whose_lease_was_taken_stops_at_its_next_batch_boundary(ch_client, store_url, db, shared_store_backfill,
                                                                       monkeypatch):
    """Runner A waits at a batch boundary (its `on_batch` callback blocks) while runner B, a second manager
    with its own handle, takes the lease over: B runs with a 0.5 s lease and A, started with 60 s, beats
    every 15 s, so B finds A's lease stale as it would after A's heartbeats stopped reaching the store.
    Released once B is copying, A must stop with "lease lost": no batch, no INSERT, no tracking row after
    B's claim; B finishes and the target is exact."""
    rows = 6_000
    root = shared_store_backfill(source_sql(rows), SLOW_COPY, meta(100))
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "60")
    recording = Recording(ch_client, f"{db}.dst")
    first = ClickHouseBackfillManager(recording, migrations_dir=root)
    at_boundary, release = threading.Event(), threading.Event()

    def hold_after_second_batch(summary, event):
        if event["number"] == 2:
            at_boundary.set()
            release.wait(60)
    runner_a = Runner(first, db, on_batch=hold_after_second_batch)
    runner_a.start()
    assert at_boundary.wait(60), (runner_a.error, runner_a.result)
    second = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    heartbeat = float(second.get_status(db, 1, live_counts=False)["lease"]["heartbeat"])
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.5")  # read by B when it checks A's lease
    wait_until(lambda: time.time() > heartbeat + 0.7)
    runner_b = Runner(second, db)
    runner_b.start()

    def b_is_copying():
        status = second.get_status(db, 1, live_counts=False)
        return (status["lease"] or {}).get("owner") == second.owner and status["batches_completed"] >= 5
    wait_until(b_is_copying)
    inserts_before = len(recording.inserts)
    release.set()
    runner_a.join(60)
    assert not runner_a.is_alive() and runner_a.error is None, runner_a.error
    assert runner_a.result["stopped"] == "lease lost", runner_a.result
    assert len(recording.inserts) == inserts_before == 2  # A started no batch after the takeover
    history = tracking_rows(ch_client, backfill_id(db, 1))
    b_claim = min(version for writer, version in history if writer == second.owner)
    assert not [v for w, v in history if w == first.owner and v > b_claim], "A wrote after B's claim"
    runner_b.join(120)
    assert runner_b.error is None, runner_b.error
    assert (runner_b.result["stopped"], runner_b.result["rows_processed"]) == ("completed", rows)
    assert_copied_exactly(ch_client, db, rows)


class InFlightAtInsert(Recording):
    """Records, as each INSERT into the target starts, the in-flight range the store holds for it then."""

    def __init__(self, client, target: str, store: CheckpointStore, bid: str):
        super().__init__(client, target)
        self.store, self.bid, self.seen = store, bid, []

    def command(self, sql, *args, **kwargs):
        if sql.lstrip().startswith("/*") and f"INSERT INTO {self.target}" in sql:
            stored = self.store.load(self.bid).checkpoint.get("in_flight")
            token = (kwargs.get("settings") or {}).get("insert_deduplication_token")
            self.seen.append((stored and Batch.from_json(stored), token))
        return super().command(sql, *args, **kwargs)


def test_halved_batch_is_written_ahead_before_its_insert_starts(ch_client, store_url, db, shared_store_backfill):
    """A real MEMORY_LIMIT_EXCEEDED (241) on the wide half of the source: every INSERT, the halved one
    included, starts only once the store holds exactly its range as in flight (its token is that range's)."""
    rows = 80_000
    root = shared_store_backfill(OOM_UP, OOM_SQL, meta(20_000, min_batch_size=1000, settings=OOM_SETTINGS))
    bid = backfill_id(db, 1)
    client = InFlightAtInsert(ch_client, f"{db}.dst", CheckpointStore(own_client(store_url)), bid)
    result = ClickHouseBackfillManager(client, migrations_dir=root).run_backfill(db, 1)
    assert result["stopped"] == "completed" and result["current_batch_size"] == 10_000
    sizes = [batch.batch_size for batch, _ in client.seen]
    assert sizes[:4] == [20_000, 20_000, 20_000, 10_000], sizes  # the third batch ran out of memory
    for batch, token in client.seen:
        assert token == batch.token(bid), f"an INSERT ran a range the checkpoint did not hold: {batch}"
    assert_copied_exactly(ch_client, db, rows)


def test_crash_after_the_halved_insert_then_resume_is_exact(ch_client, db, shared_store_backfill, monkeypatch):
    """Injected fault (see DiesAfterInsert): the process dies right after the halved INSERT commits. The
    operator then raises max_memory_usage and resumes: the whole batch would now fit, so only the halved
    range written ahead keeps the replay to the rows already committed (token-only SQL: same range,
    same token, dropped by the target) instead of copying them a second time."""
    rows = 80_000
    settings = meta(20_000, min_batch_size=1000, settings=OOM_SETTINGS)
    root = shared_store_backfill(OOM_UP, OOM_SQL, settings)
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.5")  # the dead runner's pid is ours: wait out its lease
    dying = DiesAfterInsert(ch_client, f"{db}.dst", at=3)  # 2 narrow batches, then the halved one
    try:
        ClickHouseBackfillManager(dying, migrations_dir=root).run_backfill(db, 1)
        raise AssertionError("the runner did not die")
    except (ProcessDied, ConnectionError):
        pass
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 50_000  # the halved INSERT committed
    (root / "001_x.backfill.meta").write_text(json.dumps({**settings, "settings": {"max_threads": 1}}))
    time.sleep(0.6)
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)
    assert (result["stopped"], result["rows_processed"]) == ("completed", rows)
    assert_copied_exactly(ch_client, db, rows)


def test_a_claim_on_a_stale_read_never_moves_the_position_back(ch_client, db, shared_store_backfill):
    """Found by the chaos soak (seed 32 of the weighted short form: 300 keys twice in an anti-join target). Runner
    B reads the row, then spends time planning its SQL; meanwhile runner A claims and commits batches. B's claim
    must not write the position it read (that moves the walk back over A's batches, which B would then write
    again as first attempts): B stops without a write, and a later run goes on from A's position, exact."""
    root = shared_store_backfill(source_sql(1_000), COPY_SQL, meta(100))
    runner_a = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner_a.run_backfill(db, 1, max_batches=1)
    store, bid = CheckpointStore(ch_client), backfill_id(db, 1)
    stale = store.load(bid)  # what runner B read when it started
    runner_a.run_backfill(db, 1, max_batches=3)  # A claims and commits three more batches meanwhile
    moved = store.load(bid)
    assert moved.checkpoint["position"] != stale.checkpoint["position"]
    runner_b = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    try:
        lease.claim(store, stale, runner_b.owner, lambda r: store.save(r))
    except BackfillError as exc:
        assert "changed while this run was starting" in str(exc) and "nothing was written" in str(exc), exc
    else:
        raise AssertionError("a claim on a stale read was written")
    newest = store.load(bid)
    assert newest.version == moved.version and newest.checkpoint["position"] == moved.checkpoint["position"]
    assert runner_b.run_backfill(db, 1)["stopped"] == "completed"
    assert_copied_exactly(ch_client, db, 1_000)
