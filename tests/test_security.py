"""Credentials never leak: not in output, errors, --dry-run SQL, status JSON, tracking tables or files.

Every command runs as a subprocess with distinctive secrets set (CLICKHOUSE_PASSWORD and a URL's
userinfo); its stdout and stderr are searched for them, raw and percent-encoded. On the embedded
store the tracking tables and every file of the store and its control folder are searched too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_migrate  # noqa: E402  (the subprocess runner the `cli` fixture uses)

REPO = Path(__file__).resolve().parent.parent
ENV_SECRET = "Env-Zebra-Secret-4d7c"
URL_SECRET = "Url:Zebra@Secret/9e1b"  # needs percent-encoding inside a URL
URL_SECRET_QUOTED = urllib.parse.quote(URL_SECRET, safe="")
SECRETS = [ENV_SECRET, URL_SECRET, URL_SECRET_QUOTED, "Zebra"]

UP = """
CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {db}.src SELECT toString(number % 7), toUInt32(number), toString(number) FROM numbers(500);
CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
    SETTINGS non_replicated_deduplication_window = 1000;
"""
DOWN = "DROP TABLE IF EXISTS {db}.dst; DROP TABLE IF EXISTS {db}.src"
COPY = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range} AND {tag:String} != ''"
META = {"migration_version": 1, "batch_size": 100, "min_batch_size": 10, "checkpoint_columns": ["a", "b"],
        "source_table": "src", "params": {"tag": "x", "started": {"sql": "SELECT toString(now())"}}}

DUMP_ALL = r"""
import json, sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
out = {}
for (table,) in client.query("SELECT name FROM system.tables WHERE database = 'db_management'").result_rows:
    out[table] = [[str(v) for v in row] for row in client.query(f"SELECT * FROM db_management.{table}").result_rows]
