"""Shared fixtures: one embedded chDB store per test process, a unique database per test.

chDB lets one process open one store path, so every in-process test shares `ch_client`, and
tests that need their own store (CLI, signals, kill -9) run `migrate` in a subprocess.
Set CLICKHOUSE_URL=http://... to run the in-process tests against a ClickHouse server instead.
Shared helpers live here too (as in simonw/llm's conftest): content fingerprints, client proxies
that inject faults or record SQL, and the two ways to set up a version-1 backfill (in-process on
the shared store, or by `migrate up` on a store private to the test).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import clickhouse_connect
import pytest

from backfill_plugin.protocol.attempt import untagged
from backfill_plugin.testing.harness import wait_for_claim as claimed
from backfill_plugin.testing.pytest_plugin import Migrations
from migrator import connection
from migrator.runner import Context, Migrator

REPO = Path(__file__).resolve().parent.parent
MIGRATE = [sys.executable, "-m", "migrator"]


@pytest.fixture(scope="session")
def store_url(request, tmp_path_factory):
    """The URL every in-process client of this test process uses (one chDB store per process): a server's
    when CLICKHOUSE_URL is http(s)://..., this worker's HTTP endpoint (tests/chhttp.py) with
    MIGRATE_TEST_HTTP=1, else an embedded store."""
    url = os.environ.get("CLICKHOUSE_URL")
    if url and not url.startswith("chdb"):
        return url
    if os.environ.get("MIGRATE_TEST_HTTP") == "1":
        return request.getfixturevalue("http_endpoint").url
    return "chdb://" + str(tmp_path_factory.mktemp("chdb") / "store")


@pytest.fixture(scope="session")
def ch_client(store_url):
    if store_url.startswith("chdb"):
        yield clickhouse_connect.get_client(dsn=store_url)
    else:
        yield connection.connect(connection.resolve(store_url))


class HttpEndpoint:
    """A running tests/chhttp.py: ClickHouse's HTTP interface over this worker's own engine process.

    `url` is what `migrate` and connection.connect take; `fault(...)` arms a transport fault aimed at
    the nth query whose text matches; `log()` is every query the endpoint received."""

    def __init__(self, proc: subprocess.Popen, port: int, store: Path, password: str | None, host: str = "127.0.0.1"):
        self.proc, self.port, self.store, self.password, self.host = proc, port, store, password, host
        self.base = f"http://{host}:{port}"
        self.url = f"{self.base}/"

    def _call(self, method: str, path: str, payload=None):
        import urllib.request
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def fault(self, kind: str, match: str, nth: int = 1, times: int = 1, seconds: float = 0.0, status: int = 503,
              regex: bool = False) -> None:
        self._call("POST", "/__faults", {"kind": kind, "match": match, "nth": nth, "times": times,
                                         "seconds": seconds, "status": status, "regex": regex})

    def clear_faults(self) -> None:
        self._call("DELETE", "/__faults")

    def log(self) -> list[dict]:
        return self._call("GET", "/__log")

    def clear_log(self) -> None:
        self._call("DELETE", "/__log")


def start_endpoint(store: Path, password: str | None = None, timeout: float = 60, port: int = 0,
                   host: str = "127.0.0.1", config: Path | None = None) -> HttpEndpoint:
    """Start tests/chhttp.py on a free port of 127.0.0.1 (or `host`:`port`) with its own store (its engine
    given `config`, a ClickHouse config file, if any); return once /ping answers."""
    import urllib.request
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CHHTTP_PASSWORD", None)
    if password is not None:
        env["CHHTTP_PASSWORD"] = password  # not on the command line, where ps would show it
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.parent / "chhttp.stderr", "ab") as errors:  # tracebacks of the endpoint, if any
        engine = f"{store}?config-file={config}" if config else str(store)  # chDB reads settings from the path
        proc = subprocess.Popen([sys.executable, "-m", "tests.chhttp", "--store", engine, "--port", str(port),
                                 "--host", host],
                                cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    line = proc.stdout.readline()
    if not line.startswith(f"listening on http://{host}:"):
        proc.kill()
        raise RuntimeError(f"the HTTP endpoint did not start: {line!r}")
    port = int(line.split(f"{host}:")[1].split("/")[0])
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/ping", timeout=5) as resp:
                if resp.read() == b"Ok.\n":
                    break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the HTTP endpoint did not answer /ping")
        time.sleep(0.05)
    return HttpEndpoint(proc, port, store, password, host)


def stop_endpoint(endpoint: HttpEndpoint) -> None:
    endpoint.proc.terminate()
    try:
        endpoint.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        endpoint.proc.kill()
        endpoint.proc.wait(timeout=15)


@pytest.fixture(scope="session")
def http_endpoint(tmp_path_factory):
    """This worker's HTTP endpoint over a fresh store (tests/chhttp.py in a subprocess), stopped at the end."""
    endpoint = start_endpoint(tmp_path_factory.mktemp("chhttp") / "store")
    yield endpoint
    stop_endpoint(endpoint)


