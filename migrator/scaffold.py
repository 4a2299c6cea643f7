"""`migrate new`: files a new version starts from, with the backfill pair when asked."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import MigrateError
from .sqltext import check_identifier

BACKFILL_SQL = """-- Backfill for version {version}: runs once per batch; the framework owns the key range.
-- batch_range selects exactly this batch's keys of the source table. Exactly-once needs the
-- target to deduplicate (SETTINGS non_replicated_deduplication_window = 1000, or Replicated*)
-- and, on a retry or replay (retry_count > 0), to skip keys an earlier attempt already wrote.
-- Rows written into the source while it runs: keys past the position are copied when the walk gets
-- there; keys at or behind it are not. Live writes need their own path into the target (the new
-- write path from a cutover instant, as migration 021 does, or a materialized view created by the
-- up file): see "Backfill or inline migration?" in docs/backfill_developer_guide.md.
INSERT INTO {{db}}.TARGET_TABLE
SELECT *
FROM {{db}}.SOURCE_TABLE
WHERE {{batch_range}}
  AND ({{retry_count}} = 0 OR id NOT IN (SELECT id FROM {{db}}.TARGET_TABLE WHERE {{batch_range}}))
-- For a composite key (checkpoint_columns ["kind", "id"]) the anti-join takes the whole key tuple:
--   AND ({{retry_count}} = 0 OR (kind, id) NOT IN (SELECT kind, id FROM {{db}}.TARGET_TABLE WHERE {{batch_range}}))
-- `migrate new NAME --backfill --from SOURCE_TABLE` writes all of this from the real table, ready to run.
"""


VALIDATE_SQL = """-- Validation for backfill {version}: run by `migrate backfill validate {version}` (after `run`).
-- Rendered once per key range: {{batch_range}} selects exactly that range's keys over the checkpoint
-- columns. Keep it directly on every table read, so the primary key reads only the range's granules
-- and memory follows the range size, not the table size.
-- One row per check: check, expected, actual, ok (1 when they agree). The framework sums expected and
-- actual over all ranges and names every range where a check failed, with the `run --range` command
-- that copies that range again.
-- Adapt:
-- - SOURCE_TABLE / TARGET_TABLE: the same two tables as the backfill SQL and its meta;
-- - id: the checkpoint column(s) of the meta, the key a source row and its target row share. For a
--   composite key write every column where `id` stands, each under its own name: `SELECT kind, id, 0
--   AS side ...` and `GROUP BY kind, id`. Not `SELECT (kind, id) AS id`: the alias shadows the column
--   id that {{batch_range}} compares, and the engine refuses it (ILLEGAL_TYPE_OF_ARGUMENT);
-- - tuple(*): the columns the backfill writes, in the same order on both sides (`*` fits a backfill
--   that copies whole rows between tables with the same columns);
-- - a filter the backfill applies to the source (e.g. AND deleted = 0) goes on the source side too.
-- Checks, per range:
-- 1. missing_keys_in_target: source keys with no target row (expected 0);
-- 2. duplicate_keys_in_target: keys the target holds more often than the source (expected 0);
-- 3. rows_equal_source: source keys whose target rows equal theirs in every hashed column
--    (a 64-bit hash of each row, summed per key; expected: every source key).
"""


def scaffold(directory: Path, version: int, name: str, backfill: bool, rebuild: dict | None = None,
             source: dict | None = None) -> list[Path]:
    """Write empty up/down files (and a backfill's SQL, meta and validation); refuse to overwrite anything.

    `rebuild` ({"table", "definition"}) writes the staged rebuild of an existing table instead; `source`
    (the same shape) a copy of an existing table into a new table named `name`, ready to run."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", name):
        raise MigrateError(f"name {name!r}: use letters, digits, _ and -")
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{version:03d}_{name}"
    files = {
        ".up.sql": f"-- {name}: applied by migrate up. {{db}} is the target database.\n",
        ".down.sql": f"-- {name}: undoes the up file, applied by migrate down.\n",
    }
    if backfill:
        files[".backfill.sql"] = BACKFILL_SQL.format(version=version)
        files[".backfill.meta"] = json.dumps({
            "migration_version": version, "description": name.replace("_", " "), "batch_size": 100000,
            "checkpoint_columns": ["id"], "source_table": "SOURCE_TABLE"}, indent=2) + "\n"
        files[".backfill.validate.sql"] = validation(VALIDATE_SQL.format(version=version), "id", "SOURCE_TABLE",
                                                     "TARGET_TABLE", "tuple(*)", "missing_keys_in_target",
                                                     "duplicate_keys_in_target")
    if rebuild is not None:
        files = rebuild_files(version, name, rebuild["table"], rebuild["definition"])
    if source is not None:
        files = copy_files(version, name, source["table"], source["definition"])
    created = []
    for ext, text in files.items():
        path = Path(f"{stem}{ext}")
        if path.exists():
            raise MigrateError(f"{path} already exists")
        path.write_text(text)
        created.append(path)
    return created


