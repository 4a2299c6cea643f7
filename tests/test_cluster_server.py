"""`--cluster` against a real ClickHouse cluster (server mode); skipped with a reason without one.

Run with e.g. CLICKHOUSE_CLUSTER_URL=http://default@ch1:8123 MIGRATE_CLUSTER=my_cluster pytest -m server
(MIGRATE_CLUSTER defaults to the first cluster in system.clusters; the password comes from
CLICKHOUSE_PASSWORD). The text-level rewriting is unit-tested in test_migrator.py.
"""
from __future__ import annotations

import os
import uuid

import pytest

from migrator import connection
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
