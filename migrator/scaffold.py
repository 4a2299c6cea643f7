"""`migrate new`: files a new version starts from, with the backfill pair when asked."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import MigrateError

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
-- - id: the checkpoint column(s) of the meta, the key a source row and its target row share;
-- - tuple(*): the columns the backfill writes, in the same order on both sides (`*` fits a backfill
--   that copies whole rows between tables with the same columns);
-- - a filter the backfill applies to the source (e.g. AND deleted = 0) goes on the source side too.
-- Checks, per range:
-- 1. missing_keys_in_target: source keys with no target row (expected 0);
-- 2. duplicate_keys_in_target: keys the target holds more often than the source (expected 0);
-- 3. rows_equal_source: source keys whose target rows equal theirs in every hashed column
--    (a 64-bit hash of each row, summed per key; expected: every source key).
SELECT c.1 AS check, c.2 AS expected, c.3 AS actual, toUInt8(expected = actual) AS ok
FROM
(
    SELECT
        countIf(source_rows > 0) AS source_keys,
        countIf(source_rows > 0 AND target_rows = 0) AS missing,
        countIf(target_rows > source_rows) AS duplicates,
        countIf(source_rows > 0 AND target_rows = source_rows AND source_hash = target_hash) AS equal
    FROM
    (
        SELECT id, sum(side = 0) AS source_rows, sum(side = 1) AS target_rows,
            sumIf(h, side = 0) AS source_hash, sumIf(h, side = 1) AS target_hash
        FROM
        (
            SELECT id, 0 AS side, cityHash64(tuple(*)) AS h FROM {{db}}.SOURCE_TABLE WHERE {{batch_range}}
            UNION ALL
            SELECT id, 1 AS side, cityHash64(tuple(*)) AS h FROM {{db}}.TARGET_TABLE WHERE {{batch_range}}
        )
        GROUP BY id
    )
)
ARRAY JOIN [
    ('missing_keys_in_target', toUInt64(0), missing),
    ('duplicate_keys_in_target', toUInt64(0), duplicates),
    ('rows_equal_source', source_keys, equal)
] AS c
"""


def scaffold(directory: Path, version: int, name: str, backfill: bool) -> list[Path]:
    """Write empty up/down files (and a backfill's SQL, meta and validation); refuse to overwrite anything."""
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
        files[".backfill.validate.sql"] = VALIDATE_SQL.format(version=version)
    created = []
    for ext, text in files.items():
        path = Path(f"{stem}{ext}")
        if path.exists():
            raise MigrateError(f"{path} already exists")
        path.write_text(text)
        created.append(path)
    return created
