"""Backfill failures the operator can act on (one line each, like every migrate error)."""
import re

from migrator.errors import MigrateError, one_line  # noqa: F401 - one_line is re-exported


class BackfillError(MigrateError):
    """A backfill cannot start or go on; the message says what to do."""


class LeaseLost(BackfillError):
    """Another runner took the backfill over: this one must stop without writing its state."""


def error_code(exc: Exception) -> int | None:
    """ClickHouse's error code (241 = out of memory), from the driver or from the message text."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"Code: (\d+)", str(exc))
    return int(match.group(1)) if match else None