REBUILD_UP = """-- {name}: the staging table of an online rebuild of {{db}}.{table}, from its own definition
-- (SHOW CREATE TABLE when this file was made). Edit what the rebuild is for: ORDER BY, PARTITION BY
-- or ENGINE. Keep the columns: publish swaps this table in for {table} (EXCHANGE TABLES) and refuses
-- different ones. non_replicated_deduplication_window lets a replayed batch deduplicate (exactly once).
{create};
"""
REBUILD_DOWN = """-- {name}: drops the staging table. After 'migrate backfill publish {version}' it holds the rebuilt
-- data under {table}'s name: run 'migrate backfill unpublish {version}' before rolling this back.
DROP TABLE IF EXISTS {{db}}.{staging}
"""
REBUILD_BACKFILL = """-- Backfill for version {version}: copies {table} into {staging} batch by batch, walked by the
-- sorting key of {table} ({keys}); the framework owns the key range.
INSERT INTO {{db}}.{staging} ({columns})
SELECT {columns}
FROM {{db}}.{table}
WHERE {{batch_range}}
"""
REBUILD_VALIDATE = """-- Validation for backfill {version}: every column of every row of {table} must be in {staging}.
-- Rendered once per key range ({{batch_range}} over {keys}); one row per check: check, expected,
-- actual, ok. 'migrate backfill publish {version}' refuses until this has passed after completion.
"""
DEDUP = "non_replicated_deduplication_window = 1000"
CHECKS = """SELECT c.1 AS check, c.2 AS expected, c.3 AS actual, toUInt8(expected = actual) AS ok
FROM
(
    SELECT
        countIf(source_rows > 0) AS source_keys,
        countIf(source_rows > 0 AND target_rows = 0) AS missing,
        countIf(target_rows > source_rows) AS extra,
        countIf(source_rows > 0 AND target_rows = source_rows AND source_hash = target_hash) AS equal
    FROM
    (
        SELECT {keys}, sum(side = 0) AS source_rows, sum(side = 1) AS target_rows,
            sumIf(h, side = 0) AS source_hash, sumIf(h, side = 1) AS target_hash
        FROM
        (
            SELECT {keys}, 0 AS side, cityHash64({hashed}) AS h FROM {{db}}.{source} WHERE {{batch_range}}
            UNION ALL
            SELECT {keys}, 1 AS side, cityHash64({hashed}) AS h FROM {{db}}.{target} WHERE {{batch_range}}
        )
        GROUP BY {keys}
    )
)
ARRAY JOIN [
    ('{missing}', toUInt64(0), missing),
    ('{extra}', toUInt64(0), extra),
    ('rows_equal_source', source_keys, equal)
] AS c
"""


def validation(head: str, keys: str, source: str, target: str, hashed: str, missing: str, extra: str) -> str:
    """One validation for both scaffolds: per key of the range, missing keys, keys the target holds more
    often than the source, and rows equal by a 64-bit hash of the hashed columns summed per key."""
    return head + CHECKS.format(keys=keys, source=source, target=target, hashed=hashed, missing=missing, extra=extra)


def table_definition(client, database: str, table: str, option: str = "--rebuild") -> dict:
    """What a rebuild or copy scaffold needs of an existing table, read through the migrator's own client."""
    rows = client.query("SELECT sorting_key, engine, partition_key FROM system.tables WHERE database = {d:String} "
                        "AND name = {t:String}", parameters={"d": database, "t": table}).result_rows
    if not rows:
        raise MigrateError(f"{option} {table}: table {database}.{table} does not exist")
    cols = client.query("SELECT name, type, default_kind FROM system.columns WHERE database = {d:String} "
                        "AND table = {t:String} ORDER BY position", parameters={"d": database, "t": table}).result_rows
    return {"create": client.query(f"SHOW CREATE TABLE {database}.{table}").result_rows[0][0], "sorting_key": rows[0][0],
            "engine": rows[0][1], "partition_key": rows[0][2], "columns": cols}


def rebuild_files(version: int, name: str, table: str, definition: dict) -> dict[str, str]:
    """The up/down/backfill files of a staged rebuild of `table`, published in exchange mode."""
    staging = f"{table}_rebuild_{version}"
    keys = walk_keys(table, definition, "--rebuild")
    copied = [f"`{c}`" for c, _, kind in definition["columns"] if kind not in ("ALIAS", "MATERIALIZED", "EPHEMERAL")]
    hashed = [f"`{c}`" for c, _, kind in definition["columns"] if kind not in ("ALIAS", "EPHEMERAL")]
    create = re.sub(r"^CREATE TABLE \S+", f"CREATE TABLE {{db}}.{staging}", definition["create"].strip(), count=1)
    if "Replicated" not in definition["engine"]:
        create = (re.sub(r"\nSETTINGS ", f"\nSETTINGS {DEDUP}, ", create, count=1) if "\nSETTINGS " in create
                  else f"{create}\nSETTINGS {DEDUP}")
    fill = {"name": name, "version": version, "table": table, "staging": staging, "keys": ", ".join(keys),
            "columns": ", ".join(copied), "hashed": ", ".join(hashed)}
    meta = {"migration_version": version, "description": f"rebuild {table}", "batch_size": 100000,
            "checkpoint_columns": keys, "source_table": table,
            "publish": {"mode": "exchange", "staging_table": staging, "live_table": table}}
    return {".up.sql": REBUILD_UP.format(create=create, **fill), ".down.sql": REBUILD_DOWN.format(**fill),
            ".backfill.sql": REBUILD_BACKFILL.format(**fill), ".backfill.meta": json.dumps(meta, indent=2) + "\n",
            ".backfill.validate.sql": validation(REBUILD_VALIDATE.format(**fill), fill["keys"], table, staging,
                                                 fill["hashed"], "missing_keys_in_staging", "extra_rows_in_staging")}


