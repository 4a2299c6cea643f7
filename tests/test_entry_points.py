"""Plugins loaded through a REAL entry point (a *.dist-info on PYTHONPATH), and hooks in-process.

The subprocess tests build tiny installed distributions by hand: a module plus
`NAME-VERSION.dist-info/{METADATA,entry_points.txt}` declaring group `migrator`, which is what
`pip install` of a plugin leaves in site-packages. importlib.metadata finds it on sys.path exactly
like an installed one, so this exercises pluggy's `load_setuptools_entrypoints("migrator")`.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

from migrator import hookimpl
from migrator.plugins import pm

GOOD_PLUGIN = '''
import json
import os

import click
from migrator import hookimpl


def _log(event, context, migration):
    with open(os.environ["PROBE_LOG"], "a") as fh:
        fh.write(json.dumps({"event": event, "version": migration.version, "database": context.database}) + "\\n")


@hookimpl
def register_commands(cli):
    @cli.command("probe-hello")
    @click.pass_obj
    def probe_hello(app):
        """Greeting from the probe plugin."""
        click.echo(f"hello from probe to {app.database}")


@hookimpl
def after_migration_applied(context, migration):
    _log("applied", context, migration)


@hookimpl
def after_migration_rolled_back(context, migration):
    _log("rolled_back", context, migration)
'''

MISSPELLED_PLUGIN = '''
from migrator import hookimpl


@hookimpl
def register_comands(cli):  # typo: must not be silently ignored
    pass
'''

WRONG_ARGS_PLUGIN = '''
from migrator import hookimpl


@hookimpl
def after_migration_applied(context, migration, bogus):
    pass
'''


def make_dist(root: Path, project: str, version: str, module: str, source: str, ep_name: str) -> Path:
    """An 'installed' distribution in `root`: the module and its dist-info with a migrator entry point."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{project.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[migrator]\n{ep_name} = {module}\n")
    return root


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    base = tmp_path_factory.mktemp("sites")
    return {
        "good": make_dist(base / "good", "probe-plugin", "0.3.0", "mig_probe_plugin", GOOD_PLUGIN, "probe"),
        "misspelled": make_dist(base / "bad", "typo-plugin", "0.1.0", "mig_typo_plugin", MISSPELLED_PLUGIN, "typo"),
        "wrong_args": make_dist(base / "args", "args-plugin", "0.1.0", "mig_args_plugin", WRONG_ARGS_PLUGIN, "args"),
    }


def path_env(*dirs: Path, **extra) -> dict:
    paths = [str(d) for d in dirs] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {"PYTHONPATH": os.pathsep.join(paths), "MIGRATOR_DISABLE_PLUGINS": "", **extra}


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_plugins_lists_the_entry_point_plugin_and_its_hooks(cli, sites):
    proc = cli("plugins", "--json", env=path_env(sites["good"]))
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["probe"]["hooks"] == ["after_migration_applied", "after_migration_rolled_back",
                                         "register_commands"]
    assert plugins["probe"]["version"] == "0.3.0"  # from the dist-info: loaded as a distribution
    assert "register_commands" in plugins["backfill"]["hooks"]  # the project's own plugin, same path

    text = cli("plugins", env=path_env(sites["good"]))
    assert text.returncode == 0, text.stderr
    assert "probe: after_migration_applied, after_migration_rolled_back, register_commands" in text.stdout.splitlines()


