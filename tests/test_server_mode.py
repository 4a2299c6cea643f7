"""The engine and fault tests again, against a ClickHouse server instead of the embedded store.

The server is CLICKHOUSE_URL when it is http(s)://... (password from the URL or CLICKHOUSE_PASSWORD),
else with MIGRATE_TEST_SERVER=docker one that Docker starts through testcontainers' ClickHouse module
(skipped with the reason when it cannot), else the test HTTP endpoint (tests/chhttp.py): ClickHouse's
HTTP interface over the real engine in its own process, so `make test` runs the product's HTTP path. Server mode differs where it matters: several processes share
the server, so `pause` and `status` from a second process go through the tracking table, and a
second runner is refused by its lease rather than by the store lock.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from migrator import connection
from migrator.runner import Context, Migrator
from tests.conftest import (
    DOWN_SQL,
    MIGRATE,
    REPO,
    DiesAfterInsert,
    Lines,
    ProcessDied,
    Recording,
    Runner,
    assert_copied_exactly,
    wait_until,
)
from tests.test_faults import (
    ANTI_JOIN,
    COPY_SQL,
    FIRST_ATTEMPT_FAILS,
    OOM_SETTINGS,
    OOM_SQL,
    OOM_UP,
    PARTIAL_COMMIT,
    meta,
    simple_up,
    source_sql,
)

pytestmark = pytest.mark.server
IMAGE = os.environ.get("CLICKHOUSE_IMAGE", "clickhouse/clickhouse-server:24.8")


def _docker_reason() -> str | None:
    try:
        import docker
        docker.from_env(timeout=5).ping()
        return None
    except Exception as exc:  # no daemon, no socket, no permission: all mean "no Docker here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


@pytest.fixture(scope="module")
def server_url(request):
    """An http(s) URL of a ClickHouse server: CLICKHOUSE_URL when it is http(s)://..., a server that Docker
    starts through testcontainers when MIGRATE_TEST_SERVER=docker (skipped with its reason if it cannot),
    else this worker's HTTP endpoint over the real engine (tests/chhttp.py)."""
    url = os.environ.get("CLICKHOUSE_URL", "")
    if url.startswith(("http://", "https://")):
        yield url
        return
    if os.environ.get("MIGRATE_TEST_SERVER") != "docker":
        yield request.getfixturevalue("http_endpoint").url
        return
    yield from _docker_server_url()


def _docker_server_url():
    problem = _docker_reason()
    if problem:
        reason = (f"server mode skipped: CLICKHOUSE_URL is not http(s)://... and Docker cannot start a "
                  f"ClickHouse server through testcontainers ({problem})")
        print(reason)
        pytest.skip(reason)
    try:
        from testcontainers.community.clickhouse import ClickHouseContainer
    except ImportError:
        from testcontainers.clickhouse import ClickHouseContainer
    container = ClickHouseContainer(IMAGE)
    try:
        container.start()
    except Exception as exc:
        reason = f"server mode skipped: testcontainers could not start {IMAGE} ({type(exc).__name__}: {exc})"
        print(reason)
        pytest.skip(reason)
    try:
        host, port = container.get_container_host_ip(), container.get_exposed_port(8123)
        yield (f"http://{urllib.parse.quote(container.username)}:{urllib.parse.quote(container.password, safe='')}"
               f"@{host}:{port}/")
    finally:
        container.stop()


@pytest.fixture(scope="module")
def server(server_url):
    return connection.connect(connection.resolve(server_url))


@pytest.fixture
def sdb(server):
    name = "t_srv_" + uuid.uuid4().hex[:10]
    server.command(f"CREATE DATABASE {name}")
    yield name
    server.command(f"DROP DATABASE IF EXISTS {name}")
    try:  # the tracking rows of this test's database
        server.command("DELETE FROM db_management.backfills WHERE db_name = {d:String}", parameters={"d": name})
    except Exception:  # noqa: BLE001, S110 - cleanup only
        pass


def apply_version_1(client, database: str, root: Path, rows: int, batch_size: int, sql: str = COPY_SQL,
                    up: str | None = None, validate: str | None = None, **meta_extra) -> Path:
    """Write version 1 (a source of `rows` rows, a copy backfill) into `root` and apply it to `database`."""
    root.mkdir(exist_ok=True)
    (root / "001_x.up.sql").write_text(up or source_sql(rows))
    (root / "001_x.down.sql").write_text(DOWN_SQL)
    (root / "001_x.backfill.sql").write_text(sql)
    (root / "001_x.backfill.meta").write_text(json.dumps(meta(batch_size, **meta_extra)))
    if validate:
        (root / "001_x.backfill.validate.sql").write_text(validate)
    Migrator(Context(client=client, database=database, migrations_dir=root, echo=lambda _: None)).up()
    return root


