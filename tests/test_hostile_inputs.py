"""Hostile and malformed inputs: each is one line naming the culprit, a non-zero exit, no traceback,
and nothing already written is lost or changed. Hostile key values are processed correctly.

CLI-level checks run `python -m migrator` in a subprocess on a store private to the test (the
`cli` fixture) after a partial run, and compare the tracking rows and the target before and after.
Fine-grained checks use the loaders and the manager in-process on the shared `ch_client`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backfill_plugin import ClickHouseBackfillManager
from backfill_plugin.errors import BackfillError
from backfill_plugin.spec.meta import load_spec
from backfill_plugin.spec.render import render
from migrator.discovery import discover
from migrator.errors import MigrateError
from tests.conftest import (
    REPO,
    assert_copied_exactly,
    assert_copied_through,
    fingerprint,
    fingerprint_sql,
    run_migrate,
    store_query,
)

# A migration's `{db}` is substituted even inside literals, so the key '{db}' is spelled '{' || 'db}'.
PREFIXES = r"""['', 'it''s', 'back\\slash', 'new\nline', 'tab\tcr\r', 'üñí ✓ 日本', '"dq"', 'x\\''y', '\\''', '{' || 'db}']"""


def up_sql(rows: int) -> str:
    """src in two INSERTs (two parts, interleaved keys): 10 rows per key value of `a`, (a, b) unique."""
    half = rows // 2
    select = (f"SELECT arrayElement({PREFIXES}, (number % 10) + 1) || "
              f"if(intDiv(number, 100) = 0, '', toString(intDiv(number, 100))), "
              f"toUInt32(intDiv(number % 100, 10)), concat('v', toString(number))")
    return (f"CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);\n"
            f"INSERT INTO {{db}}.src {select} FROM numbers(0, {half});\n"
            f"INSERT INTO {{db}}.src {select} FROM numbers({half}, {rows - half});\n"
            f"CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
            f"SETTINGS non_replicated_deduplication_window = 1000;\n")


ROWS = 2000
UP = up_sql(ROWS)
DOWN = "DROP TABLE IF EXISTS {db}.dst; DROP TABLE IF EXISTS {db}.src"
COPY = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
META = {"migration_version": 1, "batch_size": 100, "min_batch_size": 10, "checkpoint_columns": ["a", "b"],
        "source_table": "src"}
ALLOWED = ("migration_version, batch_size, checkpoint_columns, source_table, description, timeout_seconds, "
           "run_on_startup, max_retries, min_batch_size, max_batch_size, target_batch_seconds, max_rows_per_second, "
           "max_target_parts, max_pending_mutations, max_replica_delay_seconds, settings, params, publish")

def dump(store: Path) -> dict:
    """Every tracking row, and the fingerprints (every column, duplicated keys) of the source and the
    target, read by a subprocess (one store per process)."""
    rows, dst, src = store_query(store, "SELECT * FROM db_management.backfills ORDER BY version",
                                 fingerprint_sql("d.dst"), fingerprint_sql("d.src"))
    return {"rows": rows, "dst": dst[0], "src": src[0], "dups": dst[0][3]}


def tracking_rows(client, db: str) -> tuple:
    """(rows, newest version) of backfill {db}_1 in the tracking table: a claim or any write shows."""
    return client.query("SELECT count(), max(version) FROM db_management.backfills WHERE backfill_id = {b:String}",
                        parameters={"b": f"{db}_1"}).result_rows[0]


def one_line_error(proc) -> str:
    """The contract: non-zero exit, no traceback, exactly one line on stderr; returns it."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _prepare(store: Path, root: Path) -> dict:
    """001 applied and 3 batches of its backfill done: something to lose."""
    for name, text in (("up.sql", UP), ("down.sql", DOWN), ("backfill.sql", COPY), ("backfill.meta", json.dumps(META))):
        (root / f"001_x.{name}").write_text(text)
    proc = run_migrate(["up"], store, migrations_dir=root)
    assert proc.returncode == 0, proc.stderr
    proc = run_migrate(["backfill", "run", "1", "--max-batches", "3"], store, migrations_dir=root)
    assert proc.returncode == 0, proc.stderr
    before = dump(store)
    assert before["dst"][0] == 300
    return before


@pytest.fixture
def prepared(cli, tmp_path):
    """A private prepared store, for tests that go on to change it: (migrations root, dump before)."""
    root = tmp_path / "prepared_migrations"
    root.mkdir()
    return root, _prepare(cli.store, root)


class Shared:
    """One prepared store for the tests that must leave it unchanged (each checks it and restores files)."""

    def __init__(self, base: Path):
        self.store, self.root = base / "store", base / "migrations"
        self.root.mkdir()
        self.before = _prepare(self.store, self.root)
        self.files = {p.name: p.read_text() for p in self.root.iterdir()}

    def cli(self, *args, database: str = "d"):
        return run_migrate(list(args), self.store, database=database, migrations_dir=self.root)

    def restore(self) -> None:
        for path in self.root.iterdir():
            path.unlink()
        for name, text in self.files.items():
            (self.root / name).write_text(text)

    def assert_unchanged(self) -> None:
        assert dump(self.store) == self.before


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return Shared(tmp_path_factory.mktemp("hostile_shared"))


