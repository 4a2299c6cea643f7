"""Guarantees of the batch protocol, each isolated so that it alone makes its test pass:
the write-ahead, the non-advancing guard, read-only commands without DDL, meta defaults, and the
control channel of a backfill that runs inline in `migrate up`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.protocol.attempt import untagged
from backfill_plugin.protocol.keys import KeySpace
from backfill_plugin.spec.meta import load_spec
from backfill_plugin.testing.harness import fault_site
from migrator import tracking
from migrator.discovery import discover
from tests.conftest import MIGRATE, REPO
from tests.test_migrator_cluster import Recorder

UP = """
CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {db}.src SELECT ['', 'q''x', 'b\\\\s', 'é'][number % 4 + 1], number, toString(number * 3) FROM numbers(4000);
CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
"""
# The target has no dedup window, so the token cannot hide a replayed range: only the anti-join on
# {retry_count} > 0 can, and the runner sets it only for a range it knows was in flight.
ANTI_JOIN = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} "
             "AND (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range} AND {retry_count} > 0)")
META = {"migration_version": 1, "batch_size": 1000, "checkpoint_columns": ["a", "b"], "source_table": "src"}

READER = r"""
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn=sys.argv[1])
fp = "SELECT count(), groupBitXor(cityHash64(a, b, v)), sum(cityHash64(a, b, v)) FROM d.{}"
print(json.dumps({"src": c.query(fp.format("src")).result_rows[0], "dst": c.query(fp.format("dst")).result_rows[0],
                  "dups": c.command("SELECT count() FROM (SELECT a, b FROM d.dst GROUP BY a, b HAVING count() > 1)")}))
