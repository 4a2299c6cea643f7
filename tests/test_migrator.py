"""The migrator on the real engine: apply/roll back, tracking, dirty state, lock, {db}, dry-run,
cluster rewriting, the splitter, discovery errors, and the `migrate` CLI in a subprocess."""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from migrator import tracking
from migrator.discovery import discover
from migrator.errors import MigrateError
from migrator.runner import Context, Migrator
from migrator.sqltext import on_cluster, split_statements, substitute_db

REPO = Path(__file__).resolve().parent.parent
REAL_LOCK_GRACE = {"test_two_concurrent_ups_only_one_applies"}


@pytest.fixture(autouse=True)
def quick_lock_grace(request, monkeypatch):
    """The lock's grace re-check (0.3 s, twice) is for real races; only the race test needs it."""
    if request.node.originalname not in REAL_LOCK_GRACE:
        monkeypatch.setattr(tracking.AdvisoryLock, "__init__",
                            functools.partialmethod(tracking.AdvisoryLock.__init__, grace_seconds=0.01))

T1_UP = "CREATE TABLE {db}.t1 (x Int32) ENGINE = MergeTree ORDER BY x;\nINSERT INTO {db}.t1 VALUES (1), (2)"
T2_UP = "-- unqualified: lands in the target database\nCREATE TABLE t2 (k String, v UInt64) ENGINE = ReplacingMergeTree(v) ORDER BY k"
T3_UP = ("CREATE TABLE {db}.t3 (k String, n UInt64) ENGINE = SummingMergeTree ORDER BY k;\n"
         "CREATE MATERIALIZED VIEW {db}.t3_mv TO {db}.t3 AS SELECT k, 1 AS n FROM {db}.t2")


def tables(client, db) -> list[str]:
    return [r[0] for r in client.query("SELECT name FROM system.tables WHERE database = {d:String} ORDER BY name",
                                       parameters={"d": db}).result_rows]


def three(migrations):
    root = migrations(1, "t1", T1_UP, "DROP TABLE {db}.t1")
    migrations(2, "t2", T2_UP, "DROP TABLE t2")
    migrations(3, "t3", T3_UP, "DROP TABLE {db}.t3_mv;\nDROP TABLE {db}.t3")
    return root


# -- apply / roll back ------------------------------------------------------------------------------

def test_up_down_up_cycle(ch_client, db, migrations, migrator_for):
    root = three(migrations)
    assert migrator_for(db, root).up() == [1, 2, 3]
    assert tables(ch_client, db) == ["t1", "t2", "t3", "t3_mv"]
    assert ch_client.command(f"SELECT sum(x) FROM {db}.t1") == 3
    st = migrator_for(db, root).status()
    assert st["current_version"] == 3 and type(st["current_version"]) is int
    assert st["pending_versions"] == [] and st["dirty"] is False

    assert migrator_for(db, root).down(0) == [3, 2, 1]
    assert tables(ch_client, db) == []
    st = migrator_for(db, root).status()
    assert (st["current_version"], st["pending_versions"], st["dirty"]) == (0, [1, 2, 3], False)
    assert all(type(v) is int for v in st["pending_versions"])

    assert migrator_for(db, root).up() == [1, 2, 3]
    assert tables(ch_client, db) == ["t1", "t2", "t3", "t3_mv"]
    assert migrator_for(db, root).up() == []  # nothing left to apply
    assert migrator_for(db, root).status()["current_version"] == 3


def test_up_to_and_down_to_with_version_gaps(ch_client, db, migrations, migrator_for):
    root = migrations(1, "a", "CREATE TABLE {db}.a (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.a")
    migrations(5, "b", "CREATE TABLE {db}.b (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.b")
    migrations(10, "c", "CREATE TABLE {db}.c (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.c")
    m = migrator_for(db, root)
    assert m.up(to=1) == [1]
    assert m.status()["pending_versions"] == [5, 10]
    assert m.up(to=5) == [5]
    assert tables(ch_client, db) == ["a", "b"]
    with pytest.raises(MigrateError) as exc:
        m.up(to=7)
    assert str(exc.value) == "--to 7: no migration with that version"
    with pytest.raises(MigrateError) as exc:
        m.down(to=3)
    assert str(exc.value) == "--to 3: no migration with that version"
    assert m.up() == [10]
    assert m.down(to=5) == [10]
    assert m.down(to=5) == []
    assert (m.status()["current_version"], tables(ch_client, db)) == (5, ["a", "b"])
    assert m.down(to=1) == [5]
    assert (m.status()["current_version"], m.status()["pending_versions"]) == (1, [5, 10])