def finish_exactly(cli, root: Path) -> None:
    """After the bad input is gone, the backfill completes and the target equals the source."""
    proc = cli("backfill", "run", "1", migrations_dir=root)
    assert proc.returncode == 0, proc.stderr
    after = dump(cli.store)
    assert after["dst"] == after["src"] and after["src"][0] == ROWS
    assert after["dups"] == 0


# -- meta files: every field, in-process (fine-grained, exact messages) --------------------------
def _meta_with(**changes) -> dict:
    out = dict(META)
    for key, value in changes.items():
        if value is ...:
            out.pop(key)
        else:
            out[key] = value
    return out


META_CASES = [
    # (id, meta text or dict, message after "<path>: ")
    ("malformed-json", '{"migration_version": 1,,}',
     "invalid JSON at line 1 column 25: Expecting property name enclosed in double quotes"),
    ("truncated-json", '{"migration_version": 1', "invalid JSON at line 1 column 24: Expecting ',' delimiter"),
    ("empty-file", "", "invalid JSON at line 1 column 1: Expecting value"),
    ("not-an-object", "[1, 2]", "must be a JSON object"),
    ("duplicate-field", '{"migration_version": 1, "batch_size": 100, "batch_size": 5, "checkpoint_columns": ["a"], '
                        '"source_table": "src"}', "duplicate field 'batch_size'"),
    ("unknown-field", _meta_with(batchsize=10), f"unknown field 'batchsize' (allowed: {ALLOWED})"),
    ("missing-migration_version", _meta_with(migration_version=...), "missing required field 'migration_version'"),
    ("missing-batch_size", _meta_with(batch_size=...), "missing required field 'batch_size'"),
    ("missing-checkpoint_columns", _meta_with(checkpoint_columns=...), "missing required field 'checkpoint_columns'"),
    ("missing-source_table", _meta_with(source_table=...), "missing required field 'source_table'"),
    ("version-as-text", _meta_with(migration_version="1"), "field 'migration_version' must be an integer (got \"1\")"),
    ("version-negative", _meta_with(migration_version=-1), "field 'migration_version' must be >= 0 (got -1)"),
    ("version-mismatch", _meta_with(migration_version=2),
     "field 'migration_version' is 2 but the file name says 1"),
    ("batch_size-zero", _meta_with(batch_size=0), "field 'batch_size' must be >= 1 (got 0)"),
    ("batch_size-float", _meta_with(batch_size=1.5), "field 'batch_size' must be an integer (got 1.5)"),
    ("batch_size-bool", _meta_with(batch_size=True), "field 'batch_size' must be an integer (got true)"),
    ("batch_size-huge", _meta_with(batch_size=10 ** 20),
     "field 'batch_size' must be <= 9223372036854775807 (got 100000000000000000000)"),
    ("columns-text", _meta_with(checkpoint_columns="a"),
     "field 'checkpoint_columns' must be a non-empty list of column names (got \"a\")"),
    ("columns-empty", _meta_with(checkpoint_columns=[]),
     "field 'checkpoint_columns' must be a non-empty list of column names (got [])"),
    ("columns-expression", _meta_with(checkpoint_columns=["a", "lower(b)"]),
     "field 'checkpoint_columns' must list plain column names (got [\"a\", \"lower(b)\"])"),
    ("columns-repeated", _meta_with(checkpoint_columns=["a", "a"]),
     "field 'checkpoint_columns' must not repeat a column (got [\"a\", \"a\"])"),
    ("source_table-qualified", _meta_with(source_table="d.src"),
     "field 'source_table' must be a table name (letters, digits, _) (got \"d.src\")"),
    ("source_table-injection", _meta_with(source_table="src; DROP TABLE src"),
     "field 'source_table' must be a table name (letters, digits, _) (got \"src; DROP TABLE src\")"),
    ("source_table-number", _meta_with(source_table=5),
     "field 'source_table' must be a table name (letters, digits, _) (got 5)"),
    ("description-number", _meta_with(description=5), "field 'description' must be a string (got 5)"),
    ("timeout-zero", _meta_with(timeout_seconds=0), "field 'timeout_seconds' must be > 0 (got 0)"),
    ("timeout-text", _meta_with(timeout_seconds="60"), "field 'timeout_seconds' must be a number (got \"60\")"),
    ("timeout-nan", '{"migration_version": 1, "batch_size": 100, "checkpoint_columns": ["a"], "source_table": "src", '
                    '"timeout_seconds": NaN}', "field 'timeout_seconds' must be a finite number (got NaN)"),
    ("timeout-infinity", '{"migration_version": 1, "batch_size": 100, "checkpoint_columns": ["a"], "source_table": "src", '
                         '"timeout_seconds": Infinity}', "field 'timeout_seconds' must be a finite number (got Infinity)"),
    ("run_on_startup-text", _meta_with(run_on_startup="yes"),
     "field 'run_on_startup' must be true or false (got \"yes\")"),
    ("max_retries-negative", _meta_with(max_retries=-1), "field 'max_retries' must be >= 0 (got -1)"),
    ("min_batch_size-zero", _meta_with(min_batch_size=0), "field 'min_batch_size' must be >= 1 (got 0)"),
    ("min_batch_size-above-batch_size", _meta_with(min_batch_size=101),
     "field 'min_batch_size' (101) is larger than 'batch_size' (100)"),
    ("settings-list", _meta_with(settings=["max_threads"]),
     "field 'settings' must be an object of ClickHouse settings (got [\"max_threads\"])"),
    ("settings-nested", _meta_with(settings={"max_memory_usage": {"value": 1}}),
     "field 'settings' entry 'max_memory_usage' must be a setting name with a scalar value "
     "(got {\"max_memory_usage\": {\"value\": 1}})"),
    ("settings-bad-name", _meta_with(settings={"max threads": 1}),
     "field 'settings' entry 'max threads' must be a setting name with a scalar value (got {\"max threads\": 1})"),
    ("settings-owned-token", _meta_with(settings={"insert_deduplication_token": "fixed"}),  # lost all but batch 1
     "field 'settings' entry 'insert_deduplication_token' is set by the backfill itself (one token per batch "
     "range); remove it (got {\"insert_deduplication_token\": \"fixed\"})"),
    ("settings-owned-dedup", _meta_with(settings={"insert_deduplicate": 0}),
     "field 'settings' entry 'insert_deduplicate' is set by the backfill itself (exactly-once replays); remove it "
     "(got {\"insert_deduplicate\": 0})"),
    ("settings-owned-timeout", _meta_with(settings={"max_execution_time": 5}),  # was silently overridden
     "field 'settings' entry 'max_execution_time' is set from field 'timeout_seconds'; use that field "
     "(got {\"max_execution_time\": 5})"),
    ("settings-null", _meta_with(settings={"max_threads": None}),
     "field 'settings' entry 'max_threads' must be a setting name with a scalar value (got {\"max_threads\": null})"),
    ("params-list", _meta_with(params=[1]), "field 'params' must be an object of name: value (got [1])"),
    ("params-reserved-db", _meta_with(params={"db": "x"}),
     "field 'params' name 'db' is not allowed (identifier, not a framework placeholder) (got {\"db\": \"x\"})"),
    ("params-reserved-checkpoint", _meta_with(params={"checkpoint_a": 1}),
     "field 'params' name 'checkpoint_a' is not allowed (identifier, not a framework placeholder) "
     "(got {\"checkpoint_a\": 1})"),
    ("params-bad-name", _meta_with(params={"a-b": 1}),
     "field 'params' name 'a-b' is not allowed (identifier, not a framework placeholder) (got {\"a-b\": 1})"),
    ("params-list-value", _meta_with(params={"x": [1]}),
     "field 'params' 'x' must be a constant or {\"sql\": \"SELECT ...\"} (got {\"x\": [1]})"),
    ("params-sql-not-text", _meta_with(params={"x": {"sql": 1}}),
     "field 'params' 'x' must be a constant or {\"sql\": \"SELECT ...\"} (got {\"x\": {\"sql\": 1}})"),
    ("params-sql-extra-key", _meta_with(params={"x": {"sql": "SELECT 1", "ttl": 5}}),
     "field 'params' 'x' must be a constant or {\"sql\": \"SELECT ...\"} (got {\"x\": {\"sql\": \"SELECT 1\", \"ttl\": 5}})"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_invalid_meta_is_one_line_naming_file_and_field(migrations, text, message):
    root = migrations(1, "x", "SELECT 1", "SELECT 1", COPY, text)
    path = root / "001_x.backfill.meta"
    with pytest.raises(BackfillError) as info:
        load_spec(discover(root)[1])
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)


def test_valid_meta_gets_its_defaults(migrations):
    root = migrations(1, "x", "SELECT 1", "SELECT 1", COPY, META)
    spec = load_spec(discover(root)[1])
    assert spec.meta == {**META, "description": "", "timeout_seconds": 3600, "run_on_startup": False,
                         "max_retries": 3, "settings": {}, "params": {}, "publish": None, "max_batch_size": 1000,
                         "target_batch_seconds": "off", "max_rows_per_second": "off", "max_target_parts": "auto",
                         "max_pending_mutations": 10, "max_replica_delay_seconds": 300}


# -- meta files at the CLI: nothing written is lost or changed -----------------------------------
CLI_META_CASES = ["malformed-json", "duplicate-field", "unknown-field", "version-mismatch", "batch_size-bool",
                  "source_table-injection", "timeout-nan", "min_batch_size-above-batch_size", "params-reserved-db",
                  "settings-owned-token"]


def test_cli_rejects_each_bad_meta_and_keeps_all_progress(shared):
    meta_path = shared.root / "001_x.backfill.meta"
    cases = {c[0]: c for c in META_CASES}
    wrong = []
    try:
        for n, case in enumerate(CLI_META_CASES):
            _, text, message = cases[case]
            meta_path.write_text(text if isinstance(text, str) else json.dumps(text))
            command = ("backfill", "list") if n % 3 == 2 else ("backfill", "run", "1")
            line = one_line_error(shared.cli(*command))
            if line != f"error: {meta_path}: {message}":
                wrong.append((case, command, line))
        meta_path.write_bytes(b'{"description": "caf\xe9"}')  # Latin-1, not UTF-8
        line = one_line_error(shared.cli("backfill", "run", "1"))
        if line != f"error: {meta_path}: not UTF-8 text (byte 20: invalid continuation byte)":
            wrong.append(("latin-1", line))
    finally:
        shared.restore()
    assert not wrong, wrong
    shared.assert_unchanged()


def test_cli_up_with_a_bad_meta_applies_nothing(cli, migrations):
    root = migrations(1, "x", UP, DOWN, COPY, {**META, "bogus": 1})
    line = one_line_error(cli("up", migrations_dir=root))
    assert line == f"error: {root / '001_x.backfill.meta'}: unknown field 'bogus' (allowed: {ALLOWED})"
    status = json.loads(cli("status", "--json", migrations_dir=root).stdout)
    assert status["current_version"] == 0  # nothing applied, so a fixed meta registers on the next `up`


# -- files that do not pair up, duplicate or malformed versions ----------------------------------
def _directory_cases(root: Path) -> list[tuple[str, callable, str]]:
    sql, meta = root / "001_x.backfill.sql", root / "001_x.backfill.meta"

    def move(path):
        return lambda: path.rename(path.with_name(path.name + ".away"))

    def add(name, text="SELECT 1"):
        return lambda: (root / name).write_text(text)

    return [
        ("meta-without-sql", move(sql), f"error: {meta}: missing its pair {root}/001_x.backfill.sql"),
        ("sql-without-meta", move(meta), f"error: {sql}: missing its pair {root}/001_x.backfill.meta"),
        ("duplicate-version", add("001_y.up.sql"),
         f"error: {root}/001_y.up.sql: duplicate version 1 (also 001_x.backfill.meta)"),
        ("same-version-other-padding", add("01_x.up.sql"),
         f"error: {root}/01_x.up.sql: duplicate version 1 (also 001_x.up.sql)"),
        ("malformed-version", add("1a_oops.up.sql"),
         f"error: {root}/1a_oops.up.sql: malformed migration file name; expected NNN_name.up.sql, .down.sql, "
         f".backfill.sql or .backfill.meta"),
        ("malformed-kind", add("002_x.backfil.sql"),
         f"error: {root}/002_x.backfil.sql: malformed migration file name; expected NNN_name.up.sql, .down.sql, "
         f".backfill.sql or .backfill.meta"),
        ("version-zero", add("000_zero.up.sql"),
         f"error: {root}/000_zero.up.sql: version 0 is reserved for 'nothing applied'; start at 1"),
    ]


def test_cli_rejects_a_bad_migrations_directory_and_keeps_all_progress(shared):
    wrong = []
    try:
        for n, (case, breaks, expected) in enumerate(_directory_cases(shared.root)):
            breaks()
            command = ("up",) if n % 2 else ("backfill", "run", "1")
            line = one_line_error(shared.cli(*command))
            if line != expected:
                wrong.append((case, command, line, expected))
            shared.restore()
    finally:
        shared.restore()
    assert not wrong, wrong
    shared.assert_unchanged()


# -- the source table does not fit the meta --------------------------------------------------------
SOURCE_CASES = [
    ("column-missing", {"checkpoint_columns": ["a", "zz"]},
     "{meta}: field 'checkpoint_columns': column 'zz' is not in {db}.src"),
    ("not-a-prefix", {"checkpoint_columns": ["b"]},
     "{meta}: field 'checkpoint_columns' ['b'] must be a prefix of {db}.src's sorting key (a, b): column 'b' (UInt32) "
     "is at position 1, where the key has a"),
    ("prefix-out-of-order", {"checkpoint_columns": ["b", "a"]},
     "{meta}: field 'checkpoint_columns' ['b', 'a'] must be a prefix of {db}.src's sorting key (a, b): column 'b' "
     "(UInt32) is at position 1, where the key has a"),
    ("table-missing", {"source_table": "nope"}, "{meta}: field 'source_table': table {db}.nope does not exist"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES])
def test_meta_that_does_not_fit_the_source_is_refused_before_any_write(ch_client, db, migrations, migrator_for,
                                                                     change, message):
    root = migrations(1, "x", UP, DOWN, COPY, META)
    migrator_for(db, root).up()
    (root / "001_x.backfill.meta").write_text(json.dumps({**META, **change}))
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    before = tracking_rows(ch_client, db)
    with pytest.raises(BackfillError) as info:
        manager.run_backfill(db, 1)
    assert str(info.value) == message.format(meta=root / "001_x.backfill.meta", db=db)
    assert tracking_rows(ch_client, db) == before  # not even a claim was written
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_nullable_checkpoint_column_is_refused(ch_client, db, migrations, migrator_for):
    """NULL is neither < nor > a position: keyset batches would skip those rows and still 'complete'."""
    up = ("CREATE TABLE {db}.src (a Nullable(String), b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
          "SETTINGS allow_nullable_key = 1;\n"
          "INSERT INTO {db}.src SELECT if(number % 4 = 0, NULL, toString(number % 6)), toUInt32(number), '' "
          "FROM numbers(40);\n"
          "CREATE TABLE {db}.dst (a Nullable(String), b UInt32, v String) ENGINE = MergeTree ORDER BY b")
    root = migrations(1, "x", up, DOWN, COPY, META)
    message = (f"{root / '001_x.backfill.meta'}: field 'checkpoint_columns': column 'a' is "
               f"Nullable(String); a checkpoint column must not be Nullable")
    with pytest.raises(BackfillError) as info:  # said at `up`, on the schema the up file would create
        migrator_for(db, root).up()
    assert str(info.value) == message
    assert ch_client.command(f"SELECT count() FROM system.tables WHERE database = '{db}'") == 0
    for suffix in (".backfill.sql", ".backfill.meta"):  # applied without its backfill, which comes later:
        (root / f"001_x{suffix}").rename(root.parent / f"001_x{suffix}")  # the run refuses it too
    migrator_for(db, root).up()
    for suffix in (".backfill.sql", ".backfill.meta"):
        (root.parent / f"001_x{suffix}").rename(root / f"001_x{suffix}")
    with pytest.raises(BackfillError) as info:
        ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)
    assert str(info.value) == message
    assert ch_client.command(f"SELECT count() FROM {db}.dst") == 0


