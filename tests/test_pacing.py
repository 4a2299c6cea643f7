"""Pacing: the adaptive batch size, health throttling on the real engine, the wait and the rate ceiling.

The sizer and the rate ceiling are pure arithmetic over a clock: they are driven by a simulated
cost model and an injected clock (no wall-time assertions). The health signals run their queries on
chDB; only replica lag, which embedded chDB cannot have, is answered by a fake (see its docstring).
"""
from __future__ import annotations

import json
import random
import re
import time
from types import SimpleNamespace

import pytest

from backfill_plugin.errors import BackfillError
from backfill_plugin.pacing.health import Health, Limits, Throttle, wait_until_healthy
from backfill_plugin.pacing.pacer import CheckSchedule
from backfill_plugin.pacing.sizing import BatchSizer, RateCeiling
from backfill_plugin.spec.meta import MAX_INT, load_spec, parse_override
from migrator.discovery import discover


# -- the batch size ------------------------------------------------------------------------------
def cost(fixed: float, rate: float):
    """Seconds of a batch: a fixed cost per statement plus rows at a rate."""
    return lambda rows: fixed + rows / rate


def drive(state: dict, size: int, batches: int, seconds_of, target=2.0, lo=1000, hi=10_000_000) -> list[int]:
    """Run `batches` batches through a sizer rebuilt from JSON each time (as from the checkpoint); the sizes used."""
    sizes = []
    for _ in range(batches):
        state = json.loads(json.dumps(state))
        sizer = BatchSizer(state, size, target, lo, hi)
        sizes.append(size)
        size = sizer.observe(size, seconds_of(size), size)
    drive.state = state
    return sizes + [size]


def steps_bounded(sizes: list[int], up: float = 1.5) -> bool:
    return all(b <= a * up + 1 and b >= a / 2 - 1 for a, b in zip(sizes, sizes[1:]))


def test_size_settles_near_the_target_and_shrinks_again_when_batches_slow_down():
    fast, slow = cost(0.5, 100_000), cost(0.5, 25_000)  # meet 2 s at 150,000 and at 37,500 rows
    sizes = drive({}, 10_000, 40, fast)
    assert all(75_000 <= s <= 300_000 for s in sizes[-10:]), sizes
    assert steps_bounded(sizes)
    state = drive.state
    assert "vs target 2 s" in state["reason"] and state["changed_at"], state
    later = drive(state, sizes[-1], 40, slow)
    assert all(18_750 <= s <= 75_000 for s in later[-10:]), later
    assert steps_bounded(later)
    assert later[-1] < sizes[-1] / 2
    assert "->" in drive.state["reason"]


def test_one_outlier_batch_moves_the_size_at_most_one_bounded_step():
    model = cost(0.2, 100_000)
    sizes = drive({}, 50_000, 40, model)
    settled, size = drive.state, sizes[-1]

    def after_one(seconds: float) -> tuple[int, dict]:
        state = json.loads(json.dumps(settled))
        return BatchSizer(state, size, 2.0, 1000, 10_000_000).observe(size, seconds, size), state

    slowed, state = after_one(model(size) * 20)  # one batch 20x slower (a merge storm, a cold cache)
    assert size / 2 <= slowed < size  # one step of at most /2
    assert size / 3 * 1.5 < after_one(model(size) * 3)[0] < size  # that batch alone would ask for a third
    assert size < after_one(model(size) / 10)[0] <= size * 1.5  # one very fast batch: at most x1.5
    recovered = drive(state, slowed, 15, model)
    assert recovered[-1] >= size / 1.5 and steps_bounded(recovered)


