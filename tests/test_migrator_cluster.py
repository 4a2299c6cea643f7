"""Servers and clusters, migrator side: no DDL from read-only commands, tracking DDL only when missing,
latest-read / quorum-write settings on state rows, --cluster text rules (SharedMergeTree, Replicated
databases, macros) and the CANNOT_ASSIGN_ALTER retry. Everything that runs, runs on the real engine;
what needs a server is checked on the SQL text and settings sent."""
from __future__ import annotations

import functools
import json
import re

import pytest
from conftest import run_migrate
from test_migrator import inspect_store

from migrator import cluster as clustering
from migrator import tracking
from migrator.errors import MigrateError
from migrator.sqltext import on_cluster

DDL_RE = re.compile(r"^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|EXCHANGE|ATTACH|DETACH)\b", re.IGNORECASE)


@pytest.fixture(autouse=True)
def quick_lock_grace(monkeypatch):
    monkeypatch.setattr(tracking.AdvisoryLock, "__init__",
                        functools.partialmethod(tracking.AdvisoryLock.__init__, grace_seconds=0.01))


class Recorder:
    """A passthrough proxy around the real client that records every statement and its settings."""

    def __init__(self, client):
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "sent", [])

    def command(self, sql, parameters=None, settings=None, **kw):
        self.sent.append((sql, settings))
        return self._client.command(sql, parameters=parameters, settings=settings, **kw)

    def query(self, sql, parameters=None, settings=None, **kw):
        self.sent.append((sql, settings))
        return self._client.query(sql, parameters=parameters, settings=settings, **kw)

    def __getattr__(self, name):
        return getattr(self._client, name)

    def __setattr__(self, name, value):
        setattr(self._client, name, value)

    def ddl(self) -> list[str]:
        return [sql for sql, _ in self.sent if DDL_RE.match(sql)]


class FlakyClient(Recorder):
    """Injects CANNOT_ASSIGN_ALTER (517), which the engine cannot produce on demand: the first `times`
    statements matching `pattern` raise it; everything else (and every later try) runs on the real engine."""

    def __init__(self, client, pattern: str, times: int = 1, code: int = 517):
        super().__init__(client)
        object.__setattr__(self, "left", {"n": times, "pattern": pattern, "code": code})

    def command(self, sql, parameters=None, settings=None, **kw):
        if self.left["n"] and self.left["pattern"] in sql:
            self.left["n"] -= 1
            self.sent.append((sql, "injected"))
            raise RuntimeError(f"Code: {self.left['code']}. DB::Exception: Metadata on replica is not up to date "
                               "with common metadata in Zookeeper. (CANNOT_ASSIGN_ALTER)")
        return super().command(sql, parameters=parameters, settings=settings, **kw)


ONE = "CREATE TABLE {db}.t (x Int32) ENGINE = MergeTree ORDER BY x"
TWO = "ALTER TABLE {db}.t ADD COLUMN y Int32 DEFAULT 7;\nALTER TABLE {db}.t ADD COLUMN z Int32 DEFAULT 8"


# -- read-only commands send no DDL; tracking DDL only when missing -----------------------------------

def test_status_sends_no_ddl_on_a_migrated_store(ch_client, db, migrations, migrator_for):
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    assert migrator_for(db, root).up() == [1]
    recorder = Recorder(ch_client)
    m = migrator_for(db, root)
    m.ctx.client = recorder
    assert m.status()["current_version"] == 1
    assert recorder.ddl() == []
    assert not [sql for sql, _ in recorder.sent if sql.lstrip().upper().startswith("INSERT")]
    reads = [s for sql, s in recorder.sent if "FROM db_management.migrations" in sql]
    assert reads == [tracking.LATEST_READ]


def test_status_on_an_empty_store_reports_zero_and_creates_nothing(tmp_path, migrations):
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    store = tmp_path / "store"
    proc = run_migrate(["status", "--json"], store, migrations_dir=root)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert (st["current_version"], st["pending_versions"], st["dirty"]) == (0, [1], False)
    assert inspect_store(store, "SELECT name FROM system.databases WHERE name IN ('db_management', 'd')") == []


