"""The one exception type users see: a one-line message, no traceback unless --debug."""


class MigrateError(Exception):
    """A failure the operator can act on; its message is the whole story on one line."""
