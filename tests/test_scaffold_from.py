"""`migrate new NAME --backfill --from TABLE`: a copy of a real table, scaffolded from what the engine says
about it, that `up`, `backfill run` and `validate` pass with no edit, for a single-column key, a composite
key and a key with a Float column; and whose validation fails once one target row differs.

Every step is the `migrate` command a user types, in a subprocess, on a store of the test's own."""

from __future__ import annotations

import json

from tests.conftest import run_migrate, store_query

ROWS = 120_000  # above the scaffold's batch_size (100,000): the walk takes more than one batch
SOURCES = f"""
CREATE TABLE {{db}}.single (id UInt64, v String, at DateTime) ENGINE = MergeTree ORDER BY id;
INSERT INTO {{db}}.single SELECT number * 3, toString(number), toDateTime('2026-01-01 00:00:00') + number
FROM numbers({ROWS});
CREATE TABLE {{db}}.pair (kind LowCardinality(String), id UInt32, v String, n Nullable(Float64),
    doubled UInt64 MATERIALIZED id * 2, label String ALIAS concat(kind, '-', v))
ENGINE = MergeTree PARTITION BY kind ORDER BY (kind, id);
INSERT INTO {{db}}.pair (kind, id, v, n) SELECT ['view', 'click', 'buy'][number % 3 + 1], intDiv(number, 3),
    toString(number), if(number % 7 = 0, NULL, number / 7) FROM numbers({ROWS});
CREATE TABLE {{db}}.scored (score Float64, id UInt32, v String) ENGINE = MergeTree ORDER BY (score, id);
INSERT INTO {{db}}.scored SELECT multiIf(number % 50 = 0, [-inf, -0., 0., inf, nan][intDiv(number % 250, 50) + 1],
    (number % 1000) / 8 - 60), toUInt32(number), toString(number) FROM numbers({ROWS});
"""
COPIES = {  # new table -> (source, the checkpoint columns the meta must carry, a key to change a row at)
    "single_v2": ("single", ["id"], "id = 30"),
    "pair_v2": ("pair", ["kind", "id"], "kind = 'click' AND id = 10"),
    "scored_v2": ("scored", ["score", "id"], "id = 12"),
}


def ok(proc):
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_scaffold_from_a_real_table_runs_and_validates_with_no_edit(tmp_path, migrations):
    root = migrations(1, "sources", SOURCES, "DROP TABLE {db}.single; DROP TABLE {db}.pair; DROP TABLE {db}.scored")
    store = tmp_path / "store"
    ok(run_migrate(["up"], store, migrations_dir=root))
    for version, (name, (source, keys, _)) in enumerate(COPIES.items(), start=2):
        made = ok(run_migrate(["new", name, "--backfill", "--from", source], store, migrations_dir=root))
        assert made.stdout.count("created ") == 5, made.stdout
        meta = json.loads((root / f"{version:03d}_{name}.backfill.meta").read_text())
        assert meta["checkpoint_columns"] == keys and meta["source_table"] == source
    ok(run_migrate(["up"], store, migrations_dir=root))
    for version in range(2, 2 + len(COPIES)):
        ran = ok(run_migrate(["backfill", "run", str(version)], store, migrations_dir=root))
        assert f"backfill {version}: completed; {ROWS:,} rows processed" in ran.stdout, ran.stdout
        checked = ok(run_migrate(["backfill", "validate", str(version)], store, migrations_dir=root))
        assert f"validation of backfill {version} passed" in checked.stdout, checked.stdout
    # The copies hold every source row in every stored column (MATERIALIZED included), and the sorting key.
    for name, (source, keys, _) in COPIES.items():
        columns = "kind, id, v, n, doubled" if source == "pair" else "*"
        same = f"SELECT count(), sum(cityHash64(tuple({columns}))) FROM d.{{t}}"
        a, b = store_query(store, same.format(t=source), same.format(t=name))
        assert a == b, name
        assert store_query(store, f"SELECT sorting_key FROM system.tables WHERE database = 'd' AND name = '{name}'")[
            0
        ] == [[", ".join(keys)]]
    # One row changed in each target: its validation fails and names the check.
    store_query(
        store,
        *[
            f"ALTER TABLE d.{name} UPDATE v = 'changed' WHERE {where} SETTINGS mutations_sync = 1"
            for name, (_, _, where) in COPIES.items()
        ],
    )
    for version, name in enumerate(COPIES, start=2):
        failed = run_migrate(["backfill", "validate", str(version), "--restart", "--json"], store, migrations_dir=root)
        assert failed.returncode != 0, failed.stdout
        checks = {c["check"]: c for c in json.loads(failed.stdout)["checks"]}
        assert checks["rows_equal_source"]["expected"] - checks["rows_equal_source"]["actual"] == 1, (name, checks)
        assert checks["missing_keys_in_target"]["actual"] == checks["duplicate_keys_in_target"]["actual"] == 0


def test_scaffold_from_refusals_are_one_line_and_write_nothing(tmp_path, migrations):
    root = migrations(
        1,
        "sources",
        "CREATE TABLE {db}.events (k UInt64) ENGINE = MergeTree ORDER BY k;\n"
        "CREATE TABLE {db}.hashed (k UInt64) ENGINE = MergeTree ORDER BY intHash32(k)",
        "DROP TABLE {db}.events; DROP TABLE {db}.hashed",
    )
    store = tmp_path / "store"
    ok(run_migrate(["up"], store, migrations_dir=root))
    for args, message in [
        (["new", "x", "--from", "events"], "error: --from needs --backfill: the copy is a backfill into the new table"),
        (["new", "x", "--backfill", "--from", "nope"], "error: --from nope: table d.nope does not exist"),
        (
            ["new", "x-y", "--backfill", "--from", "events"],
            "error: --from: the new table name 'x-y' is not a valid identifier (letters, digits, _; not starting with a "
            "digit)",
        ),
        (
            ["new", "events", "--backfill", "--from", "events"],
            "error: --from events: the new table needs a name of its own (NAME is 'events')",
        ),
        (
            ["new", "x", "--backfill", "--from", "hashed"],
            "error: --from hashed: its sorting key (intHash32(k)) does not start with a plain column to walk by; "
            "scaffold with --backfill alone and write the copy by hand",
        ),
        (
            ["new", "x", "--backfill", "--from", "events", "--rebuild", "events"],
            "error: --rebuild and --from exclude each other: a rebuild replaces TABLE, --from copies it into a new "
            "table NAME",
        ),
    ]:
        proc = run_migrate(args, store, migrations_dir=root)
        assert proc.returncode == 1 and proc.stderr.strip() == message, (args, proc.stderr)
    assert sorted(p.name for p in root.iterdir()) == ["001_sources.down.sql", "001_sources.up.sql"]
