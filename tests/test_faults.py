"""Fault injection on the real engine: kill -9 at random points, signals, concurrent runners, real OOM,
stale leases, and (in-process) crashes, pauses and retries.

Subprocess tests run `python -m migrator` against a store private to the test, exactly as an
operator would; every result is read back through another subprocess (one process per store).
The default run (`make test`) is bounded: many kill points over a few thousand rows; `-m slow` runs
more kill points over 200k rows. Both print how many kill points were survived, where they
landed and how many rows were compared.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from tests.conftest import (
    REPO,
    DiesAfterInsert,
    Lines,
    ProcessDied,
    Recording,
    Runner,
    assert_copied_exactly,
    assert_copied_through,
    assert_phases,
    assert_store_copied_exactly,
    kill_phase,
    own_client,
    report,
    run_migrate,
    start_migrate,
    store_fingerprint,
    store_query,
    wait_for_claim,
    wait_until,
)

# Keys an SQL builder that forgets to escape would choke on: '', quotes, backslashes, newlines,
# tabs, CR, unicode. `a` is one of these prefixes plus a group number (bare prefix for group 0),
# `b` numbers the rows of a group, so (a, b) is unique and every row has its own key.
PREFIXES = r"""['', 'it''s', 'back\\slash', 'new\nline', 'tab\tcr\r', 'üñí ✓ 日本', '"dq"', 'x\\''y']"""
GROUP = 400  # rows per group number: 8 prefixes x 50 values of b


def source_sql(rows: int, parts: int = 2) -> str:
    """src filled in `parts` INSERTs (unmerged parts interleaved in key order), dst with a dedup window."""
    per = -(-rows // parts)
    inserts = "\n".join(
        f"INSERT INTO {{db}}.src SELECT arrayElement({PREFIXES}, (number % 8) + 1) || "
        f"if(intDiv(number, {GROUP}) = 0, '', toString(intDiv(number, {GROUP}))), "
        f"toUInt32(intDiv(number % {GROUP}, 8)), "
        f"concat('v', toString(number), if(number % 5 = 0, '\\n''\\\\', '')) "
        f"FROM numbers({i * per}, {min(per, rows - i * per)});"
        for i in range(parts) if rows - i * per > 0)
    return (f"CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);\n"
            f"{inserts}\n"
            f"CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
            f"SETTINGS non_replicated_deduplication_window = 1000;\n")


COPY_SQL = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"


def meta(batch_size: int, **extra) -> dict:
    return {"migration_version": 1, "batch_size": batch_size, "min_batch_size": min(batch_size, 100),
            "checkpoint_columns": ["a", "b"], "source_table": "src", **extra}


# -- subprocess plumbing ---------------------------------------------------------------------
def start(store, root, *args, **env):
    return start_migrate(args, store, migrations_dir=root, env=env)


def migrate(store, root, *args, **env) -> subprocess.CompletedProcess:
    return run_migrate(args, store, migrations_dir=root, env=env)


def history(store) -> list:
    """[writer, status, checkpoint_data] of every tracking row of d_1, oldest first."""
    return store_query(store, "SELECT writer, status, checkpoint_data FROM db_management.backfills "
                              "WHERE db_name = 'd' ORDER BY version")[0]


def status_json(store, root) -> dict:
    proc = migrate(store, root, "backfill", "status", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def assert_store_copied_through(store, position, rows: int) -> None:
    """dst holds exactly the src rows up to and including `position`, read by a subprocess."""
    where = f"(a, b) <= ({sql_string(position[0])}, {int(position[1])})"
    want, got = store_fingerprint(store, "d.src", where=where), store_fingerprint(store, "d.dst")
    assert got == want and got[0] == rows and got[3] == 0, (got, want)


def assert_one_line_error(proc, pattern: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.fullmatch(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def copy_in_own_store(private_store_backfill):
    """copy_in_own_store(rows, batch_size, ...) -> (store, root): 001 applied by `migrate up` in a subprocess."""
    def make(rows: int, batch_size: int, sql: str = COPY_SQL, up: str | None = None, **meta_extra):
        return private_store_backfill(up or source_sql(rows), sql, meta(batch_size, **meta_extra))
    return make


# -- kill -9 at random points ----------------------------------------------------------------
def _kill_at_random_points(request, copy_in_own_store, rows: int, batch_size: int, kills: int, seed: int,
                           row_sleep: float) -> None:
    """Kill -9 runs at seeded random instants, each run resuming the last; then run to completion.

    Most kills wait for a random number of batch lines and then a random fraction of a batch, so they
    land anywhere in the batch protocol; the first and about one in five wait for the runner's claim
    and kill it at once. After each kill, where it landed is read from the store; a kill that landed
    before the runner wrote anything (interpreter start-up) is not a kill point. The loop goes on (at
    most 3 x kills runs) until it has `kills` kill points and one in each required phase.
    `row_sleep` (sleepEachRow in the SQL) makes the INSERT a fair share of each batch, so kills land in it.
    """
    store, root = copy_in_own_store(rows, batch_size, sql=COPY_SQL + f" AND sleepEachRow({row_sleep}) = 0")
    rng = random.Random(seed)
    phases: list[str] = []

    def counted():
        return [p for p in phases if p != "startup"]

    def short():
        return len(counted()) < kills or not {"claimed", "insert", "committed"} <= set(phases)

    runs = 0
    while short() and runs < 3 * kills:
        proc = start(store, root, "backfill", "run", "1")
        lines = Lines(proc)
        if runs == 0 or rng.random() < 0.2:
            wait_for_claim(store, proc)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            lines.wait_for("batch ", count=rng.randint(1, 5))
            time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, "the run ended before its kill point; use more rows"
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        phases.append(kill_phase(store, proc.pid))
        runs += 1
    proc = migrate(store, root, "backfill", "run", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{rows:,} rows processed" in proc.stdout
    got = assert_store_copied_exactly(store, rows)
    status = status_json(store, root)
    assert status["status"] == "completed"
    assert status["rows_processed"] == rows
    assert status["checkpoint"]["in_flight"] is None
    counts = assert_phases(phases)
    report(request, f"\nkill -9: {len(counted())} kill points survived (seed {seed}, {rows:,} rows, batch size "
                    f"{batch_size}); {got[0]:,} rows compared (every column), 0 duplicate keys, 0 missing; "
                    f"landed: " + "; ".join(f"{n} x {p}" for p, n in counts.items()))
    assert len(counted()) >= kills


@pytest.mark.timeout(420)
def test_kill_9_at_random_points_then_rerun_copies_exactly_once(request, copy_in_own_store):
    """The bounded kill suite `make test` runs: many kill points over a few thousand rows."""
    _kill_at_random_points(request, copy_in_own_store, rows=16_000, batch_size=200, kills=8, seed=20240611,
                           row_sleep=0.0008)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_9_at_many_random_points_over_200k_rows(request, copy_in_own_store):
    _kill_at_random_points(request, copy_in_own_store, rows=200_000, batch_size=500, kills=14, seed=7,
                           row_sleep=0.0001)


# -- signals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_pauses_at_a_batch_boundary_and_resume_completes(copy_in_own_store, sig, code):
    rows = 2_000
    store, root = copy_in_own_store(rows, 100)
    proc = start(store, root, "backfill", "run", "1")
    lines = Lines(proc)
    lines.wait_for("batch ", count=3)
    proc.send_signal(sig)
    out, err = lines.rest()
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err
    assert f"{signal.Signals(sig).name}: stopping after the current batch" in err
    assert "paused at a batch boundary; resume with 'migrate backfill resume 1'" in err
    assert "backfill 1: paused (stop requested)" in out
    status = status_json(store, root)
    assert status["status"] == "paused"
    assert status["checkpoint"]["in_flight"] is None  # stopped between batches, nothing to replay
    assert 3 <= status["batches_completed"] < rows // 100
    assert status["rows_processed"] == 100 * status["batches_completed"]
    assert status["lease"] is None
    assert_store_copied_through(store, status["checkpoint"]["position"], status["rows_processed"])
    proc = migrate(store, root, "backfill", "resume", "1")
    assert proc.returncode == 0, proc.stderr
    assert "backfill 1: completed;" in proc.stdout
    assert_store_copied_exactly(store, rows)


def test_sigterm_while_the_runner_claims_still_pauses_at_the_first_boundary(copy_in_own_store):
    """The signal lands in the claim window: the live status file says running, no batch has run."""
    rows = 2_000
    store, root = copy_in_own_store(rows, 100)
    proc = start(store, root, "backfill", "run", "1")
    wait_for_claim(store, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "SIGTERM: stopping after the current batch" in err
    assert proc.returncode == 143, (out, err)
    assert status_json(store, root)["status"] == "paused"


def test_second_signal_interrupts_the_batch_and_it_is_replayed(copy_in_own_store):
    """The first SIGINT asks for a stop at the boundary; a second one is promised to interrupt the batch."""
    rows = 300
    slow = COPY_SQL + " AND sleepEachRow(0.025) = 0"  # ~2.5 s per batch: both signals land inside one INSERT
    store, root = copy_in_own_store(rows, 100, sql=slow)
    proc = start(store, root, "backfill", "run", "1")
    lines = Lines(proc)
    lines.wait_for("batch ", count=1)
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = lines.rest()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert "stopped inside a batch; its range is replayed on resume" in err
    status = status_json(store, root)
    assert status["status"] == "paused" and status["checkpoint"]["in_flight"] is not None
    proc = migrate(store, root, "backfill", "resume", "1")
    assert proc.returncode == 0, proc.stderr
    assert_store_copied_exactly(store, rows)


# -- concurrent runners ----------------------------------------------------------------------
def test_two_runners_started_at_the_same_instant_exactly_one_runs(copy_in_own_store):
    rows = 6_000
    store, root = copy_in_own_store(rows, 100)
    procs = [start(store, root, "backfill", "run", "1") for _ in range(2)]
    results = [(p.returncode, *p.communicate(timeout=300)) for p in procs]
    results = [(p.returncode, out, err) for p, (_, out, err) in zip(procs, results)]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "backfill 1: completed;" in winners[0][1]
    code, out, err = losers[0]
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: store {store} is held by ")
    assert_store_copied_exactly(store, rows)


# -- real out-of-memory ----------------------------------------------------------------------
OOM_UP = """
CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {db}.src SELECT 'k' || leftPad(toString(number), 6, '0'), toUInt32(number % 10),
    if(number < 40000, toString(number), repeat('x', 1000) || toString(number)) FROM numbers(80000);
CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 1000;
"""
# groupArray holds the whole batch in memory, so the memory a batch needs follows its size.
OOM_SQL = ("INSERT INTO {db}.dst SELECT t.1, t.2, t.3 FROM "
           "(SELECT arrayJoin(groupArray((a, b, v))) AS t FROM {db}.src WHERE {batch_range})")
# Measured on chDB 26: 20,000 narrow rows pass at 8 MB; 10,000 wide rows pass from 48 MB and
# 20,000 wide rows fail even at 80 MB. 64 MB sits in the middle of both margins.
OOM_SETTINGS = {"max_memory_usage": 64_000_000, "max_threads": 1}


def test_real_memory_limit_mid_run_halves_the_batch_and_completes(copy_in_own_store):
    rows = 80_000
    store, root = copy_in_own_store(rows, 20_000, sql=OOM_SQL, up=OOM_UP, min_batch_size=1000, settings=OOM_SETTINGS)
    proc = migrate(store, root, "backfill", "run", "1")
    assert proc.returncode == 0, proc.stderr
    assert "memory limit at batch size 20000; halving to 10000" in proc.stderr
    assert "Traceback" not in proc.stderr
    status = status_json(store, root)
    assert status["status"] == "completed"
    assert status["current_batch_size"] == 10_000
    assert status["rows_processed"] == rows
    assert_store_copied_exactly(store, rows)
    rows_written = history(store)
    sizes = [json.loads(cp).get("current_batch_size") for _, _, cp in rows_written]
    first_small = sizes.index(10_000)
    done_before = json.loads(rows_written[first_small][2])["batches_completed"]
    assert done_before >= 2, "the narrow first half ran at full size before the limit was hit"


# -- leases ----------------------------------------------------------------------------------
def test_runner_killed_with_a_fresh_lease_is_taken_over(copy_in_own_store):
    rows = 3_000
    store, root = copy_in_own_store(rows, 100)
    proc = start(store, root, "backfill", "run", "1", BACKFILL_LEASE_SECONDS="2")
    Lines(proc).wait_for("batch ", count=3)
    proc.kill()
    proc.wait(timeout=60)
    last_writer, last_status, last_cp = history(store)[-1]
    assert last_status == "running"
    lease = json.loads(last_cp)["lease"]
    assert lease["pid"] == proc.pid  # the dead runner still "holds" a lease younger than its timeout
    proc = migrate(store, root, "backfill", "resume", "1", BACKFILL_LEASE_SECONDS="2")
    assert proc.returncode == 0, proc.stderr
    assert "backfill 1: completed;" in proc.stdout
    assert_store_copied_exactly(store, rows)


FORGE_LEASE = r"""
import json, sys, time, clickhouse_connect
from backfill_plugin.protocol.checkpoint import CheckpointStore
client = clickhouse_connect.get_client(dsn=sys.argv[1])
store = CheckpointStore(client)
row = store.load("d_1")
row.status, row.writer = "running", "runner-on-another-host:4242:deadbeef"
row.checkpoint["lease"] = {"owner": row.writer, "host": "runner-on-another-host", "pid": 4242,
                           "heartbeat": time.time()}
