"""`--cluster` against a real ClickHouse cluster (server mode); skipped with a reason without one.

Run with e.g. CLICKHOUSE_CLUSTER_URL=http://default@ch1:8123 MIGRATE_CLUSTER=my_cluster pytest -m server
(MIGRATE_CLUSTER defaults to the first cluster in system.clusters; the password comes from
CLICKHOUSE_PASSWORD). The text-level rewriting is unit-tested in test_migrator.py.
"""
from __future__ import annotations

import os
import uuid

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


@pytest.fixture
def cluster_client():
    url = os.environ.get("CLICKHOUSE_CLUSTER_URL")
    if not url:
        pytest.skip("no ClickHouse cluster: set CLICKHOUSE_CLUSTER_URL=http://user@host:8123 "
                    "(and MIGRATE_CLUSTER=name) to run --cluster against a real cluster")
    client = connection.connect(connection.resolve(url))
    cluster = os.environ.get("MIGRATE_CLUSTER") or client.command("SELECT cluster FROM system.clusters LIMIT 1")
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