def test_after_an_oom_the_size_grows_back_only_gradually():
    model = cost(0.1, 1_000_000)  # cheap rows: the size wants to grow to the maximum
    sizes = drive({}, 100_000, 30, model, hi=400_000)
    assert sizes[-1] == 400_000
    state = drive.state
    sizer = BatchSizer(state, 400_000, 2.0, 1000, 400_000)
    # attempt.py halved the batch on MEMORY_LIMIT_EXCEEDED: it committed at 200,000 after the failure
    assert sizer.observe(200_000, 9.0, 200_000) == 200_000  # the halved batch's time teaches nothing
    assert state["oom"]["failed_size"] == 400_000
    assert state["reason"] == "out of memory at 400,000: halved to 200,000, then at most 300,000 for 20 batches"
    regrow = drive(state, 200_000, 19, model, hi=400_000)
    assert steps_bounded(regrow, up=1.2)
    assert max(regrow) <= 300_000 and regrow[-1] == 300_000  # held below the size that failed
    assert drive.state["reason"].endswith("held below the size that ran out of memory (400,000): 288,000 -> 300,000")
    back = drive(drive.state, regrow[-1], 5, model, hi=400_000)
    assert back[-1] == 400_000  # the hold ends after a while


def test_an_oom_reported_by_the_caller_is_counted_once():
    state = {}
    sizer = BatchSizer(state, 80_000, 2.0, 1000, 1_000_000)
    sizer.observe(80_000, 1.0, 80_000)
    assert sizer.oom(80_000, 40_000) == 40_000
    assert sizer.observe(40_000, 30.0, 40_000) == 40_000  # that batch's time includes the failure
    assert state["oom"]["failed_size"] == 80_000 and state["oom"]["batches_left"] == 20  # that batch not counted
    assert sizer.observe(40_000, 1.0, 40_000) <= 48_000


def test_bounds_hold_whatever_the_batches_take():
    rnd = random.Random(7)
    state, size, sizes = {}, 5_000, []
    for i in range(300):  # a cheap stretch, an expensive one, then anything
        sizer = BatchSizer(state, size, 1.5, 2_000, 60_000)
        per_row = 1e-7 if i < 60 else 1e-2 if i < 120 else rnd.choice([1e-7, 1e-5, 1e-4, 1e-3, 1e-2])
        seconds = per_row * size * rnd.uniform(0.5, 2)
        new = sizer.observe(size, seconds, size)
        assert 2_000 <= new <= 60_000 and size / 2 - 1 <= new <= size * 1.5 + 1
        sizes.append(new)
        size = new
    assert min(sizes) == 2_000 and max(sizes) == 60_000  # both bounds are reached, neither is passed


def test_an_operator_size_outside_the_bounds_is_brought_back_and_no_target_keeps_the_size():
    state = {}
    BatchSizer(state, 5_000, 2.0, 1000, 10_000).observe(5_000, 1.0, 5_000)
    sizer = BatchSizer(state, 50_000, 2.0, 1000, 10_000)  # `run --batch-size 50000`
    assert "set to 50,000 by the operator" in state["reason"]
    assert sizer.observe(50_000, 10.0, 50_000) == 10_000  # the bounds win over the step limit
    assert sizer.observe(10_000, 0.1, 10_000) == 10_000  # however fast, never above max
    assert BatchSizer(state, 10, 2.0, 1000, 10_000).observe(10, 5.0, 10) == 1000  # nor below min
    fixed = {}
    sizer = BatchSizer(fixed, 7_000, "off", 1000, 100_000)
    assert [sizer.observe(7_000, s, 7_000) for s in (0.01, 50.0, 3.0)] == [7_000] * 3
    assert sizer.observe(3_500, 9.0, 3_500) == 3_500 and sizer.observe(3_500, 0.01, 3_500) == 3_500  # OOM-halved stays
    assert BatchSizer({}, 7_000, None, 1000, 100_000).observe(7_000, 0.01, 7_000) == 7_000


# -- health signals on the real engine -----------------------------------------------------------
def _table(client, db: str, settings: str = "") -> None:
    client.command(f"CREATE TABLE {db}.t (a UInt32, p UInt8, v UInt32 DEFAULT 0) ENGINE = MergeTree "
                   f"PARTITION BY p ORDER BY a{settings}")
    client.command(f"SYSTEM STOP MERGES {db}.t")
    for i in range(6):
        client.command(f"INSERT INTO {db}.t (a, p) VALUES ({i}, {1 + (i == 5)})")  # partition 1: 5 parts


