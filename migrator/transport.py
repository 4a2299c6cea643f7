"""Failures of the way to the server, told apart from the server's and the SQL's own errors.

An error line must say what failed: the network (no answer, a connection closed or reset: the
statement may or may not have run), the server or something in front of it (an HTTP 502/503 with no
ClickHouse error in it: a proxy, a load balancer, an overloaded server), or the SQL (the engine's own
`Code: N` refusing it, which callers name with the SQL file). Reads are safe to repeat, so `retry`
repeats them across such a fault; writes are not, and each caller decides (docs/backfill_runbook.md,
"Transient faults").
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import time

_STATUS = re.compile(r"HTTP driver received HTTP status (\d+)(?:, server response: (.*))?", re.DOTALL)
_NETWORK_TEXT = (
    "executing HTTP request",
    "Failed to read response data",
    "Stream failed during read",
    "Stream ended unexpectedly",
    "connection closed by server",
)
RETRY_DELAYS = (0.5, 1.0, 2.0)  # seconds between the attempts of a repeated read


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _engine_error(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    return isinstance(code, int) or "Code: " in str(exc)


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


def cause(exc: BaseException) -> str | None:
    """ "network", "server" (an HTTP error status without a ClickHouse error), or None (anything else:
    a ClickHouse error, a bug)."""
    if _engine_error(exc) or server_exception(exc):  # the server's own error, also one sent after a 200
        return None
    if _STATUS.search(str(exc)):
        return "server"
    for link in _chain(exc):
        if isinstance(link, (OSError, http.client.HTTPException, socket.timeout)):
            return "network"
        if type(link).__module__.startswith("urllib3"):
            return "network"
    text = str(exc)
    return "network" if any(t in text for t in _NETWORK_TEXT) else None


def _what(exc: BaseException) -> str:
    names = " ".join(f"{type(link).__name__} {link}" for link in _chain(exc))
    if "timed out" in names.lower() or "Timeout" in names:
        return "no answer within the read timeout; the statement may still run on the server"
    if "Refused" in names:
        return "connection refused"
    if "RemoteDisconnected" in names or "closed connection without response" in names:
        return "connection closed without an answer; the statement may have run"
    if "Reset" in names or "reset" in names or "Connection broken" in names or "during read" in names:
        return "connection broken in the middle of the answer; the statement may have run"
    return "connection failed"


def describe(exc: BaseException) -> str | None:
    """One line that starts with what failed ("network error: ...", "server error: ..."), or None when
    the error is neither (a ClickHouse error keeps its own `Code: N. DB::Exception: ...` line)."""
    kind = cause(exc)
    if kind is None:
        return None
    raw = " ".join(str(exc).split())
    raw = re.sub(r" \(https?://[^)\s]*\)", "", raw)  # the driver's URL: the caller names the server
    if kind == "server":
        match = _STATUS.search(str(exc))
        body = re.sub(r"<[^>]+>", " ", match.group(2) or "")
        body = " ".join(re.sub(r"\(for url [^)]*\)", "", body).split())
        return (
            f"server error: HTTP {match.group(1)} with no ClickHouse error in the answer (a proxy or load "
            f"balancer in front of the server, or the server overloaded){': ' + body if body else ''}"
        )[:500]
    return f"network error: {_what(exc)} ({raw})"[:500]


def retry(read, what: str, sleep=time.sleep, delays=RETRY_DELAYS):
    """`read()` again after a network or server fault (at most len(delays) more times): for statements
    whose second run changes nothing (a read; a state row of a fixed version, whose copy is the same row).
    Other errors, a refused connection and the last fault are raised."""
    for delay in (*delays, None):
        try:
            return read()
        except Exception as exc:
            if delay is None or cause(exc) is None or _what(exc) == "connection refused":
                raise  # (refused: nothing listens there; waiting 3.5 s would not change that)
            logging.getLogger("migrate").warning("%s: %s; again in %.1fs", what, describe(exc), delay)
            sleep(delay)
    return None  # not reached