def walk_keys(table: str, definition: dict, option: str) -> list[str]:
    """The checkpoint columns: the longest prefix of the sorting key made of plain, non-Nullable columns."""
    if "MergeTree" not in definition["engine"]:
        raise MigrateError(f"{option} {table}: it is {definition['engine']}; only MergeTree tables are walked by key")
    types = {c: t for c, t, _ in definition["columns"]}
    keys = []
    for part in definition["sorting_key"].split(","):
        part = part.strip()
        if part not in types or "Nullable(" in types[part]:
            break
        keys.append(part)
    if not keys:
        raise MigrateError(f"{option} {table}: its sorting key ({definition['sorting_key'] or 'none'}) does not start "
                           f"with a plain column to walk by; scaffold with --backfill alone and write the copy by hand")
    return keys


COPY_UP = """-- {name}: the target of backfill {version}, with the columns and sorting key of {table} (read from
-- {{db}}.{table} when this file was made). Edit what the copy is for (a column's type, PARTITION BY,
-- the engine); keep the checkpoint columns ({keys}) leading the sorting key. The dedup window lets a
-- replayed batch deduplicate (exactly once); a Replicated*MergeTree deduplicates by default.
CREATE TABLE {{db}}.{target}
(
{definitions}
)
ENGINE = MergeTree{partition}
ORDER BY {sorting}
SETTINGS {dedup}
"""
COPY_DOWN = """-- {name}: drops the target of backfill {version}.
DROP TABLE IF EXISTS {{db}}.{target}
"""
COPY_BACKFILL = """-- Backfill for version {version}: copies {table} into {target} batch by batch, walked by the sorting
-- key of {table} ({keys}); the framework owns the key range. A retry or a replay ({{retry_count}} > 0)
-- skips the keys an earlier attempt of the range already wrote: the whole key tuple, in this range only.
INSERT INTO {{db}}.{target} ({columns})
SELECT {columns}
FROM {{db}}.{table}
WHERE {{batch_range}}
  AND ({{retry_count}} = 0 OR {key_tuple} NOT IN (SELECT {key_list} FROM {{db}}.{target} WHERE {{batch_range}}))
"""
COPY_VALIDATE = """-- Validation for backfill {version}: every row of {table} must be in {target}, equal in every
-- column. Rendered once per key range ({{batch_range}} over {keys}); one row per check: check,
-- expected, actual, ok. Each key column is selected and grouped under its own name (never as one
-- aliased tuple, which would shadow the column {{batch_range}} compares).
"""


def copy_files(version: int, name: str, table: str, definition: dict) -> dict[str, str]:
    """The files of a backfill that copies `table` into a new table `name`: up, run and validate with no edit."""
    check_identifier(name, "--from: the new table")
    if name == table:
        raise MigrateError(f"--from {table}: the new table needs a name of its own (NAME is {name!r})")
    keys = walk_keys(table, definition, "--from")
    stored = [(c, t) for c, t, kind in definition["columns"] if kind not in ("ALIAS", "EPHEMERAL")]
    quoted = [f"`{c}`" for c, _ in stored]
    key_list = ", ".join(f"`{k}`" for k in keys)
    fill = {"name": name, "version": version, "table": table, "target": name, "keys": ", ".join(keys),
            "columns": ", ".join(quoted), "key_list": key_list,
            "key_tuple": key_list if len(keys) == 1 else f"({key_list})"}
    partition = f"\nPARTITION BY {definition['partition_key']}" if definition.get("partition_key") else ""
    sorting = definition["sorting_key"]  # one column bare: `ORDER BY (id)` would read back as '(id)'
    up = COPY_UP.format(definitions=",\n".join(f"    `{c}` {t}" for c, t in stored), partition=partition,
                        sorting=sorting if sorting in dict(stored) else f"({sorting})", dedup=DEDUP, **fill)
    meta = {"migration_version": version, "description": f"copy {table} into {name}", "batch_size": 100000,
            "checkpoint_columns": keys, "source_table": table}
    return {".up.sql": up, ".down.sql": COPY_DOWN.format(**fill), ".backfill.sql": COPY_BACKFILL.format(**fill),
            ".backfill.meta": json.dumps(meta, indent=2) + "\n",
            ".backfill.validate.sql": validation(COPY_VALIDATE.format(**fill), key_list, table, name,
                                                 f"tuple({', '.join(quoted)})", "missing_keys_in_target",
                                                 "duplicate_keys_in_target")}