def test_active_parts_past_a_small_limit_throttle_until_merged(ch_client, db):
    _table(ch_client, db)
    throttle = Health(ch_client, db, "t", Limits(max_target_parts=3)).check()
    assert throttle == Throttle("target_parts", 5, 3, f"{db}.t partition 1 has 5 active parts, over "
                                                     f"max_target_parts 3 (merges are behind)")
    assert throttle.to_json()["value"] == 5
    assert Health(ch_client, db, "t", Limits(max_target_parts=5)).check() is None  # at the limit is not over it
    assert Health(ch_client, db, "t", Limits(max_target_parts="off")).check() is None
    ch_client.command(f"SYSTEM START MERGES {db}.t")
    ch_client.command(f"OPTIMIZE TABLE {db}.t FINAL")
    assert Health(ch_client, db, "t", Limits(max_target_parts=3)).check() is None


def test_the_default_part_limit_is_the_tables_parts_to_delay_insert(ch_client, db):
    _table(ch_client, db, " SETTINGS parts_to_delay_insert = 4")
    throttle = Health(ch_client, db, "t", Limits()).check()
    assert (throttle.signal, throttle.value, throttle.limit) == ("target_parts", 5, 4)
    assert "the table's parts_to_delay_insert 4" in throttle.reason
    ch_client.command(f"ALTER TABLE {db}.t MODIFY SETTING parts_to_delay_insert = 10")  # read again on each check
    assert Health(ch_client, db, "t", Limits()).check() is None
    ch_client.command(f"CREATE TABLE {db}.plain (a UInt32) ENGINE = MergeTree ORDER BY a")
    server = int(ch_client.query("SELECT value FROM system.merge_tree_settings "
                                 "WHERE name = 'parts_to_delay_insert'").result_rows[0][0])
    assert Health(ch_client, db, "plain", Limits())._parts_limit("MergeTree ORDER BY a")[0] == server


def test_a_pending_mutation_throttles_until_it_is_done(ch_client, db):
    _table(ch_client, db)
    ch_client.command(f"ALTER TABLE {db}.t UPDATE v = v + 1 WHERE 1", settings={"mutations_sync": 0})
    health = Health(ch_client, db, "t", Limits(max_target_parts="off", max_pending_mutations=0))
    throttle = health.check()
    assert (throttle.signal, throttle.value, throttle.limit) == ("pending_mutations", 1, 0), throttle
    assert f"{db}.t has 1 pending mutation, over max_pending_mutations 0 (oldest mutation_" in throttle.reason
    assert Health(ch_client, db, "t", Limits(max_target_parts="off")).check() is None  # default 10 lets one run
    ch_client.command(f"SYSTEM START MERGES {db}.t")
    seen, deadline = [], time.monotonic() + 120
    stopped = wait_until_healthy(health.check, lambda: "gave up" if time.monotonic() > deadline else None,
                                 seen.append, first_delay=0.05, max_delay=0.5)
    assert stopped is None  # the mutation finished: healthy again, the batch may start
    assert all(t.signal == "pending_mutations" for t in seen)


def test_waiting_while_throttled_returns_a_stop_reason_promptly(ch_client, db):
    """Real throttle (merges stopped); the clock and sleep are injected, so no wall time passes."""
    _table(ch_client, db)
    health = Health(ch_client, db, "t", Limits(max_target_parts=2))
    now, slept, asked, seen = [0.0], [], [], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    def should_stop():
        asked.append(now[0])
        return "paused" if now[0] >= 100 else None

    reason = wait_until_healthy(health.check, should_stop, seen.append, sleep=sleep, clock=lambda: now[0])
    assert reason == "paused"
    assert max(slept) <= 1.0 and all(b - a <= 1.0 for a, b in zip(asked, asked[1:]))  # asked every second
    assert now[0] <= 101  # stopped at the first question after the pause
    assert [t.value for t in seen] == [5] * 8  # checks at 0, 1, 3, 7, 15, 31, 61 and 91 s (capped at 30 s)
    assert seen[0].signal == "target_parts"