store.save(row)
print(json.dumps(row.checkpoint["lease"]))
"""


def test_lease_of_a_runner_on_another_host_refuses_then_is_taken_over_when_stale(copy_in_own_store):
    """Injected fault: a runner on another host that stopped heartbeating cannot be produced on one
    machine, so its lease row is written directly (what that runner's last heartbeat would have left)."""
    rows = 3_000
    store, root = copy_in_own_store(rows, 100)
    forged = subprocess.run([sys.executable, "-c", FORGE_LEASE, f"chdb://{store}"], capture_output=True,
                            text=True, timeout=60, cwd=str(REPO))
    assert forged.returncode == 0, forged.stderr
    forged_at = json.loads(forged.stdout)["heartbeat"]
    before = history(store)
    proc = migrate(store, root, "backfill", "run", "1")  # default lease: 60 s, so this lease is fresh
    assert_one_line_error(proc, r"error: backfill d_1 is already running \(runner-on-another-host:4242:deadbeef, "
                                r"heartbeat \d+s ago\); refusing a second runner")
    assert history(store) == before  # the refused runner wrote nothing
    time.sleep(max(0.0, forged_at + 1.5 - time.time()))
    proc = migrate(store, root, "backfill", "run", "1", BACKFILL_LEASE_SECONDS="1")
    assert proc.returncode == 0, proc.stderr
    assert f"{rows:,} rows processed" in proc.stdout
    assert_store_copied_exactly(store, rows)


# -- in-process: one engine shared by threads (the `ch_client` fixture) -------------------------
def simple_up(rows: int) -> str:
    """Keys in number order ('k000000', ...), so a test can name the row an error should hit."""
    return (f"CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);\n"
            f"INSERT INTO {{db}}.src SELECT 'k' || leftPad(toString(number), 6, '0'), toUInt32(number % 10), "
            f"toString(number) FROM numbers({rows});\n"
            f"CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
            f"SETTINGS non_replicated_deduplication_window = 1000;\n")


@pytest.fixture
def copy_in_process(shared_store_backfill):
    """copy_in_process(rows, batch_size, ...) -> migrations root, with 001 applied to `db` on the shared store."""
    def make(rows: int, batch_size: int, sql: str = COPY_SQL, up: str | None = None, **meta_extra):
        return shared_store_backfill(up or source_sql(rows), sql, meta(batch_size, **meta_extra))
    return make


def batches_done(manager, db: str) -> int:
    return manager.get_status(db, 1, live_counts=False)["batches_completed"]


SLOW_COPY = COPY_SQL + " AND sleepEachRow(0.0005) = 0"  # ~50 ms per batch of 100: a run lasts a while


def test_second_runner_refused_while_the_first_runs_in_a_thread(ch_client, db, copy_in_process):
    rows = 4_000
    root = copy_in_process(rows, 100, sql=SLOW_COPY)
    first = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    second = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner = Runner(first, db)
    runner.start()
    wait_until(lambda: batches_done(second, db) >= 2)
    owner = second.get_status(db, 1, live_counts=False)["lease"]["owner"]
    with pytest.raises(BackfillError, match=rf"backfill {db}_1 is already running \({re.escape(owner)}, heartbeat "
                                            r"\d+s ago\); refusing a second runner"):
        second.run_backfill(db, 1)
    runner.join(120)
    assert runner.error is None, runner.error
    assert runner.result["stopped"] == "completed"  # the refusal did not disturb the first runner
    assert runner.result["rows_processed"] == rows
    assert_copied_exactly(ch_client, db, rows)


def test_lease_between_two_managers_with_their_own_handles(ch_client, store_url, db, copy_in_process, monkeypatch):
    """Two runners in one process, each with its own handle on the store, so nothing but the lease stands
    between them (the pid is the same, the store lock is shared). The first is refused to the second
    while its heartbeat keeps the lease fresh; then the first dies after an INSERT (injected fault: see
    DiesAfterInsert; its heartbeat dies with it), and the second takes over once the lease is stale."""
    lease = 2.0
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", str(lease))
    rows = 3_000
    root = copy_in_process(rows, 100, sql=SLOW_COPY)
    dying = DiesAfterInsert(own_client(store_url), f"{db}.dst", at=6)
    first = Runner(ClickHouseBackfillManager(dying, migrations_dir=root), db)
    second = ClickHouseBackfillManager(own_client(store_url), migrations_dir=root)
    first.start()
    wait_until(lambda: batches_done(second, db) >= 2)
    with pytest.raises(BackfillError, match="is already running .*; refusing a second runner"):
        second.run_backfill(db, 1)
    first.join(120)
    assert isinstance(first.error, (ProcessDied, ConnectionError)), (first.result, first.error)
    status = second.get_status(db, 1, live_counts=False)
    assert status["status"] == "running" and status["checkpoint"]["in_flight"] is not None  # died mid-protocol
    heartbeat = float(status["lease"]["heartbeat"])
    wait_until(lambda: time.time() > heartbeat + lease + 0.2)  # stale now: no heartbeat since the death
    result = second.run_backfill(db, 1)
    assert (result["stopped"], result["rows_processed"]) == ("completed", rows)
    assert_copied_exactly(ch_client, db, rows)


def test_two_runners_at_the_same_instant_in_one_process_exactly_one_runs(ch_client, db, copy_in_process):
    rows = 2_000
    root = copy_in_process(rows, 100)
    barrier = threading.Barrier(2)
    runners = [Runner(ClickHouseBackfillManager(ch_client, migrations_dir=root), db, barrier) for _ in range(2)]
    for r in runners:
        r.start()
    for r in runners:
        r.join(120)
    done = [r for r in runners if r.error is None]
    refused = [r for r in runners if r.error is not None]
    assert len(done) == 1 and len(refused) == 1, [r.error for r in runners]
    assert done[0].result["stopped"] == "completed"
    assert isinstance(refused[0].error, BackfillError)
    assert "refusing a second runner" in str(refused[0].error)
    assert_copied_exactly(ch_client, db, rows)


def test_pause_from_another_thread_stops_at_the_batch_boundary(ch_client, db, copy_in_process):
    rows = 4_000
    root = copy_in_process(rows, 100, sql=SLOW_COPY)
    runner_mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    operator = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner = Runner(runner_mgr, db)
    runner.start()
    wait_until(lambda: batches_done(operator, db) >= 3)
    operator.pause_backfill(db, 1)
    runner.join(120)
    assert runner.error is None, runner.error
    assert runner.result["stopped"] == "paused"
    status = operator.get_status(db, 1)
    assert status["status"] == "paused"
    assert status["checkpoint"]["in_flight"] is None
    assert status["lease"] is None
    assert 3 <= status["batches_completed"] < rows // 100
    # stopped at a boundary: exactly the processed batches are in the target, nothing half-done
    assert status["rows_processed"] == 100 * status["batches_completed"]
    assert_copied_through(ch_client, db, status["checkpoint"]["position"], status["rows_processed"])
    result = operator.resume_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert_copied_exactly(ch_client, db, rows)


def test_resume_right_after_pause_waits_for_the_runner_still_in_its_batch(ch_client, store_url, db, copy_in_process):
    rows = 180
    root = copy_in_process(rows, 90, sql=COPY_SQL + " AND sleepEachRow(0.02) = 0", up=simple_up(rows))  # ~1.8 s a batch
    first = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    operator = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner = Runner(first, db)
    runner.start()
    wait_until(lambda: operator.get_status(db, 1, live_counts=False)["checkpoint"].get("in_flight") is not None)
    operator.pause_backfill(db, 1)  # the runner is inside batch 1 and holds a fresh lease
    # Another operator's own client (a client runs one query at a time; the runner's is busy).
    second = Runner(ClickHouseBackfillManager(own_client(store_url), migrations_dir=root), db)
    second.start()
    second.join(60)
    runner.join(60)
    assert isinstance(second.error, BackfillError), second.result
    assert "already running" in str(second.error) or "still" in str(second.error)
    # the first runner finished its batch and stopped at the boundary, undisturbed by the refusal
    assert runner.error is None, runner.error
    assert (runner.result["stopped"], runner.result["batches_completed"]) == ("paused", 1)
    status = operator.get_status(db, 1)
    assert (status["status"], status["rows_processed"], status["lease"]) == ("paused", 90, None)
    assert status["checkpoint"]["in_flight"] is None
    assert_copied_through(ch_client, db, status["checkpoint"]["position"], 90)
    assert operator.resume_backfill(db, 1)["stopped"] == "completed"
    assert_copied_exactly(ch_client, db, rows)


# SQL that reads {retry_count} promises to skip, on a retry, the keys a failed or crashed attempt
# already wrote (the manager then drops the dedup token on retries); SQL that does not relies on the
# deterministic token alone. Both ways must end exact.
ANTI_JOIN = " AND ({retry_count} = 0 OR (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range}))"


@pytest.mark.parametrize("replay", ["token", "anti-join"])
def test_crash_between_insert_and_checkpoint_replays_without_duplicates(ch_client, db, copy_in_process, monkeypatch,
                                                                        replay):
    """Injected fault: the process 'dies' right after the 3rd batch's INSERT returned, before any
    checkpoint write (see DiesAfterInsert). The next runner must replay exactly that range (same
    SQL, same dedup token; or, for SQL that anti-joins, {retry_count} = 1) and the target must end exact."""
    rows = 1_000
    root = copy_in_process(rows, 100, sql=COPY_SQL + (ANTI_JOIN if replay == "anti-join" else ""))
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.5")  # the dead runner's pid is ours: wait out its lease
    dying = DiesAfterInsert(ch_client, f"{db}.dst", at=3)
    with pytest.raises((ProcessDied, ConnectionError)):
        ClickHouseBackfillManager(dying, migrations_dir=root).run_backfill(db, 1)
    crashed_sql, crashed_token = dying.tokens[-1]
    status = ClickHouseBackfillManager(ch_client, migrations_dir=root).get_status(db, 1, live_counts=False)
    assert status["status"] == "running"
    assert status["checkpoint"]["in_flight"] is not None  # the 3rd batch is recorded as in flight
    assert status["checkpoint"]["rows_processed"] == 200
    assert_copied_through(ch_client, db, status["checkpoint"]["in_flight"]["end"], 300)  # the INSERT did commit
    time.sleep(0.6)
    recording = Recording(ch_client, f"{db}.dst")
    result = ClickHouseBackfillManager(recording, migrations_dir=root).run_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert result["rows_processed"] == rows
    replay_sql, replay_token = recording.inserts[0]
    if replay == "token":
        assert replay_sql == crashed_sql  # the recorded range, unchanged
        assert replay_token == crashed_token is not None
    else:
        assert "(0 = 0 OR" in crashed_sql and "(1 = 0 OR" in replay_sql
        assert replay_sql.replace("(1 = 0 OR", "(0 = 0 OR") == crashed_sql
    assert_copied_exactly(ch_client, db, rows)


# Real engine errors. throwIf is evaluated while reading, after earlier granules were already
# inserted: with one thread and small insert blocks the failed INSERT commits 16,384 rows first
# (chDB 26). The framework squashes SQL without {retry_count} into one block whatever the meta says.
PARTIAL_COMMIT = {"max_threads": 1, "max_block_size": 8192, "min_insert_block_size_rows": 1000,
                  "min_insert_block_size_bytes": 0}
FIRST_ATTEMPT_FAILS = COPY_SQL + " AND throwIf({retry_count} = 0 AND a = 'k020000') = 0" + ANTI_JOIN


def test_token_only_sql_never_commits_part_of_a_failed_batch(ch_client, db, copy_in_process):
    """Without {retry_count} the token is the only replay guard, so a batch must commit whole or not at
    all: meta settings that would split the INSERT into blocks are overridden (real error 395).
    Only time is replaced: `sleep` records what the target held at the backoff instead of waiting;
    the error, the retry and the INSERTs are the engine's."""
    rows = 40_000
    root = copy_in_process(rows, 32_768, sql=COPY_SQL + " AND throwIf(a = 'k020000') = 0", up=simple_up(rows),
                  min_batch_size=1000, settings=PARTIAL_COMMIT, max_retries=1)
    seen = []
    manager = ClickHouseBackfillManager(
        ch_client, migrations_dir=root, sleep=lambda s: seen.append(ch_client.command(f"SELECT count() FROM {db}.dst")))
    with pytest.raises(BackfillError, match="failed 2 times: Code: 395"):
        manager.run_backfill(db, 1)
    assert seen == [0] and ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_transient_error_after_a_partial_commit_is_retried_without_duplicates(ch_client, db, copy_in_process):
    """A real FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (395) in the middle of a 32,768-row batch, on the
    first attempt only; sleep is patched to record the backoff and what the target held then. (The
    batch is 4 whole granules and the failing row is in the 3rd: the engine evaluates throwIf on
    every row of a granule it reads, so a later batch sharing that granule would fail too.)"""
    rows = 40_000
    root = copy_in_process(rows, 32_768, sql=FIRST_ATTEMPT_FAILS, up=simple_up(rows), min_batch_size=1000,
                  settings=PARTIAL_COMMIT)
    sleeps = []
    manager = ClickHouseBackfillManager(
        ch_client, migrations_dir=root,
        sleep=lambda s: sleeps.append((s, ch_client.command(f"SELECT count() FROM {db}.dst"))))
    result = manager.run_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert [s for s, _ in sleeps] == [1]  # one failure, first backoff step
    committed = sleeps[0][1]
    assert 0 < committed < 32_768, "the failed INSERT committed part of the batch before failing"
    assert result["error_log"] is None
    assert_copied_exactly(ch_client, db, rows)


TIMEOUT_SQL = COPY_SQL + " AND sleepEachRow(if({retry_count} = 0, 0.02, 0)) = 0" + ANTI_JOIN  # 2 s per 100 rows


def test_real_timeout_is_retried_with_backoff(ch_client, db, copy_in_process):
    """A real TIMEOUT_EXCEEDED (159) from timeout_seconds on the first attempt. Only time is replaced:
    `sleep` records the backoff instead of waiting it out."""
    rows = 100
    root = copy_in_process(rows, 100, sql=TIMEOUT_SQL, up=simple_up(rows), timeout_seconds=1)
    sleeps = []
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root, sleep=sleeps.append).run_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert sleeps == [1]  # the batch timed out once, then passed
    assert_copied_exactly(ch_client, db, rows)