def test_broken_statement_leaves_the_version_dirty_until_force(ch_client, db, migrations, migrator_for):
    root = migrations(1, "one", "CREATE TABLE {db}.one (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.one")
    migrations(2, "broken", "CREATE TABLE {db}.half (x Int32) ENGINE = MergeTree ORDER BY x;\n"
                            "CREATE TABLE {db}.bad (x NoSuchType) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.half")
    with pytest.raises(MigrateError) as exc:
        migrator_for(db, root).up()
    msg = str(exc.value)
    assert msg.startswith("002_broken.up.sql: version 2 failed: ") and "NoSuchType" in msg
    assert "\n" not in msg
    st = migrator_for(db, root).status()
    assert (st["current_version"], st["dirty"], st["partially_applied_version"]) == (1, True, 2)
    assert tables(ch_client, db) == ["half", "one"]  # the first statement of 2 did run

    for attempt in (lambda m: m.up(), lambda m: m.down(0)):
        with pytest.raises(MigrateError) as exc:
            attempt(migrator_for(db, root))
        assert str(exc.value) == (f"database {db!r} is dirty: version 2 was partially applied; repair by hand, "
                                  "then 'migrate force VERSION' to mark the version that is really in place")
    assert tables(ch_client, db) == ["half", "one"]  # refused: nothing ran

    ch_client.command(f"DROP TABLE {db}.half")  # the operator's manual repair ...
    migrator_for(db, root).force(1)             # ... then declares version 1 as what is in place
    st = migrator_for(db, root).status()
    assert (st["current_version"], st["dirty"], st["pending_versions"]) == (1, False, [2])
    (root / "002_broken.up.sql").write_text("CREATE TABLE {db}.half (x Int32) ENGINE = MergeTree ORDER BY x")
    assert migrator_for(db, root).up() == [2]
    assert migrator_for(db, root).status()["dirty"] is False


def test_failed_down_is_dirty_too(db, migrations, migrator_for):
    root = migrations(1, "one", "CREATE TABLE {db}.one (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.nope")
    m = migrator_for(db, root)
    m.up()
    with pytest.raises(MigrateError, match=r"^001_one\.down\.sql: version 1 failed: "):
        m.down(0)
    st = m.status()
    assert (st["current_version"], st["dirty"], st["partially_applied_version"]) == (1, True, 1)
    with pytest.raises(MigrateError, match="is dirty"):
        m.up()
    m.force(0)
    assert (m.status()["current_version"], m.status()["dirty"]) == (0, False)
    with pytest.raises(MigrateError) as exc:
        m.force(9)
    assert str(exc.value) == "force 9: no migration with that version"


def test_tracking_is_insert_only_versioned_rows(ch_client, db, migrations, migrator_for):
    root = three(migrations)
    migrator_for(db, root).up(to=2)
    migrator_for(db, root).down(0)
    newest = ch_client.query("SELECT curr_version, partially_applied_version FROM db_management.migrations "
                             "WHERE db_name = {d:String} ORDER BY version DESC LIMIT 1", parameters={"d": db}).result_rows
    assert newest == [(0, None)]
    assert ch_client.command("SELECT count() FROM system.mutations WHERE database = 'db_management'") == 0
    engine = ch_client.command("SELECT engine FROM system.tables WHERE database = 'db_management' AND name = 'migrations'")
    assert engine == "ReplacingMergeTree"


# -- the advisory lock ------------------------------------------------------------------------------

def test_two_concurrent_ups_only_one_applies(ch_client, db, migrations, migrator_for):
    root = migrations(1, "slow", "CREATE TABLE {db}.once (x Int32) ENGINE = MergeTree ORDER BY x;\n"
                                 "SELECT sleepEachRow(0.3) FROM numbers(3);\n"
                                 "INSERT INTO {db}.once VALUES (1)", "DROP TABLE {db}.once")
    barrier, results = threading.Barrier(2), {}

    def run(name):
        m = migrator_for(db, root)
        barrier.wait()
        try:
            results[name] = m.up()
        except MigrateError as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outcomes = sorted(results.values(), key=lambda r: isinstance(r, MigrateError))
    assert len(outcomes) == 2
    assert outcomes[0] == [1], results
    assert isinstance(outcomes[1], MigrateError), results
    assert f"database {db!r} is locked by another migrate" in str(outcomes[1])
    assert ch_client.command(f"SELECT count() FROM {db}.once") == 1  # applied exactly once
    st = migrator_for(db, root).status()
    assert (st["current_version"], st["dirty"]) == (1, False)
    assert migrator_for(db, root).down(0) == [1]  # the lock was released by both