def test_backoff_doubles_to_its_cap_and_a_healthy_check_returns_at_once():
    now, checks = [0.0], []

    def check():
        checks.append(now[0])
        return Throttle("target_parts", 9, 3, "busy") if len(checks) < 8 else None

    def sleep(seconds):
        now[0] += seconds
    assert wait_until_healthy(check, lambda: None, sleep=sleep, clock=lambda: now[0], max_delay=8) is None
    assert [b - a for a, b in zip(checks, checks[1:])] == [1, 2, 4, 8, 8, 8, 8]
    calls = []
    assert wait_until_healthy(lambda: None, lambda: calls.append(1), calls.append) is None and calls == []


def test_health_is_checked_before_every_batch_once_a_signal_may_be_within_reach(monkeypatch):
    """The schedule's decisions over an injected clock: far from the limits, one check per interval; the
    parts projected from the batches since the last check (at the rate seen between checks) decide when
    a check comes early, and a signal read above half its limit is checked before every batch."""
    monkeypatch.setenv("BACKFILL_HEALTH_SECONDS", "5")
    now = [0.0]
    schedule = CheckSchedule(clock=lambda: now[0])

    def batches_until_due() -> int:
        count = 0
        while not schedule.due():
            schedule.batches += 1
            count += 1
        return count
    assert schedule.due()  # the first batch
    schedule.checked({"target_parts": (0, 100), "pending_mutations": (0, 10)})
    assert batches_until_due() == 51  # one part a batch at least: 51 > 100 / 2
    schedule.checked({"target_parts": (153, 400), "pending_mutations": (0, 10)})  # 3 parts a batch seen
    assert schedule.parts_per_batch == 3 and batches_until_due() == 16  # 153 + 3 x 16 > 200
    schedule.checked({"target_parts": (0, 100), "pending_mutations": (6, 10)})
    assert schedule.due()  # mutations over half their limit: every batch
    schedule.checked({"target_parts": (0, 100), "pending_mutations": (0, 10)})
    assert not schedule.due()
    now[0] += 5
    assert schedule.due()  # the interval passed


class Recorder:
    """A passthrough client proxy that records the SQL of every query."""

    def __init__(self, client):
        self.client, self.sent = client, []

    def query(self, sql, parameters=None, **kwargs):
        self.sent.append(sql)
        return self.client.query(sql, parameters=parameters, **kwargs)


class FakeReplicated:
    """A passthrough to chDB that records every query, but answers the target's engine as
    ReplicatedMergeTree and system.replicas with a lag: embedded chDB has no Keeper, so it can neither
    create a Replicated table nor lag behind one (a fault the engine cannot produce on demand). It has
    no cluster either: with `cluster`, `clusterAllReplicas(cluster, system.x)` runs as `system.x`."""

    def __init__(self, client, delay: int, cluster: str | None = None):
        self.client, self.delay, self.cluster, self.sent = client, delay, cluster, []

    def query(self, sql, parameters=None, **kwargs):
        self.sent.append(sql)
        if self.cluster:
            sql = re.sub(rf"clusterAllReplicas\({self.cluster}, (system\.\w+)\)", r"\1", sql)
        if "FROM system.tables" in sql:
            return SimpleNamespace(result_rows=[("ReplicatedMergeTree", "ReplicatedMergeTree('/t', 'r1') ORDER BY a")])
        if "system.replicas" in sql:
            self.client.query(sql, parameters=parameters)  # the real engine must accept the rest of the SQL
            return SimpleNamespace(result_rows=[("r2", self.delay)])
        return self.client.query(sql, parameters=parameters, **kwargs)


