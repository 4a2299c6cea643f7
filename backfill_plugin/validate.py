"""`migrate backfill validate N`: run a backfill's own checks (`NNN_name.backfill.validate.sql`).

Each statement returns one row: check, expected, actual, ok. The SQL sees the same params the
backfill ran with (e.g. cutover_timestamp), so it checks exactly what the backfill was responsible for.
"""
from __future__ import annotations

from migrator.discovery import read_text
from migrator.sqltext import split_statements

from .checkpoint import backfill_id
from .errors import BackfillError
from .render import render


def validate(manager, database: str, version: int) -> list[dict]:
    """Run the backfill's validate SQL with the params it ran with; one dict per check."""
    spec = manager.spec(version)
    if spec.validate_path is None:
        raise BackfillError(f"version {version} ships no {spec.sql_path.name.replace('.sql', '.validate.sql')}")
    row = manager.store.load(backfill_id(database, version))
    if row is None or not (row.checkpoint.get("params") is not None):
        raise BackfillError(f"backfill {backfill_id(database, version)} has not started; nothing to validate")
    values = {k: v for k, v in row.checkpoint.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    values.update(row.checkpoint["params"] or {})
    values["db"] = database
    results = []
    for stmt in split_statements(read_text(spec.validate_path)):
        sql, params = render(stmt, values, spec.validate_path)
        result = manager.ch_client.query(sql, parameters=params or None)
        for values_row in result.result_rows:
            item = dict(zip(result.column_names, values_row))
            item["ok"] = bool(item.get("ok"))
            results.append(item)
    return results