def test_a_lock_claim_of_a_killed_holder_on_this_host_holds_nothing(ch_client, db):
    """A `migrate up` killed -9 (or one whose release never reached the server) leaves its claim row live for
    the 600 s lease; a claim naming a process of this host that no longer exists holds nothing."""
    tracking.ensure_schema(ch_client)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = tracking.AdvisoryLock(ch_client, db)
    killed.owner, killed.claim = f"{socket.gethostname()}:{gone.pid}:killed", tracking.next_version()
    killed._write(0)
    live = tracking.AdvisoryLock(ch_client, db)
    live.owner = f"{socket.gethostname()}:{os.getpid()}:other"
    live.claim = tracking.next_version()
    live._write(0)  # a live holder of this host still refuses
    with pytest.raises(MigrateError, match="locked by another migrate"):
        tracking.AdvisoryLock(ch_client, db).acquire()
    live.release()
    tracking.AdvisoryLock(ch_client, db).acquire().release()


@pytest.mark.parametrize("direction", ["up", "down"])
def test_state_is_reread_under_the_lock(ch_client, db, migrations, migrator_for, monkeypatch, direction):
    """Another runner finishes between our first read and our lock: we must not redo its work."""
    root = migrations(1, "t", "CREATE TABLE {db}.t (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.t")
    if direction == "down":
        migrator_for(db, root).up()
    other, ours = migrator_for(db, root), migrator_for(db, root)
    enter, raced = tracking.AdvisoryLock.__enter__, []

    def racing_enter(lock):
        if not raced:
            raced.append(None)
            raced[0] = getattr(other, direction)(0 if direction == "down" else None)
        return enter(lock)

    monkeypatch.setattr(tracking.AdvisoryLock, "__enter__", racing_enter)
    done = getattr(ours, direction)(0 if direction == "down" else None)
    assert raced == [[1]]  # the other runner did the work ...
    assert done == []      # ... and we saw that under the lock (re-running CREATE/DROP would fail)
    assert ours.status()["current_version"] == (1 if direction == "up" else 0)


# -- {db}, unqualified names, dry-run --------------------------------------------------------------

def test_db_substitution_and_unqualified_names(ch_client, db, migrations, migrator_for):
    before = ch_client.command("SELECT currentDatabase()")
    root = migrations(1, "names", "CREATE TABLE {db}.q (v String) ENGINE = MergeTree ORDER BY v;\n"
                                  "CREATE TABLE plain (v String) ENGINE = MergeTree ORDER BY v;\n"
                                  "INSERT INTO {db}.q VALUES ('{db}');\n"
                                  "INSERT INTO plain SELECT concat(v, '!') FROM q",
                      "DROP TABLE plain; DROP TABLE q")
    assert migrator_for(db, root).up() == [1]
    assert tables(ch_client, db) == ["plain", "q"]
    assert ch_client.command(f"SELECT v FROM {db}.q") == db
    assert ch_client.command(f"SELECT v FROM {db}.plain") == db + "!"
    assert ch_client.command("EXISTS TABLE default.plain") == 0 and ch_client.command("EXISTS TABLE default.q") == 0
    # the shared client is handed back in the database it was in, not left inside the target
    assert ch_client.command("SELECT currentDatabase()") == before
    assert migrator_for(db, root).down(0) == [1]
    assert tables(ch_client, db) == []
    assert ch_client.command("SELECT currentDatabase()") == before


def test_substitute_db_refuses_a_name_that_would_need_quoting():
    assert substitute_db("SELECT * FROM {db}.t WHERE x = '{db}'", "prod_1") == "SELECT * FROM prod_1.t WHERE x = 'prod_1'"
    with pytest.raises(MigrateError) as exc:
        substitute_db("SELECT 1 FROM {db}.t", "x; DROP TABLE y")
    assert str(exc.value) == ("database name 'x; DROP TABLE y' is not a valid identifier "
                              "(letters, digits, _; not starting with a digit)")