def test_a_command_added_by_register_commands_shows_in_help_and_runs(cli, sites):
    env = path_env(sites["good"])
    helptext = cli("--help", env=env)
    assert helptext.returncode == 0, helptext.stderr
    assert "probe-hello" in helptext.stdout and "Greeting from the probe plugin." in helptext.stdout
    run = cli("--database", "zz", "probe-hello", env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "hello from probe to zz"


def test_entry_point_hooks_fire_during_up_and_down(cli, sites, migrations, tmp_path):
    root = migrations(1, "one", "CREATE TABLE {db}.t1 (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.t1")
    migrations(2, "two", "CREATE TABLE t2 (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE t2")
    log = tmp_path / "probe.log"
    env = path_env(sites["good"], PROBE_LOG=str(log))
    up = cli("up", migrations_dir=root, database="hooked", env=env)
    assert up.returncode == 0, up.stderr
    down = cli("down", "--to", "0", migrations_dir=root, database="hooked", env=env)
    assert down.returncode == 0, down.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events == [{"event": "applied", "version": 1, "database": "hooked"},
                      {"event": "applied", "version": 2, "database": "hooked"},
                      {"event": "rolled_back", "version": 2, "database": "hooked"},
                      {"event": "rolled_back", "version": 1, "database": "hooked"}]


def test_a_misspelled_hookimpl_makes_migrate_fail_on_one_line(cli, sites):
    proc = cli("plugins", env=path_env(sites["misspelled"]))
    assert_one_line_error(proc, "loading plugins failed", "unknown hook 'register_comands'", "mig_typo_plugin")
    assert proc.stdout == ""
    # every command is refused, not only `plugins`: the typo cannot go unnoticed
    assert_one_line_error(cli("status", env=path_env(sites["misspelled"])), "register_comands")


def test_a_hookimpl_with_an_unknown_argument_fails_on_one_line(cli, sites):
    proc = cli("plugins", env=path_env(sites["wrong_args"]))
    assert_one_line_error(proc, "loading plugins failed", "after_migration_applied", "bogus")


def test_disable_env_skips_entry_points(cli, sites):
    env = path_env(sites["good"], sites["misspelled"], MIGRATOR_DISABLE_PLUGINS="1")
    proc = cli("plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr  # the misspelled plugin is not even imported
    assert json.loads(proc.stdout) == []
    helptext = cli("--help", env=env)
    assert helptext.returncode == 0, helptext.stderr
    commands = [line.split()[0] for line in helptext.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert "up" in commands and "plugins" in commands
    assert "probe-hello" not in commands and "backfill" not in commands


# -- in-process: an inline plugin object registered on the shared manager ---------------------------

class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def after_migration_applied(self, context, migration):
        self.events.append(("applied", migration.version, context.database, context.dry_run))

    @hookimpl
    def after_migration_rolled_back(self, context, migration):
        self.events.append(("rolled_back", migration.version, context.database))

    @hookimpl
    def register_backfill(self, context, migration):
        self.events.append(("backfill", migration.version, migration.has_backfill))
        return f"recorder saw backfill {migration.version}"


@pytest.fixture
def recorder():
    rec = Recorder()
    pm.register(rec)
    try:
        yield rec
    finally:
        pm.unregister(rec)
    assert not pm.is_registered(rec)


def test_inline_plugin_sees_apply_backfill_and_rollback(recorder, ch_client, db, migrations, migrator_for):
    root = migrations(1, "src", "CREATE TABLE {db}.src (x UInt32) ENGINE = MergeTree ORDER BY x;"
                                "INSERT INTO {db}.src SELECT number FROM numbers(10)", "DROP TABLE {db}.src")
    migrations(2, "copy", "CREATE TABLE {db}.dst (x UInt32) ENGINE = MergeTree ORDER BY x "
               "SETTINGS non_replicated_deduplication_window = 100", "DROP TABLE {db}.dst",
               backfill_sql="INSERT INTO {db}.dst SELECT x FROM {db}.src WHERE {batch_range}",
               meta={"migration_version": 2, "batch_size": 5, "checkpoint_columns": ["x"], "source_table": "src",
                     "min_batch_size": 1})

    dry = migrator_for(db, root, dry_run=True)
    dry.up()
    assert recorder.events == []  # --dry-run applies nothing, so no hook fires

    m = migrator_for(db, root)
    assert m.up() == [1, 2]
    assert recorder.events == [("applied", 1, db, False), ("applied", 2, db, False), ("backfill", 2, True)]
    assert "recorder saw backfill 2" in m.lines
    assert ch_client.command(f"EXISTS TABLE {db}.dst") == 1

    recorder.events.clear()
    assert migrator_for(db, root).down(0) == [2, 1]
    assert recorder.events == [("rolled_back", 2, db), ("rolled_back", 1, db)]
    assert ch_client.command(f"EXISTS TABLE {db}.src") == 0


def test_inline_plugin_is_gone_after_unregister(ch_client, db, migrations, migrator_for):
    rec = Recorder()
    pm.register(rec)
    try:
        assert any(impl.plugin is rec for impl in pm.hook.after_migration_applied.get_hookimpls())
    finally:
        pm.unregister(rec)
    root = migrations(1, "one", "CREATE TABLE {db}.t (x Int32) ENGINE = MergeTree ORDER BY x", "DROP TABLE {db}.t")
    assert migrator_for(db, root).up() == [1]
    assert rec.events == []


def test_check_pending_rejects_a_misspelled_inline_hookimpl():
    class Typo:
        @hookimpl
        def after_migration_aplied(self, context, migration):
            pass

    typo = Typo()
    pm.register(typo)  # pluggy accepts unknown names at registration time...
    try:
        with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'after_migration_aplied'"):
            pm.check_pending()  # ...and check_pending() is what makes the typo loud
    finally:
        pm.unregister(typo)
    pm.check_pending()  # the manager is clean again


PLACEHOLDER_PLUGIN = '''
import sys

import click
from migrator import hookimpl

AFTER_BACKFILL = "backfill_plugin.plugin" in sys.modules  # which entry point loaded first


@hookimpl
def register_commands(cli):
    @cli.command("tenant-hello")
    def tenant_hello():
        click.echo(f"tenant plugin loaded {'after' if AFTER_BACKFILL else 'before'} the backfill plugin")


@hookimpl
def backfill_placeholders(backfill, checkpoint):
    return {"tenant": "acme"}
'''


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_plugin_implementing_backfill_hooks_loads_in_either_order(tmp_path, order):
    """A third party implementing a backfill hook must not depend on loading after the backfill plugin.

    On PYTHONPATH its dist-info is found before site-packages (it loads first); appended to sys.path
    after site-packages it loads after the backfill plugin. The working directory is not the repo,
    whose egg-info would otherwise be found first.
    """
    site = make_dist(tmp_path / "site", "tenant-plugin", "0.1.0", "mig_tenant_plugin", PLACEHOLDER_PLUGIN, "tenant")
    boot = ("import sys; sys.path.append(sys.argv.pop(1)); sys.argv[0] = 'migrate'; "
            "from migrator.cli import main; main()")
    env = {**os.environ, "MIGRATOR_DISABLE_PLUGINS": "", "CLICKHOUSE_URL": f"chdb://{tmp_path / 'store'}"}
    if order == "before":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "migrator"]
    else:
        argv = [sys.executable, "-c", boot, str(site)]
    run = functools.partial(subprocess.run, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    proc = run(argv + ["plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    names = [p["name"] for p in json.loads(proc.stdout)]
    assert "tenant" in names and "backfill" in names
    hello = run(argv + ["tenant-hello"])
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == f"tenant plugin loaded {order} the backfill plugin"