def test_ensure_schema_creates_only_what_is_missing(ch_client, db):
    schema = [f"CREATE DATABASE IF NOT EXISTS {db}_x",
              f"CREATE TABLE IF NOT EXISTS {db}_x.a (k String) ENGINE = MergeTree ORDER BY k",
              f"CREATE TABLE IF NOT EXISTS {db}.b (k String) ENGINE = MergeTree ORDER BY k"]
    ch_client.command(schema[2])  # already there
    try:
        first = Recorder(ch_client)
        tracking.ensure_schema(first, None, schema=schema)
        assert first.ddl() == schema[:2]
        again = Recorder(ch_client)
        tracking.ensure_schema(again, "main", schema=schema)  # under --cluster too: nothing missing, no DDL
        assert again.ddl() == []
        assert tracking.missing_statements(ch_client, schema) == []
    finally:
        ch_client.command(f"DROP DATABASE IF EXISTS {db}_x")


def test_ensure_schema_sends_missing_objects_on_cluster(ch_client, db):
    """chDB has no cluster: the ON CLUSTER statement is sent, and the engine refusing it proves it was."""
    recorder = Recorder(ch_client)
    with pytest.raises(Exception, match="CLUSTER_DOESNT_EXIST|cluster 'main' not found"):
        tracking.ensure_schema(recorder, "main", schema=[f"CREATE DATABASE IF NOT EXISTS {db}_y"])
    assert recorder.ddl() == [f"CREATE DATABASE IF NOT EXISTS {db}_y ON CLUSTER main"]
    with pytest.raises(ValueError, match="not a CREATE DATABASE/TABLE IF NOT EXISTS"):
        tracking.missing_statements(ch_client, [f"DROP TABLE {db}.t"])


# -- reads that decide writes: latest read, quorum write ----------------------------------------------

def test_state_and_lock_rows_use_latest_reads_and_quorum_writes(ch_client, db, migrations, migrator_for):
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    recorder = Recorder(ch_client)
    m = migrator_for(db, root)
    m.ctx.client = recorder
    assert m.up() == [1] and m.down(0) == [1]
    m.force(1)
    tracked = ("db_management.migrations", "db_management.migration_locks")
    writes = [sql for sql, _ in recorder.sent if sql.startswith("INSERT INTO") and sql.split()[2] in tracked]
    reads = [s for sql, s in recorder.sent if sql.startswith("SELECT") and any(f"FROM {t}" in sql for t in tracked)]
    # Quorum settings ride in the INSERT's own text (INSERT INTO t (...) SETTINGS ... SELECT ...).
    quorum = ") SETTINGS insert_quorum = 'auto', insert_quorum_parallel = 0 SELECT "
    assert len(writes) >= 10 and all(quorum in sql for sql in writes), writes
    assert len(reads) >= 5 and all(s == tracking.LATEST_READ for s in reads), reads
    assert tracking.QUORUM_WRITE == {"insert_quorum": "auto", "insert_quorum_parallel": 0}
    assert tracking.LATEST_READ == {"select_sequential_consistency": 1}
    assert m.status()["current_version"] == 1  # the engine accepted every one of them


# -- --cluster on SQL text ----------------------------------------------------------------------------

def test_on_cluster_without_a_cluster_is_the_statement():
    for stmt in ("CREATE TABLE d.t (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE d.t", "SELECT 1"):
        assert on_cluster(stmt, None) == stmt