def test_invalid_database_name_is_a_one_line_error(ch_client, migrations):
    root = migrations(1, "a", "SELECT 1")
    with pytest.raises(MigrateError) as exc:
        Migrator(Context(client=ch_client, database="x-y", migrations_dir=root))
    assert str(exc.value) == "database name 'x-y' is not a valid identifier (letters, digits, _; not starting with a digit)"


def test_dry_run_prints_the_sql_and_changes_nothing(ch_client, db, migrations, migrator_for):
    root = migrations(1, "t1", T1_UP, "DROP TABLE {db}.t1")
    migrations(2, "t2", T2_UP, "DROP TABLE t2")
    dry = migrator_for(db, root, dry_run=True)
    assert dry.up() == []
    assert dry.lines == [
        "-- 001_t1.up.sql",
        f"CREATE TABLE {db}.t1 (x Int32) ENGINE = MergeTree ORDER BY x;",
        f"INSERT INTO {db}.t1 VALUES (1), (2);",
        "-- 002_t2.up.sql",
        "-- unqualified: lands in the target database\n"
        "CREATE TABLE t2 (k String, v UInt64) ENGINE = ReplacingMergeTree(v) ORDER BY k;",
    ]
    assert tables(ch_client, db) == []
    assert migrator_for(db, root).status()["current_version"] == 0

    assert migrator_for(db, root).up(to=1) == [1]
    dry = migrator_for(db, root, dry_run=True)
    dry.up(to=2)
    assert dry.lines[0] == "-- 002_t2.up.sql"  # only what is pending
    dry = migrator_for(db, root, dry_run=True)
    assert dry.down(0) == []
    assert dry.lines == ["-- 001_t1.down.sql", f"DROP TABLE {db}.t1;"]
    assert tables(ch_client, db) == ["t1"]
    st = migrator_for(db, root).status()
    assert (st["current_version"], st["dirty"]) == (1, False)


# -- --cluster: rewriting on SQL text ----------------------------------------------------------------