@pytest.fixture
def setup(server, sdb, tmp_path):
    """setup(rows, batch_size, ...) -> migrations root with 001 applied to `sdb` on the server."""
    def make(rows: int, batch_size: int, sql: str = COPY_SQL, up: str | None = None, **meta_extra):
        return apply_version_1(server, sdb, tmp_path / "migrations", rows, batch_size, sql, up, **meta_extra)
    return make


exact = assert_copied_exactly  # every column compared, no key twice


# -- in-process, on the server ---------------------------------------------------------------------
def test_hostile_composite_keys_copied_exactly_once(server, sdb, setup):
    rows = 5_000
    root = setup(rows, 300)
    result = ClickHouseBackfillManager(server, migrations_dir=root).run_backfill(sdb, 1)
    assert result["stopped"] == "completed" and result["rows_processed"] == rows
    exact(server, sdb, rows)


@pytest.mark.parametrize("replay", ["token", "anti-join"])
def test_crash_between_insert_and_checkpoint_replays_without_duplicates(server, sdb, setup, monkeypatch, replay):
    """Injected fault (see conftest.DiesAfterInsert): the process 'dies' right after an INSERT."""
    rows = 1_000
    root = setup(rows, 100, sql=COPY_SQL + (ANTI_JOIN if replay == "anti-join" else ""))
    monkeypatch.setenv("BACKFILL_LEASE_SECONDS", "0.5")
    dying = DiesAfterInsert(server, f"{sdb}.dst", at=3)
    with pytest.raises((ProcessDied, ConnectionError)):
        ClickHouseBackfillManager(dying, migrations_dir=root).run_backfill(sdb, 1)
    assert server.command(f"SELECT count() FROM {sdb}.dst") == 300
    time.sleep(0.6)
    recording = Recording(server, f"{sdb}.dst")
    assert ClickHouseBackfillManager(recording, migrations_dir=root).run_backfill(sdb, 1)["stopped"] == "completed"
    if replay == "token":
        assert recording.inserts[0] == dying.tokens[-1]  # same SQL, same dedup token
    exact(server, sdb, rows)


def test_transient_error_after_a_partial_commit_is_retried_without_duplicates(server, sdb, setup):
    """A real throwIf (395) mid-batch on the first attempt only ({retry_count} = 0), after the failed
    INSERT committed part of the batch; the retry anti-joins. Only time is replaced: `sleep` records the
    backoff and what the target held then. (SQL without {retry_count} commits whole or not at all:
    test_faults.test_token_only_sql_never_commits_part_of_a_failed_batch.)"""
    rows = 40_000
    root = setup(rows, 32_768, sql=FIRST_ATTEMPT_FAILS, up=simple_up(rows), min_batch_size=1000,
                 settings=PARTIAL_COMMIT)
    sleeps = []
    manager = ClickHouseBackfillManager(
        server, migrations_dir=root, sleep=lambda s: sleeps.append((s, server.command(f"SELECT count() FROM {sdb}.dst"))))
    assert manager.run_backfill(sdb, 1)["stopped"] == "completed"
    assert [s for s, _ in sleeps] == [1]
    assert 0 < sleeps[0][1] < 32_768, "the failed INSERT committed part of the batch before failing"
    exact(server, sdb, rows)


def test_real_memory_limit_halves_the_batch_and_completes(server, sdb, setup):
    rows = 80_000
    root = setup(rows, 20_000, sql=OOM_SQL, up=OOM_UP, min_batch_size=1000, settings=OOM_SETTINGS)
    result = ClickHouseBackfillManager(server, migrations_dir=root).run_backfill(sdb, 1)
    assert result["stopped"] == "completed"
    assert result["current_batch_size"] < 20_000
    exact(server, sdb, rows)