ALREADY_REPLICATED = [
    ("CREATE TABLE d.t (x Int32) ENGINE = SharedMergeTree ORDER BY x",
     "CREATE TABLE d.t ON CLUSTER c (x Int32) ENGINE = SharedMergeTree ORDER BY x"),
    ("CREATE TABLE d.t (x Int32) ENGINE = SharedMergeTree('/p/{shard}', '{replica}') ORDER BY x",
     "CREATE TABLE d.t ON CLUSTER c (x Int32) ENGINE = SharedMergeTree('/p/{shard}', '{replica}') ORDER BY x"),
    ("CREATE TABLE d.t (k String, v UInt64) ENGINE = SharedReplacingMergeTree(v) ORDER BY k",
     "CREATE TABLE d.t ON CLUSTER c (k String, v UInt64) ENGINE = SharedReplacingMergeTree(v) ORDER BY k"),
    ("CREATE TABLE d.t (k String, v UInt64) ENGINE = ReplicatedReplacingMergeTree(v) ORDER BY k",
     "CREATE TABLE d.t ON CLUSTER c (k String, v UInt64) ENGINE = ReplicatedReplacingMergeTree(v) ORDER BY k"),
    ("create table d.t (x Int32) engine = sharedAggregatingMergeTree order by x",
     "create table d.t ON CLUSTER c (x Int32) engine = sharedAggregatingMergeTree order by x"),
]


@pytest.mark.parametrize("sql,expected", ALREADY_REPLICATED, ids=[c[0][30:70] for c in ALREADY_REPLICATED])
def test_shared_and_replicated_engines_are_never_rewritten(sql, expected):
    assert on_cluster(sql, "c") == expected
    assert "ReplicatedShared" not in on_cluster(sql, "c") and "ReplicatedReplicated" not in on_cluster(sql, "c")


REPLICATED_DB = [
    # inside the Replicated database `r`: as written (no ON CLUSTER, the database picks the engine)
    ("CREATE TABLE r.t (x Int32) ENGINE = MergeTree ORDER BY x", None),
    ("CREATE TABLE t (x Int32) ENGINE = MergeTree ORDER BY x", None),  # unqualified: the target database r
    ("ALTER TABLE `r`.t ADD COLUMN y Int32", None),
    ("DROP TABLE IF EXISTS r.t SYNC", None),
    ("CREATE MATERIALIZED VIEW r.mv ENGINE = SummingMergeTree ORDER BY k AS SELECT k FROM r.t", None),
    ("RENAME TABLE r.a TO r.b", None),
    ("-- header\nCREATE TABLE r.t (x Int32) ENGINE = MergeTree ORDER BY x", None),
    # another database, and the database statement itself: rewritten as usual
    ("CREATE TABLE o.t (x Int32) ENGINE = MergeTree ORDER BY x",
     "CREATE TABLE o.t ON CLUSTER c (x Int32) ENGINE = ReplicatedMergeTree() ORDER BY x"),
    ("CREATE DATABASE IF NOT EXISTS r", "CREATE DATABASE IF NOT EXISTS r ON CLUSTER c"),
]


@pytest.mark.parametrize("sql,expected", REPLICATED_DB, ids=[c[0][:40] for c in REPLICATED_DB])
def test_ddl_inside_a_replicated_database_gets_no_on_cluster(sql, expected):
    assert on_cluster(sql, "c", frozenset({"r"}), "r") == (expected or sql)


def test_the_runner_asks_system_databases_only_under_cluster(ch_client, db, migrations, migrator_for):
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    assert migrator_for(db, root).replicated_databases() == frozenset()
    recorder = Recorder(ch_client)
    m = migrator_for(db, root, cluster="main")
    m.ctx.client = recorder
    assert m.replicated_databases() == frozenset()  # chDB: Atomic/Overlay databases only
    assert [sql for sql, _ in recorder.sent] == ["SELECT name FROM system.databases WHERE engine = 'Replicated'"]
    m._replicated = frozenset({db})  # what system.databases says on a server with `db` Replicated
    assert m.statements(root / "001_t.up.sql") == [ONE.format(db=db)]


