"""`--cluster` against a real ClickHouse cluster (server mode); skipped with a reason without one.

Run with e.g. CLICKHOUSE_CLUSTER_URL=http://default@ch1:8123 MIGRATE_CLUSTER=my_cluster pytest -m server
(MIGRATE_CLUSTER defaults to the first cluster in system.clusters; the password comes from
CLICKHOUSE_PASSWORD). Without that URL, `make test-server` starts tests/cluster/docker-compose.yml
(two replicas of one shard and a Keeper) through testcontainers when Docker is available.
The text-level rewriting is unit-tested in test_migrator.py.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from test_migrator_cluster import Recorder  # the passthrough proxy that records SQL

from migrator import connection, tracking
from migrator.runner import Context, Migrator

pytestmark = pytest.mark.server

UP = """
CREATE TABLE {db}.events (k String, v UInt64) ENGINE = ReplacingMergeTree(v) ORDER BY k;
CREATE TABLE {db}.totals (k String, n UInt64) ENGINE = SummingMergeTree ORDER BY k;
CREATE MATERIALIZED VIEW {db}.totals_mv TO {db}.totals AS SELECT k, 1 AS n FROM {db}.events;
"""
DOWN = "DROP TABLE {db}.totals_mv SYNC; DROP TABLE {db}.totals SYNC; DROP TABLE {db}.events SYNC"


COMPOSE = Path(__file__).resolve().parent / "cluster"


@pytest.fixture(scope="module")
def cluster_url():
    """CLICKHOUSE_CLUSTER_URL, else the compose cluster started through Docker, else a skip saying why."""
    url = os.environ.get("CLICKHOUSE_CLUSTER_URL")
    if url:
        yield url, os.environ.get("MIGRATE_CLUSTER")
        return
    try:
        from testcontainers.compose import DockerCompose
        compose = DockerCompose(COMPOSE, compose_file_name="docker-compose.yml", pull=True)
        compose.start()
    except Exception as exc:  # noqa: BLE001 - no Docker here: the reason is the skip message
        pytest.skip(f"no ClickHouse cluster: set CLICKHOUSE_CLUSTER_URL=http://user@host:8123 (and MIGRATE_CLUSTER="
                    f"name), or make Docker available for tests/cluster/docker-compose.yml "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    try:
        host, port = compose.get_service_host("ch1", 8123), compose.get_service_port("ch1", 8123)
        url = f"http://default@{host}:{port}"
        deadline = time.time() + 120
        while True:  # both replicas answer and see each other through Keeper
            try:
                client = connection.connect(connection.resolve(url))
                if int(client.command("SELECT count() FROM clusterAllReplicas('replicated', system.one)")) == 2:
                    break
            except Exception:  # noqa: BLE001 - still starting
                if time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise TimeoutError("the compose cluster did not come up within 120 s")
            time.sleep(1)
        yield url, "replicated"
    finally:
        compose.stop()


@pytest.fixture
def cluster_client(cluster_url):
    url, cluster = cluster_url
    client = connection.connect(connection.resolve(url))
    cluster = cluster or client.command("SELECT cluster FROM system.clusters LIMIT 1")
    return client, cluster


def test_cluster_up_and_down_reach_every_replica(cluster_client, tmp_path):
    client, cluster = cluster_client
    db = "t_cluster_" + uuid.uuid4().hex[:8]
    (tmp_path / "001_events.up.sql").write_text(UP)
    (tmp_path / "001_events.down.sql").write_text(DOWN)
    m = Migrator(Context(client=client, database=db, migrations_dir=tmp_path, cluster=cluster, echo=lambda _: None))
    replicas = int(client.command(f"SELECT count() FROM system.clusters WHERE cluster = '{cluster}'"))
    try:
        assert m.up() == [1]
        engines = client.query(
            f"SELECT name, engine, count() FROM clusterAllReplicas('{cluster}', system.tables) "
            f"WHERE database = '{db}' GROUP BY name, engine ORDER BY name").result_rows
        assert engines == [("events", "ReplicatedReplacingMergeTree", replicas),
                           ("totals", "ReplicatedSummingMergeTree", replicas),
                           ("totals_mv", "MaterializedView", replicas)]
        tracking = client.command("SELECT engine FROM system.tables "
                                  "WHERE database = 'db_management' AND name = 'migrations'")
        assert tracking == "ReplicatedReplacingMergeTree"
        assert m.status()["current_version"] == 1
        assert m.down(0) == [1]
        left = client.command(f"SELECT count() FROM clusterAllReplicas('{cluster}', system.tables) "
                              f"WHERE database = '{db}'")
        assert int(left) == 0
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} ON CLUSTER {cluster} SYNC")


def test_cluster_status_sends_no_ddl_and_up_into_a_replicated_database(cluster_client, tmp_path):
    client, cluster = cluster_client
    db = "t_rdb_" + uuid.uuid4().hex[:8]
    (tmp_path / "001_events.up.sql").write_text(UP)
    (tmp_path / "001_events.down.sql").write_text(DOWN)
    client.command(f"CREATE DATABASE {db} ON CLUSTER {cluster} "
                   f"ENGINE = Replicated('/clickhouse/databases/{db}', '{{shard}}', '{{replica}}')")
    recorder = Recorder(client)
    m = Migrator(Context(client=recorder, database=db, migrations_dir=tmp_path, cluster=cluster, echo=lambda _: None))
    try:
        assert m.statements(tmp_path / "001_events.up.sql")[0].strip().startswith(f"CREATE TABLE {db}.events (")
        assert m.up() == [1]  # no ON CLUSTER inside a Replicated database: it replicates the DDL itself
        engines = client.query(
            f"SELECT name, engine, count() FROM clusterAllReplicas('{cluster}', system.tables) "
            f"WHERE database = '{db}' AND name = 'events' GROUP BY name, engine").result_rows
        replicas = int(client.command(f"SELECT count() FROM system.clusters WHERE cluster = '{cluster}'"))
        assert engines == [("events", "ReplicatedReplacingMergeTree", replicas)]
        recorder.sent.clear()
        assert m.status()["current_version"] == 1
        assert recorder.ddl() == []
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} ON CLUSTER {cluster} SYNC")


@pytest.mark.skipif(not os.environ.get("CLICKHOUSE_CLUSTER_THROWAWAY"),
                    reason="renames db_management tables cluster-wide: set CLICKHOUSE_CLUSTER_THROWAWAY=1 on a "
                           "cluster made for this test")
def test_cluster_adopt_takes_over_the_old_replicated_table(cluster_client):
    from migrator.adopt import adopt
    client, cluster = cluster_client
    for table in (tracking.MIGRATIONS, tracking.LOCKS):
        client.command(f"DROP TABLE IF EXISTS {table} ON CLUSTER {cluster} SYNC")
    client.command(f"CREATE DATABASE IF NOT EXISTS db_management ON CLUSTER {cluster}")
    client.command(f"CREATE TABLE db_management.migrations ON CLUSTER {cluster} (db_name String, curr_version UInt64, "
                   "partially_applied_version UInt64 NULL) ENGINE = ReplicatedMergeTree() ORDER BY (db_name)")
    client.command("INSERT INTO db_management.migrations VALUES ('d', 0, NULL)")
    client.command("ALTER TABLE db_management.migrations UPDATE curr_version = 5, partially_applied_version = 6 "
                   "WHERE db_name = 'd' SETTINGS mutations_sync = 2")
    report = adopt(client, cluster)
    assert report[0] == "adopted db_management.migrations: d at version 5 (dirty: 6 partially applied)"
    assert tracking.read_state(client, "d") == tracking.State(5, 6)
    engines = client.query(f"SELECT engine, count() FROM clusterAllReplicas('{cluster}', system.tables) "
                           "WHERE database = 'db_management' AND name = 'migrations' GROUP BY engine").result_rows
    replicas = int(client.command(f"SELECT count() FROM system.clusters WHERE cluster = '{cluster}'"))
    assert engines == [("ReplicatedReplacingMergeTree", replicas)]
    assert adopt(client, cluster)[0].startswith("nothing to adopt")


def test_cluster_backfill_kills_an_abandoned_attempt_on_every_replica(cluster_client, tmp_path):
    """The server keeps running an INSERT whose client gave up (the injected fault is only the client's
    read timeout): the retry must find it in clusterAllReplicas(system.processes), kill it ON CLUSTER,
    and leave the replicated target exactly equal to the source."""
    from test_attempts import ANTI_JOIN, META, ROWS, UP, GivesUp, exact

    from backfill_plugin import ClickHouseBackfillManager
    from backfill_plugin.protocol.attempt import Attempts

    client, cluster = cluster_client
    db = "t_cluster_" + uuid.uuid4().hex[:8]
    (tmp_path / "001_copy.up.sql").write_text(UP)
    (tmp_path / "001_copy.down.sql").write_text("DROP TABLE {db}.src SYNC; DROP TABLE {db}.dst SYNC")
    (tmp_path / "001_copy.backfill.sql").write_text(ANTI_JOIN)
    (tmp_path / "001_copy.backfill.meta").write_text(__import__("json").dumps(META))
    m = Migrator(Context(client=client, database=db, migrations_dir=tmp_path, cluster=cluster, echo=lambda _: None))
    try:
        assert m.up() == [1]
        runner = GivesUp(client, which=2, after=1.5)
        mgr = ClickHouseBackfillManager(runner, migrations_dir=tmp_path, cluster=cluster, sleep=lambda s: None)
        assert mgr.run_backfill(db, 1)["status"] == "completed"
        for thread in runner.orphans:
            thread.join(60)
        assert runner.orphan_errors and "QUERY_WAS_CANCELLED" in runner.orphan_errors[0]
        client.command(f"SYSTEM SYNC REPLICA {db}.dst")
        assert exact(client, db) == (ROWS, 0, True)
        assert not Attempts(client, cluster).running(f"{db}_1")
    finally:
        m.down(0)
        client.command(f"DROP DATABASE IF EXISTS {db} ON CLUSTER {cluster} SYNC")

