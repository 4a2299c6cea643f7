"""Fixtures for testing a backfill with pytest; installed with the package (entry point `pytest11`).

Only fixtures: a project that uses none of them sees no change. Every fixture works on a store of its
own under the test's tmp_path, driven by `migrate` subprocesses (an embedded store is one process's at
a time, and kill -9 needs a process to kill).

    def test_copy_is_exactly_once(backfill_migrations, exactly_once):
        backfill_migrations.copy("migrations")          # or .write(1, "copy", up_sql, ...)
        exactly_once(1)                                  # raises, naming the phase, if not
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from . import harness


class Migrations:
    """A migrations folder: `write` one version from strings, or `copy` a folder of them."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, version: int, name: str, up: str, down: str = "SELECT 1", backfill_sql: str | None = None,
              meta: dict | str | None = None, validate: str | None = None) -> Path:
        stem = self.root / f"{version:03d}_{name}"
        Path(f"{stem}.up.sql").write_text(up)
        Path(f"{stem}.down.sql").write_text(down)
        if backfill_sql is not None:
            Path(f"{stem}.backfill.sql").write_text(backfill_sql)
        if meta is not None:
            Path(f"{stem}.backfill.meta").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        if validate is not None:
            Path(f"{stem}.backfill.validate.sql").write_text(validate)
        return self.root

    def copy(self, source) -> Path:
        shutil.copytree(Path(source), self.root, dirs_exist_ok=True)
        return self.root


@pytest.fixture
def backfill_store(tmp_path) -> Path:
    """The path of an embedded store private to this test (created by the first `migrate` on it)."""
    return tmp_path / "backfill-store"


@pytest.fixture
def backfill_migrations(tmp_path) -> Migrations:
    """An empty migrations folder for this test: `.write(version, name, up, ...)` or `.copy(path)`."""
    return Migrations(tmp_path / "migrations")


@pytest.fixture
def migrate_cli(tmp_path, backfill_store, backfill_migrations):
    """`migrate_cli("up")`, `migrate_cli("backfill", "run", 1, database="d")`: `migrate` in a subprocess on
    this test's store and migrations folder; returns the finished process. `.query(sql, ...)` reads the
    store (in a subprocess too)."""
    project = harness.Project(backfill_migrations.root, backfill_store.parent)
    project.store = backfill_store

    def call(*args, database: str = "d", **env):
        return project.migrate(*args, database=database, **env)
    call.query = project.query
    call.project = project
    return call


@pytest.fixture
def exactly_once(tmp_path, backfill_migrations):
    """`exactly_once(version, **options)`: the backfill uninterrupted as the reference, then kill -9 at
    the claim, after the range is written ahead, after the INSERT committed (before the checkpoint) and
    at random instants, resumed each time; each target compared with the reference, every column, and
    duplicate keys counted. Raises ExactlyOnceFailure naming the phase, the range and the first
    differing keys; returns a summary. Options: target=, keys=, data= (SQL or a callable taking the
    database name), at_batch=2, random_kills=3, seed=0, env= (extra environment for each `migrate`),
    checks="refuse" ("warn" runs SQL the checks would refuse)."""
    def run(version: int, **options) -> dict:
        return harness.exactly_once(backfill_migrations.root, tmp_path / f"exactly-once-{version}", version, **options)
    return run