MACROS = [
    ("CREATE TABLE d.t ON CLUSTER c (x Int32) ENGINE = ReplicatedMergeTree() ORDER BY x", {"shard", "replica"}),
    ("CREATE TABLE d.t (k String, v UInt64) ENGINE = ReplicatedReplacingMergeTree(v) ORDER BY k", {"shard", "replica"}),
    ("CREATE TABLE d.t (x Int32) ENGINE = ReplicatedMergeTree ORDER BY x", {"shard", "replica"}),
    ("CREATE TABLE d.t (x Int32) ENGINE = ReplicatedMergeTree('/t/{shard}/x', 'r1') ORDER BY x", {"shard"}),
    ("CREATE TABLE d.t (x Int32) ENGINE = ReplicatedMergeTree('/t/x', '{replica}') ORDER BY x", {"replica"}),
    ("CREATE TABLE d.t (x Int32) ENGINE = ReplicatedMergeTree('/t/x', 'r1') ORDER BY x", set()),
    ("CREATE TABLE d.t (x Int32) ENGINE = SharedMergeTree ORDER BY x", set()),
    ("CREATE TABLE d.t (x Int32) ENGINE = MergeTree ORDER BY x", set()),
    ("INSERT INTO d.t VALUES (1)", set()),
]


@pytest.mark.parametrize("sql,needed", MACROS, ids=[c[0][28:70] for c in MACROS])
def test_required_macros(sql, needed):
    assert clustering.required_macros([sql]) == needed


def test_missing_macros_stop_cluster_up_before_anything_is_applied(ch_client, db, migrations, migrator_for):
    """chDB defines no macros (system.macros is empty): the rewritten engines need {shard} and {replica}."""
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    recorder = Recorder(ch_client)
    m = migrator_for(db, root, cluster="main")
    m.ctx.client = recorder
    with pytest.raises(MigrateError) as exc:
        m.up()
    assert str(exc.value) == ("--cluster: macro {replica}, {shard} is not defined on this server (system.macros); "
                              "the replicated engines need it: define it in the server's <macros> config")
    assert recorder.ddl() == [] and not [s for s, _ in recorder.sent if s.startswith("INSERT")]
    assert ch_client.command(f"EXISTS TABLE {db}.t") == 0


# -- CANNOT_ASSIGN_ALTER (517) between back-to-back DDL ----------------------------------------------

def test_517_is_retried_and_the_statement_then_succeeds(ch_client, db, migrations, migrator_for):
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    migrations(2, "cols", TWO, "SELECT 1")
    flaky = FlakyClient(ch_client, "ADD COLUMN z", times=2)
    m = migrator_for(db, root)
    m.ctx.client = flaky
    assert m.up() == [1, 2]
    sent_z = [s for sql, s in flaky.sent if "ADD COLUMN z" in sql]
    assert sent_z == ["injected", "injected", None]  # two 517s, then the real engine ran it
    cols = [r[0] for r in ch_client.query(f"SELECT name FROM system.columns WHERE database = '{db}' AND table = 't' "
                                          "ORDER BY position").result_rows]
    assert cols == ["x", "y", "z"]
    assert m.status()["dirty"] is False


def test_other_errors_are_not_retried_and_517_gives_up_after_its_tries(ch_client, db, migrations, migrator_for):
    root = migrations(1, "t", ONE, "DROP TABLE {db}.t")
    flaky = FlakyClient(ch_client, "CREATE TABLE", times=1, code=60)
    m = migrator_for(db, root)
    m.ctx.client = flaky
    with pytest.raises(MigrateError, match=r"^001_t\.up\.sql: version 1 failed: Code: 60\."):
        m.up()
    assert [s for sql, s in flaky.sent if sql.startswith("CREATE TABLE")] == ["injected"]

    stubborn, delays = FlakyClient(ch_client, "SELECT 42", times=99), []
    with pytest.raises(RuntimeError, match="Code: 517"):
        clustering.run_ddl(stubborn, "SELECT 42", sleep=delays.append)
    assert delays == [0.2, 0.4, 0.8, 1.6] and len(stubborn.sent) == clustering.DDL_TRIES
