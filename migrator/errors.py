"""The one exception type users see, and the one way an error becomes one line."""
from __future__ import annotations

import re


class MigrateError(Exception):
    """A failure the operator can act on; its message is the whole story on one line."""


def one_line(exc: BaseException) -> str:
    """The first line of an error: what the operator sees, what error_log keeps."""
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def error_code(exc: BaseException) -> int | None:
    """ClickHouse's error code (517 = CANNOT_ASSIGN_ALTER), from the driver or from the message text."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"Code: (\d+)", str(exc))
    return int(match.group(1)) if match else None