CLUSTER_CASES = [
    ("CREATE TABLE d.t (x Int32) ENGINE = MergeTree ORDER BY x",
     "CREATE TABLE d.t ON CLUSTER c (x Int32) ENGINE = ReplicatedMergeTree() ORDER BY x"),
    ("CREATE TABLE IF NOT EXISTS d.t (k String, v UInt64) ENGINE = ReplacingMergeTree(v) ORDER BY k",
     "CREATE TABLE IF NOT EXISTS d.t ON CLUSTER c (k String, v UInt64) ENGINE = ReplicatedReplacingMergeTree(v) ORDER BY k"),
    ("CREATE TABLE d.r (k String, v UInt64, del UInt8) ENGINE = ReplacingMergeTree(v, del) ORDER BY k",
     "CREATE TABLE d.r ON CLUSTER c (k String, v UInt64, del UInt8) ENGINE = ReplicatedReplacingMergeTree(v, del) ORDER BY k"),
    ("CREATE TABLE d.agg (k String, s AggregateFunction(sum, UInt64)) ENGINE = AggregatingMergeTree ORDER BY k",
     "CREATE TABLE d.agg ON CLUSTER c (k String, s AggregateFunction(sum, UInt64)) ENGINE = ReplicatedAggregatingMergeTree() ORDER BY k"),
    ("CREATE TABLE d.s (a Int32, b Int32) ENGINE = SummingMergeTree((a, b)) ORDER BY a",
     "CREATE TABLE d.s ON CLUSTER c (a Int32, b Int32) ENGINE = ReplicatedSummingMergeTree((a, b)) ORDER BY a"),
    ("create table d.t (x Int32) engine=CollapsingMergeTree(sign) order by x",
     "create table d.t ON CLUSTER c (x Int32) ENGINE = ReplicatedCollapsingMergeTree(sign) order by x"),
    ("CREATE TABLE `my db`.`t` (x Int32) ENGINE = MergeTree ORDER BY x",
     "CREATE TABLE `my db`.`t` ON CLUSTER c (x Int32) ENGINE = ReplicatedMergeTree() ORDER BY x"),
    ("CREATE TABLE d.t2 AS d.t", "CREATE TABLE d.t2 ON CLUSTER c AS d.t"),
    ("CREATE MATERIALIZED VIEW IF NOT EXISTS d.mv TO d.agg AS SELECT k, sumState(v) AS s FROM d.t GROUP BY k",
     "CREATE MATERIALIZED VIEW IF NOT EXISTS d.mv ON CLUSTER c TO d.agg AS SELECT k, sumState(v) AS s FROM d.t GROUP BY k"),
    ("CREATE MATERIALIZED VIEW d.mv2 ENGINE = SummingMergeTree ORDER BY k AS SELECT k, 1 AS n FROM d.t",
     "CREATE MATERIALIZED VIEW d.mv2 ON CLUSTER c ENGINE = ReplicatedSummingMergeTree() ORDER BY k AS SELECT k, 1 AS n FROM d.t"),
    ("CREATE OR REPLACE VIEW d.v AS SELECT 1", "CREATE OR REPLACE VIEW d.v ON CLUSTER c AS SELECT 1"),
    ("DROP TABLE IF EXISTS d.t", "DROP TABLE IF EXISTS d.t ON CLUSTER c"),
    ("DROP TABLE d.t SYNC", "DROP TABLE d.t ON CLUSTER c SYNC"),
    ("DROP VIEW d.mv", "DROP VIEW d.mv ON CLUSTER c"),
    ("ALTER TABLE d.t ADD COLUMN y Int32 DEFAULT 0", "ALTER TABLE d.t ON CLUSTER c ADD COLUMN y Int32 DEFAULT 0"),
    ("TRUNCATE TABLE IF EXISTS d.t", "TRUNCATE TABLE IF EXISTS d.t ON CLUSTER c"),
    ("CREATE DATABASE IF NOT EXISTS d", "CREATE DATABASE IF NOT EXISTS d ON CLUSTER c"),
    ("DROP DATABASE d", "DROP DATABASE d ON CLUSTER c"),
    ("RENAME TABLE d.a TO d.b, d.c TO d.e", "RENAME TABLE d.a TO d.b, d.c TO d.e ON CLUSTER c"),
    ("EXCHANGE TABLES d.a AND d.b", "EXCHANGE TABLES d.a AND d.b ON CLUSTER c"),
    # a file's header comment stays on its first statement: the DDL behind it is still rewritten
    ("-- header; with a CREATE TABLE x word\n/* block */\nCREATE TABLE d.t (x Int32) ENGINE = MergeTree ORDER BY x",
     "-- header; with a CREATE TABLE x word\n/* block */\nCREATE TABLE d.t ON CLUSTER c (x Int32) ENGINE = ReplicatedMergeTree() ORDER BY x"),
    # already clustered / already replicated: untouched
    ("CREATE TABLE d.t ON CLUSTER other (x Int32) ENGINE = ReplicatedMergeTree('/p/{shard}', '{replica}') ORDER BY x",
     "CREATE TABLE d.t ON CLUSTER other (x Int32) ENGINE = ReplicatedMergeTree('/p/{shard}', '{replica}') ORDER BY x"),
    ("ALTER TABLE d.t ON CLUSTER c DROP COLUMN y", "ALTER TABLE d.t ON CLUSTER c DROP COLUMN y"),
    # not DDL: untouched
    ("INSERT INTO d.t SELECT number FROM numbers(10)", "INSERT INTO d.t SELECT number FROM numbers(10)"),
    ("SELECT 1", "SELECT 1"),
]


@pytest.mark.parametrize("sql,expected", CLUSTER_CASES, ids=[c[0][:40] for c in CLUSTER_CASES])
def test_cluster_rewrite(sql, expected):
    assert on_cluster(sql, "c") == expected
    assert on_cluster(expected, "c") == expected  # idempotent


def test_cluster_name_must_be_an_identifier():
    with pytest.raises(MigrateError) as exc:
        on_cluster("DROP TABLE d.t", "c; DROP TABLE x")
    assert str(exc.value) == ("cluster name 'c; DROP TABLE x' is not a valid identifier "
                              "(letters, digits, _; not starting with a digit)")