@pytest.fixture
def db(ch_client):
    """A fresh database name for this test (created; dropped afterwards)."""
    name = "t_" + uuid.uuid4().hex[:12]
    ch_client.command(f"CREATE DATABASE {name}")
    yield name
    ch_client.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def migrations(tmp_path):
    """A writer for a migrations directory: migrations(version, name, up, down, backfill_sql=, meta=, validate=)
    -> its root (the shipped pytest plugin's `Migrations.write`, called as a function)."""
    folder = Migrations(tmp_path / "migrations")

    def write(version: int, name: str, up: str, down: str = "SELECT 1", backfill_sql=None, meta=None, validate=None):
        return folder.write(version, name, up, down, backfill_sql, meta, validate)

    write.root = folder.root
    return write


@pytest.fixture
def migrator_for(ch_client):
    """Build a Migrator over `ch_client` for a database and migrations directory."""
    def make(database: str, directory: Path, cluster=None, dry_run=False, echo=None) -> Migrator:
        lines = []
        ctx = Context(client=ch_client, database=database, migrations_dir=Path(directory), cluster=cluster,
                      dry_run=dry_run, echo=echo or lines.append)
        m = Migrator(ctx)
        m.lines = lines
        return m
    return make


@pytest.fixture
def project_migrations(tmp_path):
    """A copy of the repo's migrations/ (001, 020, 021) that a test may add to."""
    dest = tmp_path / "project_migrations"
    shutil.copytree(REPO / "migrations", dest)
    return dest


def migrate_env(store: Path, database: str = "d", migrations_dir: Path | None = None, env=None) -> dict:
    """The environment of a `migrate` subprocess on its own embedded store (unbuffered: tests read its lines)."""
    full_env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": database,
                "MIGRATE_DIR": str(migrations_dir or REPO / "migrations"), "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MIGRATE_DEBUG", None)
    return full_env


def run_migrate(args, store: Path, database: str = "d", migrations_dir: Path | None = None, env=None,
                timeout=300, **popen):
    """Run `python -m migrator ...` in a subprocess against its own embedded store."""
    return subprocess.run(MIGRATE + list(args), env=migrate_env(store, database, migrations_dir, env),
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO), **popen)


