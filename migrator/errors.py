"""The one exception type users see, and the one way an error becomes one line."""
from __future__ import annotations

import re

from .transport import describe, server_exception


class MigrateError(Exception):
    """A failure the operator can act on; its message is the whole story on one line."""


# clickhouse-connect's HTTP client wraps the server's own message; embedded chDB gives it bare
_HTTP_WRAPPER = re.compile(r"^Received ClickHouse exception, code: \d+, server response: (?=Code: \d+\.)")
_HTTP_URL = re.compile(r" \(for url https?://[^)\s]*\)$")
def one_line(exc: BaseException) -> str:
    """The first line of an error: what the operator sees, what error_log keeps. A ClickHouse error reads
    the same from a server over HTTP as from the embedded engine: `Code: N. DB::Exception: ...`, also when
    it arrived after the response's 200 status (see transport.server_exception)."""
    late = server_exception(exc)
    transport = None if late else describe(exc)  # a network or proxy fault says so, whatever the driver called it
    if transport:
        return transport
    text = (late or str(exc)).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = _HTTP_URL.sub("", _HTTP_WRAPPER.sub("", text[0]))
    return line[:500]


def error_code(exc: BaseException) -> int | None:
    """ClickHouse's error code (517 = CANNOT_ASSIGN_ALTER), from the driver or from the message text."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"Code: (\d+)", server_exception(exc) or str(exc))
    return int(match.group(1)) if match else None