def test_replica_delay_throttles_only_replicated_targets(ch_client, db):
    _table(ch_client, db)
    lagging = FakeReplicated(ch_client, 412)
    throttle = Health(lagging, db, "t", Limits(max_target_parts="off")).check()
    assert throttle == Throttle("replica_delay", 412, 300, f"replica r2 of {db}.t is 412 s behind, over "
                                                          f"max_replica_delay_seconds 300")
    assert Health(FakeReplicated(ch_client, 412), db, "t", Limits(max_target_parts="off",
                                                                  max_replica_delay_seconds=600)).check() is None
    quiet = FakeReplicated(ch_client, 412)
    assert Health(quiet, db, "t", Limits(max_target_parts="off", max_replica_delay_seconds="off")).check() is None
    assert not any("system.replicas" in sql for sql in quiet.sent)
    recorder = Recorder(ch_client)
    assert Health(recorder, db, "t", Limits(max_target_parts="off")).check() is None  # plain MergeTree on chDB
    assert recorder.sent and not any("system.replicas" in sql for sql in recorder.sent)


def test_on_a_cluster_every_signal_is_read_on_every_replica(ch_client, db):
    _table(ch_client, db)  # 5 parts in partition 1 on chDB, the only "replica"
    fake = FakeReplicated(ch_client, 412, cluster="prod")
    throttle = Health(fake, db, "t", Limits(max_target_parts=10), cluster="prod").check()
    assert throttle.signal == "replica_delay"  # parts (5 <= 10) and mutations (0) were read and passed
    for table in ("parts", "mutations", "replicas"):
        assert any(f"FROM clusterAllReplicas(prod, system.{table})" in sql for sql in fake.sent), (table, fake.sent)
    assert Health(FakeReplicated(ch_client, 0, cluster="prod"), db, "t", Limits(max_target_parts=4),
                  cluster="prod").check().value == 5


def test_an_unreadable_system_table_is_a_one_line_error_naming_the_switch(ch_client, db):
    class Denied:
        """Fault injection: a server that refuses system.mutations (grants), which chDB cannot do."""
        def query(self, sql, parameters=None, **kwargs):
            if "system.mutations" in sql:
                raise RuntimeError("Code: 497. DB::Exception: Not enough privileges.\nStack trace: ...")
            return ch_client.query(sql, parameters=parameters)
    _table(ch_client, db)
    with pytest.raises(BackfillError) as info:
        Health(Denied(), db, "t", Limits()).check()
    assert str(info.value) == (f"cannot read the health of {db}.t for max_pending_mutations (Code: 497. "
                               f"DB::Exception: Not enough privileges.); grant access to the system table or "
                               f"set max_pending_mutations to \"off\"")
    assert "\n" not in str(info.value)


# -- the rate ceiling ----------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now, self.slept = 1000.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_the_rate_ceiling_holds_over_a_run():
    clock = Clock()
    ceiling, start, rows = RateCeiling(50_000, clock=clock, sleep=clock.sleep), clock.now, 0
    for n in (10_000, 20_000, 5_000, 10_000, 15_000, 10_000, 30_000, 10_000, 10_000, 20_000):
        clock.now += n / 400_000  # the batch itself runs 8x faster than the ceiling
        rows += n
        assert ceiling.after_batch(n) is None
    rate = rows / (clock.now - start)
    assert 0.8 * 50_000 <= rate <= 50_000 * 1.0001, rate
    assert max(clock.slept) <= 1.0  # slices: a stop request is seen within a second


def test_slow_batches_earn_no_burst_and_a_stop_ends_the_wait():
    clock = Clock()
    ceiling = RateCeiling(1_000, clock=clock, sleep=clock.sleep)
    clock.now += 60  # a slow batch: 1,000 rows in a minute, far under the ceiling
    assert ceiling.after_batch(1_000) is None and clock.slept == []
    clock.now += 0.1  # then a fast one: it waits its own share, not less
    ceiling.after_batch(1_000)
    assert sum(clock.slept) == pytest.approx(0.9)
    clock.slept.clear()
    asked = []
    reason = ceiling.after_batch(50_000, lambda: asked.append(clock.now) or ("stop requested" if len(asked) > 3 else None))
    assert reason == "stop requested" and sum(clock.slept) == 3.0  # 50 s owed, stopped after 3
    assert RateCeiling("off", clock=clock, sleep=clock.sleep).after_batch(10 ** 9) is None


