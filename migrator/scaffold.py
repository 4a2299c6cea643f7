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
INSERT INTO {{db}}.target_table
SELECT *
FROM {{db}}.source_table
WHERE {{batch_range}}
  AND ({{retry_count}} = 0 OR id NOT IN (SELECT id FROM {{db}}.target_table WHERE {{batch_range}}))
"""


def scaffold(directory: Path, version: int, name: str, backfill: bool) -> list[Path]:
    """Write empty up/down files (and a backfill pair); refuse to overwrite anything."""
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
            "checkpoint_columns": ["id"], "source_table": "source_table"}, indent=2) + "\n"
    created = []
    for ext, text in files.items():
        path = Path(f"{stem}{ext}")
        if path.exists():
            raise MigrateError(f"{path} already exists")
        path.write_text(text)
        created.append(path)
    return created