def test_cli_meta_that_does_not_fit_the_source_keeps_all_progress(shared):
    meta_path = shared.root / "001_x.backfill.meta"
    wrong = []
    try:
        for case, change, message in SOURCE_CASES:
            meta_path.write_text(json.dumps({**META, **change}))
            line = one_line_error(shared.cli("backfill", "run", "1"))
            if line != "error: " + message.format(meta=meta_path, db="d"):
                wrong.append((case, line))
    finally:
        shared.restore()
    assert not wrong, wrong
    shared.assert_unchanged()


# -- unknown placeholders --------------------------------------------------------------------------
@pytest.mark.parametrize("sql", [COPY + " AND v != '{nope}'", COPY + " AND v != {nope:String}"], ids=["literal", "typed"])
def test_unknown_placeholder_is_named_before_any_write(ch_client, db, migrations, migrator_for, sql):
    root = migrations(1, "x", UP, DOWN, COPY, META)
    migrator_for(db, root).up()
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    position = manager.run_backfill(db, 1, max_batches=2)["position"]
    done = tracking_rows(ch_client, db)
    (root / "001_x.backfill.sql").write_text(sql)
    with pytest.raises(BackfillError) as info:
        manager.run_backfill(db, 1)
    message = str(info.value)
    assert message.startswith(f"{root / '001_x.backfill.sql'}: unknown placeholder {{nope}} (known: ")
    assert "\n" not in message
    known = message.split("(known: ", 1)[1].rstrip(")").split(", ")
    assert {"db", "batch_size", "retry_count", "batch_range", "checkpoint_a", "checkpoint_b",
            "batch_end_a", "batch_end_b"} <= set(known)
    assert tracking_rows(ch_client, db) == done  # not even a claim was written
    assert_copied_through(ch_client, db, position, 200)
    (root / "001_x.backfill.sql").write_text(COPY)
    assert manager.run_backfill(db, 1)["stopped"] == "completed"
    assert_copied_exactly(ch_client, db, ROWS)


