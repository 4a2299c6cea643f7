"""The product over ClickHouse's HTTP interface: `migrate` and the backfill through clickhouse-connect's real
HttpClient, against tests/chhttp.py (every query on the real engine in the endpoint's own process).

What only HTTP brings, tested here: a client read timeout that abandons an INSERT the server keeps running
or has already committed, connections refused, dropped or reset around a batch or a checkpoint write,
engine errors arriving as HTTP errors, what read-only commands send, and a server that rejects the
password. Faults are injected at the transport by the endpoint (named in each test); every query result
and every error comes from the engine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.protocol import preflight
from backfill_plugin.protocol.attempt import MARKER, untagged
from migrator import connection
from migrator.errors import one_line
from tests.conftest import (
    DOWN_SQL,
    MIGRATE,
    REPO,
    assert_copied_exactly,
    start_endpoint,
    stop_endpoint,
    wait_until,
)
from tests.test_faults import ANTI_JOIN, COPY_SQL, OOM_SETTINGS, OOM_SQL, OOM_UP, meta, source_sql
from tests.test_server_mode import apply_version_1

READS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN")
WRITES = ("INSERT", "CREATE", "DROP", "ALTER", "RENAME", "TRUNCATE", "DELETE", "UPDATE", "OPTIMIZE", "SYSTEM",
          "KILL", "ATTACH", "DETACH", "GRANT", "REVOKE", "EXCHANGE", "UNDROP")
VALIDATE_SQL = ("SELECT 'rows' AS check, (SELECT count() FROM {db}.src WHERE {batch_range}) AS expected, "
                "(SELECT count() FROM {db}.dst WHERE {batch_range}) AS actual, toUInt8(expected = actual) AS ok")


@pytest.fixture(scope="module")
def hclient(http_endpoint):
    return connection.connect(connection.resolve(http_endpoint.url))


@pytest.fixture
def hdb(hclient, http_endpoint):
    name = "t_http_" + uuid.uuid4().hex[:10]
    hclient.command(f"CREATE DATABASE {name}")
    http_endpoint.clear_log()  # this worker's endpoint: only this test's queries from here on
    yield name
    http_endpoint.clear_faults()
    hclient.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def hsetup(hclient, hdb, tmp_path):
    """hsetup(rows, batch_size, sql=, up=, **meta) -> migrations root with 001 applied over HTTP to `hdb`."""
    def make(rows: int, batch_size: int, sql: str = COPY_SQL, up: str | None = None, **meta_extra) -> Path:
        return apply_version_1(hclient, hdb, tmp_path / "migrations", rows, batch_size, sql, up, VALIDATE_SQL,
                               **meta_extra)
    return make


def first_word(sql: str) -> str:
    """The statement's first keyword, after comments (the backfill's attempt marker is one)."""
    text = sql.lstrip()
    while text.startswith(("/*", "--")):
        text = text.split("*/", 1)[1] if text.startswith("/*") else text.split("\n", 1)[-1]
        text = text.lstrip()
    return text.split(None, 1)[0].upper() if text else ""


def migrate(url: str, db: str, root: Path, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full = {**os.environ, "CLICKHOUSE_URL": url, "MIGRATE_DATABASE": db, "MIGRATE_DIR": str(root),
            "PYTHONUNBUFFERED": "1", **(env or {})}
    full.pop("MIGRATE_DEBUG", None)
    if not (env or {}).get("CLICKHOUSE_PASSWORD"):
        full.pop("CLICKHOUSE_PASSWORD", None)
    return subprocess.run(MIGRATE + list(args), env=full, cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


# -- the endpoint itself: ClickHouse's HTTP interface, as documented -----------------------------------
def _http(endpoint, body: bytes = b"", headers: dict | None = None, **params):
    """One raw request: (status, headers, body) whatever the status."""
    import urllib.error
    import urllib.parse
    import urllib.request
    url = endpoint.base + "/?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, data=body or None, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_endpoint_speaks_clickhouse_http(http_endpoint):
    """The transport rules of tests/chhttp.py that the product relies on, checked on raw requests."""
    import threading
    status, headers, body = _http(http_endpoint, b"SELECT * FROM no_such_db.t")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "81"
    assert body.startswith(b"Code: 81. DB::Exception: ") and b"(UNKNOWN_DATABASE) (version " in body
    status, headers, body = _http(http_endpoint, b"SELECT throwIf(1)")
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "395"
    assert _http(http_endpoint, b" + 1", query="SELECT 41")[2] == b"42\n"  # query parameter, newline, body
    assert _http(http_endpoint, b"SELECT {s:String} || '!'", param_s="it's")[2] == b"it\\'s!\n"
    assert _http(http_endpoint, b"SELECT 1", no_such_setting="1")[1]["X-ClickHouse-Exception-Code"] == "115"
    assert _http(http_endpoint, b"SELECT getSetting('max_threads')", max_threads="3")[2] == b"3\n"
    assert _http(http_endpoint, b"SELECT getSetting('max_threads')")[2] != b"3\n"  # that query only
    assert _http(http_endpoint, b"SELECT 1; SELECT 2")[1]["X-ClickHouse-Exception-Code"] == "62"
    assert _http(http_endpoint, query_id="q-1", query="SELECT 1")[1]["X-ClickHouse-Query-Id"] == "q-1"
    status, _, body = _http(http_endpoint, query="CREATE DATABASE nope_ro")  # GET runs read-only
    assert status == 500 and b"(READONLY)" in body
    gz = _http(http_endpoint, b"SELECT number FROM numbers(1000)", {"Accept-Encoding": "gzip"},
               enable_http_compression="1")
    assert gz[1]["Content-Encoding"] == "gzip"
    assert json.loads(gz[1]["X-ClickHouse-Summary"])["read_rows"] == "1000"
    # a session carries SET and runs one query at a time: a second concurrent one is SESSION_IS_LOCKED
    sid = uuid.uuid4().hex
    assert _http(http_endpoint, b"SET max_threads = 1", session_id=sid)[0] == 200
    slow = threading.Thread(target=_http, args=(http_endpoint, b"SELECT sleep(1.5)"), kwargs={"session_id": sid})
    slow.start()
    time.sleep(0.5)
    status, headers, body = _http(http_endpoint, b"SELECT 1", session_id=sid)
    slow.join()
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "373" and b"SESSION_IS_LOCKED" in body
    assert _http(http_endpoint, b"SELECT getSetting('max_threads')", session_id=sid)[2] == b"1\n"
    # a stall holds the query back before it runs; it then runs and answers
    http_endpoint.fault("stall", "SELECT 'stalled'", seconds=1.0)
    started = time.monotonic()
    assert _http(http_endpoint, b"SELECT 'stalled'")[2] == b"stalled\n"
    assert time.monotonic() - started >= 1.0


def test_large_parameters_travel_as_a_form(hclient, http_endpoint):
    """clickhouse-connect moves the query and its param_* into a multipart form when they would make the URL
    too long; the endpoint reads them from the form, as ClickHouse does, and the engine binds them."""
    values = [f"v{i};'x" + "y" * 100 for i in range(2_000)]
    got = hclient.query("SELECT length({qs:Array(String)}), {qs:Array(String)}[2000]", parameters={"qs": values})
    assert got.result_rows == [(2_000, values[-1])]


def test_an_engine_error_reads_the_same_over_http_as_embedded(hclient, ch_client, store_url):
    """migrator.errors.one_line drops clickhouse-connect's HTTP wrapper: the operator sees ClickHouse's own
    `Code: N. DB::Exception: ...` from either backend (a server adds its version)."""
    if not store_url.startswith("chdb"):
        pytest.skip("needs the embedded store to compare with")
    lines = []
    for client in (ch_client, hclient):
        with pytest.raises(Exception) as err:
            client.command("SELECT throwIf(number = 3, 'three') FROM numbers(5)")
        lines.append(one_line(err.value))
    embedded, http = lines
    assert embedded.startswith("Code: 395. DB::Exception: three")
    assert http.startswith(embedded) and http.endswith(")")


# -- (a) every command, in subprocesses, over HTTP ---------------------------------------------------------
def test_every_migrate_and_backfill_command_over_http(http_endpoint, hclient, hdb, tmp_path):
    rows = 600
    root = tmp_path / "migrations"
    root.mkdir()
    (root / "001_x.up.sql").write_text(source_sql(rows))
    (root / "001_x.down.sql").write_text(DOWN_SQL)
    (root / "001_x.backfill.sql").write_text(COPY_SQL)
    (root / "001_x.backfill.meta").write_text(json.dumps(meta(100)))
    (root / "001_x.backfill.validate.sql").write_text(VALIDATE_SQL)
    (root / "002_extra.up.sql").write_text("CREATE TABLE {db}.extra (x UInt8) ENGINE = MergeTree ORDER BY x")
    (root / "002_extra.down.sql").write_text("DROP TABLE IF EXISTS {db}.extra")
    url = http_endpoint.url

    def run(*args):
        return ok(migrate(url, hdb, root, *args))

    assert "backfill 1 registered (pending)" in run("up")
    assert json.loads(run("status", "--json"))["current_version"] == 2
    assert hclient.command(f"EXISTS TABLE {hdb}.extra") == 1
    listed = json.loads(run("backfill", "list", "--json"))
    assert [(b["migration_version"], b["status"]) for b in listed] == [(1, "pending")]
    assert "paused" in run("backfill", "pause", "1")
    assert json.loads(run("backfill", "status", "1", "--json"))["status"] == "paused"
    run("backfill", "resume", "1", "--max-batches", "2")
    status = json.loads(run("backfill", "status", "1", "--json"))
    assert status["rows_processed"] == 200 and status["checkpoint"]["in_flight"] is None
    assert hclient.command(f"SELECT count() FROM {hdb}.dst") == 200
    assert "completed" in run("backfill", "run", "1")
    assert_copied_exactly(hclient, hdb, rows)
    assert json.loads(run("backfill", "validate", "1", "--json"))["checks"][0]["ok"]
    assert "reset" in run("backfill", "reset", "1", "--yes")
    status = json.loads(run("backfill", "status", "1", "--json"))
    assert status["status"] == "pending" and status["rows_processed"] == 0
    run("down", "--to", "1")
    assert json.loads(run("status", "--json"))["current_version"] == 1
    assert hclient.command(f"EXISTS TABLE {hdb}.extra") == 0
    run("force", "2")
    assert json.loads(run("status", "--json"))["current_version"] == 2
    run("adopt")
    assert json.loads(run("status", "--json"))["current_version"] == 2
    # every one of those commands went through the endpoint, as HTTP requests the engine answered
    assert any(e["query"].startswith(f"/* {MARKER} ") for e in http_endpoint.log())


# -- (b) the abandoned attempt: a real client read timeout --------------------------------------------------
def _batch_insert_pattern(db: str) -> str:
    """A batch INSERT, not the preflight's EXPLAIN of the same statement: batches start with the marker."""
    return rf"(?s)^/\* {re.escape(MARKER)} .*INSERT INTO {re.escape(db)}\.dst"