def test_cluster_rewrites_every_statement_of_the_repo_migrations_and_tracking_tables(migrator_for):
    m = migrator_for("prod", REPO / "migrations", cluster="main")
    ddl = 0
    for mig in m.migrations.values():
        for path in (mig.up, mig.down):
            for stmt in m.statements(path):
                body = "\n".join(line for line in stmt.splitlines() if not line.lstrip().startswith("--"))
                if body.lstrip().upper().startswith(("CREATE", "DROP", "ALTER")):
                    ddl += 1
                    assert " ON CLUSTER main" in stmt, stmt
                assert "{db}" not in stmt
                if "MergeTree" in stmt:
                    assert "ENGINE = Replicated" in stmt and "ENGINE = MergeTree" not in stmt, stmt
    assert ddl >= 6
    tracked = [on_cluster(s, "main") for s in tracking.SCHEMA]
    assert all(" ON CLUSTER main" in s for s in tracked)
    assert "ENGINE = ReplicatedReplacingMergeTree(version)" in tracked[1]
    assert "ENGINE = ReplicatedMergeTree()" in tracked[2]


# -- the statement splitter ------------------------------------------------------------------------

SPLIT_CASES = [
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 'a;b'; SELECT 2", ["SELECT 'a;b'", "SELECT 2"]),
    ("SELECT 'it''s; fine'; SELECT 2", ["SELECT 'it''s; fine'", "SELECT 2"]),
    ("SELECT 'it\\'s; fine'; SELECT 2", ["SELECT 'it\\'s; fine'", "SELECT 2"]),
    ("SELECT 'ends with backslash\\\\'; SELECT 2", ["SELECT 'ends with backslash\\\\'", "SELECT 2"]),
    ('SELECT 1 AS "a;b"; SELECT 2', ['SELECT 1 AS "a;b"', "SELECT 2"]),
    ("SELECT 1 AS `x;y`; SELECT 2", ["SELECT 1 AS `x;y`", "SELECT 2"]),
    ("SELECT 1 -- not; a boundary\n; SELECT 2", ["SELECT 1 -- not; a boundary", "SELECT 2"]),
    ("SELECT 1 -- don't\n; SELECT 2", ["SELECT 1 -- don't", "SELECT 2"]),
    ("SELECT /* ; it's */ 1; SELECT 2", ["SELECT /* ; it's */ 1", "SELECT 2"]),
    ("SELECT 1 # hash; comment\n; SELECT 2", ["SELECT 1 # hash; comment", "SELECT 2"]),
    ("SELECT '-- not a comment; /* nor this'; SELECT 2", ["SELECT '-- not a comment; /* nor this'", "SELECT 2"]),
    ("SELECT 1;\n-- the end; really\n/* bye; */\n", ["SELECT 1"]),
    (";;SELECT 1;;  ;\n;SELECT 2;", ["SELECT 1", "SELECT 2"]),
    ("-- nothing\n;/* here */;\n", []),
    ("", []),
]


@pytest.mark.parametrize("sql,expected", SPLIT_CASES, ids=[repr(c[0])[:40] for c in SPLIT_CASES])
def test_splitter(sql, expected):
    assert split_statements(sql) == expected


def test_splitter_edge_cases_on_the_real_engine(ch_client, db, migrations, migrator_for):
    root = migrations(1, "tricky", """
        CREATE TABLE {db}.s (id UInt8, v String) ENGINE = MergeTree ORDER BY id; -- comment; here
        /* block; comment with a ' quote */
        INSERT INTO {db}.s VALUES (1, 'a;b'), (2, 'it''s;'), (3, 'back\\'slash;'), (4, '-- not; comment'),
                                  (5, '/* nor; this */'), (6, 'end\\\\');
        INSERT INTO {db}.s SELECT 7, "v;x" FROM (SELECT 'dq' AS "v;x");;
        INSERT INTO {db}.s SELECT 8, `b;t` FROM (SELECT 'bt' AS `b;t`);
        -- trailing; comment only
        /* and; a block */
        """, "DROP TABLE {db}.s")
    assert len(migrator_for(db, root).statements(root / "001_tricky.up.sql")) == 4
    assert migrator_for(db, root).up() == [1]
    values = [r[0] for r in ch_client.query(f"SELECT v FROM {db}.s ORDER BY id").result_rows]
    assert values == ["a;b", "it's;", "back'slash;", "-- not; comment", "/* nor; this */", "end\\", "dq", "bt"]


# -- discovery: every bad directory is one line naming the file -----------------------------------

