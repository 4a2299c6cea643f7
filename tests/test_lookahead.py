"""The next batch's range looked up beside the current INSERT: used only for the range it was started
from, looked up again otherwise, and a backfill walks the same ranges with it as without it."""
from __future__ import annotations

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.protocol.keys import KeySpace
from backfill_plugin.protocol.lookahead import Lookahead
from tests.test_migrator_cluster import Recorder
from tests.test_protocol_guards import ANTI_JOIN, META, UP


def _keys(ch_client, db) -> KeySpace:
    ch_client.command(f"CREATE TABLE {db}.src (a String, b UInt32) ENGINE = MergeTree ORDER BY (a, b)")
    ch_client.command(f"INSERT INTO {db}.src SELECT toString(number % 7), number FROM numbers(3000)")
    return KeySpace(db, "src", {"a": "String", "b": "UInt32"})


def test_a_lookup_is_used_only_for_the_range_and_size_it_was_started_from(ch_client, db):
    keys = _keys(ch_client, db)
    main, side = Recorder(ch_client), Recorder(ch_client)
    ahead = Lookahead(keys, side)
    try:
        first = keys.next_batch(ch_client, None, 400)
        ahead.start(first[0], 400, None)
        hit = ahead.next_batch(main, first[0], 400, None)
        assert hit == keys.next_batch(ch_client, first[0], 400) and hit[1] == 400
        assert side.sent and not main.sent  # looked up on the lookahead's own client
        side.sent.clear()
        ahead.start(hit[0], 400, None)
        resized = ahead.next_batch(main, hit[0], 250, None)  # the size changed after the batch: ask again
        assert resized == keys.next_batch(ch_client, hit[0], 250) and resized[1] == 250
        assert main.sent
        main.sent.clear()
        ahead.start(first[0], 400, None)
        moved = ahead.next_batch(main, hit[0], 400, None)  # the batch ended elsewhere (an OOM halving)
        assert moved == keys.next_batch(ch_client, hit[0], 400) and main.sent
    finally:
        ahead.close()


def test_a_failed_or_empty_lookup_is_asked_again_on_the_main_client(ch_client, db):
    """The lookahead's failure is injected (a client that refuses every query): the engine cannot be
    made to fail one handle on demand."""
    keys = _keys(ch_client, db)

    class Refusing:
        def query(self, *a, **k):
            raise RuntimeError("Code: 210. DB::NetException: Connection refused")

        command = query
    for side in (Refusing(), ch_client):
        ahead = Lookahead(keys, side)
        try:
            ahead.start(None, 400, None)
            assert ahead.next_batch(ch_client, None, 400, None) == keys.next_batch(ch_client, None, 400)
        finally:
            ahead.close()
    last = keys.next_batch(ch_client, None, 3000)[0]
    ahead = Lookahead(keys, Recorder(ch_client))
    try:
        ahead.start(last, 400, None)
        assert ahead._pending[1].result() is None  # the lookup has finished: no keys left then
        ch_client.command(f"INSERT INTO {db}.src VALUES ('9', 1)")  # a row arrives before the next batch
        assert ahead.next_batch(ch_client, last, 400, None) == (["9", 1], 1)
    finally:
        ahead.close()


def test_a_backfill_with_the_lookahead_copies_every_row_once_in_the_same_ranges(ch_client, db, migrations,
                                                                                 migrator_for):
    root = migrations(1, "copy", UP, "SELECT 1", ANTI_JOIN, META)
    migrator_for(db, root).up()
    ends = []
    status = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(
        db, 1, on_batch=lambda summary, event: ends.append((event["range_end"], event["rows"])))
    assert status["status"] == "completed" and status["rows_processed"] == 4000
    keys = KeySpace(db, "src", {"a": "String", "b": "UInt32"})
    expected, position = [], None
    while (found := keys.next_batch(ch_client, position, 1000)) is not None:
        expected.append(found)
        position = found[0]
    assert ends == expected  # the ranges a walk without lookahead takes
    same = "SELECT count(), sum(cityHash64(a, b, v)) FROM {db}.{t}"
    assert ch_client.query(same.format(db=db, t="dst")).result_rows == ch_client.query(same.format(db=db, t="src")).result_rows
    assert ch_client.command(f"SELECT count() - uniqExact(a, b) FROM {db}.dst") == 0


def test_a_lookup_starts_only_once_the_size_held_since_the_last_batch(ch_client, db):
    keys = _keys(ch_client, db)
    side = Recorder(ch_client)
    ahead = Lookahead(keys, side)
    try:
        first = keys.next_batch(ch_client, None, 400)
        for size, looked_up in ((400, False), (600, False), (600, True)):  # first batch, resized, held
            side.sent.clear()
            ahead.after_write_ahead(first[0], size, None)
            if ahead._pending:
                ahead._pending[1].result()
            assert bool(side.sent) is looked_up, (size, side.sent)
        assert ahead.next_batch(ch_client, first[0], 600, None) == keys.next_batch(ch_client, first[0], 600)
    finally:
        ahead.close()
