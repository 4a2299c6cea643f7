"""Backfill failures the operator can act on (one line each, like every migrate error)."""
from migrator.errors import MigrateError


class BackfillError(MigrateError):
    """A backfill cannot start or go on; the message says what to do."""
