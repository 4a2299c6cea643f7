"""The migrator at the edges (issue 33): it knows which versions are applied, not only the highest one, and a
command that applied nothing leaves nothing dirty. `migrate` in a subprocess on a store of its own."""

from __future__ import annotations

import json
import shutil

import pytest

from migrator import tracking
from tests.conftest import store_query


@pytest.fixture
def project(tmp_path, migrations, cli):
    """`project.add(v)` writes version v (up: CREATE TABLE t<v>; down: DROP TABLE t<v>); `project(*args)` runs migrate."""

    def add(version: int):
        return migrations(
            version,
            f"t{version}",
            f"CREATE TABLE {{db}}.t{version} (x UInt8) ENGINE = MergeTree ORDER BY x",
            f"DROP TABLE {{db}}.t{version}",
        )

    def call(*args):
        return cli(*args, migrations_dir=migrations.root)

    call.add, call.root, call.store = add, migrations.root, cli.store
    return call


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def error(proc) -> str:
    """The one-line error of a refused command."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def state(project) -> dict:
    return json.loads(ok(project("status", "--json")).stdout)


def tables(project) -> list[str]:
    return [
        r[0] for r in store_query(project.store, "SELECT name FROM system.tables WHERE database = 'd' ORDER BY name")[0]
    ]


# -- 3. an applied version whose files are gone ------------------------------------------------------


def test_down_refuses_an_applied_version_whose_files_are_gone(project):
    for v in (1, 3, 5, 7):
        project.add(v)
    ok(project("up"))
    gone = project.root / "gone"
    gone.mkdir()
    for path in project.root.glob("007_*"):
        shutil.move(str(path), gone / path.name)
    for to in ("5", "3"):
        line = error(project("down", "--to", to))
        assert line == (
            f"error: version 7 is applied to 'd' but its files are gone: no 007_*.down.sql in {project.root}; "
            "restore them, or undo version 7 by hand and run 'migrate force 5'; nothing rolled back"
        ), line
    assert (state(project)["current_version"], state(project)["dirty"]) == (7, False)
    assert tables(project) == ["t1", "t3", "t5", "t7"]
    for path in gone.iterdir():
        shutil.move(str(path), project.root / path.name)
    assert ok(project("down", "--to", "3")).stdout.splitlines() == ["rolled back 7 t7", "rolled back 5 t5"]
    assert tables(project) == ["t1", "t3"] and state(project)["applied_versions"] == [1, 3]


# -- 4. a version added later inside a gap ------------------------------------------------------------


def test_a_version_added_inside_a_gap_is_named_and_never_rolled_back(project):
    for v in (1, 3, 5):
        project.add(v)
    ok(project("up"))
    project.add(4)
    st = state(project)
    assert (st["current_version"], st["missing_versions"], st["pending_versions"]) == (5, [4], [])
    assert (
        "missing:   4 (never applied, below version 5; 'migrate up --allow-missing' applies, "
        "'migrate force 4' marks applied)" in ok(project("status")).stdout
    )
    assert error(project("up")) == (
        "error: database 'd' is at version 5 but 4 (004_t4.up.sql) below it was never applied; "
        "'migrate up --allow-missing' applies it now (in version order), or 'migrate force 4' marks version 4 "
        "applied without running it"
    )
    # down never runs the down file of a version that was not applied
    assert ok(project("down", "--to", "3")).stdout.splitlines() == ["rolled back 5 t5"]
    st = state(project)
    assert (st["current_version"], st["dirty"], st["missing_versions"], st["pending_versions"]) == (
        3,
        False,
        [],
        [4, 5],
    )
    assert tables(project) == ["t1", "t3"]


def test_a_missing_version_is_applied_with_allow_missing_or_marked_with_force(project):
    for v in (1, 3, 5):
        project.add(v)
    ok(project("up"))
    project.add(2)
    project.add(4)
    assert ok(project("up", "--allow-missing")).stdout.splitlines() == ["applied 2 t2", "applied 4 t4"]
    st = state(project)
    assert (st["current_version"], st["applied_versions"], st["missing_versions"]) == (5, [1, 2, 3, 4, 5], [])
    assert tables(project) == ["t1", "t2", "t3", "t4", "t5"]
    project.add(6)
    ok(project("up"))
    store_query(project.store, "DROP TABLE d.t6")  # undone by hand, as an operator would before a force
    project.add(7)
    ok(project("force", "5"))  # back to 5: 6 is no longer applied
    assert state(project)["applied_versions"] == [1, 2, 3, 4, 5]
    assert ok(project("up", "--to", "7")).stdout.splitlines()[:2] == ["applied 6 t6", "applied 7 t7"]
    assert state(project)["applied_versions"] == [1, 2, 3, 4, 5, 6, 7]


def test_force_marks_a_missing_version_applied_without_running_it(project):
    for v in (1, 3):
        project.add(v)
    ok(project("up"))
    project.add(2)
    assert (
        ok(project("force", "2")).stdout.strip()
        == "forced d to version 3; version 2 marked applied (its up file was not run)"
    )
    st = state(project)
    assert (st["current_version"], st["applied_versions"], st["missing_versions"]) == (3, [1, 2, 3], [])
    assert tables(project) == ["t1", "t3"]
    assert ok(project("up")).stdout.strip() == "nothing to apply"


def test_a_tracking_table_of_the_older_shape_assumes_the_versions_up_to_the_current_one(project):
    """A row written before the applied set was kept: every version on disk up to the current one is assumed
    applied (golang-migrate's reading); the first command that writes state adds the column."""
    for v in (1, 2, 3):
        project.add(v)
    older = tracking.SCHEMA[1].replace(",\n        applied_versions Array(UInt64)", "")
    assert "applied_versions" not in older
    store_query(
        project.store,
        "CREATE DATABASE d",
        "CREATE DATABASE db_management",
        older,
        "INSERT INTO db_management.migrations (db_name, curr_version, version) VALUES ('d', 2, 1)",
        "CREATE TABLE d.t1 (x UInt8) ENGINE = MergeTree ORDER BY x",
        "CREATE TABLE d.t2 (x UInt8) ENGINE = MergeTree ORDER BY x",
    )
    st = state(project)
    assert (
        st["current_version"],
        st["applied_versions"],
        st["missing_versions"],
        st["pending_versions"],
        st["applied_recorded"],
    ) == (2, [1, 2], [], [3], False)
    assert ok(project("up")).stdout.splitlines()[0] == "applied 3 t3"
    st = state(project)
    assert (st["applied_versions"], st["applied_recorded"]) == ([1, 2, 3], True)


# -- 5. nothing applied, nothing dirty ------------------------------------------------------------------


def test_an_unknown_cluster_is_refused_before_anything_is_applied(project):
    project.add(1)
    ok(project("up"))
    project.root.joinpath("002_col.up.sql").write_text("ALTER TABLE {db}.t1 ADD COLUMN y UInt8")
    project.root.joinpath("002_col.down.sql").write_text("ALTER TABLE {db}.t1 DROP COLUMN y")
    line = error(project("--cluster", "nosuch", "up"))
    assert (
        line
        == "error: --cluster nosuch: no such cluster on this server (system.clusters; it has none); nothing applied"
    )
    st = state(project)
    assert (st["current_version"], st["dirty"], st["pending_versions"]) == (1, False, [2])


def test_a_failure_before_the_first_statement_leaves_the_version_clean(project):
    """The up file cannot be read (not UTF-8): nothing of version 2 was sent, so it is not dirty."""
    project.add(1)
    ok(project("up"))
    project.root.joinpath("002_bad.up.sql").write_bytes(b"CREATE TABLE {db}.t2 (x UInt8) ENGINE = Log -- \xff\xfe")
    project.root.joinpath("002_bad.down.sql").write_text("DROP TABLE {db}.t2")
    assert "002_bad.up.sql: not UTF-8 text" in error(project("up"))
    st = state(project)
    assert (st["current_version"], st["dirty"], st["partially_applied_version"]) == (1, False, None)
