"""Fault injection on the real engine: kill -9 at random points, signals, concurrent runners, real OOM,
stale leases, and (in-process) crashes, pauses and retries.

Subprocess tests run `python -m migrator` against a store private to the test, exactly as an
operator would; every result is read back through another subprocess (one process per store).
The default run is bounded (a few kill points, 20k rows); `-m slow` runs >= 12 kill points over
200k rows. Both print how many kill points were survived and how many rows were compared.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import clickhouse_connect
import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError

REPO = Path(__file__).resolve().parent.parent
MIGRATE = [sys.executable, "-m", "migrator"]

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
DOWN_SQL = "DROP TABLE IF EXISTS {db}.dst; DROP TABLE IF EXISTS {db}.src"


def meta(batch_size: int, **extra) -> dict:
    return {"migration_version": 1, "batch_size": batch_size, "min_batch_size": min(batch_size, 100),
            "checkpoint_columns": ["a", "b"], "source_table": "src", **extra}


# -- subprocess plumbing ---------------------------------------------------------------------
def env_for(store: Path, root: Path, database: str = "d", **extra) -> dict:
    env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": database,
           "MIGRATE_DIR": str(root), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MIGRATE_DEBUG", None)
    return env


def start(store: Path, root: Path, *args, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(MIGRATE + list(args), env=env_for(store, root, **extra_env), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def migrate(store: Path, root: Path, *args, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(MIGRATE + list(args), env=env_for(store, root, **extra_env), cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


READER = r"""
import json, sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
db = sys.argv[2]
out = {}
for table in ("src", "dst"):
    n, x, s = client.query(f"SELECT count(), groupBitXor(cityHash64(a, b, v)), sum(cityHash64(a, b, v)) "
                           f"FROM {db}.{table}").result_rows[0]
    out[table] = [int(n), int(x), int(s)]
out["dup_keys"] = int(client.command(
    f"SELECT count() FROM (SELECT a, b FROM {db}.dst GROUP BY a, b HAVING count() > 1)"))
out["history"] = [[w, s, c] for w, s, c in client.query(
    "SELECT writer, status, checkpoint_data FROM db_management.backfills WHERE db_name = {d:String} "
    "ORDER BY version", parameters={"d": db}).result_rows]