print(json.dumps(out))
"""


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def assert_no_secret(proc, command) -> None:
    found = leaks(proc.stdout + proc.stderr)
    assert not found, f"{command} printed {found}: {proc.stdout!r} {proc.stderr!r}"


@pytest.fixture
def project(migrations):
    return migrations(1, "x", UP, DOWN, COPY, META)


def test_embedded_store_commands_tables_and_files_never_hold_the_password(cli, project):
    env = {"CLICKHOUSE_PASSWORD": ENV_SECRET}
    commands = [
        (("up",), 0), (("status",), 0), (("status", "--json"), 0),
        (("backfill", "list"), 0), (("backfill", "list", "--json"), 0),
        (("backfill", "status", "1", "--json"), 0), (("backfill", "run", "1", "--dry-run"), 0),
        (("backfill", "run", "1", "--max-batches", "2"), 0), (("backfill", "status", "1"), 0),
        (("backfill", "run", "1"), 0), (("backfill", "status", "1", "--json"), 0),
        (("backfill", "run", "99"), 1), (("backfill", "resume", "1"), 1),
        (("backfill", "run", "1", "--param", "nope=1"), 1), (("--debug", "backfill", "run", "99"), 1),
        (("--url", "ftp://u:" + ENV_SECRET + "@h/", "status"), 1),
    ]
    for args, code in commands:
        proc = cli(*args, migrations_dir=project, env=env)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert_no_secret(proc, args)
    status = json.loads(cli("backfill", "status", "1", "--json", migrations_dir=project, env=env).stdout)
    assert status["status"] == "completed" and status["rows_processed"] == 500  # the commands did real work
    dumped = subprocess.run([sys.executable, "-c", DUMP_ALL, f"chdb://{cli.store}"], capture_output=True, text=True,
                            timeout=120, cwd=str(REPO))
    assert dumped.returncode == 0, dumped.stderr
    tables = json.loads(dumped.stdout)
    assert {"backfills", "migrations", "migration_locks"} <= set(tables)
    assert not leaks(dumped.stdout)
    control = cli.store.with_name(cli.store.name + ".control")
    files = [p for root in (cli.store, control) if root.exists() for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], path


URLS = {
    "env-url": ("CLICKHOUSE_URL", f"http://user:{URL_SECRET_QUOTED}@127.0.0.1:1/"),
    "flag-url": ("--url", f"http://user:{URL_SECRET_QUOTED}@127.0.0.1:1/"),
    "https-url": ("CLICKHOUSE_URL", f"https://user:{URL_SECRET_QUOTED}@127.0.0.1:1/"),
    "unquoted-url": ("CLICKHOUSE_URL", f"http://user:{ENV_SECRET}@127.0.0.1:1/db"),
    "bad-scheme": ("CLICKHOUSE_URL", f"ftp://user:{URL_SECRET_QUOTED}@127.0.0.1:1/"),
}
SERVER_COMMANDS = [("up",), ("status", "--json"), ("backfill", "list", "--json"), ("backfill", "status", "1", "--json"),
                   ("backfill", "run", "1", "--dry-run"), ("backfill", "run", "1"), ("--debug", "up")]


def _server_run(where: str, url: str, args: tuple, project: Path, tmp_path: Path):
    env = {"CLICKHOUSE_PASSWORD": ENV_SECRET}
    if where == "--url":
        args = ("--url", url) + args
    else:
        env["CLICKHOUSE_URL"] = url
    # run_migrate points CLICKHOUSE_URL at a store; the env given here overrides it
    return run_migrate(list(args), tmp_path / "unused-store", migrations_dir=project, env=env, timeout=120)


@pytest.mark.parametrize("case", list(URLS))
def test_server_url_password_never_shown_when_the_connection_fails(project, tmp_path, case):
    where, url = URLS[case]
    for args in SERVER_COMMANDS:
        proc = _server_run(where, url, args, project, tmp_path)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert_no_secret(proc, args)
        if "--debug" not in args:
            assert "Traceback" not in proc.stderr
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, proc.stderr
            assert "***" in errors[0]  # redacted where it was, so the operator still sees which URL failed
            if case != "bad-scheme":
                assert errors[0].startswith("error: cannot connect to http")
                assert "127.0.0.1:1" in errors[0]


def test_failed_server_connection_is_exactly_one_line(project, tmp_path):
    proc = _server_run("CLICKHOUSE_URL", URLS["env-url"][1], ("up",), project, tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- URLs that do not parse: the password is found and masked without the URL parser ------------------
HALVES = ("Kx7Tq", "Mw4Rz")  # distinctive: a piece of the password on either side of the character
MALFORMED = {c: f"http://admin:{HALVES[0]}{c}{HALVES[1]}@127.0.0.1:1" for c in "#/?[@"}


def test_a_password_holding_hash_slash_question_bracket_or_at_never_shows_whole_or_in_part(tmp_path):
    """`migrate --url URL status` (and with --debug) for a password with each character that breaks or
    moves the URL parser's user-info: neither half of the password in stdout or stderr, one line
    without --debug."""
    procs = {}
    for char, url in MALFORMED.items():
        for debug in ((), ("--debug",)):
            procs[char, debug] = subprocess.Popen(
                [sys.executable, "-m", "migrator", *debug, "--url", url, "status"], cwd=str(tmp_path),
                env={k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "MIGRATE_"))},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for (char, debug), proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (char, debug, out, err)
        shown = [h for h in HALVES if h in out + err]
        assert not shown, f"{char!r} {debug}: {shown} in {out!r} {err!r}"
        assert "admin:***@127.0.0.1:1" in err, (char, debug, err)  # the operator still sees which URL
        if not debug:
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            if char != "@":  # an unencoded @ parses (the last @ ends the user-info); the others cannot
                assert "cannot be read as a URL; percent-encode the characters # / ? [ ] @ : %" in err, err


@pytest.mark.parametrize("text", [
    "cannot reach http://admin:Kx7Tq#Mw4Rz@db.example:8123 (timeout)",
    "--url 'https://u:Kx7Tq/Mw4Rz@h:1/x' is bad",
    "a:(http://u:Kx7Tq[Mw4Rz@h) b:[https://v:Kx7Tq@Mw4Rz@h2:9]",
])
def test_redact_masks_the_user_info_of_urls_that_do_not_parse(text):
    from migrator.connection import redact
    masked = redact(text)
    assert not [h for h in HALVES if h in masked], masked
    assert "://u:***@" in masked or "://admin:***@" in masked


def test_log_lines_are_redacted(caplog):
    import logging

    from migrator.cli import redact_logs
    saved = logging.getLogRecordFactory()
    redact_logs()
    try:
        with caplog.at_level(logging.WARNING, logger="backfill"):
            logging.getLogger("backfill").warning("batch failed (%s)", "for url http://a:Kx7Tq?Mw4Rz@h:1")
    finally:
        logging.setLogRecordFactory(saved)
    assert caplog.messages == ["batch failed (for url http://a:***@h:1)"]