@pytest.mark.parametrize("sql, problem", [
    (COPY + "; SELECT 1", "must hold exactly one SQL statement (found 2)"),
    ("-- nothing but a comment\n", "must hold exactly one SQL statement (found 0)"),
], ids=["two-statements", "no-statement"])
def test_backfill_sql_must_be_one_statement(ch_client, db, migrations, migrator_for, sql, problem):
    root = migrations(1, "x", UP, DOWN, COPY, META)
    migrator_for(db, root).up()
    (root / "001_x.backfill.sql").write_text(sql)
    with pytest.raises(BackfillError) as info:
        ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)
    assert str(info.value) == f"{root / '001_x.backfill.sql'}: {problem}"


def test_cli_unknown_placeholder_is_one_line_and_changes_nothing(shared):
    sql_path = shared.root / "001_x.backfill.sql"
    try:
        sql_path.write_text(COPY + " AND '{tenant}' != ''")
        line = one_line_error(shared.cli("backfill", "run", "1"))
    finally:
        shared.restore()
    assert line.startswith(f"error: {sql_path}: unknown placeholder {{tenant}} (known: ")
    shared.assert_unchanged()


def test_cli_backfill_sql_not_utf8_names_the_file(shared):
    sql_path = shared.root / "001_x.backfill.sql"
    try:
        sql_path.write_bytes(COPY.encode() + b" AND v != 'caf\xe9'")
        line = one_line_error(shared.cli("backfill", "run", "1"))
    finally:
        shared.restore()
    assert line.startswith(f"error: {sql_path}: ")


