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


def cause(exc: BaseException) -> str | None:
    """ "network", "server" (an HTTP error status without a ClickHouse error), or None (anything else:
    a ClickHouse error, a bug)."""
    if _engine_error(exc):
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