def test_memory_limit_below_min_batch_size_fails_and_keeps_the_checkpoint(ch_client, db, copy_in_process):
    """Real MEMORY_LIMIT_EXCEEDED (241) on the wide half; halving would go below min_batch_size."""
    rows = 80_000
    root = copy_in_process(rows, 20_000, sql=OOM_SQL, up=OOM_UP, min_batch_size=20_000, settings=OOM_SETTINGS)
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    with pytest.raises(BackfillError, match=r"^out of memory at batch size 20000; halving would go below "
                                            r"min_batch_size 20000: Code: 241\."):
        manager.run_backfill(db, 1)
    status = manager.get_status(db, 1)
    assert status["status"] == "failed"
    assert status["error_log"].startswith("out of memory at batch size 20000")
    assert status["rows_processed"] == 40_000  # the two narrow batches stay done
    assert status["position"] == ["k039999", 9]
    assert status["checkpoint"]["in_flight"] is not None  # the failed range is kept for the next run
    assert_copied_through(ch_client, db, status["position"], 40_000)


def test_retries_exhausted_fail_with_the_error_and_keep_the_checkpoint(ch_client, db, copy_in_process):
    """A real error (395) on every attempt, then the operator fixes the SQL and resumes. Only time is
    replaced: `sleep` records the backoff steps instead of waiting them out."""
    rows = 300
    always = COPY_SQL + " AND throwIf(a = 'k000150') = 0"
    root = copy_in_process(rows, 100, sql=always, up=simple_up(rows), max_retries=2)
    sleeps = []
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root, sleep=sleeps.append)
    with pytest.raises(BackfillError, match=r"^batch after \['k000099', 9\] failed 3 times: Code: 395\."):
        manager.run_backfill(db, 1)
    assert sleeps == [1, 2]  # exponential backoff
    status = manager.get_status(db, 1)
    assert status["status"] == "failed"
    assert status["error_log"].startswith("batch after ['k000099', 9] failed 3 times: Code: 395.")
    assert status["position"] == ["k000099", 9]
    assert status["rows_processed"] == 100
    assert_copied_through(ch_client, db, status["position"], 100)
    (root / "001_x.backfill.sql").write_text(COPY_SQL)  # the operator fixes the SQL
    result = manager.resume_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert_copied_exactly(ch_client, db, rows)
