"""Faults at random over many statements and many processes (issue 31): nothing lost, nothing doubled,
every stop explained in one true line.

One HTTP endpoint (tests/chhttp.py over the real engine) runs with a seeded chaos schedule
(tests/chaos.py): a fraction of all requests is refused (502/503), stalled, answered late, dropped
after running or reset mid-answer. Against it, at once, in separate processes:
- three backfills, each in `migrate backfill run` processes that a supervisor re-runs until one
  reports `completed` (as a Kubernetes Job restarts a failed pod): token-only SQL (030), SQL that
  anti-joins on {retry_count} (031) and the project's 021 aggregation over the demo calls;
- two pollers running `status`/`list`, text and `--json`, every 100 ms (each one process running the
  real CLI in a loop);
- one operator process that pauses backfill 031 and resumes it;
- `migrate up` applying a new migration (re-run until it succeeds);
- kill -9 of runners at seeded random instants.
At the end: each target equals the same backfill run uninterrupted on a copy of the data in another
database (every column hashed, no key twice), every backfill `completed`, `validate` passing, no
traceback anywhere, and every non-zero exit one line whose cause (network, server, SQL, another runner)
is stated and true.

`make test` runs the short form on fixed seeds; `make soak` runs it for SOAK_MINUTES (default 30)
with more rows and prints the coverage (fault kind x statement kind), the restarts and the verdict,
and fails if any applicable pair of fault kind and statement kind was never hit (tests/chaos.py).
A failing run is reproduced with its seed: SOAK_SEED=N make soak.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import chaos
from tests.conftest import MIGRATE, REPO, report, start_endpoint, stop_endpoint

CUTOVER = "2031-01-01 00:00:00.000"  # after every generated call: the whole history is backfilled
PREFIXES = r"""['', 'it''s', 'back\\slash', 'new\nline', 'üñí ✓', 'x\\''y']"""
UP_030 = f"""CREATE TABLE {{db}}.src30 (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {{db}}.src30 SELECT arrayElement({PREFIXES}, (number % 6) + 1) || toString(intDiv(number, 600)),
    toUInt32(intDiv(number % 600, 6)), concat('v', toString(number)) FROM numbers({{rows}});
CREATE TABLE {{db}}.dst30 (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 10000;"""
UP_031 = """CREATE TABLE {db}.src31 (k UInt64, v String) ENGINE = MergeTree ORDER BY k;
INSERT INTO {db}.src31 SELECT number * 7, repeat('v', number % 50) FROM numbers({rows});
CREATE TABLE {db}.dst31 AS {db}.src31 ENGINE = MergeTree ORDER BY k;"""
SQL_030 = "INSERT INTO {db}.dst30 SELECT a, b, v FROM {db}.src30 WHERE {batch_range}"
SQL_031 = (
    "INSERT INTO {db}.dst31 SELECT k, v FROM {db}.src31 WHERE {batch_range} AND ({retry_count} = 0 OR k NOT IN "
    "(SELECT k FROM {db}.dst31 WHERE {batch_range}))"
)
VALIDATE = (
    "SELECT 'rows' AS check, (SELECT count() FROM {{db}}.src{v} WHERE {{batch_range}}) AS expected, "
    "(SELECT count() FROM {{db}}.dst{v} WHERE {{batch_range}}) AS actual, toUInt8(expected = actual) AS ok"
)
TARGETS = {30: ("dst30", "a, b"), 31: ("dst31", "k"), 21: ("calls_complete", "project_id, id")}
LATE_MIGRATION = "CREATE TABLE IF NOT EXISTS {db}.late_extra (x UInt8) ENGINE = MergeTree ORDER BY x"

# What a non-zero exit may say, by cause; a line that fits none of them is a finding. The SQL here is correct,
# so an error naming a SQL file is never true; a network or server error must match a fault injected.
CAUSES = {
    "network": re.compile(r"\bnetwork error: "),
    "server": re.compile(r"\bserver error: HTTP (\d+) "),
    "ClickHouse error": re.compile(r"\bCode: \d+\. DB::Exception"),
    "another runner": re.compile(
        r"^error: .*(already running|claimed at the same time|took over the lease|"
        r"refusing a second runner|changed while it was being validated|changed while this run was starting)"
    ),
    "state": re.compile(
        r"^error: (backfill \w+ is (completed|paused|failed|pending|running); only a|database 'd' is "
        r"dirty: version 40 was partially applied)"
    ),
}
BLAMES_SQL = re.compile(r"\.sql: ")

POLLER = r"""
import contextlib, io, json, sys, time
from migrator.cli import build, run
group, deadline, n = build(), time.time() + float(sys.argv[1]), 0
commands = [a.split() for a in sys.argv[2:]]
while time.time() < deadline:
    argv = commands[n % len(commands)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(group, argv)
        except SystemExit as exc:
            code = exc.code or 0
    print(json.dumps({"argv": argv, "code": code, "stdout": out.getvalue()[-2000:], "stderr": err.getvalue()}),
          flush=True)
    n += 1
    time.sleep(0.1)
"""
OPERATOR = r"""
import subprocess, sys, time, json
migrate, version, wait = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def call(*args):
    p = subprocess.run(migrate + list(args), capture_output=True, text=True)
    print(json.dumps({"argv": list(args), "code": p.returncode, "stdout": p.stdout[-2000:], "stderr": p.stderr}),
          flush=True)
    return p.returncode
time.sleep(wait)
for _ in range(20):
    if call("backfill", "pause", version) == 0:
        break
    time.sleep(0.3)
time.sleep(wait)
call("backfill", "resume", version)
"""


class Outputs:
    """Every finished command of the soak: argv, exit code, stdout, stderr (for the end checks)."""

    def __init__(self):
        self.lock, self.items = threading.Lock(), []

    def add(self, who: str, argv, code: int, out: str, err: str) -> None:
        with self.lock:
            self.items.append({"who": who, "argv": list(argv), "code": code, "stdout": out, "stderr": err})


def _env(url: str, extra: dict | None = None) -> dict:
    env = {
        **os.environ,
        "CLICKHOUSE_URL": url,
        "MIGRATE_DATABASE": "d",
        "PYTHONUNBUFFERED": "1",
        "BACKFILL_LEASE_SECONDS": "10",
        **(extra or {}),
    }
    env.pop("MIGRATE_DEBUG", None)
    env.pop("CLICKHOUSE_PASSWORD", None)
    return env


def _write_migrations(root: Path, rows: int, batch_size: int) -> None:
    shutil.copytree(REPO / "migrations", root)
    for v, up, sql, target, keys in ((30, UP_030, SQL_030, "dst30", ["a", "b"]), (31, UP_031, SQL_031, "dst31", ["k"])):
        name = f"0{v}_copy{v}"
        (root / f"{name}.up.sql").write_text(up.replace("{rows}", str(rows)))
        (root / f"{name}.down.sql").write_text(
            f"DROP TABLE IF EXISTS {{db}}.{target}; DROP TABLE IF EXISTS {{db}}.src{v}"
        )
        (root / f"{name}.backfill.sql").write_text(sql)
        (root / f"{name}.backfill.validate.sql").write_text(VALIDATE.format(v=v))
        (root / f"{name}.backfill.meta").write_text(
            json.dumps(
                {
                    "migration_version": v,
                    "batch_size": batch_size,
                    "min_batch_size": 10,
                    "checkpoint_columns": keys,
                    "source_table": f"src{v}",
                    "max_retries": 3,
                }
            )
        )


def _table_exists(url: str, table: str) -> bool:
    """Asked through the endpoint with chaos on: an operator's look, repeated until it is answered."""
    from migrator import connection

    for _ in range(20):
        try:
            return bool(connection.connect(connection.resolve(url)).command(f"EXISTS TABLE {table}"))
        except Exception:  # noqa: BLE001 - a fault injected on the look itself: look again
            time.sleep(0.2)
    raise AssertionError(f"could not look at {table} in 20 tries")


def _run(argv, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(MIGRATE + argv, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def _ok(proc) -> str:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.args, proc.stdout, proc.stderr)
    return proc.stdout


def _run_args(version: int, batch_size: int) -> list[str]:
    args = ["backfill", "run", str(version), "--batch-size", str(batch_size), "--target-batch-seconds", "off"]
    return args + (["--param", f"cutover_timestamp={CUTOVER}"] if version == 21 else [])


def _prepare(url: str, root: Path, database: str, calls: int) -> dict:
    env = _env(url, {"MIGRATE_DATABASE": database, "MIGRATE_DIR": str(root)})
    _ok(_run(["up"], env))
    demo = subprocess.run(
        [sys.executable, "-m", "backfill_plugin.ops.demo", "--calls", str(calls), "--seed", "7"],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr
    return env


class Supervisor(threading.Thread):
    """Re-runs `migrate backfill run V` until a run reports completed, then `validate V` until it passes."""

    def __init__(self, version: int, env: dict, batch_size: int, outputs: Outputs, deadline: float):
        super().__init__(daemon=True, name=f"supervisor-{version}")
        self.version, self.env, self.batch_size, self.outputs, self.deadline = (
            version,
            env,
            batch_size,
            outputs,
            deadline,
        )
        self.proc: subprocess.Popen | None = None
        self.runs, self.kills, self.completed, self.validated, self.lock = 0, 0, False, False, threading.Lock()

    def _once(self, argv: list[str]) -> tuple[int, str, str]:
        with self.lock:
            self.proc = subprocess.Popen(
                MIGRATE + argv, env=self.env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        out, err = self.proc.communicate(timeout=600)
        code = self.proc.returncode
        with self.lock:
            self.proc = None
        self.outputs.add(f"runner {self.version}", argv, code, out, err)
        return code, out, err

    def kill(self) -> bool:
        """kill -9 the running runner, if one runs (not its validation)."""
        with self.lock:
            if self.proc is None or self.completed or self.proc.poll() is not None:
                return False
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
            return True

    def run(self) -> None:
        while not self.completed and time.time() < self.deadline:
            self.runs += 1
            code, out, _ = self._once(_run_args(self.version, self.batch_size))
            self.completed = code == 0 and f"backfill {self.version}: completed" in out
            if not self.completed:
                time.sleep(0.3)
        while self.completed and not self.validated and time.time() < self.deadline:
            code, out, _ = self._once(["backfill", "validate", str(self.version)])
            self.validated = code == 0 and "passed" in out
            if not self.validated:
                time.sleep(0.3)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _cause(item: dict, injected: set) -> str:
    """The cause a non-zero exit states, checked for truth against the faults injected (`injected`: fault
    kinds, and "refuse 502"/"refuse 503"); raises AssertionError naming the line otherwise."""
    lines = _lines(item["stderr"])
    error = [line for line in lines if line.startswith("error: ")]
    assert len(error) == 1, f"{item['who']} {item['argv']}: not one error line: {item['stderr']!r}"
    line = error[0]
    assert not BLAMES_SQL.search(line), f"{item['who']} {item['argv']}: blames correct SQL: {line}"
    for cause, pattern in CAUSES.items():
        match = pattern.search(line)
        if not match:
            continue
        if cause == "network":
            assert injected & {"drop", "reset", "late", "stall"}, f"network error with no such fault injected: {line}"
        if cause == "server":
            assert f"refuse {match.group(1)}" in injected, f"HTTP {match.group(1)} never injected: {line}"
        return cause
    if item["code"] in (130, 143):
        return "signal"
    raise AssertionError(f"{item['who']} {item['argv']}: the error does not say what failed: {line}")


def soak(
    tmp_path: Path,
    seed: int,
    rate: float,
    rows: int,
    calls: int,
    batch_size: int,
    kills: int,
    duration: float,
    max_seconds: float = 0.6,
    boost: float = chaos.BOOST,
) -> dict:
    """The soak (module docstring); returns its report. `duration` bounds the chaos phase (the backfills
    are re-run until done or until it is over, which fails); `boost` weights the schedule (tests/chaos.py)."""
    endpoint = start_endpoint(tmp_path / "chhttp" / "store")
    try:
        return _soak(endpoint, tmp_path, seed, rate, rows, calls, batch_size, kills, duration, max_seconds, boost)
    finally:
        stop_endpoint(endpoint)


def _soak(endpoint, tmp_path, seed, rate, rows, calls, batch_size, kills, duration, max_seconds, boost) -> dict:
    url, root, rng = endpoint.url, tmp_path / "migrations", random.Random(seed)
    _write_migrations(root, rows, batch_size)
    # The reference: the same data in database `ref`, each backfill run once, uninterrupted, no faults.
    ref_env = _prepare(url, root, "ref", calls)
    for v in (30, 31, 21):
        assert f"backfill {v}: completed" in _ok(_run(_run_args(v, batch_size), ref_env))
    env = _prepare(url, root, "d", calls)
    endpoint.clear_log()
    endpoint._call("POST", "/__chaos", {"seed": seed, "rate": rate, "max_seconds": max_seconds, "boost": boost})
    started, outputs = time.time(), Outputs()
    deadline = started + duration
    supervisors = [Supervisor(v, env, batch_size, outputs, deadline) for v in (30, 31, 21)]
    pollers = [
        subprocess.Popen(
            [sys.executable, "-c", POLLER, str(duration), *commands],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for commands in (
            ["backfill status 21", "backfill list --json", "backfill status 30 --json"],
            ["backfill list", "backfill status 31", "backfill status 21 --json"],
        )
    ]
    operator = subprocess.Popen(
        [sys.executable, "-c", OPERATOR, json.dumps(MIGRATE), "31", str(min(3.0, duration / 8))],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for s in supervisors:
        s.start()

    def migrate_up():
        time.sleep(rng.uniform(0.5, 2.0))
        (root / "040_late.up.sql").write_text(LATE_MIGRATION)
        (root / "040_late.down.sql").write_text("DROP TABLE IF EXISTS {db}.late_extra")
        while time.time() < deadline:
            proc = _run(["up"], env)
            outputs.add("migrate up", ["up"], proc.returncode, proc.stdout, proc.stderr)
            if proc.returncode == 0:
                return
            if "is dirty" in proc.stderr:  # the runbook's repair: see what 040 did, then mark what is in place
                done = _run(["force", "40" if _table_exists(url, "d.late_extra") else "31"], env)
                outputs.add("migrate force", ["force"], done.returncode, done.stdout, done.stderr)
            time.sleep(0.3)

    upper = threading.Thread(target=migrate_up, daemon=True)
    upper.start()
    killed = 0
    while killed < kills and any(s.is_alive() and not s.completed for s in supervisors) and time.time() < deadline:
        time.sleep(rng.uniform(0.3, 2.0))
        live = [s for s in supervisors if s.is_alive() and not s.completed]
        if live and rng.choice(live).kill():
            killed += 1
    for s in supervisors:
        s.join(max(1.0, deadline - time.time() + 5))
    upper.join(max(1.0, deadline - time.time() + 5))
    busy = time.time() - started
    for p in pollers:
        p.terminate()
    for p in [*pollers, operator]:
        out, err = p.communicate(timeout=max(30.0, deadline - time.time() + 30))
        assert "Traceback" not in err, err
        for line in out.splitlines():
            try:
                item = json.loads(line)
            except ValueError:  # the last line of a poller stopped mid-write
                continue
            outputs.add(
                "poller" if p in pollers else "operator", item["argv"], item["code"], item["stdout"], item["stderr"]
            )
    chaos_report = endpoint._call("DELETE", "/__chaos")
    return _verdict(endpoint, url, root, env, supervisors, outputs, chaos_report, killed, busy, seed)


def _verdict(endpoint, url, root, env, supervisors, outputs, chaos_report, killed, busy, seed) -> dict:
    from migrator import connection

    client = connection.connect(connection.resolve(url))
    problems = []
    for s in supervisors:
        if not (s.completed and s.validated):
            problems.append(
                f"backfill {s.version}: completed={s.completed} validated={s.validated} after {s.runs} runs"
            )
    for v, (table, keys) in TARGETS.items():
        sql = (
            "SELECT count(), sum(cityHash64(tuple(*))), groupBitXor(cityHash64(tuple(*))), count() - uniqExact({k}) "
            "FROM {db}.{t}"
        )
        want = client.query(sql.format(k=keys, db="ref", t=table)).result_rows[0]
        got = client.query(sql.format(k=keys, db="d", t=table)).result_rows[0]
        if got != want or got[3] != 0 or got[0] == 0:
            problems.append(f"d.{table} {got} != ref.{table} {want} (count, hash sum, hash xor, duplicated keys)")
        status = json.loads(_ok(_run(["backfill", "status", str(v), "--json"], {**env, "MIGRATE_DIR": str(root)})))
        if status["status"] != "completed" or status["checkpoint"].get("in_flight") is not None:
            problems.append(
                f"backfill {v}: status {status['status']}, in flight {status['checkpoint'].get('in_flight')}"
            )
        validated = _run(["backfill", "validate", str(v)], {**env, "MIGRATE_DIR": str(root)})
        if validated.returncode != 0:
            problems.append(f"validate {v}: {validated.stderr.strip()}")
    if not client.command("EXISTS TABLE d.late_extra"):
        problems.append("the migration applied meanwhile (040) is not there")
    causes: dict[str, int] = {}
    errors: list[str] = []
    injected = {i["fault"] for i in chaos_report["log"]} | {
        f"refuse {i['status']}" for i in chaos_report["log"] if i["fault"] == "refuse"
    }
    for item in outputs.items:
        if "Traceback" in item["stderr"] or "Traceback" in item["stdout"]:
            problems.append(f"{item['who']} {item['argv']}: traceback: {item['stderr'][-400:]}")
            continue
        if item["code"] != 0 and item["code"] != -signal.SIGKILL:
            try:
                cause = _cause(item, injected)
                causes[cause] = causes.get(cause, 0) + 1
                errors.append(f"{cause}: {_lines(item['stderr'])[-1]}")
            except AssertionError as exc:
                problems.append(str(exc))
    restarts = {s.version: s.runs - 1 for s in supervisors}
    return {
        "seed": seed,
        "problems": problems,
        "chaos": chaos_report,
        "causes": causes,
        "errors": errors,
        "restarts": restarts,
        "kills": killed,
        "seconds": busy,
        "commands": len(outputs.items),
    }


def summary(result: dict) -> str:
    rep = result["chaos"]
    verdict = "PASS" if not result["problems"] else "FAIL"
    lines = [
        f"chaos soak seed {result['seed']} rate {rep['rate']}: {verdict} in {result['seconds']:.0f} s; "
        f"{rep['injected']} faults over {sum(rep['requests'].values())} requests; {result['kills']} kill -9; "
        f"restarts {result['restarts']}; {result['commands']} commands; non-zero exits by stated cause "
        f"{result['causes']}",
        chaos.table(rep),
    ]
    lines += [f"problem: {p}" for p in result["problems"]]
    return "\n".join(lines)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [31, 32])
def test_chaos_soak_short(request, tmp_path, seed):
    """The short form `make test` runs: a few hundred statements under faults, fixed seeds, with the weighted
    schedule, so that the rare statement kinds are hit too (weighted, seeds 31 and 32 found the two defects the
    aimed tests now pin: a lost answer to the migrate lock claim, a backfill lease claimed on a stale read)."""
    result = soak(tmp_path, seed, rate=0.08, rows=1_200, calls=1_500, batch_size=150, kills=2, duration=90)
    report(request, "\n" + summary(result))
    assert not result["problems"], summary(result)
    assert result["chaos"]["injected"] >= 10


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_chaos_soak_long(request, tmp_path):
    """`make soak`: SOAK_MINUTES of rounds (consecutive seeds from SOAK_SEED, or from the clock), each printing its
    own coverage, then the coverage so far and the pairs not yet hit; at the end it fails, naming them, if any
    applicable pair (tests/chaos.py, APPLICABLE) was never hit: a soak that claims coverage proves it."""
    minutes = float(os.environ.get("SOAK_MINUTES", "30"))
    first = int(os.environ.get("SOAK_SEED", "0")) or int(time.time())
    end, rounds, totals = time.time() + minutes * 60, 0, None
    while rounds == 0 or time.time() < end:
        seed = first + rounds
        result = soak(
            tmp_path / f"round{rounds}",
            seed,
            rate=0.1,
            rows=20_000,
            calls=20_000,
            batch_size=500,
            kills=8,
            duration=max(120.0, min(900.0, end - time.time())),
        )
        rounds += 1
        totals = chaos.tally(result["chaos"], totals)
        gaps = chaos.missing(totals)
        report(
            request,
            "\n" + summary(result) + f"\ncoverage after {rounds} rounds (seeds {first}..{seed}):\n"
            f"{chaos.table(totals)}\nnot yet hit ({len(gaps)} of {len(chaos.APPLICABLE)} pairs): "
            + (", ".join(f"{s} x {f}" for s, f in gaps) or "none"),
        )
        assert not result["problems"], f"seed {seed}: " + summary(result)
    gaps = chaos.missing(totals)
    report(
        request,
        f"\nsoak: {rounds} rounds from seed {first} in {minutes:g} min, every round passed; "
        + (
            f"FAIL: {len(gaps)} applicable pairs (statement kind x fault kind) never hit: "
            + ", ".join(f"{s} x {f}" for s, f in gaps)
            if gaps
            else f"every applicable pair hit ({len(chaos.APPLICABLE)})"
        ),
    )
    assert not gaps, f"soak from seed {first}, {rounds} rounds: never hit: {gaps}"


def test_chaos_schedule_is_a_function_of_the_seed_and_the_requests_of_each_kind():
    """The schedule alone (no engine: it decides before a request reaches one): two schedules with one seed give
    the same faults to the same requests whatever the interleaving of kinds; another seed gives others; limits
    hold; the classifier tells a lease claim, a heartbeat and a checkpoint write apart from the row they write."""
    requests = [(f"/* migrate-backfill d_1 range=x */\nINSERT INTO d.t SELECT {i}", {}) for i in range(300)]
    requests += [(f"SELECT status FROM db_management.backfills WHERE {i} = {i}", {}) for i in range(300)]

    def faults(seed, order, **kw):
        schedule = chaos.Chaos(seed, 0.2, **kw)
        for sql, params in order:
            schedule.take(sql, params)
        return sorted((f["statement"], f["n"], f["fault"], f["status"], f["seconds"]) for f in schedule.report()["log"])

    mixed = [r for pair in zip(requests[:300], requests[300:]) for r in pair]
    assert faults(7, requests) == faults(7, mixed) and faults(7, requests) != faults(8, requests)
    assert 80 < len(faults(7, requests)) < 160
    only = faults(7, requests, kinds=["drop"], statements=["status read"])
    assert only and {(s, f) for s, _, f, _, _ in only} == {("status read", "drop")}
    classify = chaos.Classifier()
    row = "INSERT INTO db_management.backfills (backfill_id) SELECT {backfill_id:String}"

    def write(status, owner, beat, position):
        cp = json.dumps({"position": position, "lease": {"owner": owner, "heartbeat": beat}})
        return classify(row, {"param_backfill_id": "d_1", "param_status": status, "param_checkpoint_data": cp})

    assert [
        write("pending", None, 0, None),
        write("running", "a", 1, None),
        write("running", "a", 2, None),
        write("running", "a", 2, [5]),
        write("running", "b", 3, [5]),
        write("paused", "b", 3, [5]),
    ] == [
        "checkpoint write",
        "lease claim or heartbeat",
        "lease claim or heartbeat",
        "checkpoint write",
        "lease claim or heartbeat",
        "checkpoint write",
    ]
    assert classify("EXPLAIN PIPELINE INSERT INTO d.t SELECT 1") == "EXPLAIN"
    assert classify("SELECT count() FROM d.src") == "completion check"
    assert classify("CREATE TABLE d.x (a UInt8) ENGINE = MergeTree ORDER BY a") == "migration DDL"


def test_chaos_schedule_hits_rare_statement_kinds_with_every_fault_kind():
    """The weighting (no engine, as above): a kind that gets a handful of requests per run is faulted on them far
    more often than the flat rate would, the fault kinds on a kind are dealt in turn, and consecutive seeds (the
    rounds of `make soak`) start the turn further on, so five rounds with a handful of requests each cover every
    applicable pair of those kinds; `missing` names what a tally never hit; boost 0 is the flat rate."""
    rare = {
        "completion check": "SELECT count() FROM d.src",
        "EXPLAIN": "EXPLAIN PIPELINE INSERT INTO d.t SELECT 1",
        "migration DDL": "CREATE TABLE d.x (a UInt8) ENGINE = MergeTree ORDER BY a",
        "validation": "SELECT 'rows' AS check, 1 AS expected, 1 AS actual, toUInt8(expected = actual) AS ok",
    }

    def run(seed, per_kind=6, **kw):
        schedule = chaos.Chaos(seed, 0.05, **kw)
        for _ in range(per_kind):
            for sql in rare.values():
                schedule.take(sql, {})
        return schedule.report()

    one = run(1)
    assert set(one["requests"][k] for k in rare) == {6} and one["injected"] >= 4
    for kind in rare:  # dealt in turn: the i-th fault on a kind is the fault kind after the (i-1)-th
        dealt = [f["fault"] for f in one["log"] if f["statement"] == kind]
        assert all(chaos.FAULTS[(chaos.FAULTS.index(a) + 1) % 5] == b for a, b in zip(dealt, dealt[1:])), dealt
    totals = None
    for seed in range(40, 45):
        totals = chaos.tally(run(seed), totals)
    assert [pair for pair in chaos.missing(totals) if pair[0] in rare] == []
    assert totals["requests"]["completion check"] == 30
    assert ("status read", "refuse") in chaos.missing(totals) and len(chaos.missing(totals)) == 30
    flat = sum(run(seed, boost=0)["injected"] for seed in range(40, 45))
    assert flat < sum(sum(row.values()) for row in totals["coverage"].values()) / 3
    assert chaos.Chaos(1, 0.0).chance(0) == 0.0 and chaos.Chaos(1, 0.3).chance(100) == 0.3


@pytest.mark.timeout(120)
def test_a_lost_answer_to_the_migrate_lock_claim_does_not_lock_out_the_next_migrate(tmp_path):
    """Aimed at what the soak found (seed 31, `migration DDL` request 0 reset): the endpoint resets the answer to
    `migrate up`'s lock claim after the claim was written, so that `up` stops with a network error; run again, `up`
    must apply the migration, not refuse for ten minutes because of a claim whose process has exited."""
    root = tmp_path / "migrations"
    root.mkdir()
    (root / "001_t.up.sql").write_text("CREATE TABLE IF NOT EXISTS {db}.t1 (x UInt8) ENGINE = MergeTree ORDER BY x")
    (root / "001_t.down.sql").write_text("DROP TABLE IF EXISTS {db}.t1")
    endpoint = start_endpoint(tmp_path / "chhttp" / "store")
    try:
        env = _env(endpoint.url, {"MIGRATE_DIR": str(root)})
        endpoint.fault("reset", "INSERT INTO db_management.migration_locks")
        first = _run(["up"], env)
        assert first.returncode != 0 and "network error: " in first.stderr, first.stderr
        again = _run(["up"], env)
        assert again.returncode == 0, again.stderr
        assert _table_exists(endpoint.url, "d.t1")
    finally:
        stop_endpoint(endpoint)
