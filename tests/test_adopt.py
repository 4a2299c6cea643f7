"""`migrate adopt` on the real engine: a store the previous migrator wrote, converted without losing its
applied version or its dirty flag. Each test has its own store (db_management is per store), driven
through the CLI in subprocesses, where the one-line error and exit-code contract is what is checked."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_migrate

from migrator import tracking

OLD_DDL = """
            CREATE TABLE IF NOT EXISTS db_management.migrations
            (
                db_name String,
                curr_version UInt64,
                partially_applied_version UInt64 NULL,
            )
            ENGINE = MergeTree()
            ORDER BY (db_name)
        """
OLD_COLUMNS = ("db_management.migrations (db_name String, curr_version UInt64, "
               "partially_applied_version Nullable(UInt64))")
UPS = {1: "CREATE TABLE {db}.a (x Int32) ENGINE = MergeTree ORDER BY x",
       2: "CREATE TABLE {db}.b (x Int32) ENGINE = MergeTree ORDER BY x",
       3: "CREATE TABLE {db}.c (x Int32) ENGINE = MergeTree ORDER BY x"}
NAMES = {1: "a", 2: "b", 3: "c"}


@pytest.fixture
def root(migrations):
    for v, sql in UPS.items():
        migrations(v, NAMES[v], sql, f"DROP TABLE {{db}}.{NAMES[v]}")
    return migrations.root


def sql_on_store(store, statements: list[str], query: str | None = None):
    """Run statements (and an optional query, returned as rows) on a store in a separate process."""
    code = ("import json, sys, clickhouse_connect\n"
            "c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1])\n"
            "args = json.loads(sys.argv[2])\n"
            "for s in args['statements']: c.command(s)\n"
            "print(json.dumps(c.query(args['query']).result_rows if args['query'] else None, default=str))\n")
    args = json.dumps({"statements": statements, "query": query})
    out = subprocess.run([sys.executable, "-c", code, str(store), args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def old_migrator_store(store, applied: int, partial: int | None = None, db: str = "d") -> None:
    """What the old migrator leaves: its table, a first row at version 0, then in-place ALTER ... UPDATEs
    around each version it applied (partially applied first, then applied and cleared), and the tables."""
    def update(assignments: str) -> str:
        return (f"ALTER TABLE db_management.migrations UPDATE {assignments} WHERE db_name = '{db}' "
                "SETTINGS mutations_sync = 2")

    stmts = ["CREATE DATABASE IF NOT EXISTS db_management", OLD_DDL,
             "INSERT INTO db_management.migrations (db_name, curr_version, partially_applied_version) "
             f"VALUES ('{db}', 0, NULL)",
             f"CREATE DATABASE IF NOT EXISTS {db}"]
    for v in range(1, applied + 1):
        stmts += [update(f"partially_applied_version = {v}"), UPS[v].format(db=db),
                  update(f"curr_version = {v}, partially_applied_version = NULL")]
    if partial is not None:
        stmts += [update(f"partially_applied_version = {partial}")]
    sql_on_store(store, stmts)


def one_line_error(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def ok(proc) -> list[str]:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout.strip().splitlines()


def management_tables(store) -> list[str]:
    return [r[0] for r in sql_on_store(store, [], "SELECT name FROM system.tables WHERE database = 'db_management' "
                                                  "ORDER BY name")]


def test_state_commands_refuse_until_adopted_then_adopt_keeps_the_version(cli, root):
    old_migrator_store(cli.store, applied=2)
    for command in (["status"], ["up"], ["down", "--to", "0"], ["force", "2"]):
        line = one_line_error(cli(*command, migrations_dir=root))
        assert line == (f"error: another migrator wrote {OLD_COLUMNS}; run 'migrate adopt' to convert it to this "
                        "tool's tracking tables"), command
    assert sql_on_store(cli.store, [], "SELECT name FROM system.tables WHERE database = 'd' ORDER BY name") == \
        [["a"], ["b"]]  # refused before anything ran
    assert management_tables(cli.store) == ["migrations"]

    out = ok(cli("adopt", migrations_dir=root))
    assert out[0] == "adopted db_management.migrations: d at version 2"
    assert out[1].startswith("the old table is kept as db_management.migrations_pre_adopt_")
    aside = out[1].rsplit(" ", 1)[1]
    assert management_tables(cli.store) == ["migration_locks", "migrations", aside.split(".")[1]]
    assert sql_on_store(cli.store, [], f"SELECT * FROM {aside}") == [["d", 2, None]]  # kept for audit
    engine = sql_on_store(cli.store, [], "SELECT engine FROM system.tables WHERE database = 'db_management' "
                                         "AND name = 'migrations'")
    assert engine == [["ReplacingMergeTree"]]

    st = json.loads(ok(cli("status", "--json", migrations_dir=root))[0])
    assert (st["current_version"], st["dirty"], st["pending_versions"]) == (2, False, [3])
    assert ok(cli("up", migrations_dir=root)) == ["applied 3 c"]  # only what came after the old migrator

    again = ok(cli("adopt", migrations_dir=root))
    assert again == ["nothing to adopt: db_management.migrations and db_management.migration_locks are missing "
                     "or already this tool's; nothing changed"]
    assert management_tables(cli.store) == ["migration_locks", "migrations", aside.split(".")[1]]
    assert json.loads(ok(cli("status", "--json", migrations_dir=root))[0])["current_version"] == 3


def test_dirty_state_survives_adoption(cli, root):
    old_migrator_store(cli.store, applied=1, partial=2)  # the old migrator died inside version 2
    assert "another migrator wrote" in one_line_error(cli("status", migrations_dir=root))
    out = ok(cli("adopt", migrations_dir=root))
    assert out[0] == "adopted db_management.migrations: d at version 1 (dirty: 2 partially applied)"

    st = json.loads(ok(cli("status", "--json", migrations_dir=root))[0])
    assert (st["current_version"], st["dirty"], st["partially_applied_version"]) == (1, True, 2)
    line = one_line_error(cli("up", migrations_dir=root))
    assert "is dirty: version 2 was partially applied" in line and "migrate force" in line
    assert sql_on_store(cli.store, [], "SELECT name FROM system.tables WHERE database = 'd'") == [["a"]]

    assert ok(cli("force", "1", migrations_dir=root)) == ["forced d to version 1"]
    assert ok(cli("up", migrations_dir=root)) == ["applied 2 b", "applied 3 c"]
    assert ok(cli("adopt", migrations_dir=root))[0].startswith("nothing to adopt")


def test_an_old_lock_table_of_another_shape_is_set_aside(cli, root):
    old_migrator_store(cli.store, applied=3, db="one")
    sql_on_store(cli.store, [
        "CREATE TABLE db_management.migration_locks (db_name String, locked_by String, locked_at DateTime) "
        "ENGINE = MergeTree ORDER BY db_name",
        "INSERT INTO db_management.migration_locks VALUES ('one', 'old-host', '2026-01-01 00:00:00')",
        "INSERT INTO db_management.migrations VALUES ('two', 1, NULL)"])
    line = one_line_error(cli("status", migrations_dir=root))
    assert line == (f"error: another migrator wrote {OLD_COLUMNS} and db_management.migration_locks (db_name String, "
                    "locked_by String, locked_at DateTime); run 'migrate adopt' to convert them to this tool's "
                    "tracking tables")
    out = ok(cli("adopt", migrations_dir=root))
    assert out[0] == "adopted db_management.migrations: one at version 3; two at version 1"
    assert out[2].startswith("the old lock table db_management.migration_locks (db_name String, locked_by String, "
                             "locked_at DateTime) is kept as db_management.migration_locks_pre_adopt_")
    kept = out[2].rsplit(" ", 1)[1]
    assert sql_on_store(cli.store, [], f"SELECT db_name, locked_by FROM {kept}") == [["one", "old-host"]]
    for db, version in (("one", 3), ("two", 1)):
        st = json.loads(ok(cli("status", "--json", database=db, migrations_dir=root))[0])
        assert st["current_version"] == version
    assert ok(cli("up", database="two", migrations_dir=root)) == ["applied 2 b", "applied 3 c"]  # takes our lock


def test_an_interrupted_adoption_is_finished_or_redone(cli, root, tmp_path):
    old_migrator_store(cli.store, applied=2)
    staging = tracking.SCHEMA[1].replace(tracking.MIGRATIONS, "db_management.migrations_adopting", 1)
    # died after building the staging table, before the swap: a stale row there must not win
    sql_on_store(cli.store, [staging, "INSERT INTO db_management.migrations_adopting (db_name, curr_version, version) "
                                      "VALUES ('d', 99, 1)"])
    assert ok(cli("adopt", migrations_dir=root))[0] == "adopted db_management.migrations: d at version 2"
    assert json.loads(ok(cli("status", "--json", migrations_dir=root))[0])["current_version"] == 2

    store2 = tmp_path / "store2"
    old_migrator_store(store2, applied=2)
    # died between the two renames: the old table is aside, the staging table holds the state
    sql_on_store(store2, [staging, "INSERT INTO db_management.migrations_adopting (db_name, curr_version, version) "
                                   "VALUES ('d', 2, 1)",
                          "RENAME TABLE db_management.migrations TO db_management.migrations_pre_adopt_x"])
    out = ok(run_migrate(["adopt"], store2, migrations_dir=root))
    assert out == ["finished an interrupted adoption: db_management.migrations_adopting is now "
                   "db_management.migrations"]
    st = json.loads(ok(run_migrate(["status", "--json"], store2, migrations_dir=root))[0])
    assert (st["current_version"], st["dirty"]) == (2, False)


def test_adopt_under_cluster_checks_macros_before_changing_anything(cli, root):
    """chDB defines no {shard}/{replica} macros, so --cluster must stop before the first DDL; the
    statements it would send are checked on their text."""
    old_migrator_store(cli.store, applied=2)
    line = one_line_error(cli("--cluster", "main", "adopt", migrations_dir=root))
    assert line.startswith("error: --cluster: macro {replica}, {shard} is not defined on this server")
    assert management_tables(cli.store) == ["migrations"]  # nothing changed

    code = ("import json, sys, clickhouse_connect\n"
            "from migrator.adopt import plan\nfrom migrator.sqltext import on_cluster\n"
            "p = plan(clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1]), 'S')\n"
            "print(json.dumps([on_cluster(s, 'main') for s in p.before + p.after]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(cli.store)], capture_output=True, text=True, timeout=120,
                         cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    drop, create, swap = json.loads(out.stdout)
    assert drop == "DROP TABLE IF EXISTS db_management.migrations_adopting ON CLUSTER main SYNC"
    assert create.startswith("CREATE TABLE IF NOT EXISTS db_management.migrations_adopting ON CLUSTER main (")
    assert "ENGINE = ReplicatedReplacingMergeTree(version)" in create
    assert swap == ("RENAME TABLE db_management.migrations TO db_management.migrations_pre_adopt_S, "
                    "db_management.migrations_adopting TO db_management.migrations ON CLUSTER main")
