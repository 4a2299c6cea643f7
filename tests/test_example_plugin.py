"""The example plugin in examples/migrator-tenant-plugin, installed by pip the way a user would.

`pip install --no-deps --target SITE` builds its wheel from its own pyproject.toml, so the entry
point `migrate` loads comes from a real dist-info that pip wrote, not from one made by hand.
Every `migrate` runs in a subprocess with SITE on PYTHONPATH, its own embedded store, and a
working directory outside the repository (the repository root may hold this project's egg-info,
which would then be found before SITE). The repository itself follows SITE on PYTHONPATH so that
the checked-out `migrator` and `backfill_plugin` are the code under test.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MIGRATE, REPO

from migrator.errors import MigrateError

EXAMPLE = REPO / "examples" / "migrator-tenant-plugin"
HOSTILE = "O'Brien \\ Co'); DROP TABLE {db}.events; --\\"  # quote, backslash, a trailing backslash
HOSTILE_SQL = r"'O\'Brien \\ Co\'); DROP TABLE {db}.events; --\\'"  # how render.escape puts it in '...'
READ_TABLES = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
db = sys.argv[2]
source = client.query(f"SELECT id, kind, payload FROM {db}.events ORDER BY id").result_rows
target = client.query(f"SELECT tenant, id, kind, payload FROM {db}.tenant_events ORDER BY id, tenant").result_rows
print(json.dumps({"source": source, "target": target}))
"""