def start_migrate(args, store: Path, database: str = "d", migrations_dir: Path | None = None, env=None):
    """Start `python -m migrator ...` without waiting (to signal or kill it), stdout and stderr piped."""
    return subprocess.Popen(MIGRATE + list(args), env=migrate_env(store, database, migrations_dir, env),
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cli(tmp_path):
    """`cli("up")` runs migrate in a subprocess with a store private to this test."""
    store = tmp_path / "store"

    def call(*args, **kwargs):
        return run_migrate(args, store, **kwargs)
    call.store = store
    return call


# -- content checks: every column, and duplicate keys ----------------------------------------------
ROW_HASH = "cityHash64(tuple(*))"  # every column of the row, NULLs and arrays included


def fingerprint_sql(table: str, keys: str = "a, b", where: str = "") -> str:
    """count, sum and xor of a hash of every column, and how many rows repeat a key: two tables with
    equal fingerprints hold the same multiset of rows (up to a 64-bit hash collision)."""
    return (f"SELECT count(), sum({ROW_HASH}), groupBitXor({ROW_HASH}), count() - uniqExact({keys}) "
            f"FROM {table}" + (f" WHERE {where}" if where else ""))


def fingerprint(client, table: str, keys: str = "a, b", where: str = "", parameters=None) -> tuple:
    row = client.query(fingerprint_sql(table, keys, where), parameters=parameters).result_rows[0]
    return tuple(int(v) for v in row)


def assert_copied_exactly(client, db: str, rows: int | None = None, keys: str = "a, b", expected: str | None = None,
                          src_where: str = "", parameters=None, unique_keys: bool = True) -> tuple:
    """{db}.dst holds exactly the expected rows, every column compared, and no key twice (with
    `unique_keys=False`: as many repeated keys as expected). `expected` is a table or a subquery
    (default {db}.src, filtered by `src_where`); `rows` pins the count."""
    want = fingerprint(client, expected or f"{db}.src", keys, src_where, parameters)
    got = fingerprint(client, f"{db}.dst", keys)
    assert got == want, f"{db}.dst {got} != expected {want} (count, hash sum, hash xor, duplicated keys)"
    assert got[3] == 0 or not unique_keys, f"{got[3]} duplicated keys in {db}.dst"
    if rows is not None:
        assert got[0] == rows
    return got


def assert_copied_through(client, db: str, position, rows: int | None = None, keys: str = "a, b") -> tuple:
    """{db}.dst holds exactly the src rows with (a, b) up to and including `position`: nothing of a
    later batch, nothing missing, nothing twice."""
    assert position is not None
    return assert_copied_exactly(client, db, rows, keys, src_where="(a, b) <= ({pa:String}, {pb:UInt32})",
                                 parameters={"pa": position[0], "pb": position[1]})


STORE_QUERY = r"""
import json, sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
out = []
for sql in json.loads(sys.argv[2]):
    if sql.lstrip().upper().startswith(("SELECT", "WITH", "EXISTS")):
        out.append([[v if isinstance(v, int) else str(v) for v in r] for r in client.query(sql).result_rows])
    else:
        client.command(sql)
        out.append(None)
print(json.dumps(out))
"""


def store_query(store: Path, *statements: str) -> list:
    """Run statements on an embedded store in a subprocess (a store is one process's at a time);
    one list of rows per SELECT, None per command."""
    proc = subprocess.run([sys.executable, "-c", STORE_QUERY, f"chdb://{store}", json.dumps(statements)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def store_fingerprint(store: Path, table: str, keys: str = "a, b", where: str = "") -> tuple:
    return tuple(store_query(store, fingerprint_sql(table, keys, where))[0][0])


def assert_store_copied_exactly(store: Path, rows: int | None = None, database: str = "d",
                                keys: str = "a, b") -> tuple:
    """assert_copied_exactly for a private store, read by a subprocess."""
    want, got = store_query(store, fingerprint_sql(f"{database}.src", keys), fingerprint_sql(f"{database}.dst", keys))
    want, got = tuple(want[0]), tuple(got[0])
    assert got == want, f"dst {got} != src {want} (count, hash sum, hash xor, duplicated keys)"
    assert got[3] == 0, f"{got[3]} duplicated keys in dst"
    if rows is not None:
        assert got[0] == rows
    return got


# -- clients ---------------------------------------------------------------------------------------
def own_client(store_url: str):
    """A client with its own handle on the test process's store: a second operator (a chDB handle runs
    one query at a time, so a runner's busy handle cannot be shared)."""
    if store_url.startswith("chdb"):
        return clickhouse_connect.get_client(dsn=store_url)
    return connection.connect(connection.resolve(store_url))


class ProcessDied(BaseException):
    """Stands for the death of the process: not an Exception, so no handler treats it as retryable."""


class DiesAfterInsert:
    """Injected fault (kill -9 cannot be aimed at this instant in-process): a client proxy whose target
    INSERT number `at` succeeds and then the 'process dies': it raises, and every later call (checkpoint
    writes and heartbeats included) fails, so nothing more reaches the store, as after a real crash."""

    def __init__(self, client, target: str, at: int):
        self.client, self.target, self.at = client, target, at
        self.inserts, self.dead, self.tokens = 0, False, []

    def command(self, sql, *args, **kwargs):
        if self.dead:
            raise ConnectionError("process is gone")
        out = self.client.command(sql, *args, **kwargs)
        if untagged(sql).lstrip().startswith(f"INSERT INTO {self.target}"):
            self.inserts += 1
            self.tokens.append((untagged(sql), (kwargs.get("settings") or {}).get("insert_deduplication_token")))
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
    """A passthrough client proxy that records the INSERTs into the target (the replay's SQL and token)."""

    def __init__(self, client, target: str):
        self.client, self.target, self.inserts = client, target, []

    def command(self, sql, *args, **kwargs):
        if untagged(sql).lstrip().startswith(f"INSERT INTO {self.target}"):
            self.inserts.append((untagged(sql), (kwargs.get("settings") or {}).get("insert_deduplication_token")))
        return self.client.command(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


# -- threads and processes ---------------------------------------------------------------------------
class Runner(threading.Thread):
    """run_backfill of version 1 in a thread, keeping its result or exception."""

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


def report(request, message: str) -> None:
    """Shown in the terminal even without -s (and printed for -s runs and logs)."""
    print(message)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(message)


# -- version 1 with a backfill, applied ---------------------------------------------------------------
DOWN_SQL = "DROP TABLE IF EXISTS {db}.dst; DROP TABLE IF EXISTS {db}.src"


@pytest.fixture
def shared_store_backfill(db, migrations, migrator_for):
    """shared_store_backfill(up, backfill_sql, meta) -> migrations root, with version 1 applied in-process
    to this test's database on the shared store (`ch_client`)."""
    def make(up: str, sql: str, meta: dict, down: str = DOWN_SQL) -> Path:
        root = migrations(1, "x", up, down, sql, meta)
        migrator_for(db, root).up()
        return root
    return make


@pytest.fixture
def private_store_backfill(tmp_path, migrations):
    """private_store_backfill(up, backfill_sql, meta) -> (store, root), with version 1 applied by
    `migrate up` in a subprocess to database `d` of a store private to this test."""
    def make(up: str, sql: str, meta: dict, down: str = DOWN_SQL) -> tuple[Path, Path]:
        root = migrations(1, "x", up, down, sql, meta)
        store = tmp_path / "store"
        proc = run_migrate(["up"], store, migrations_dir=root)
        assert proc.returncode == 0, proc.stderr
        assert "backfill 1 registered (pending)" in proc.stdout
        return store, root
    return make


# -- where a kill -9 landed ----------------------------------------------------------------------------
PHASE_READER = r"""
import json, socket, sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
db, pid, target, keys = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
rows = client.query("SELECT status, checkpoint_data FROM db_management.backfills WHERE db_name = {d:String} "
                    "AND startsWith(writer, {w:String}) ORDER BY version",
                    parameters={"d": db, "w": f"{socket.gethostname()}:{pid}:"}).result_rows
out = {"rows": len(rows)}
if rows:
    cp = json.loads(rows[-1][1])
    out.update(status=rows[-1][0], in_flight=cp.get("in_flight"))
    batch = cp.get("in_flight")
    if batch:  # the test's own predicate for the range, not the framework's
        names = ", ".join(name for name, _ in keys)
        params = {f"e{i}": v for i, v in enumerate(batch["end"])}
        where = f"({names}) <= (" + ", ".join(f"{{e{i}:{t}}}" for i, (_, t) in enumerate(keys)) + ")"
        if batch.get("start") is not None:
            params.update({f"s{i}": v for i, v in enumerate(batch["start"])})
            where += f" AND ({names}) > (" + ", ".join(f"{{s{i}:{t}}}" for i, (_, t) in enumerate(keys)) + ")"
        out["in_target"] = int(client.command(f"SELECT count() FROM {db}.{target} WHERE {where}", parameters=params))
print(json.dumps(out))
"""
PHASES = {  # where a killed runner was, read from the tracking rows it wrote and the target
    "startup": "start-up, nothing written yet (not counted)",
    "claimed": "claimed, no range of its own written ahead yet",
    "insert": "range written ahead, INSERT not committed",
    "committed": "INSERT committed, its completion not yet written",
    "partial": "INSERT partly committed",
    "between": "between batches, completion saved by a heartbeat",
}
REQUIRED_PHASES = ("claimed", "insert", "committed")  # every kill suite must land in each of these


def kill_phase(store: Path, pid: int, target: str = "dst", keys=(("a", "String"), ("b", "UInt32")),
               database: str = "d", rows_are_source_rows: bool = True) -> str:
    """Where the killed runner `pid` was: from the tracking rows it wrote (writer is host:pid:...) and
    whether the target already holds the range its last row has in flight."""
    proc = subprocess.run([sys.executable, "-c", PHASE_READER, f"chdb://{store}", database, str(pid), target,
                           json.dumps(keys)], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    if got["rows"] == 0:
        return "startup"
    assert got["status"] == "running", got
    if got["rows"] == 1:  # only the claim (it may carry a range a killed runner left for replay)
        return "claimed"
    batch = got["in_flight"]
    if not batch:
        return "between"
    if got["in_target"] == 0:
        return "insert"
    return "committed" if got["in_target"] == batch["rows"] or not rows_are_source_rows else "partial"


def wait_for_claim(store: Path, proc: subprocess.Popen, version: int = 1, database: str = "d",
                   timeout: float = 60) -> None:
    """Until runner `proc` has claimed the backfill (its live status file says running)."""
    assert claimed(store, proc, database, version, timeout), "the runner did not claim the backfill"


def assert_phases(phases: list[str]) -> dict:
    """Each required phase was hit; returns the counts of the phases that count as kill points."""
    counts = {PHASES[p]: phases.count(p) for p in PHASES if p in phases}
    missing = [PHASES[p] for p in REQUIRED_PHASES if p not in phases]
    assert not missing, f"no kill landed in: {missing}; landed: {counts}"
    return counts