# -- meta fields ---------------------------------------------------------------------------------
META = {"migration_version": 1, "batch_size": 100, "checkpoint_columns": ["a"], "source_table": "src"}


@pytest.mark.parametrize("extra, message", [
    ({"max_batch_size": 50}, "field 'max_batch_size' (50) is smaller than 'batch_size' (100)"),
    ({"max_batch_size": 0}, "field 'max_batch_size' must be >= 1 (got 0)"),
    ({"target_batch_seconds": 0}, "field 'target_batch_seconds' must be > 0 or \"off\" (got 0)"),
    ({"target_batch_seconds": "fast"}, "field 'target_batch_seconds' must be a number or \"off\" (got \"fast\")"),
    ({"target_batch_seconds": 60, "timeout_seconds": 30},
     "field 'target_batch_seconds' (60) must be below 'timeout_seconds' (30)"),
    ({"max_target_parts": 0}, "field 'max_target_parts' must be >= 1, \"auto\" or \"off\" (got 0)"),
    ({"max_target_parts": None}, "field 'max_target_parts' must be an integer, \"auto\" or \"off\" (got null)"),
    ({"max_pending_mutations": -1}, "field 'max_pending_mutations' must be >= 0 or \"off\" (got -1)"),
    ({"max_pending_mutations": "auto"}, "field 'max_pending_mutations' must be an integer or \"off\" (got \"auto\")"),
    ({"max_replica_delay_seconds": False},
     "field 'max_replica_delay_seconds' must be a number or \"off\" (got false)"),
    ({"max_rows_per_second": -5}, "field 'max_rows_per_second' must be > 0 or \"off\" (got -5)"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_pacing_fields_are_checked_naming_file_and_field(migrations, extra, message):
    root = migrations(1, "x", "SELECT 1", "SELECT 1", "SELECT 1", {**META, **extra})
    with pytest.raises(BackfillError) as info:
        load_spec(discover(root)[1])
    assert str(info.value) == f"{root / '001_x.backfill.meta'}: {message}"


def test_pacing_fields_defaults_and_off(migrations):
    root = migrations(1, "x", "SELECT 1", "SELECT 1", "SELECT 1", {**META, "batch_size": MAX_INT})
    meta = load_spec(discover(root)[1]).meta
    assert meta["max_batch_size"] == MAX_INT  # 10 x batch_size, never past what a valid file allows
    root = migrations(2, "y", "SELECT 1", "SELECT 1", "SELECT 1",
                      {**META, "migration_version": 2, "target_batch_seconds": 2.5, "max_target_parts": "off",
                       "max_pending_mutations": 0, "max_replica_delay_seconds": "off", "max_rows_per_second": 1e5})
    meta = load_spec(discover(root)[2]).meta
    assert meta["max_batch_size"] == 1000 and meta["target_batch_seconds"] == 2.5
    limits = Limits.from_meta(meta, max_target_parts=None, max_pending_mutations="off")
    assert limits == Limits(max_target_parts="off", max_pending_mutations="off", max_replica_delay_seconds="off")


def test_command_line_pacing_values_parse_like_the_meta():
    assert parse_override("max_target_parts", "off") == "off"
    assert parse_override("max_target_parts", "auto") == "auto"
    assert parse_override("max_target_parts", "300") == 300
    assert parse_override("target_batch_seconds", "2.5") == 2.5
    assert parse_override("max_rows_per_second", "50000") == 50_000
    with pytest.raises(BackfillError, match=r"^--max-target-parts must be >= 1, \"auto\" or \"off\" \(got '0'\)$"):
        parse_override("max_target_parts", "0")
    with pytest.raises(BackfillError, match=r"^--target-batch-seconds must be a number or \"off\" \(got 'soon'\)$"):
        parse_override("target_batch_seconds", "soon")