def test_pause_from_another_client_and_second_runner_refused(server, server_url, sdb, setup):
    rows = 4_000
    root = setup(rows, 100, sql=COPY_SQL + " AND sleepEachRow(0.0005) = 0")
    runner = Runner(ClickHouseBackfillManager(server, migrations_dir=root), sdb)
    runner.start()
    other = ClickHouseBackfillManager(connection.connect(connection.resolve(server_url)), migrations_dir=root)
    wait_until(lambda: other.get_status(sdb, 1, live_counts=False)["batches_completed"] >= 2)
    with pytest.raises(BackfillError, match="refusing a second runner"):
        other.run_backfill(sdb, 1)
    other.pause_backfill(sdb, 1)
    runner.join(120)
    assert runner.error is None, runner.error
    assert runner.result["stopped"] == "paused"
    status = other.get_status(sdb, 1)
    assert status["status"] == "paused" and status["checkpoint"]["in_flight"] is None
    assert server.command(f"SELECT count() FROM {sdb}.dst") == status["rows_processed"]
    assert other.resume_backfill(sdb, 1)["stopped"] == "completed"
    exact(server, sdb, rows)


# -- subprocesses sharing the server ----------------------------------------------------------------
def _env(server_url: str, db: str, root: Path) -> dict:
    env = {**os.environ, "CLICKHOUSE_URL": server_url, "MIGRATE_DATABASE": db, "MIGRATE_DIR": str(root),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MIGRATE_DEBUG", None)
    return env


def test_kill_9_pause_and_status_from_other_processes(request, server, server_url, sdb, setup):
    rows = 6_000
    root = setup(rows, 100, sql=COPY_SQL + " AND sleepEachRow(0.0005) = 0")
    env = _env(server_url, sdb, root)
    rng, kills = random.Random(11), 0
    for _ in range(3):
        proc = subprocess.Popen(MIGRATE + ["backfill", "run", "1"], env=env, cwd=str(REPO), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        Lines(proc).wait_for("batch ", count=rng.randint(1, 4))
        time.sleep(rng.uniform(0, 0.1))
        proc.kill()
        proc.wait(timeout=60)
        kills += 1
    proc = subprocess.Popen(MIGRATE + ["backfill", "run", "1"], env=env, cwd=str(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = Lines(proc)
    lines.wait_for("batch ", count=2)
    status = subprocess.run(MIGRATE + ["backfill", "status", "1", "--json"], env=env, cwd=str(REPO),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "running"
    paused = subprocess.run(MIGRATE + ["backfill", "pause", "1"], env=env, cwd=str(REPO), capture_output=True,
                            text=True, timeout=120)
    assert paused.returncode == 0, paused.stderr
    out, err = lines.rest()
    assert proc.returncode == 0, err
    assert "paused" in out
    done = subprocess.run(MIGRATE + ["backfill", "resume", "1"], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    exact(server, sdb, rows)
    print(f"server mode: {kills} kill points survived, {rows:,} rows compared")


def test_lease_between_two_processes_refuses_then_takes_over_when_stale(server, server_url, sdb, setup):
    """Two runner processes on one server, where no store lock stands between them: only the lease does.
    The second is refused while the first heartbeats; then the first is frozen (SIGSTOP: its pid is
    alive, its heartbeat stops) and the second takes over once the lease is stale. The target ends exact."""
    rows, lease = 6_000, 3.0
    root = setup(rows, 100, sql=COPY_SQL + " AND sleepEachRow(0.0005) = 0")
    env = {**_env(server_url, sdb, root), "BACKFILL_LEASE_SECONDS": str(lease)}

    def migrate(*args, timeout=300):
        return subprocess.run(MIGRATE + list(args), env=env, cwd=str(REPO), capture_output=True, text=True,
                              timeout=timeout)

    first = subprocess.Popen(MIGRATE + ["backfill", "run", "1"], env=env, cwd=str(REPO), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        Lines(first).wait_for("batch ", count=2)
        refused = migrate("backfill", "run", "1")
        assert refused.returncode == 1, refused.stderr
        assert "refusing a second runner" in refused.stderr and "Traceback" not in refused.stderr
        first.send_signal(signal.SIGSTOP)
        status = json.loads(migrate("backfill", "status", "1", "--json").stdout)
        assert status["lease"]["pid"] == first.pid
        heartbeat = float(status["lease"]["heartbeat"])
        wait_until(lambda: time.time() > heartbeat + lease + 0.5)  # no heartbeat from a frozen runner
        took_over = migrate("backfill", "run", "1")
        assert took_over.returncode == 0, took_over.stderr
        assert "completed" in took_over.stdout
    finally:
        first.kill()  # also ends a stopped process
        first.wait(timeout=60)
    exact(server, sdb, rows)