# -- corrupt checkpoint_data -----------------------------------------------------------------------
CORRUPT = r"""
import sys, clickhouse_connect
from backfill_plugin.protocol.checkpoint import CheckpointStore
from migrator.tracking import next_version
client = clickhouse_connect.get_client(dsn=sys.argv[1])
store = CheckpointStore(client)
if sys.argv[2] == "repair":  # re-insert the newest good row as the newest version
    rows = client.query("SELECT * EXCEPT version FROM db_management.backfills WHERE backfill_id = 'd_1' "
                        "AND writer != 'hand' "
                        "ORDER BY version DESC LIMIT 1").result_rows
    cols = [c for c in client.query("SELECT * EXCEPT version FROM db_management.backfills LIMIT 0").column_names]
    client.insert("db_management.backfills", [list(rows[0]) + [next_version()]], column_names=cols + ["version"])
else:
    client.command("INSERT INTO db_management.backfills (backfill_id, migration_version, db_name, status, "
                   "checkpoint_data, rows_processed, version, writer) SELECT 'd_1', 1, 'd', 'running', "
                   "{c:String}, 300, {v:UInt64}, 'hand'", parameters={"c": sys.argv[2], "v": next_version()})
    print(client.command("SELECT max(version) FROM db_management.backfills"))
"""


