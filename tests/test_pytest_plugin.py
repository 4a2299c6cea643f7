"""The pytest plugin shipped in the wheel: a user project with one backfill and one test that calls
`exactly_once` passes for correct SQL and fails, naming the phase, for SQL that is not exactly-once.

The project lives outside the checkout and runs in a fresh virtual environment holding only the built
wheel; its dependencies are this environment's own packages (linked in, the editable install of
this checkout left out), so nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from backfill_plugin.testing.harness import ExactlyOnceFailure
from tests.conftest import REPO

UP = """
CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {db}.src SELECT toString(number % 5), number, toString(number * 3) FROM numbers(1000);
CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
"""
META = '{"migration_version": 1, "batch_size": 200, "checkpoint_columns": ["a", "b"], "source_table": "src"}'
ANTI_JOIN = ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} "
             "AND (a, b) NOT IN (SELECT a, b FROM {db}.dst WHERE {batch_range} AND {retry_count} > 0)")
CASES = {  # SQL -> what the failure must name (None: the test passes)
    "correct": (ANTI_JOIN, None),
    "no-anti-join": ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}",
                     "killed after the INSERT committed, before the checkpoint (batch 2)"),
    "limit-instead-of-range": ("INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src ORDER BY a, b LIMIT {batch_size}",
                               "uninterrupted run (the reference, no kill)"),
    "anti-join-ignores-retry-count": (ANTI_JOIN.replace("{retry_count} > 0", "{retry_count} = 0"),
                                      "killed after the INSERT committed, before the checkpoint (batch 2)"),
}
# The user's test. checks="warn": SQL the framework would refuse at `up` still runs, so the harness
# shows what it does to the target (with the default, `up` refuses two of these SQL files outright).
USER_TEST = '''
from pathlib import Path

import backfill_plugin


def test_backfill_is_exactly_once(backfill_migrations, exactly_once):
    assert "site-packages" in backfill_plugin.__file__, backfill_plugin.__file__  # the wheel, not a checkout
    backfill_migrations.copy(Path(__file__).parent / "migrations")
    print(exactly_once(1, checks="warn", random_kills=2))
'''


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory) -> Path:
    """A fresh venv with only the wheel built from this checkout installed (plus linked dependencies)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "migrator", "backfill_plugin", "backfill_metrics"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip"]
    run = {"capture_output": True, "text": True, "timeout": 300}
    built = subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
                           **run)
    assert built.returncode == 0, built.stderr
    venv = tmp / "venv"
    assert subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run).returncode == 0
    python = venv / "bin" / "python"
    wheel = next((tmp / "dist").glob("clickhouse_migrator-*.whl"))
    installed = subprocess.run(pip + ["--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                               **run)
    assert installed.returncode == 0, installed.stderr
    deps = tmp / "deps"  # this environment's packages, without the editable install of the checkout
    deps.mkdir()
    own = Path(sysconfig.get_paths()["purelib"])
    for entry in own.iterdir():
        if entry.name.startswith(("clickhouse_migrator", "__editable__", "_distutils_hack")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          **run).stdout.strip()
    (Path(site) / "deps.pth").write_text(str(deps) + "\n")
    return python


def user_project(root: Path, sql: str) -> Path:
    migrations = root / "migrations"
    migrations.mkdir(parents=True)
    for suffix, text in ((".up.sql", UP), (".down.sql", "SELECT 1"), (".backfill.sql", sql),
                         (".backfill.meta", META)):
        (migrations / f"001_copy{suffix}").write_text(text)
    (root / "test_backfill.py").write_text(USER_TEST)
    return root


@pytest.mark.timeout(600)
def test_exactly_once_from_the_wheel_passes_good_sql_and_names_the_phase_of_bad_sql(wheel_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST", "CLICKHOUSE", "MIGRATE"))}
    procs = {}
    for name, (sql, _) in CASES.items():  # one user project per SQL, all four at once
        root = user_project(tmp_path / name, sql)
        procs[name] = subprocess.Popen([str(wheel_python), "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                        "-p", "no:xdist", "-p", "no:timeout", "test_backfill.py"], cwd=str(root),
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, (_, phase) in CASES.items():
        out, _ = procs[name].communicate(timeout=540)
        if phase is None:
            assert procs[name].returncode == 0, out
            assert "1 passed" in out and "'duplicate_keys': 0" in out, out
        else:
            assert procs[name].returncode == 1, out
            assert "ExactlyOnceFailure" in out and phase in out, out
            assert "1 failed" in out, out


def test_exactly_once_with_data_from_a_callback(backfill_migrations, exactly_once):
    """The `data` option: the up file creates empty tables, a callback gives each database its rows."""
    up = "\n".join(line for line in UP.splitlines() if not line.startswith("INSERT"))
    backfill_migrations.write(1, "copy", up, backfill_sql=ANTI_JOIN, meta=META)
    seen = []

    def rows(database):
        seen.append(database)
        return [f"INSERT INTO {database}.src SELECT toString(number % 3), number, 'x' FROM numbers(700)"]
    summary = exactly_once(1, data=rows, random_kills=0)
    assert summary["rows"] == 700 and set(summary["scenarios"]) == {"claimed", "written_ahead", "committed"}
    assert all(s["rows"] == 700 and s["duplicate_keys"] == 0 and s["kills"] == 1
               for s in summary["scenarios"].values()), summary
    assert sorted(seen) == sorted(["reference", "claimed", "written_ahead", "committed"])


def test_exactly_once_fails_a_sql_that_writes_another_value_on_a_replay(backfill_migrations, exactly_once):
    """Keys alone are not enough: a SQL that writes every key once but another non-key value on a replay
    fails the harness, naming the phase and the keys whose rows differ."""
    wrong = ANTI_JOIN.replace("SELECT a, b, v FROM", "SELECT a, b, if({retry_count} > 0, 'replayed', v) FROM")
    backfill_migrations.write(1, "copy", UP, backfill_sql=wrong, meta=META)
    with pytest.raises(ExactlyOnceFailure) as failure:
        exactly_once(1, random_kills=0)
    text = str(failure.value)
    assert text.startswith("killed after the range was written ahead, before its INSERT (batch 2): dst differs "
                           "from the reference: 1000 rows vs 1000 in the reference; rows not in the reference at keys"), text
    assert "reference rows missing at keys" in text and "duplicate" not in text