def _batch_inserts(endpoint, db: str) -> list[dict]:
    return [e for e in endpoint.log() if e["query"].startswith(f"/* {MARKER} ") and f"INSERT INTO {db}.dst" in e["query"]]


@pytest.mark.parametrize("replay", ["token", "anti-join"])
def test_read_timeout_on_a_committed_batch_is_replayed_exactly(http_endpoint, hclient, hdb, hsetup, monkeypatch,
                                                               replay):
    """Injected at the transport: the endpoint runs the 2nd batch INSERT to its commit, then answers 5 s late;
    the client's real read timeout (MIGRATE_RECEIVE_TIMEOUT=2) fires on a batch that is done. The retry
    replays the same range: same dedup token (token-only SQL) or {retry_count} = 1 (anti-join); the target
    ends exact. Time is compressed: timeout_seconds is 1 and the preflight's 60 s margin between the batch
    timeout and the receive timeout is set to 0 (a server late beyond both is what this stands for)."""
    rows = 500
    root = hsetup(rows, 100, sql=COPY_SQL + (ANTI_JOIN if replay == "anti-join" else ""), timeout_seconds=1)
    monkeypatch.setattr(preflight, "TIMEOUT_MARGIN", 0.0)
    monkeypatch.setenv("MIGRATE_RECEIVE_TIMEOUT", "2")
    client = connection.connect(connection.resolve(http_endpoint.url))
    http_endpoint.fault("late", _batch_insert_pattern(hdb), nth=2, seconds=5, regex=True)
    sleeps = []
    result = ClickHouseBackfillManager(client, migrations_dir=root, sleep=sleeps.append).run_backfill(hdb, 1)
    assert result["stopped"] == "completed" and result["rows_processed"] == rows
    assert sleeps[:1] == [1]  # the timeout was an error the batch retried after its first backoff
    inserts = _batch_inserts(http_endpoint, hdb)
    assert len(inserts) == 6  # 5 batches, the 2nd one twice
    first, again = inserts[1], inserts[2]
    assert first["status"] == 200  # the abandoned attempt committed on the server
    if replay == "token":
        assert first["settings"]["insert_deduplication_token"] == again["settings"]["insert_deduplication_token"]
        assert untagged(first["query"]) == untagged(again["query"])
    else:
        assert "(0 = 0 OR" in first["query"] and "(1 = 0 OR" in again["query"]
    assert_copied_exactly(hclient, hdb, rows)