def write(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_text("SELECT 1")
    return root


MALFORMED = ": malformed migration file name; expected NNN_name.up.sql, .down.sql, .backfill.sql or .backfill.meta"
BAD_DIRS = {
    "duplicate version": (["001_a.up.sql", "001_a.down.sql", "001_b.up.sql", "001_b.down.sql"],
                          "{r}/001_b.down.sql: duplicate version 1 (also 001_a.down.sql)"),
    "duplicate spelled differently": (["001_a.up.sql", "001_a.down.sql", "1_a.up.sql"],
                                      "{r}/1_a.up.sql: duplicate version 1 (also 001_a.up.sql)"),
    "lone up": (["001_a.up.sql"], "{r}/001_a.up.sql: missing its pair {r}/001_a.down.sql"),
    "lone down": (["001_a.down.sql"], "{r}/001_a.down.sql: missing its pair {r}/001_a.up.sql"),
    "lone backfill.sql": (["001_a.up.sql", "001_a.down.sql", "001_a.backfill.sql"],
                          "{r}/001_a.backfill.sql: missing its pair {r}/001_a.backfill.meta"),
    "lone backfill.meta": (["001_a.up.sql", "001_a.down.sql", "001_a.backfill.meta"],
                           "{r}/001_a.backfill.meta: missing its pair {r}/001_a.backfill.sql"),
    "backfill without up/down": (["001_a.backfill.sql", "001_a.backfill.meta"],
                                 "{r}/001_a.backfill.meta: version 1 has no {r}/001_a.up.sql"),
    "lone validate": (["001_a.up.sql", "001_a.down.sql", "001_a.backfill.validate.sql"],
                      "{r}/001_a.backfill.validate.sql: a validate file needs {r}/001_a.backfill.sql"),
    "no version": (["abc.up.sql"], "{r}/abc.up.sql" + MALFORMED),
    "no name": (["001.up.sql"], "{r}/001.up.sql" + MALFORMED),
    "unknown kind": (["001_a.up.sql", "001_a.down.sql", "001_a.sideways.sql"], "{r}/001_a.sideways.sql" + MALFORMED),
    "version zero": (["000_init.up.sql", "000_init.down.sql"],
                     "{r}/000_init.down.sql: version 0 is reserved for 'nothing applied'; start at 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRS))
def test_bad_migration_directories(tmp_path, ch_client, case):
    names, expected = BAD_DIRS[case]
    root = write(tmp_path / "m", *names)
    with pytest.raises(MigrateError) as exc:
        discover(root)
    assert str(exc.value) == expected.format(r=root)
    with pytest.raises(MigrateError) as exc:  # the runner refuses before touching the database
        Migrator(Context(client=ch_client, database="never_created", migrations_dir=root))
    assert str(exc.value) == expected.format(r=root)
    assert ch_client.command("EXISTS DATABASE never_created") == 0


def test_missing_migrations_directory(tmp_path):
    with pytest.raises(MigrateError) as exc:
        discover(tmp_path / "nope")
    assert str(exc.value) == f"migrations directory {tmp_path / 'nope'} does not exist"


def test_discovery_ignores_other_files_and_allows_gaps(tmp_path):
    root = write(tmp_path / "m", "README.md", ".hidden.sql", "003_c.up.sql", "003_c.down.sql", "001_a.up.sql",
                 "001_a.down.sql", "001_a.backfill.sql", "001_a.backfill.meta")
    (root / "notes").mkdir()
    found = discover(root)
    assert list(found) == [1, 3]
    assert found[1].has_backfill and not found[3].has_backfill
    assert (found[3].name, found[3].up.name) == ("c", "003_c.up.sql")


# -- the CLI in a subprocess (its own embedded store) ----------------------------------------------

def assert_one_line_error(proc, *needles, code=1):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def inspect_store(store: Path, sql: str):
    """Read an embedded store from another process (the CLI has exited, so it is free)."""
    code = ("import json, sys, clickhouse_connect; "
            "c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1]); "
            "print(json.dumps(c.query(sys.argv[2]).result_rows))")
    out = subprocess.run([sys.executable, "-c", code, str(store), sql], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cli_cycle_on_the_repo_migrations(cli):
    repo = discover(REPO / "migrations")
    top = max(repo)

    dry = cli("up", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"-- {repo[min(repo)].up.name}" in dry.stdout and "CREATE TABLE IF NOT EXISTS d.call_parts" in dry.stdout
    assert "applied" not in dry.stdout
    # dry-run changed nothing: neither the target database nor the tracking tables exist
    assert inspect_store(cli.store, "SELECT name FROM system.databases WHERE name IN ('d', 'db_management')") == []

    up = cli("up")
    assert up.returncode == 0, up.stderr
    assert [line for line in up.stdout.splitlines() if line.startswith("applied")] == \
        [f"applied {v} {m.name}" for v, m in repo.items()]
    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["current_version"] == top and st["pending_versions"] == [] and st["dirty"] is False

    down = cli("down", "--to", "0")
    assert down.returncode == 0, down.stderr
    assert [line for line in down.stdout.splitlines() if line.startswith("rolled back")] == \
        [f"rolled back {v} {m.name}" for v, m in sorted(repo.items(), reverse=True)]
    assert inspect_store(cli.store, "SELECT name FROM system.tables WHERE database = 'd'") == []

    again = cli("up")
    assert again.returncode == 0, again.stderr
    assert f"applied {top} {repo[top].name}" in again.stdout


def test_cli_broken_migration_dirty_then_force(cli, migrations):
    root = migrations(1, "one", "CREATE TABLE {db}.one (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.one")
    migrations(2, "broken", "CREATE TABLE {db}.two (x Int32) ENGINE = MergeTree ORDER BY x;\nSELECT no_such_function(1)",
               "DROP TABLE {db}.two")
    up = cli("up", migrations_dir=root)
    line = assert_one_line_error(up, "error: 002_broken.up.sql: version 2 failed: ", "no_such_function")
    assert line.startswith("error: 002_broken.up.sql: version 2 failed")
    assert "applied 1 one" in up.stdout

    st = json.loads(cli("status", "--json", migrations_dir=root).stdout)
    assert (st["current_version"], st["dirty"], st["partially_applied_version"], st["pending_versions"]) == (1, True, 2, [2])

    assert_one_line_error(cli("up", migrations_dir=root), "is dirty: version 2 was partially applied", "migrate force")

    (root / "002_broken.up.sql").write_text("CREATE TABLE IF NOT EXISTS {db}.two (x Int32) ENGINE = MergeTree ORDER BY x")
    forced = cli("force", "1", migrations_dir=root)
    assert forced.returncode == 0 and forced.stdout.strip() == "forced d to version 1", forced.stderr
    fixed = cli("up", migrations_dir=root)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == "applied 2 broken"


def test_cli_errors_are_one_line(cli, tmp_path):
    assert_one_line_error(cli("--database", "x-y", "status"), "error: database name 'x-y' is not a valid identifier")
    missing = tmp_path / "nowhere"
    assert_one_line_error(cli("status", migrations_dir=missing), f"error: migrations directory {missing} does not exist")
    usage = cli("down")  # --to is required: a usage error, exit 2
    assert usage.returncode == 2 and "Missing option '--to'" in usage.stderr and "Traceback" not in usage.stderr


def test_cli_new_scaffolds_the_next_version(cli, project_migrations):
    top = max(discover(project_migrations))
    made = cli("new", "add_index", "--backfill", migrations_dir=project_migrations)
    assert made.returncode == 0, made.stderr
    stem = f"{top + 1:03d}_add_index"
    exts = [".up.sql", ".down.sql", ".backfill.sql", ".backfill.meta", ".backfill.validate.sql"]
    assert made.stdout.splitlines() == [f"created {project_migrations / (stem + e)}" for e in exts]
    found = discover(project_migrations)  # the scaffold is a valid migration directory
    assert max(found) == top + 1 and found[top + 1].has_backfill
    meta = json.loads((project_migrations / f"{stem}.backfill.meta").read_text())
    assert meta["migration_version"] == top + 1 and meta["batch_size"] > 0
    assert "{batch_range}" in (project_migrations / f"{stem}.backfill.sql").read_text()
    assert "{batch_range}" in (project_migrations / f"{stem}.backfill.validate.sql").read_text()

    plain = cli("new", "plain", migrations_dir=project_migrations)
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.splitlines()) == 2 and f"{top + 2:03d}_plain.up.sql" in plain.stdout
    assert_one_line_error(cli("new", "bad name", migrations_dir=project_migrations),
                          "error: name 'bad name': use letters, digits, _ and -")