def offline_build_flags() -> list[str]:
    """Build with this environment's setuptools when it can make a wheel by itself (no download).

    setuptools before 70.1 needs the separate `wheel` package for that; without either, pip builds
    in an isolated environment and fetches the build backend from the package index.
    """
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return []
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return ["--no-build-isolation"]
    return []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The example copied out of the repo (pip builds in the source tree) and pip-installed into SITE."""
    base = tmp_path_factory.mktemp("example_plugin")
    source = base / "migrator-tenant-plugin"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = base / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline_build_flags(),
                           "--target", str(site), str(source)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=base)
    assert proc.returncode == 0, f"pip install of the example failed:\n{proc.stdout}\n{proc.stderr}"
    (info,) = site.glob("migrator_tenant_plugin-*.dist-info")
    assert (info / "entry_points.txt").read_text().split() == ["[migrator]", "tenant", "=", "migrator_tenant"]
    return {"site": site, "migrations": source / "migrations"}


def migrate(installed: dict, workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`migrate ARGS` as a user with the plugin installed runs it, with a store private to `workdir`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_")}  # no stray tenant or debug
    paths = [str(installed["site"]), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    full_env = {**base, "PYTHONPATH": os.pathsep.join(paths), "MIGRATOR_DISABLE_PLUGINS": "",
                "CLICKHOUSE_URL": f"chdb://{workdir / 'store'}", "MIGRATE_DATABASE": "shop",
                "MIGRATE_DIR": str(installed["migrations"]), **env}
    return subprocess.run(MIGRATE + list(args), env=full_env, check=False, capture_output=True, text=True,
                          timeout=300, cwd=workdir)


def test_plugins_lists_the_installed_example_with_its_hooks(installed, tmp_path):
    proc = migrate(installed, tmp_path, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["tenant"] == {"name": "tenant", "hooks": ["backfill_batch_completed", "backfill_placeholders"],
                                 "version": "0.1.0"}  # the version pip recorded in the dist-info
    assert "register_commands" in plugins["backfill"]["hooks"]


def test_a_backfill_uses_the_plugin_placeholder_and_reports_every_batch(installed, tmp_path):
    """The walkthrough of docs/plugins.md: up, backfill run, a hostile tenant lands as data in every row."""
    log = tmp_path / "batches.jsonl"
    env = {"MIGRATE_TENANT": HOSTILE, "MIGRATE_TENANT_BATCH_LOG": str(log)}
    up = migrate(installed, tmp_path, "up", **env)
    assert up.returncode == 0, up.stderr
    assert "backfill 2 registered (pending)" in up.stdout
    run = migrate(installed, tmp_path, "backfill", "run", "2", **env)
    assert run.returncode == 0, run.stderr
    status = migrate(installed, tmp_path, "backfill", "status", "2", "--json", **env)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["status"] == "completed" and summary["batches_completed"] > 1, summary

    read = subprocess.run([sys.executable, "-c", READ_TABLES, f"chdb://{tmp_path / 'store'}", "shop"],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    tables = json.loads(read.stdout)
    assert len(tables["source"]) == 1000  # the hostile value's DROP TABLE stayed text
    assert tables["target"] == [[HOSTILE, *row] for row in tables["source"]]  # row for row, no gap, no duplicate

    batches = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(batches) == summary["batches_completed"]
    assert [b["number"] for b in batches] == list(range(1, len(batches) + 1))
    assert sum(b["rows"] for b in batches) == len(tables["source"])
    assert batches[0]["range_start"] is None and batches[-1]["range_end"] == [999]
    assert all(b["range_start"] == a["range_end"] for a, b in itertools.pairwise(batches))  # contiguous ranges
    assert {(b["backfill_id"], b["version"], b["database"], b["tenant"]) for b in batches} == {
        ("shop_2", 2, "shop", HOSTILE)}


def test_the_tenant_can_come_from_a_file_and_a_bad_source_is_one_line(installed, tmp_path):
    up = migrate(installed, tmp_path, "up")
    assert up.returncode == 0, up.stderr
    tenant_file = tmp_path / "tenant.txt"
    tenant_file.write_text(HOSTILE + "\n")  # the newline an editor adds is not part of the tenant
    dry = migrate(installed, tmp_path, "backfill", "run", "2", "--dry-run", MIGRATE_TENANT_FILE=str(tenant_file))
    assert dry.returncode == 0, dry.stderr
    assert f"SELECT {HOSTILE_SQL}, id, kind, payload" in dry.stdout.splitlines()

    failures = {
        "unset": ({}, "unknown placeholder {tenant}"),
        "missing file": ({"MIGRATE_TENANT_FILE": str(tmp_path / "nope.txt")},
                         f"MIGRATE_TENANT_FILE={tmp_path / 'nope.txt'}: cannot read the tenant"),
    }
    for case, (env, needle) in failures.items():
        proc = migrate(installed, tmp_path, "backfill", "run", "2", **env)
        assert proc.returncode == 1, (case, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (case, proc.stderr)
    status = migrate(installed, tmp_path, "backfill", "status", "2", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "pending"  # refused before the first write


def test_read_tenant_rules(monkeypatch, tmp_path):
    """The plugin's own rules, in-process (no engine involved): file or variable, never both, never empty."""
    spec = importlib.util.spec_from_file_location("migrator_tenant_under_test", EXAMPLE / "migrator_tenant.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    for name in ("MIGRATE_TENANT", "MIGRATE_TENANT_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert plugin.backfill_placeholders(backfill=None, checkpoint={}) is None
    tenant_file = tmp_path / "tenant"
    tenant_file.write_text("acme\r\n")
    monkeypatch.setenv("MIGRATE_TENANT_FILE", str(tenant_file))
    assert plugin.backfill_placeholders(backfill=None, checkpoint={}) == {"tenant": "acme"}
    monkeypatch.setenv("MIGRATE_TENANT", "other")
    with pytest.raises(MigrateError, match="both MIGRATE_TENANT and MIGRATE_TENANT_FILE are set"):
        plugin.read_tenant()
    monkeypatch.delenv("MIGRATE_TENANT")
    tenant_file.write_text("\n")
    with pytest.raises(MigrateError, match=f"MIGRATE_TENANT_FILE={tenant_file}: the file is empty"):
        plugin.read_tenant()