"""


def test_write_ahead_alone_makes_a_kill_between_insert_and_checkpoint_exact(tmp_path, migrations):
    """kill -9 right after batch 2's INSERT commits (a real entry-point plugin SIGKILLs its own process).
    Only the in-flight range written ahead tells the next run that batch 2 may be in the target."""
    root = migrations(1, "copy", UP, "SELECT 1", ANTI_JOIN, META)
    site = fault_site(tmp_path / "site")  # the fault plugin `exactly_once` uses, shipped in backfill_plugin.testing
    store = tmp_path / "store"
    env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": "d", "MIGRATE_DIR": str(root),
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "MIGRATOR_DISABLE_PLUGINS": ""}

    def migrate(*args, **extra):
        return subprocess.run(MIGRATE + list(args), env={**env, **extra}, capture_output=True, text=True,
                              timeout=300, cwd=str(REPO))

    assert migrate("up").returncode == 0
    killed = migrate("backfill", "run", "1", BACKFILL_KILL_AT="committed:2")
    assert killed.returncode == -9, killed.stderr
    status = json.loads(migrate("backfill", "status", "1", "--json").stdout)
    assert status["status"] == "running" and status["checkpoint"]["in_flight"] is not None
    assert status["rows_processed"] == 1000  # batch 2 committed in the target but not in the checkpoint
    done = migrate("backfill", "run", "1")
    assert done.returncode == 0, done.stderr
    got = json.loads(subprocess.run([sys.executable, "-c", READER, f"chdb://{store}"], capture_output=True,
                                    text=True, timeout=120, cwd=str(REPO)).stdout)
    assert got["dst"] == got["src"] and got["src"][0] == 4000
    assert got["dups"] == 0


def test_a_batch_that_would_not_advance_stops_the_run(ch_client, db, migrations, migrator_for, monkeypatch):
    """A range bug injected into the key space (the lower bound of a batch includes the last key done):
    the run must stop with one line naming both keys instead of re-selecting the same key forever."""
    root = migrations(1, "copy", UP.replace("numbers(4000)", "numbers(8)"), "SELECT 1", ANTI_JOIN,
                      {**META, "batch_size": 2, "min_batch_size": 1})
    migrator_for(db, root).up()
    compare = KeySpace._compare

    def inclusive(self, point, op, strict_last, **kwargs):  # `>=` instead of `>` on the last key column
        return compare(self, point, op, strict_last=False if op == ">" else strict_last, **kwargs)

    monkeypatch.setattr(KeySpace, "_compare", inclusive)
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    with pytest.raises(BackfillError, match=r"would end at \[.*\], not past its start \[.*\]"):
        mgr.run_backfill(db, 1)
    assert mgr.get_status(db, 1, live_counts=False)["status"] == "failed"


def test_read_only_backfill_commands_send_no_ddl(ch_client, db, migrations, migrator_for):
    root = migrations(1, "copy", UP, "SELECT 1", ANTI_JOIN, META)
    migrator_for(db, root).up()
    ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1, max_batches=1)
    recorder = Recorder(ch_client)
    mgr = ClickHouseBackfillManager(recorder, migrations_dir=root)
    assert mgr.get_status(db, 1)["status"] == "paused"
    assert [i["status"] for i in mgr.list_backfills(db)] == ["paused"]
    assert recorder.sent and recorder.ddl() == []
    ClickHouseBackfillManager(ch_client, migrations_dir=root).reset_backfill(db, 1)
    recorder.sent.clear()
    ClickHouseBackfillManager(recorder, migrations_dir=root).pause_backfill(db, 1)  # a pending one can
    assert recorder.sent and recorder.ddl() == []


def test_checkpoints_are_quorum_writes_and_the_checks_between_batches_read_the_latest(ch_client, db, migrations,
                                                                                      migrator_for):
    """On a replicated state table a checkpoint must reach a majority of replicas before its batch runs,
    and the pause/lease check must see other writers' rows. chDB has no replicas: this checks what is
    sent (the quorum in each checkpoint INSERT's own text), and the engine accepting it."""
    root = migrations(1, "copy", UP, "SELECT 1", ANTI_JOIN, META)
    migrator_for(db, root).up()
    recorder = Recorder(ch_client)
    assert ClickHouseBackfillManager(recorder, migrations_dir=root).run_backfill(db, 1)["status"] == "completed"
    saves = [sql for sql, _ in recorder.sent if sql.startswith("INSERT INTO db_management.backfills")]
    checks = [s for sql, s in recorder.sent if sql.startswith("SELECT countIf(status = 'paused')")]
    batches = [s for sql, s in recorder.sent if untagged(sql).lstrip().startswith(f"INSERT INTO {db}.dst")]
    quorum = ") SETTINGS insert_quorum = 'auto', insert_quorum_parallel = 0 SELECT "
    assert len(saves) >= 6 and all(quorum in sql for sql in saves), saves
    assert len(checks) >= 4 and all(s == tracking.LATEST_READ for s in checks), checks
    assert len(batches) == 4 and all(s["insert_quorum"] == "auto" for s in batches), batches


def test_meta_defaults_never_make_a_valid_file_invalid(migrations):
    root = migrations(7, "small", "SELECT 1", "SELECT 1", ANTI_JOIN,
                      {**META, "migration_version": 7, "batch_size": 300})
    spec = load_spec(discover(root)[7])
    assert spec.meta["min_batch_size"] == 300 and spec.meta["batch_size"] == 300
    root = migrations(8, "big", "SELECT 1", "SELECT 1", ANTI_JOIN, {**META, "migration_version": 8})
    assert load_spec(discover(root)[8]).meta["min_batch_size"] == 1000


def test_status_and_pause_reach_a_backfill_running_inline_in_migrate_up(tmp_path, migrations):
    """`run_on_startup`: the backfill runs inside `migrate up`, which holds the embedded store; another
    terminal still sees its live status and pauses it through the control channel."""
    slow = ANTI_JOIN.replace("WHERE {batch_range}", "WHERE {batch_range} AND sleepEachRow(0.002) = 0", 1)
    root = migrations(1, "copy", UP, "SELECT 1", slow, {**META, "batch_size": 500, "run_on_startup": True})
    store = tmp_path / "store"
    env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": "d", "MIGRATE_DIR": str(root)}

    def migrate(*args):
        return subprocess.run(MIGRATE + list(args), env=env, capture_output=True, text=True, timeout=300,
                              cwd=str(REPO))

    up = subprocess.Popen(MIGRATE + ["up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=str(REPO))
    owner = store.with_name("store.control") / "owner.json"
    deadline, live = time.time() + 120, None
    # Probe only once `up` holds the store: a probe that opened it first would lock `up` out.
    while not (owner.exists() and json.loads(owner.read_text() or "{}").get("pid") == up.pid):
        assert up.poll() is None and time.time() < deadline, up.communicate()
        time.sleep(0.05)
    while time.time() < deadline:
        probe = migrate("backfill", "status", "1", "--json")
        if probe.returncode == 0 and json.loads(probe.stdout).get("batches_completed", 0) >= 1:
            live = json.loads(probe.stdout)
            break
        time.sleep(0.3)
    assert live is not None and live["status"] == "running"
    assert live["source"].startswith("control channel")
    paused = migrate("backfill", "pause", "1")
    assert paused.returncode == 0 and "pause requested" in paused.stdout, paused.stderr
    out, err = up.communicate(timeout=120)
    assert up.returncode == 0, err
    assert "backfill 1" in out and "paused" in out
    after = json.loads(migrate("backfill", "status", "1", "--json").stdout)
    assert after["status"] == "paused" and after["rows_processed"] < 4000
    assert migrate("backfill", "resume", "1").returncode == 0
    got = json.loads(subprocess.run([sys.executable, "-c", READER, f"chdb://{store}"], capture_output=True,
                                    text=True, timeout=120, cwd=str(REPO)).stdout)
    assert got["dst"] == got["src"] and got["dups"] == 0


def test_preflight_refuses_what_would_break_exactly_once_on_a_server(ch_client, db, migrations, migrator_for,
                                                                        monkeypatch):
    """Checks a server needs, exercised on the embedded engine: a token-only target without a dedup
    window, an HTTP receive timeout shorter than the batch timeout, an unknown cluster."""
    from backfill_plugin.protocol import preflight
    from migrator import connection
    from migrator.errors import MigrateError

    token_only = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
    up = UP.rstrip().rstrip(";") + " SETTINGS non_replicated_deduplication_window = 1;"  # dst is UP's last table
    root = migrations(1, "copy", up, "SELECT 1", token_only, META)
    migrator_for(db, root).up()  # `up` refuses a target without a window (tests/test_sql_checks.py); it lost it since
    ch_client.command(f"ALTER TABLE {db}.dst MODIFY SETTING non_replicated_deduplication_window = 0")
    mgr = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    with pytest.raises(BackfillError, match=rf"target {db}.dst has non_replicated_deduplication_window = 0.*"
                                            rf"MODIFY SETTING non_replicated_deduplication_window"):
        mgr.run_backfill(db, 1)
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0
    ch_client.command(f"ALTER TABLE {db}.dst MODIFY SETTING non_replicated_deduplication_window = 100")
    assert mgr.run_backfill(db, 1)["status"] == "completed"

    # An HTTP client cannot be built without a server here: the check is tested on the value `connect`
    # passes as send_receive_timeout.
    monkeypatch.setenv(connection.RECEIVE_TIMEOUT_ENV, "300")
    with pytest.raises(BackfillError, match=r"HTTP receive timeout \(300s\) is shorter than the batch's "
                                            r"timeout_seconds \(3600s\)"):
        preflight.check_receive_timeout(connection.receive_timeout(), 3600)
    preflight.check_receive_timeout(connection.receive_timeout(), 200)
    if not hasattr(ch_client, "_backend") or not hasattr(ch_client._backend, "timeout"):
        assert preflight.receive_timeout(ch_client) is None  # the embedded engine has no HTTP timeout
    else:  # over HTTP (a server, or MIGRATE_TEST_HTTP=1): the read timeout the client was made with
        assert preflight.receive_timeout(ch_client) > 0
    monkeypatch.delenv(connection.RECEIVE_TIMEOUT_ENV)
    assert connection.receive_timeout() > 3600 + preflight.TIMEOUT_MARGIN  # the default fits the default batch
    monkeypatch.setenv(connection.RECEIVE_TIMEOUT_ENV, "soon")
    with pytest.raises(MigrateError, match="MIGRATE_RECEIVE_TIMEOUT='soon': expected a whole number"):
        connection.receive_timeout()
    with pytest.raises(BackfillError, match="--cluster nowhere: no such cluster"):
        preflight.check_single_shard(ch_client, "nowhere")


def test_token_only_replays_are_refused_outside_a_replicated_dedup_window():
    """The replicated windows cannot be shown on the embedded engine: the decision is tested on the
    window as `dedup.window` reads it from system.tables / system.merge_tree_settings."""
    from backfill_plugin.protocol import dedup

    target = ("shop", "orders_v2")
    replicated = {"engine": "ReplicatedMergeTree", "blocks": 1000, "seconds": 600,
                  "setting": "replicated_deduplication_window"}
    with pytest.raises(BackfillError, match="replicated_deduplication_window_seconds = 600, less than a batch's "
                                            r"timeout plus the lease \(3660s\).*MODIFY SETTING"):
        dedup.check_window(target, replicated, 3660)
    dedup.check_window(target, {**replicated, "seconds": 7200}, 3660)
    with pytest.raises(BackfillError, match="does not deduplicate inserts"):
        dedup.check_window(target, {**replicated, "engine": "Log"}, 60)
    with pytest.raises(BackfillError, match=r"first ran \d+s ago, longer than shop.orders_v2's"):
        dedup.check_replay_age(target, replicated, time.time() - 601)
    dedup.check_replay_age(target, replicated, time.time() - 10)
    dedup.check_replay_age(target, {**replicated, "seconds": None}, time.time() - 10**6)  # MergeTree: by count