print(json.dumps(out))
"""


def read_store(store: Path, database: str = "d") -> dict:
    """Fingerprints of src and dst plus the backfill's history, read by a subprocess (one store per process)."""
    proc = subprocess.run([sys.executable, "-c", READER, f"chdb://{store}", database], capture_output=True,
                          text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def status_json(store: Path, root: Path) -> dict:
    proc = migrate(store, root, "backfill", "status", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_exact(store: Path, rows: int) -> dict:
    """dst holds exactly the multiset of src rows: same count and fingerprints, no duplicate key."""
    got = read_store(store)
    assert got["src"][0] == rows
    assert got["dst"] == got["src"], f"dst {got['dst']} != src {got['src']}"
    assert got["dup_keys"] == 0
    return got


def assert_one_line_error(proc, pattern: str) -> str:
    import re
    err = proc.stderr.strip()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.fullmatch(pattern, lines[0]), lines[0]
    return lines[0]


def report(request, message: str) -> None:
    """Shown in the terminal even without -s (and printed for -s runs and logs)."""
    print(message)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(message)


class Lines:
    """Read a process's stdout lines in a thread, so a test can wait for progress with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.queue = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 60) -> None:
        deadline, seen = time.time() + timeout, sum(line.startswith(prefix) for line in self.lines)
        while seen < count:
            line = self.queue.get(timeout=max(0.01, deadline - time.time()))
            if line is None:
                raise AssertionError(f"process ended before {count} {prefix!r} lines: {self.lines}")
            self.lines.append(line)
            seen += line.startswith(prefix)

    def rest(self, timeout: float = 120) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        while True:
            line = self.queue.get(timeout=10)
            if line is None:
                break
            self.lines.append(line)
        return "".join(self.lines), self.proc.stderr.read()


@pytest.fixture
def generic(tmp_path, migrations):
    """generic(rows, batch_size, ...) -> (store, root) with 001 applied by `migrate up` in a subprocess."""
    def make(rows: int, batch_size: int, sql: str = COPY_SQL, up: str | None = None, **meta_extra):
        root = migrations(1, "x", up or source_sql(rows), DOWN_SQL, sql, meta(batch_size, **meta_extra))
        store = tmp_path / "store"
        proc = migrate(store, root, "up")
        assert proc.returncode == 0, proc.stderr
        assert "backfill 1 registered (pending)" in proc.stdout
        return store, root
    return make


# -- kill -9 at random points ----------------------------------------------------------------
PHASE_READER = r"""
import json, socket, sys, clickhouse_connect
from backfill_plugin.keys import KeySpace
client = clickhouse_connect.get_client(dsn=sys.argv[1])
db, pid = sys.argv[2], sys.argv[3]
rows = client.query("SELECT status, checkpoint_data FROM db_management.backfills WHERE db_name = {d:String} "
                    "AND startsWith(writer, {w:String}) ORDER BY version DESC LIMIT 1",
                    parameters={"d": db, "w": f"{socket.gethostname()}:{pid}:"}).result_rows
out = {"status": None}
if rows:
    status, cp = rows[0][0], json.loads(rows[0][1])
    out = {"status": status, "in_flight": cp.get("in_flight")}
    batch = cp.get("in_flight")
    if batch:
        where = KeySpace(db, "dst", {"a": "String", "b": "UInt32"}).range_predicate(batch["start"], batch["end"])
        out["in_target"] = int(client.command(f"SELECT count() FROM {db}.dst WHERE {where}"))
print(json.dumps(out))
"""
PHASES = {
    "startup": "start-up (before claiming the backfill)",
    "claimed": "claimed, computing the first range",
    "insert": "range written ahead, INSERT not committed",
    "committed": "INSERT committed, checkpoint not yet written",
    "partial": "INSERT partly committed",
}


def _phase(store: Path, pid: int) -> str:
    """Where a killed runner was: from the last tracking row it wrote (writer is host:pid:...) and
    whether the target already holds the range that row has in flight."""
    proc = subprocess.run([sys.executable, "-c", PHASE_READER, f"chdb://{store}", "d", str(pid)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    if got["status"] is None:
        return "startup"
    assert got["status"] == "running", got
    batch = got["in_flight"]
    if not batch:
        return "claimed"
    if got["in_target"] == 0:
        return "insert"
    return "committed" if got["in_target"] == batch["rows"] else "partial"


def _kill_at_random_points(request, generic, rows: int, batch_size: int, kills: int, seed: int,
                           row_sleep: float) -> None:
    """Kill -9 runs at seeded random instants, each run resuming the last; then run to completion.

    Most kills wait for a random number of batch lines and then a random fraction of a batch, so they
    land anywhere in the batch protocol; some land at a random instant of the start-up. After each
    kill, where it landed is read from the store. The loop goes on (at most 3 x kills) until it has
    `kills` kill points including one during an INSERT and one between an INSERT and its checkpoint.
    `row_sleep` (sleepEachRow in the SQL) makes the INSERT a fair share of each batch, so kills land in it.
    """
    store, root = generic(rows, batch_size, sql=COPY_SQL + f" AND sleepEachRow({row_sleep}) = 0")
    rng = random.Random(seed)
    phases: list[str] = []
    while len(phases) < kills or ({"insert", "committed"} - set(phases) and len(phases) < 3 * kills):
        proc = start(store, root, "backfill", "run", "1")
        lines = Lines(proc)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.05, 1.0))  # start-up: opening the store, claiming the lease
        else:
            lines.wait_for("batch ", count=rng.randint(1, 5))
            time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, "the run ended before its kill point; use more rows"
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        phases.append(_phase(store, proc.pid))
    proc = migrate(store, root, "backfill", "run", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{rows:,} rows processed" in proc.stdout
    got = assert_exact(store, rows)
    status = status_json(store, root)
    assert status["status"] == "completed"
    assert status["rows_processed"] == rows
    assert status["checkpoint"]["in_flight"] is None
    counts = {PHASES[p]: phases.count(p) for p in PHASES if p in phases}
    report(request, f"\nkill -9: {len(phases)} kill points survived (seed {seed}, {rows:,} rows, batch size "
                    f"{batch_size}); {got['src'][0]:,} rows compared, 0 duplicates, 0 missing; landed: "
                    + "; ".join(f"{n} x {p}" for p, n in counts.items()))
    assert {"insert", "committed"} <= set(phases), counts


def test_kill_9_at_random_points_then_rerun_copies_exactly_once(request, generic):
    _kill_at_random_points(request, generic, rows=16_000, batch_size=200, kills=4, seed=20240611, row_sleep=0.0003)


@pytest.mark.slow
def test_kill_9_at_many_random_points_over_200k_rows(request, generic):
    _kill_at_random_points(request, generic, rows=200_000, batch_size=500, kills=14, seed=7, row_sleep=0.0001)


# -- signals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_pauses_at_a_batch_boundary_and_resume_completes(generic, sig, code):
    rows = 2_000
    store, root = generic(rows, 100)
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
    proc = migrate(store, root, "backfill", "resume", "1")
    assert proc.returncode == 0, proc.stderr
    assert "backfill 1: completed (completed)" in proc.stdout
    assert_exact(store, rows)


def test_sigterm_while_the_runner_claims_still_pauses_at_the_first_boundary(generic):
    """The signal lands in the claim window: the live status file says running, no batch has run."""
    rows = 2_000
    store, root = generic(rows, 100)
    proc = start(store, root, "backfill", "run", "1")
    live = store.with_name(store.name + ".control") / "status-d_1.json"
    deadline = time.time() + 60
    while True:
        try:
            if json.loads(live.read_text())["status"] == "running":
                break
        except (OSError, ValueError, KeyError):
            pass
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "SIGTERM: stopping after the current batch" in err
    assert proc.returncode == 143, (out, err)
    assert status_json(store, root)["status"] == "paused"


def test_second_signal_interrupts_the_batch_and_it_is_replayed(generic):
    """The first SIGINT asks for a stop at the boundary; a second one is promised to interrupt the batch."""
    rows = 300
    slow = COPY_SQL + " AND sleepEachRow(0.025) = 0"  # ~2.5 s per batch: both signals land inside one INSERT
    store, root = generic(rows, 100, sql=slow)
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
    assert_exact(store, rows)


# -- concurrent runners ----------------------------------------------------------------------
def test_two_runners_started_at_the_same_instant_exactly_one_runs(generic):
    rows = 6_000
    store, root = generic(rows, 100)
    procs = [start(store, root, "backfill", "run", "1") for _ in range(2)]
    results = [(p.returncode, *p.communicate(timeout=300)) for p in procs]
    results = [(p.returncode, out, err) for p, (_, out, err) in zip(procs, results)]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "backfill 1: completed (completed)" in winners[0][1]
    code, out, err = losers[0]
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: store {store} is held by ")
    assert_exact(store, rows)


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


def test_real_memory_limit_mid_run_halves_the_batch_and_completes(generic):
    rows = 80_000
    store, root = generic(rows, 20_000, sql=OOM_SQL, up=OOM_UP, min_batch_size=1000, settings=OOM_SETTINGS)
    proc = migrate(store, root, "backfill", "run", "1")
    assert proc.returncode == 0, proc.stderr
    assert "memory limit at batch size 20000; halving to 10000" in proc.stderr
    assert "Traceback" not in proc.stderr
    status = status_json(store, root)
    assert status["status"] == "completed"
    assert status["current_batch_size"] == 10_000
    assert status["rows_processed"] == rows
    got = assert_exact(store, rows)
    sizes = [json.loads(cp).get("current_batch_size") for _, _, cp in got["history"]]
    first_small = sizes.index(10_000)
    done_before = json.loads(got["history"][first_small][2])["batches_completed"]
    assert done_before >= 2, "the narrow first half ran at full size before the limit was hit"


# -- leases ----------------------------------------------------------------------------------
def test_runner_killed_with_a_fresh_lease_is_taken_over(generic):
    rows = 3_000
    store, root = generic(rows, 100)
    proc = start(store, root, "backfill", "run", "1", BACKFILL_LEASE_SECONDS="2")
    Lines(proc).wait_for("batch ", count=3)
    proc.kill()
    proc.wait(timeout=60)
    before = read_store(store)
    last_writer, last_status, last_cp = before["history"][-1]
    assert last_status == "running"
    lease = json.loads(last_cp)["lease"]
    assert lease["pid"] == proc.pid  # the dead runner still "holds" a lease younger than its timeout
    proc = migrate(store, root, "backfill", "resume", "1", BACKFILL_LEASE_SECONDS="2")
    assert proc.returncode == 0, proc.stderr
    assert "backfill 1: completed (completed)" in proc.stdout
    assert_exact(store, rows)


FORGE_LEASE = r"""
import json, sys, time, clickhouse_connect
from backfill_plugin.checkpoint import CheckpointStore
client = clickhouse_connect.get_client(dsn=sys.argv[1])
store = CheckpointStore(client)
row = store.load("d_1")
row.status, row.writer = "running", "runner-on-another-host:4242:deadbeef"
row.checkpoint["lease"] = {"owner": row.writer, "host": "runner-on-another-host", "pid": 4242,
                           "heartbeat": time.time()}
store.save(row)
print(json.dumps(row.checkpoint["lease"]))
"""


def test_lease_of_a_runner_on_another_host_refuses_then_is_taken_over_when_stale(generic):
    """Injected fault: a runner on another host that stopped heartbeating cannot be produced on one
    machine, so its lease row is written directly (what that runner's last heartbeat would have left)."""
    rows = 3_000
    store, root = generic(rows, 100)
    forged = subprocess.run([sys.executable, "-c", FORGE_LEASE, f"chdb://{store}"], capture_output=True,
                            text=True, timeout=60, cwd=str(REPO))
    assert forged.returncode == 0, forged.stderr
    forged_at = json.loads(forged.stdout)["heartbeat"]
    before = read_store(store)
    proc = migrate(store, root, "backfill", "run", "1")  # default lease: 60 s, so this lease is fresh
    assert_one_line_error(proc, r"error: backfill d_1 is already running \(runner-on-another-host:4242:deadbeef, "
                                r"heartbeat \d+s ago\); refusing a second runner")
    assert read_store(store)["history"] == before["history"]  # the refused runner wrote nothing
    time.sleep(max(0.0, forged_at + 1.5 - time.time()))
    proc = migrate(store, root, "backfill", "run", "1", BACKFILL_LEASE_SECONDS="1")
    assert proc.returncode == 0, proc.stderr
    assert f"{rows:,} rows processed" in proc.stdout
    assert_exact(store, rows)


# -- in-process: one engine shared by threads (the `ch_client` fixture) -------------------------
def simple_up(rows: int) -> str:
    """Keys in number order ('k000000', ...), so a test can name the row an error should hit."""
    return (f"CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);\n"
            f"INSERT INTO {{db}}.src SELECT 'k' || leftPad(toString(number), 6, '0'), toUInt32(number % 10), "
            f"toString(number) FROM numbers({rows});\n"
            f"CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
            f"SETTINGS non_replicated_deduplication_window = 1000;\n")


@pytest.fixture
def inproc(ch_client, db, migrations, migrator_for):
    """inproc(rows, batch_size, ...) -> migrations root, with 001 applied to `db` on the shared client."""
    def make(rows: int, batch_size: int, sql: str = COPY_SQL, up: str | None = None, **meta_extra):
        root = migrations(1, "x", up or source_sql(rows), DOWN_SQL, sql, meta(batch_size, **meta_extra))
        migrator_for(db, root).up()
        return root
    return make


def fingerprint(client, db: str, table: str) -> tuple:
    return tuple(client.query(f"SELECT count(), groupBitXor(cityHash64(a, b, v)), sum(cityHash64(a, b, v)) "
                              f"FROM {db}.{table}").result_rows[0])


def assert_exact_inproc(client, db: str, rows: int) -> None:
    src, dst = fingerprint(client, db, "src"), fingerprint(client, db, "dst")
    assert src[0] == rows
    assert dst == src
    assert client.command(f"SELECT count() FROM (SELECT a, b FROM {db}.dst GROUP BY a, b HAVING count() > 1)") == 0


class Runner(threading.Thread):
    """run_backfill in a thread, keeping its result or exception."""

    def __init__(self, manager, db, barrier=None, **kwargs):
        super().__init__(daemon=True)
        self.manager, self.db, self.barrier, self.kwargs = manager, db, barrier, kwargs
        self.result, self.error = None, None

    def run(self):
        try:
            if self.barrier:
                self.barrier.wait()
            self.result = self.manager.run_backfill(self.db, 1, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.02)


SLOW_COPY = COPY_SQL + " AND sleepEachRow(0.0005) = 0"  # ~50 ms per batch of 100: a run lasts a while


def test_second_runner_refused_while_the_first_runs_in_a_thread(ch_client, db, inproc):
    rows = 4_000
    root = inproc(rows, 100, sql=SLOW_COPY)
    first = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    second = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner = Runner(first, db)
    runner.start()
    wait_until(lambda: (second.store.load(f"{db}_1") or first.store.load(f"{db}_1")).checkpoint.get("batches_completed", 0) >= 2)
    with pytest.raises(BackfillError, match=rf"backfill {db}_1 is already running \({first.owner}, heartbeat \d+s ago\); "
                                            r"refusing a second runner"):
        second.run_backfill(db, 1)
    runner.join(120)
    assert runner.error is None, runner.error
    assert runner.result["stopped"] == "completed"  # the refusal did not disturb the first runner
    assert runner.result["rows_processed"] == rows
    assert_exact_inproc(ch_client, db, rows)


def test_two_runners_at_the_same_instant_in_one_process_exactly_one_runs(ch_client, db, inproc):
    rows = 2_000
    root = inproc(rows, 100)
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
    assert_exact_inproc(ch_client, db, rows)


def test_pause_from_another_thread_stops_at_the_batch_boundary(ch_client, db, inproc):
    rows = 4_000
    root = inproc(rows, 100, sql=SLOW_COPY)
    runner_mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    operator = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner = Runner(runner_mgr, db)
    runner.start()
    wait_until(lambda: (operator.store.load(f"{db}_1") or runner_mgr.store.load(f"{db}_1")).checkpoint.get("batches_completed", 0) >= 3)
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
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == status["rows_processed"]
    result = operator.resume_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert_exact_inproc(ch_client, db, rows)


def test_resume_right_after_pause_waits_for_the_runner_still_in_its_batch(ch_client, db, inproc):
    rows = 180
    root = inproc(rows, 90, sql=COPY_SQL + " AND sleepEachRow(0.02) = 0", up=simple_up(rows))  # ~1.8 s a batch
    first = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    operator = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    runner = Runner(first, db)
    runner.start()
    wait_until(lambda: ((operator.store.load(f"{db}_1") or first.store.load(f"{db}_1")).checkpoint.get("in_flight")
                        is not None))
    operator.pause_backfill(db, 1)  # the runner is inside batch 1 and holds a fresh lease
    # Another operator's own client (a client runs one query at a time; the runner's is busy).
    own = clickhouse_connect.get_client(dsn=f"chdb://{ch_client.path}") if hasattr(ch_client, "path") else ch_client
    second = Runner(ClickHouseBackfillManager(own, migrations_dir=root), db)
    second.start()
    second.join(60)
    runner.join(60)
    assert isinstance(second.error, BackfillError), second.result
    assert "already running" in str(second.error) or "still" in str(second.error)


class ProcessDied(BaseException):
    """Stands for the death of the process: not an Exception, so no handler treats it as retryable."""


class DiesAfterInsert:
    """Injected fault (kill -9 cannot be aimed at this instant): a client proxy whose target INSERT
    number `at` succeeds and then the 'process dies': it raises, and every later call fails, so
    nothing more reaches the store, as after a real crash between the INSERT and the checkpoint."""

    def __init__(self, client, target: str, at: int):
        self.client, self.target, self.at = client, target, at
        self.inserts, self.dead, self.tokens = 0, False, []

    def command(self, sql, *args, **kwargs):
        if self.dead:
            raise ConnectionError("process is gone")
        out = self.client.command(sql, *args, **kwargs)
        if sql.lstrip().startswith(f"INSERT INTO {self.target}"):
            self.inserts += 1
            self.tokens.append((sql, (kwargs.get("settings") or {}).get("insert_deduplication_token")))
            if self.inserts == self.at:
                self.dead = True
                raise ProcessDied()
        return out

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.dead:
                raise ConnectionError("process is gone")
            return attr(*args, **kwargs)
        return call


class Recording:
    """A client proxy that records the INSERTs into the target (to see the replay's SQL and token)."""

    def __init__(self, client, target: str):
        self.client, self.target, self.inserts = client, target, []

    def command(self, sql, *args, **kwargs):
        if sql.lstrip().startswith(f"INSERT INTO {self.target}"):
            self.inserts.append((sql, (kwargs.get("settings") or {}).get("insert_deduplication_token")))
        return self.client.command(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


# SQL that reads {retry_count} promises to skip, on a retry, the keys a failed or crashed attempt
# already wrote (the manager then drops the dedup token on retries); SQL that does not relies on the
# deterministic token alone. Both ways must end exact.
ANTI_JOIN = " AND ({retry_count} = 0 OR (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range}))"


@pytest.mark.parametrize("replay", ["token", "anti-join"])
def test_crash_between_insert_and_checkpoint_replays_without_duplicates(ch_client, db, inproc, monkeypatch, replay):
    """Injected fault: the process 'dies' right after the 3rd batch's INSERT returned, before any
    checkpoint write (see DiesAfterInsert). The next runner must replay exactly that range (same
    SQL, same dedup token; or, for SQL that anti-joins, {retry_count} = 1) and the target must end exact."""
    rows = 1_000
    root = inproc(rows, 100, sql=COPY_SQL + (ANTI_JOIN if replay == "anti-join" else ""))
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.5")  # the dead runner's pid is ours: wait out its lease
    dying = DiesAfterInsert(ch_client, f"{db}.dst", at=3)
    with pytest.raises((ProcessDied, ConnectionError)):
        ClickHouseBackfillManager(dying, migrations_dir=root).run_backfill(db, 1)
    crashed_sql, crashed_token = dying.tokens[-1]
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 300  # the INSERT did commit
    survivor = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    row = survivor.store.load(f"{db}_1")
    assert row.status == "running"
    assert row.checkpoint["in_flight"] is not None  # the 3rd batch is recorded as in flight
    assert row.checkpoint["rows_processed"] == 200
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
    assert_exact_inproc(ch_client, db, rows)


# Real engine errors. throwIf is evaluated while reading, after earlier granules were already
# inserted: with one thread and small insert blocks the failed INSERT commits 16,384 rows first
# (chDB 26). The framework squashes SQL without {retry_count} into one block whatever the meta says.
PARTIAL_COMMIT = {"max_threads": 1, "max_block_size": 8192, "min_insert_block_size_rows": 1000,
                  "min_insert_block_size_bytes": 0}
FIRST_ATTEMPT_FAILS = COPY_SQL + " AND throwIf({retry_count} = 0 AND a = 'k020000') = 0" + ANTI_JOIN


def test_token_only_sql_never_commits_part_of_a_failed_batch(ch_client, db, inproc):
    """Without {retry_count} the token is the only replay guard, so a batch must commit whole or not at
    all: meta settings that would split the INSERT into blocks are overridden (real error 395)."""
    rows = 40_000
    root = inproc(rows, 32_768, sql=COPY_SQL + " AND throwIf(a = 'k020000') = 0", up=simple_up(rows),
                  min_batch_size=1000, settings=PARTIAL_COMMIT, max_retries=1)
    seen = []
    manager = ClickHouseBackfillManager(
        ch_client, migrations_dir=root, sleep=lambda s: seen.append(ch_client.command(f"SELECT count() FROM {db}.dst")))
    with pytest.raises(BackfillError, match="failed 2 times: Code: 395"):
        manager.run_backfill(db, 1)
    assert seen == [0] and ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_transient_error_after_a_partial_commit_is_retried_without_duplicates(ch_client, db, inproc):
    """A real FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (395) in the middle of a 32,768-row batch, on the
    first attempt only; sleep is patched to record the backoff and what the target held then. (The
    batch is 4 whole granules and the failing row is in the 3rd: the engine evaluates throwIf on
    every row of a granule it reads, so a later batch sharing that granule would fail too.)"""
    rows = 40_000
    root = inproc(rows, 32_768, sql=FIRST_ATTEMPT_FAILS, up=simple_up(rows), min_batch_size=1000,
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
    assert_exact_inproc(ch_client, db, rows)


TIMEOUT_SQL = COPY_SQL + " AND sleepEachRow(if({retry_count} = 0, 0.02, 0)) = 0" + ANTI_JOIN  # 2 s per 100 rows


def test_real_timeout_is_retried_with_backoff(ch_client, db, inproc):
    """A real TIMEOUT_EXCEEDED (159) from timeout_seconds on the first attempt; patched sleep."""
    rows = 100
    root = inproc(rows, 100, sql=TIMEOUT_SQL, up=simple_up(rows), timeout_seconds=1)
    sleeps = []
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root, sleep=sleeps.append).run_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert sleeps == [1]  # the batch timed out once, then passed
    assert_exact_inproc(ch_client, db, rows)


def test_memory_limit_below_min_batch_size_fails_and_keeps_the_checkpoint(ch_client, db, inproc):
    """Real MEMORY_LIMIT_EXCEEDED (241) on the wide half; halving would go below min_batch_size."""
    rows = 80_000
    root = inproc(rows, 20_000, sql=OOM_SQL, up=OOM_UP, min_batch_size=20_000, settings=OOM_SETTINGS)
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    with pytest.raises(BackfillError, match=r"^out of memory at batch size 20000; halving would go below "
                                            r"min_batch_size 20000: Code: 241\."):
        manager.run_backfill(db, 1)
    status = manager.get_status(db, 1)
    assert status["status"] == "failed"
    assert status["error_log"].startswith("out of memory at batch size 20000")
    assert status["rows_processed"] == 40_000  # the two narrow batches stay done
    assert status["position"] == ["k039999", 9]
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 40_000


def test_retries_exhausted_fail_with_the_error_and_keep_the_checkpoint(ch_client, db, inproc, migrations):
    rows = 300
    always = COPY_SQL + " AND throwIf(a = 'k000150') = 0"
    root = inproc(rows, 100, sql=always, up=simple_up(rows), max_retries=2)
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
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 100
    (root / "001_x.backfill.sql").write_text(COPY_SQL)  # the operator fixes the SQL
    result = manager.resume_backfill(db, 1)
    assert result["stopped"] == "completed"
    assert_exact_inproc(ch_client, db, rows)