def corrupt(store: Path, data: str) -> str:
    proc = subprocess.run([sys.executable, "-c", CORRUPT, f"chdb://{store}", data], capture_output=True,
                          text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("valid JSON")


CORRUPTIONS = [
    ("truncated-json", '{"position": ["a", 1], "rows_processed": 3', _json_error('{"position": ["a", 1], "rows_processed": 3')),
    ("not-an-object", "[1, 2]", "not a JSON object"),
    ("empty", "", "empty"),  # used to be read as {} and silently restarted from zero
    ("no-position", '{"rows_processed": 300}', "no position recorded"),  # likewise
    ("position-text", '{"position": "k000", "rows_processed": 300}', "position is not a list of key values"),
    ("in-flight-text", '{"position": null, "in_flight": "next", "rows_processed": 0}', "in_flight is not a key range"),
    ("rows-text", '{"position": null, "rows_processed": "many"}', "rows_processed is not an integer"),
]


def test_cli_corrupt_checkpoint_is_an_error_never_a_restart(cli, prepared):
    root, before = prepared
    wrong = []
    for n, (case, data, reason) in enumerate(CORRUPTIONS):
        version = corrupt(cli.store, data)
        expected = (f"error: checkpoint_data of backfill d_1 (row version {version}) is corrupt ({reason}); nothing "
                    f"was run. Repair it by inserting a corrected row, or start over with "
                    f"'migrate backfill reset 1 --yes'")
        commands = [("backfill", "run", "1")]
        if n == 0:
            commands += [("backfill", "resume", "1"), ("backfill", "status", "1", "--json"), ("backfill", "list"),
                         ("backfill", "pause", "1")]
        for command in commands:
            line = one_line_error(cli(*command, migrations_dir=root))
            if line != expected:
                wrong.append((case, command, line))
    assert not wrong, wrong
    corrupted = dump(cli.store)
    assert corrupted["dst"] == before["dst"]  # nothing ran
    assert corrupted["rows"][:len(before["rows"])] == before["rows"]
    assert len(corrupted["rows"]) == len(before["rows"]) + len(CORRUPTIONS)  # only the corrupt rows were added
    repaired = subprocess.run([sys.executable, "-c", CORRUPT, f"chdb://{cli.store}", "repair"],
                              capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert repaired.returncode == 0, repaired.stderr
    finish_exactly(cli, root)


def test_corrupt_checkpoint_in_process_names_the_row_and_runs_nothing(ch_client, db, migrations, migrator_for):
    from migrator.tracking import next_version
    root = migrations(1, "x", UP, DOWN, COPY, META)
    migrator_for(db, root).up()
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    position = manager.run_backfill(db, 1, max_batches=2)["position"]
    version = next_version()
    ch_client.command("INSERT INTO db_management.backfills (backfill_id, migration_version, db_name, status, "
                      "checkpoint_data, rows_processed, version) VALUES ({b:String}, 1, {d:String}, 'running', "
                      "{c:String}, 200, {v:UInt64})",
                      parameters={"b": f"{db}_1", "d": db, "v": version, "c": '{"position": '})
    expected = (f"checkpoint_data of backfill {db}_1 (row version {version}) is corrupt (Expecting value: line 1 "
                f"column 14 (char 13)); nothing was run. Repair it by inserting a corrected row, or start over with "
                f"'migrate backfill reset 1 --yes'")
    for call in (lambda: manager.run_backfill(db, 1), lambda: manager.get_status(db, 1),
                 lambda: manager.list_backfills(db), lambda: manager.resume_backfill(db, 1),
                 lambda: manager.pause_backfill(db, 1)):
        with pytest.raises(BackfillError) as info:
            call()
        assert str(info.value) == expected
    assert_copied_through(ch_client, db, position, 200)  # nothing ran
    assert tracking_rows(ch_client, db)[1] == version
    manager.reset_backfill(db, 1)  # the other remedy the message names: start over
    assert manager.run_backfill(db, 1)["stopped"] == "completed"
    assert_copied_exactly(ch_client, db, ROWS)  # the replayed ranges were deduplicated


def test_lease_with_fields_no_runner_writes_is_taken_over(ch_client, db, migrations, migrator_for):
    """A lease whose heartbeat and pid are not numbers (hand-edited) is not a live runner: no crash.
    The hand edit is a new tracking row written with SQL, as an operator would."""
    import socket

    from migrator.tracking import next_version
    root = migrations(1, "x", UP, DOWN, COPY, META)
    migrator_for(db, root).up()
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    manager.run_backfill(db, 1, max_batches=1)
    checkpoint = manager.get_status(db, 1, live_counts=False)["checkpoint"]
    checkpoint["lease"] = {"owner": "someone", "host": socket.gethostname(), "pid": "abc", "heartbeat": "soon"}
    ch_client.command("INSERT INTO db_management.backfills (backfill_id, migration_version, db_name, status, "
                      "checkpoint_data, rows_processed, version, writer) VALUES ({b:String}, 1, {d:String}, "
                      "'running', {c:String}, {r:UInt64}, {v:UInt64}, 'someone')",
                      parameters={"b": f"{db}_1", "d": db, "c": json.dumps(checkpoint),
                                  "r": checkpoint["rows_processed"], "v": next_version()})
    assert manager.get_status(db, 1, live_counts=False)["lease"]["pid"] == "abc"
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1)
    assert result["stopped"] == "completed" and result["rows_processed"] == ROWS
    assert_copied_exactly(ch_client, db, ROWS)


# -- database names --------------------------------------------------------------------------------
BAD_NAMES = ["bad-name", "1db", "d; DROP DATABASE d", "dé", "d.x", "d`x"]


def test_cli_invalid_database_name_is_refused_and_keeps_all_progress(shared):
    wrong = []
    for n, name in enumerate(BAD_NAMES):
        expected = (f"error: database name {name!r} is not a valid identifier "
                    f"(letters, digits, _; not starting with a digit)")
        commands = [("up",), ("backfill", "run", "1"), ("backfill", "list")] if n == 0 else [("backfill", "run", "1")]
        for command in commands:
            line = one_line_error(shared.cli(*command, database=name))
            if line != expected:
                wrong.append((name, command, line))
    assert not wrong, wrong
    shared.assert_unchanged()


@pytest.mark.parametrize("name", BAD_NAMES + [""])
def test_manager_refuses_an_invalid_database_name(ch_client, migrations, name):
    root = migrations(1, "x", UP, DOWN, COPY, META)
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    with pytest.raises(MigrateError, match=r"is not a valid identifier"):
        manager.run_backfill(name, 1)


# -- hostile key values and parameters: processed correctly ------------------------------------------
HOSTILE = ["", "'", "''", "\\", "\\'", "it's", "back\\slash", "new\nline", "tab\tcr\r", "üñí ✓ 日本 🦆",
           "{db}", "{batch_range}", "'; DROP TABLE x; --", "\\N", "NULL", "a\x00b"]


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v) for v in HOSTILE])
def test_rendered_values_round_trip_through_the_engine(ch_client, value):
    """A value substituted into '...' and the same value bound as {name:String} both come back intact."""
    sql, params = render("SELECT '{x}' AS literal, {x:String} AS bound, {n} AS n", {"x": value, "n": 42})
    literal, bound, n = ch_client.query(sql, parameters=params).result_rows[0]
    assert literal == value
    assert bound == value
    assert n == 42


