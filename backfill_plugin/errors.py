"""Backfill failures the operator can act on (one line each, like every migrate error)."""
from migrator.errors import MigrateError, error_code, one_line  # noqa: F401 - re-exported


class BackfillError(MigrateError):
    """A backfill cannot start or go on; the message says what to do."""


class LeaseLost(BackfillError):
    """Another runner took the backfill over: this one must stop without writing its state."""
