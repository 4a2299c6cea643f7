"""The one exception type users see, and the one way an error becomes one line."""
from __future__ import annotations

import re


class MigrateError(Exception):
    """A failure the operator can act on; its message is the whole story on one line."""


# clickhouse-connect's HTTP client wraps the server's own message; embedded chDB gives it bare
_HTTP_WRAPPER = re.compile(r"^Received ClickHouse exception, code: \d+, server response: (?=Code: \d+\.)")
_HTTP_URL = re.compile(r" \(for url https?://[^)\s]*\)$")
# What a server writes into a response whose status (200) went out with the first progress header, when the
# query fails after it: 24.x+ an exception block `__exception__ <tag> <message> <length> <tag> __exception__`
# (src/Server/HTTP/HTTP1/HTTP1ServerResponse.cpp, cancelWithException), before it the bare message; either
# way without the final chunk, so the client's read ends in IncompleteRead and only its partial body keeps it.
_EXCEPTION_BLOCK = re.compile(rb"__exception__\r?\n(\S+)\r?\n(Code: \d+\. .*?)\r?\n?\d+ \1\r?\n__exception__", re.DOTALL)
_EXCEPTION_TEXT = re.compile(rb"(?:\A|\n)(Code: \d+\. DB::Exception: .*?)\s*\Z", re.DOTALL)


def server_exception(exc: BaseException) -> str | None:
    """The server's own error text when it arrived after a 200 status (in the cut-off body of a response
    whose progress headers had already gone out), else None. clickhouse-connect raises a transport error
    for such a response; its chain keeps the body read so far (http.client.IncompleteRead.partial)."""
    seen, todo = set(), [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        partial = getattr(item, "partial", None)
        if isinstance(partial, (bytes, bytearray)) and partial:
            match = _EXCEPTION_BLOCK.search(partial) or _EXCEPTION_TEXT.search(partial)
            if match:
                return match.group(match.lastindex).decode(errors="replace").strip()
        todo += [item.__cause__, item.__context__, *(a for a in item.args if isinstance(a, BaseException))]
    return None


def one_line(exc: BaseException) -> str:
    """The first line of an error: what the operator sees, what error_log keeps. A ClickHouse error reads
    the same from a server over HTTP as from the embedded engine: `Code: N. DB::Exception: ...`, also when
    it arrived after the response's 200 status (see server_exception)."""
    late = server_exception(exc)
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