PLACEHOLDER_COLUMNS = "end_lit String, end_bound String, cp_lit String"  # what the batch SQL rendered


def test_hostile_keys_in_one_key_column_with_ties_and_placeholders(ch_client, db, migrations, migrator_for):
    """checkpoint_columns ["a"]: every row of a key lands in one batch (LIMIT WITH TIES) even across parts;
    {checkpoint_a}, {batch_end_a} inside '...' and {batch_end_a:String} bound must all hold exactly. The
    SQL selects with {batch_range} alone and writes the rendered placeholders beside each row, so a
    range bug and a rendering bug both show."""
    sql = ("INSERT INTO {db}.dst SELECT a, b, v, '{batch_end_a}', {batch_end_a:String}, '{checkpoint_a}' "
           "FROM {db}.src WHERE {batch_range}")
    rows = 600  # 60 keys of 10 rows, group 0 holding the bare hostile prefixes
    up = up_sql(rows).replace("{db}.dst (a String, b UInt32, v String)",
                              f"{{db}}.dst (a String, b UInt32, v String, {PLACEHOLDER_COLUMNS})")
    root = migrations(1, "x", up, DOWN, sql,
                      {**META, "checkpoint_columns": ["a"], "batch_size": 5, "min_batch_size": 1})
    migrator_for(db, root).up()
    batches = []
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    result = manager.run_backfill(db, 1, on_batch=lambda summary, event: batches.append(event))
    assert result["stopped"] == "completed"
    assert result["rows_processed"] == rows
    got = fingerprint(ch_client, f"(SELECT a, b, v FROM {db}.dst)")
    assert got == fingerprint(ch_client, f"{db}.src") and got[0] == rows and got[3] == 0
    # each batch is one whole key, and the rendered bounds are the framework's
    checks = ch_client.query(f"SELECT countIf(a != end_lit), countIf(end_bound != end_lit), "
                             f"countIf(a <= cp_lit AND NOT (a = '' AND cp_lit = '')) FROM {db}.dst").result_rows
    assert checks == [(0, 0, 0)]
    ends = [e["range_end"][0] for e in batches]
    assert len(ends) == len(set(ends))
    assert all(e["rows"] == 10 for e in batches)  # LIMIT 5 WITH TIES: each batch is one whole key (10 rows)
    rendered = set(ch_client.query(f"SELECT DISTINCT end_lit, cp_lit FROM {db}.dst").result_rows)
    assert rendered == {(e["range_end"][0], (e["range_start"] or [""])[0]) for e in batches}
    keys = {k for (k,) in ch_client.query(f"SELECT DISTINCT a FROM {db}.src").result_rows}
    assert {"", "it's", "back\\slash", "new\nline", "tab\tcr\r", "üñí ✓ 日本", "x\\'y", "\\'", "{db}"} <= keys
    assert set(ends) == keys  # every hostile value was a batch end, rendered into the SQL


