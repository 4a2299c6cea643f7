"""Shared fixtures: one embedded chDB store per test process, a unique database per test.

chDB lets one process open one store path, so every in-process test shares `ch_client`, and
tests that need their own store (CLI, signals, kill -9) run `migrate` in a subprocess.
Set CLICKHOUSE_URL=http://... to run the in-process tests against a ClickHouse server instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import clickhouse_connect
import pytest

from migrator import connection
from migrator.runner import Context, Migrator

REPO = Path(__file__).resolve().parent.parent
MIGRATE = [sys.executable, "-m", "migrator"]


@pytest.fixture(scope="session")
def store_url(tmp_path_factory):
    """The URL every in-process client of this test process uses (one chDB store per process)."""
    url = os.environ.get("CLICKHOUSE_URL")
    if url and not url.startswith("chdb"):
        return url
    return "chdb://" + str(tmp_path_factory.mktemp("chdb") / "store")


@pytest.fixture(scope="session")
def ch_client(store_url):
    if store_url.startswith("chdb"):
        yield clickhouse_connect.get_client(dsn=store_url)
    else:
        yield connection.connect(connection.resolve(store_url))


@pytest.fixture
def db(ch_client):
    """A fresh database name for this test (created; dropped afterwards)."""
    name = "t_" + uuid.uuid4().hex[:12]
    ch_client.command(f"CREATE DATABASE {name}")
    yield name
    ch_client.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def migrations(tmp_path):
    """A writer for a migrations directory: migrations(version, name, up, down, backfill_sql=, meta=)."""
    root = tmp_path / "migrations"
    root.mkdir()

    def write(version: int, name: str, up: str, down: str = "SELECT 1", backfill_sql=None, meta=None, validate=None):
        stem = root / f"{version:03d}_{name}"
        Path(f"{stem}.up.sql").write_text(up)
        Path(f"{stem}.down.sql").write_text(down)
        if backfill_sql is not None:
            Path(f"{stem}.backfill.sql").write_text(backfill_sql)
        if meta is not None:
            import json
            Path(f"{stem}.backfill.meta").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        if validate is not None:
            Path(f"{stem}.backfill.validate.sql").write_text(validate)
        return root

    write.root = root
    return write


@pytest.fixture
def migrator_for(ch_client):
    """Build a Migrator over `ch_client` for a database and migrations directory."""
    def make(database: str, directory: Path, cluster=None, dry_run=False, echo=None) -> Migrator:
        lines = []
        ctx = Context(client=ch_client, database=database, migrations_dir=Path(directory), cluster=cluster,
                      dry_run=dry_run, echo=echo or lines.append)
        m = Migrator(ctx)
        m.lines = lines
        return m
    return make


@pytest.fixture
def project_migrations(tmp_path):
    """A copy of the repo's migrations/ (001, 020, 021) that a test may add to."""
    dest = tmp_path / "project_migrations"
    shutil.copytree(REPO / "migrations", dest)
    return dest


def run_migrate(args, store: Path, database: str = "d", migrations_dir: Path | None = None, env=None,
                timeout=300, **popen):
    """Run `python -m migrator ...` in a subprocess against its own embedded store."""
    full_env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{store}", "MIGRATE_DATABASE": database,
                "MIGRATE_DIR": str(migrations_dir or REPO / "migrations"), **(env or {})}
    full_env.pop("MIGRATE_DEBUG", None)
    return subprocess.run(MIGRATE + list(args), env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), **popen)


@pytest.fixture
def cli(tmp_path):
    """`cli("up")` runs migrate in a subprocess with a store private to this test."""
    store = tmp_path / "store"

    def call(*args, **kwargs):
        return run_migrate(args, store, **kwargs)
    call.store = store
    return call