def test_runner_killed_while_its_insert_runs_on_the_server(http_endpoint, hclient, hdb, hsetup):
    """No injected fault: `migrate backfill run` is killed (-9) while its first batch INSERT runs on the
    engine (slowed by sleepEachRow); the server keeps running it, as ClickHouse does for an INSERT whose
    client went away. The next runner takes over once the lease is stale, finds the orphan in
    system.processes by its marker, kills it (KILL QUERY ... SYNC over HTTP) and replays with
    {retry_count} = 1; the target ends exact."""
    # One batch; its first attempt builds an IN set slowly (80 x 0.1 s), the replay's is empty. (The
    # preflight's EXPLAIN of the same SQL must not build it: see sqlcheck.explain.)
    rows = 100
    slow = (COPY_SQL + " AND b NOT IN (SELECT sleepEachRow(0.1) + 1000 FROM numbers(if({retry_count} = 0, 80, 0)) "
            "SETTINGS max_block_size = 1)")
    root = hsetup(rows, 100, sql=slow + ANTI_JOIN)
    env = {"BACKFILL_LEASE_SECONDS": "1"}
    full = {**os.environ, "CLICKHOUSE_URL": http_endpoint.url, "MIGRATE_DATABASE": hdb, "MIGRATE_DIR": str(root),
            **env}
    proc = subprocess.Popen(MIGRATE + ["backfill", "run", "1"], env=full, cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _batch_inserts(http_endpoint, hdb), timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    orphans = hclient.command("SELECT count() FROM system.processes WHERE startsWith(query, {m:String})",
                              parameters={"m": f"/* {MARKER} "})
    assert orphans == 1, "the killed runner's INSERT still runs on the server"
    time.sleep(1.2)  # the lease goes stale (the runner's pid is gone too)
    out = ok(migrate(http_endpoint.url, hdb, root, "backfill", "run", "1", env=env))
    assert "completed" in out
    sent = http_endpoint.log()
    kills = [e for e in sent if first_word(e["query"]) == "KILL"]
    explains = [e for e in sent if e["query"].startswith("EXPLAIN PIPELINE")]
    assert explains and all(e["finished"] - e["received"] < 4 for e in explains), "a preflight ran the slow subquery"
    assert kills and all(k["status"] == 200 for k in kills)
    orphan = _batch_inserts(http_endpoint, hdb)[0]
    assert orphan["error_code"] == 394  # QUERY_WAS_CANCELLED: the engine stopped it before the replay ran
    assert_copied_exactly(hclient, hdb, rows)


# -- (c) network faults during a batch INSERT and during a checkpoint write ---------------------------------
@pytest.mark.parametrize("kind", ["refuse", "drop", "reset"])
@pytest.mark.parametrize("where", ["batch", "checkpoint"])
def test_network_fault_ends_exact_or_stops_cleanly_and_resumes(http_endpoint, hclient, hdb, hsetup, monkeypatch,
                                                               kind, where):
    """Injected at the transport by the endpoint: `refuse` answers 503 before running (a load balancer),
    `drop` runs the query and closes without answering, `reset` runs it and resets the connection half-way
    through the answer. Aimed at the 2nd batch INSERT or the 3rd checkpoint write. The run either completes
    exact, or stops with one line and a state that a second run completes exactly."""
    rows = 400
    root = hsetup(rows, 100)
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.5")
    client = connection.connect(connection.resolve(http_endpoint.url))
    match, nth = (f"INSERT INTO {hdb}.dst", 2) if where == "batch" else ("INSERT INTO db_management.backfills", 3)
    http_endpoint.fault(kind, _batch_insert_pattern(hdb) if where == "batch" else re.escape(match), nth=nth, regex=True)
    manager = ClickHouseBackfillManager(client, migrations_dir=root, sleep=lambda s: None)
    try:
        result = manager.run_backfill(hdb, 1)
        outcome = "completed"
    except Exception as exc:  # noqa: BLE001 - a BackfillError, or the client's own error on a checkpoint write
        assert "\n" not in str(exc) and "Error" in type(exc).__name__
        outcome = f"stopped ({type(exc).__name__}), resumed"
        time.sleep(0.6)  # our own lease, left by the stopped run
        result = ClickHouseBackfillManager(client, migrations_dir=root, sleep=lambda s: None).run_backfill(hdb, 1)
    assert result["stopped"] == "completed" and result["rows_processed"] == rows
    faulted = [e for e in http_endpoint.log() if e.get("fault")]
    assert len(faulted) == 1 and match in faulted[0]["query"], "the fault hit its statement once"
    print(f"{kind} at {where}: {outcome}")
    assert_copied_exactly(hclient, hdb, rows)


def test_checkpoint_write_refused_stops_the_cli_with_one_line_and_resume_completes(http_endpoint, hclient, hdb,
                                                                                    hsetup):
    """Injected at the transport: a 503 from the load balancer on the 3rd checkpoint write of
    `migrate backfill run` and on each of its 3 repeats (migrator/transport.py). The command stops with one
    line that names the server's 503 and a non-zero exit; `resume` completes exactly."""
    rows = 400
    root = hsetup(rows, 100)
    http_endpoint.fault("refuse", "INSERT INTO db_management.backfills", nth=3, times=4, status=503)
    stopped = migrate(http_endpoint.url, hdb, root, "backfill", "run", "1")
    assert stopped.returncode != 0 and "Traceback" not in stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.strip() and "again in" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: server error: HTTP 503 "), stopped.stderr
    assert "completed" in ok(migrate(http_endpoint.url, hdb, root, "backfill", "resume", "1"))
    assert_copied_exactly(hclient, hdb, rows)


# -- (d) OOM halving when MEMORY_LIMIT_EXCEEDED arrives as an HTTP error -----------------------------------
def test_memory_limit_over_http_halves_the_batch(http_endpoint, hclient, hdb, hsetup):
    rows = 80_000
    root = hsetup(rows, 20_000, sql=OOM_SQL, up=OOM_UP, min_batch_size=1000, settings=OOM_SETTINGS)
    result = ClickHouseBackfillManager(hclient, migrations_dir=root).run_backfill(hdb, 1)
    assert result["stopped"] == "completed" and result["current_batch_size"] < 20_000
    ooms = [e for e in _batch_inserts(http_endpoint, hdb) if e.get("error_code") == 241]
    assert ooms and all(e["status"] == 500 for e in ooms)  # HTTP 500, X-ClickHouse-Exception-Code: 241
    assert_copied_exactly(hclient, hdb, rows)


# -- (e) read-only commands send no DDL and no writes ------------------------------------------------------
def test_read_only_commands_send_only_reads(http_endpoint, hclient, hdb, hsetup):
    """Recorded at the endpoint: status and list send only reads; validate sends no DDL and writes only its
    own resumable progress (tracking rows)."""
    rows = 300
    root = hsetup(rows, 100)
    assert ClickHouseBackfillManager(hclient, migrations_dir=root).run_backfill(hdb, 1)["stopped"] == "completed"
    url = http_endpoint.url
    for args in (("status",), ("status", "--json"), ("backfill", "list"), ("backfill", "list", "--json"),
                 ("backfill", "status", "1"), ("backfill", "status", "1", "--json")):
        http_endpoint.clear_log()
        ok(migrate(url, hdb, root, *args))
        sent = http_endpoint.log()
        assert sent, args
        words = {first_word(e["query"]) for e in sent}
        assert words <= set(READS), f"migrate {' '.join(args)} sent {sorted(words - set(READS))}"
    http_endpoint.clear_log()
    ok(migrate(url, hdb, root, "backfill", "validate", "1"))
    ddl = [e["query"] for e in http_endpoint.log() if first_word(e["query"]) in set(WRITES) - {"INSERT"}]
    assert not ddl, f"validate sent DDL: {ddl}"
    writes = [e["query"] for e in http_endpoint.log() if first_word(e["query"]) == "INSERT"]
    # validate is resumable: its progress is the one thing it writes, as rows of the tracking table
    assert writes and all(q.startswith("INSERT INTO db_management.backfills ") for q in writes), writes


# -- (f) the password never shows, also when the server rejects it -----------------------------------------
PASSWORD = "pW-7f3#q'x%2F"  # quotes, #, % and an escaped slash: each can leak through a different path


@pytest.fixture(scope="module")
def locked_endpoint(tmp_path_factory):
    endpoint = start_endpoint(tmp_path_factory.mktemp("chhttp-auth") / "store", password=PASSWORD)
    yield endpoint
    stop_endpoint(endpoint)


def test_password_never_printed_accepted_or_rejected(locked_endpoint, tmp_path):
    root = tmp_path / "migrations"
    root.mkdir()
    (root / "001_x.up.sql").write_text("CREATE TABLE {db}.t (x UInt8) ENGINE = MergeTree ORDER BY x")
    (root / "001_x.down.sql").write_text("DROP TABLE IF EXISTS {db}.t")
    url = locked_endpoint.url.replace("http://", "http://default@")
    wrong = PASSWORD[::-1]
    for args in (("up",), ("status",), ("backfill", "list"), ("--debug", "status")):
        rejected = migrate(url, "default", root, *args, env={"CLICKHOUSE_PASSWORD": wrong})
        assert rejected.returncode != 0
        text = rejected.stdout + rejected.stderr
        assert "516" in text or "Authentication failed" in text, text
        assert wrong not in text and PASSWORD not in text
    in_url = url.replace("default@", f"default:{urllib_quote(wrong)}@")
    rejected = migrate(in_url, "default", root, "status")
    assert rejected.returncode != 0 and urllib_quote(wrong) not in rejected.stdout + rejected.stderr
    assert wrong not in rejected.stdout + rejected.stderr
    accepted = migrate(url, "default", root, "up", env={"CLICKHOUSE_PASSWORD": PASSWORD})
    assert accepted.returncode == 0, accepted.stderr
    assert PASSWORD not in accepted.stdout + accepted.stderr
    status = migrate(url, "default", root, "status", "--json", env={"CLICKHOUSE_PASSWORD": PASSWORD})
    assert json.loads(ok(status))["current_version"] == 1 and PASSWORD not in status.stdout + status.stderr


def urllib_quote(text: str) -> str:
    import urllib.parse
    return urllib.parse.quote(text, safe="")


def test_one_client_serves_the_heartbeat_and_the_batch_at_once(http_endpoint):
    """The runner shares one HTTP client between threads: the batch INSERT, the heartbeat's checkpoint
    writes and the lookahead's range lookups. Within one session a second query cannot run at once
    (clickhouse-connect refuses it before sending; a server answers SESSION_IS_LOCKED, 373), so the
    product's client must use no session."""
    import threading
    client = connection.connect(connection.resolve(http_endpoint.url))
    errors, done = [], threading.Event()

    def long_query():
        try:
            client.command("SELECT sleep(1.5)")
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            errors.append(one_line(exc))
        finally:
            done.set()
    worker = threading.Thread(target=long_query)
    worker.start()
    time.sleep(0.3)  # the long query is running on the server
    assert not done.is_set()
    assert client.command("SELECT 42") == 42  # a second query meanwhile, as the heartbeat sends
    worker.join(30)
    assert errors == []
