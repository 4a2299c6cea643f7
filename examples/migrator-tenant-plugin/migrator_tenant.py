"""An example `migrate` plugin: a `{tenant}` placeholder for backfills, and one JSON line per batch.

It implements two of the backfill plugin's hooks (see docs/plugins.md):
- `backfill_placeholders` provides `{tenant}`, read from MIGRATE_TENANT or from the file named by
  MIGRATE_TENANT_FILE. The value is returned as a plain string, so the framework escapes it: inside
  '...' in the SQL a quote or a backslash in the tenant stays data, never SQL.
- `backfill_batch_completed` appends one JSON line per committed batch to the file named by
  MIGRATE_TENANT_BATCH_LOG (when set), for a dashboard or an audit trail.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from migrator import hookimpl
from migrator.errors import MigrateError

TENANT_ENV = "MIGRATE_TENANT"
TENANT_FILE_ENV = "MIGRATE_TENANT_FILE"
BATCH_LOG_ENV = "MIGRATE_TENANT_BATCH_LOG"


def read_tenant() -> str | None:
    """The tenant of this run, or None when neither variable is set.

    A file suits a value a deployment mounts as a secret; the variable suits a shell. Raising
    MigrateError (not any other exception) gives the operator `migrate`'s one-line error.
    """
    value, path = os.environ.get(TENANT_ENV), os.environ.get(TENANT_FILE_ENV)
    if value and path:
        raise MigrateError(f"both {TENANT_ENV} and {TENANT_FILE_ENV} are set; set only one")
    if value or not path:
        return value or None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise MigrateError(f"{TENANT_FILE_ENV}={path}: cannot read the tenant: {reason}") from exc
    value = text.rstrip("\r\n")  # the newline an editor or `echo` adds is not part of the tenant
    if not value:
        raise MigrateError(f"{TENANT_FILE_ENV}={path}: the file is empty")
    return value


@hookimpl
def backfill_placeholders(backfill, checkpoint):
    """`{tenant}` for every backfill's SQL, as a plain str so that the framework escapes it.

    Called for every batch, retry and replay: the value must not change during a backfill, or a
    replayed batch would render different SQL. Returning None leaves `{tenant}` undefined, and a
    backfill that uses it then fails before its first batch with "unknown placeholder {tenant}".
    """
    tenant = read_tenant()
    return None if tenant is None else {"tenant": tenant}


@hookimpl
def backfill_batch_completed(backfill, batch):
    """One JSON line per committed batch, so progress can be followed with `tail -f` or shipped."""
    path = os.environ.get(BATCH_LOG_ENV)
    if not path:
        return
    record = {"backfill_id": backfill.backfill_id, "version": backfill.version, "database": backfill.database,
              "tenant": read_tenant(), "logged_at": datetime.now(timezone.utc).isoformat(), **batch}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")  # key values may be dates: str() them