BINARY_UP = """
CREATE TABLE {db}.src (k String, f FixedString(3), n UInt32) ENGINE = MergeTree ORDER BY (k, f, n);
INSERT INTO {db}.src SELECT concat(unhex(['FF', 'C3', 'E282', '', '00', 'C3A9', '5C27']::Array(String)[number % 7 + 1]),
    toString(number % 5)), toFixedString(unhex(['', '00', 'FF', '27', '5C00'][number % 5 + 1]), 3), toUInt32(number)
    FROM numbers(700);
CREATE TABLE {db}.dst (k String, f FixedString(3), n UInt32) ENGINE = MergeTree ORDER BY (k, f, n)
    SETTINGS non_replicated_deduplication_window = 1000;
"""


def test_binary_keys_fixedstring_and_bytes_that_are_not_utf8_copy_exactly(ch_client, db, migrations, migrator_for):
    """Key bytes that are not UTF-8 (\\xFF, a lone \\xC3, NUL) and FixedString padding: read exactly,
    stored in the checkpoint, rendered as '\\xHH' inside '...' and bound as {name:String}. (They came
    back from clickhouse-connect as hex text and FixedString as bytes: an endless loop and an error.)"""
    sql = ("INSERT INTO {db}.dst SELECT k, f, n, '{batch_end_k}', {batch_end_k:String}, '{checkpoint_k}' "
           "FROM {db}.src WHERE {batch_range}")  # the range alone; the rendered placeholders kept beside each row
    up = BINARY_UP.replace("{db}.dst (k String, f FixedString(3), n UInt32)",
                           f"{{db}}.dst (k String, f FixedString(3), n UInt32, {PLACEHOLDER_COLUMNS})")
    root = migrations(1, "x", up, DOWN, sql, {**META, "checkpoint_columns": ["k", "f"], "batch_size": 40,
                                                       "min_batch_size": 1})
    migrator_for(db, root).up()
    first = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1, max_batches=8)
    assert first["stopped"] == "max batches"
    assert any("\udcff" in str(v) or "\udce2" in str(v) or "\udcc3" in str(v) for v in first["position"])
    # reloads the position; bounded, since a key read back wrong loops on one range forever
    result = ClickHouseBackfillManager(ch_client, migrations_dir=root).run_backfill(db, 1, max_batches=60)
    assert result["stopped"] == "completed" and result["rows_processed"] == 700
    got = fingerprint(ch_client, f"(SELECT k, f, n FROM {db}.dst)", keys="k, f, n")
    assert got == fingerprint(ch_client, f"{db}.src", keys="k, f, n") and got[0] == 700 and got[3] == 0
    for a, b in ((f"{db}.src", f"(SELECT k, f, n FROM {db}.dst)"), (f"(SELECT k, f, n FROM {db}.dst)", f"{db}.src")):
        assert ch_client.command(f"SELECT count() FROM (SELECT * FROM {a} EXCEPT SELECT * FROM {b})") == 0
    # the bytes rendered into '...' and bound as {name:String} are the batch end; rows lie in (checkpoint, end]
    assert ch_client.query(f"SELECT countIf(end_bound != end_lit), countIf(k > end_lit), countIf(k < cp_lit) "
                           f"FROM {db}.dst").result_rows == [(0, 0, 0)]
    assert ch_client.command(f"SELECT uniqExact(end_lit) FROM {db}.dst") > 8


def test_cli_hostile_param_and_keys_copy_exactly(cli, migrations):
    """A constant param and a --param override with quotes, backslashes and a newline, used both as
    '{tag}' and {tag:String}: the SQL never breaks and every row arrives once."""
    sql = COPY + " AND '{tag}' = {tag:String} AND length({tag:String}) = {tag_len}"
    hostile = "it's a \\'quoted\\' \n ü {db} value"
    meta = {**META, "params": {"tag": "default", "tag_len": len(hostile.encode())}}
    root = migrations(1, "x", UP, DOWN, sql, meta)
    proc = cli("up", migrations_dir=root)
    assert proc.returncode == 0, proc.stderr
    dry = cli("backfill", "run", "1", "--dry-run", "--param", f"tag={hostile}", migrations_dir=root)
    assert dry.returncode == 0, dry.stderr
    assert "it\\'s a \\\\\\'quoted\\\\\\' \\n ü {db} value" in dry.stdout  # escaped for '...'
    proc = cli("backfill", "run", "1", "--param", f"tag={hostile}", migrations_dir=root)
    assert proc.returncode == 0, proc.stderr
    after = dump(cli.store)
    assert after["dst"] == after["src"] and after["src"][0] == ROWS and after["dups"] == 0
    status = json.loads(cli("backfill", "status", "1", "--json", migrations_dir=root).stdout)
    assert status["checkpoint"]["params"]["tag"] == hostile
