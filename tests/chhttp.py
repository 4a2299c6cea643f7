"""A test endpoint that speaks ClickHouse's HTTP interface and runs every query on the real engine (chDB).

No ClickHouse server can run where the suite runs, yet the product's HTTP path (clickhouse-connect's
HttpClient, what `migrate` uses for http:// URLs) must run in `make test`. This process owns one
embedded store and answers HTTP requests the way ClickHouse's HTTPHandler does; every result byte,
error message and error code comes from the engine. Test infrastructure only, never installed.

    python -m tests.chhttp --store PATH --port N [--user U --password P]

What it does as ClickHouse does:
- the query is the `query` URL parameter, then a newline, then the body (either may be absent);
  an INSERT's data is what follows its `FORMAT name` (after blanks and at most one newline) and
  reaches the engine as `INSERT ... FROM INFILE <tmp> FORMAT name`; request bodies may be chunked
  and compressed (Content-Encoding gzip, deflate, zstd, lz4, br); a body shorter than its Content-Length
  (CANNOT_READ_ALL_DATA, 33) or a chunked body without its last chunk (UNEXPECTED_END_OF_FILE, 3) is refused
  with HTTP 500 and nothing of it runs, also when it carried a multipart form (as HTTPServerRequest.cpp);
  a form whose transport is whole but lacks its closing boundary is read to its end, as HTMLForm does;
- `database`, `default_format` (TabSeparated), `param_<name>` (bound by the engine), `query_id`
  (echoed in X-ClickHouse-Query-Id; a second query with the id of a running one is refused with
  QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING, 216), `session_id`/`session_check`/`session_timeout` (whole
  seconds up to max_session_timeout 3600, else INVALID_SESSION_TIMEOUT, 374); every other URL parameter is
  a setting for that query only (SET on the request's own engine handle; an unknown name is the engine's
  UNKNOWN_SETTING), names ending in `_format`, `_types` or `_structure` included: only multipart requests
  skip those (their external data's parameters), as the server does; GET requests run with readonly=2, in a
  session for that query only (on a copy of the session's settings and database);
- errors: `Code: N. DB::Exception: <engine message> (NAME) (version V)` with the status of
  ClickHouse's exceptionCodeToHTTPStatus and X-ClickHouse-Exception-Code;
- a second concurrent query in one session is refused with SESSION_IS_LOCKED (373);
- progress headers (`send_progress_in_http_headers`, `http_headers_progress_interval_ms`, the engine's
  own progress): the status line 200 goes out with the first, once the interval has passed with progress
  made; an error after it is an X-ClickHouse-Exception-Code header and an exception block in the body
  (`__exception__`, tag, message, length and tag, `__exception__`) with the final chunk left out;
- a query keeps running when its client goes away and shows in system.processes, killable with KILL
  QUERY from another request, until its next progress write finds the client gone: then it is cancelled
  (QUERY_WAS_CANCELLED; blocks inserted before stay), as a server's onProgress does; a read-only query with
  cancel_http_readonly_queries_on_client_close is cancelled at its next progress event;
- responses are compressed when enable_http_compression (the URL's, else the engine's default, 1) is on and
  Accept-Encoding names a method (lz4, zstd, gzip, deflate); a request holds one statement (SYNTAX_ERROR
  "Multi-statements are not allowed" otherwise, where chDB itself would run them all).

Where it differs from a server (stated, not hidden):
- chDB cannot be told a query id: system.processes and KILL QUERY see the engine's own id, not the
  `query_id` the client sent (echoed, and checked against the running ones by the endpoint itself). Code
  that finds queries by a marker in their text (backfill_plugin/protocol/attempt.py) works unchanged;
  `KILL QUERY WHERE query_id = '<client id>'` does not. The endpoint finds its own queries (to cancel one)
  by a `log_comment` it sets (the client's own, if it sent one); replace_running_query is not supported.
- X-ClickHouse-Summary carries what the engine reports (read_rows, read_bytes, elapsed_ns); the
  engine does not report written rows, so written_* keys are absent.
- progress headers are written on a timer that checks the engine's progress callback, not at each block:
  one header per interval at most, and a cancel lands at the engine's next block; the other headers
  (Date, Server) a server sends before the progress headers come after them here. A server parses an
  INSERT's data as it arrives, so a body cut short after more than one insert block can commit its first
  blocks there; the endpoint reads the whole body first and commits none. wait_end_of_query buffers nothing
  (the response is built whole anyway).
- authentication is a check of one user/password pair given on the command line (headers
  X-ClickHouse-User/X-ClickHouse-Key, basic auth, or user/password parameters); the engine itself
  runs every query as its default user. A wrong password is AUTHENTICATION_FAILED (516, HTTP 403).
- a multipart/form-data body gives the query and parameters (clickhouse-connect sends `query` and
  `param_*` so when they would make the URL too long);
- not supported: external data (file fields), ClickHouse's own block compression of
  bodies (`compress=1`/`decompress=1`; HTTP Content-Encoding is supported).

Test controls (not part of ClickHouse's interface): `POST /__faults` with JSON
{match, regex?, nth?, times?, kind, seconds?, status?} arms a transport fault for the nth query whose
text matches (one-shot unless times says otherwise; times=-1: always); `DELETE /__faults` clears them;
`GET /__log` lists every query received (JSON), `DELETE /__log` clears it. Fault kinds: `refuse`
(answer `status`, 502 or 503, before running: a load balancer), `stall` (wait `seconds`, then run),
`late` (run, then wait `seconds` before answering: the client's read timeout fires on a done query),
`drop` (run, then close the connection without answering), `reset` (run, send the headers and half
the body, then reset the connection). `--chaos SEED:RATE` or `POST /__chaos` {seed, rate, kinds?,
statements?} injects them on a seeded random fraction of all requests; `GET /__chaos` reports what was hit
(tests/chaos.py).
"""
from __future__ import annotations

import argparse
import base64
import email.policy
import gzip
import json
import os
import random
import re
import select
import signal
import socket
import string
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import chdb

from migrator.sqltext import _lex, split_statements
from tests import chaos

# URL parameters ClickHouse's HTTPHandler consumes itself; they are not settings.
RESERVED = {"query", "database", "default_format", "user", "password", "quota_key", "query_id", "stacktrace",
            "role", "buffer_size", "wait_end_of_query", "session_id", "session_timeout", "session_check",
            "client_protocol_version", "close_session", "compress", "decompress"}
# Settings the HTTP layer interprets; the engine accepts them too, so they are also SET.
CONTENT_TYPES = {"TabSeparated": "text/tab-separated-values; charset=UTF-8", "TSV": "text/tab-separated-values; charset=UTF-8",
                 "JSON": "application/json; charset=UTF-8", "JSONEachRow": "application/x-ndjson; charset=UTF-8",
                 "JSONCompact": "application/json; charset=UTF-8", "CSV": "text/csv; charset=UTF-8; header=absent"}
# src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, by error name (the engine's message ends with it)
_BY_STATUS = {
    401: "REQUIRED_PASSWORD",
    403: "UNKNOWN_USER WRONG_PASSWORD AUTHENTICATION_FAILED SET_NON_GRANTED_ROLE ACCESS_DENIED",
    400: "BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE CANNOT_PARSE_QUOTED_STRING "
         "CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING "
         "CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN "
         "ILLEGAL_COLUMN UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST TOO_BIG_AST "
         "UNEXPECTED_AST_STRUCTURE SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    404: "UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE UNKNOWN_DATABASE "
         "UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION UNKNOWN_FORMAT "
         "UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE",
    413: "QUERY_IS_TOO_LARGE", 501: "NOT_IMPLEMENTED", 503: "SOCKET_TIMEOUT CANNOT_OPEN_FILE CANNOT_SCHEDULE_TASK",
    411: "HTTP_LENGTH_REQUIRED", 408: "TIMEOUT_EXCEEDED", 415: "UNSUPPORTED_MEDIA_TYPE"}
STATUS = {name: status for status, names in _BY_STATUS.items() for name in names.split()}
SESSION_NOT_FOUND, SESSION_IS_LOCKED, AUTHENTICATION_FAILED = 372, 373, 516
INVALID_SESSION_TIMEOUT, QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING, QUERY_WAS_CANCELLED = 374, 216, 394
UNEXPECTED_END_OF_FILE, CANNOT_READ_ALL_DATA, CORRUPTED_DATA, SOCKET_TIMEOUT = 3, 33, 246, 209
DEFAULT_SESSION_TIMEOUT, MAX_SESSION_TIMEOUT = 60, 3600  # a server's default_session_timeout, max_session_timeout
RECEIVE_TIMEOUT = 30  # seconds a request body may stall (the server's http_receive_timeout)
CODE_RE = re.compile(r"Code: (\d+)\. ")
NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*(?:\(version [^)]*\))?\s*\.?\s*$")
TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)


class Engine:
    """The one store of this process; each request gets its own handle (its own settings and USE)."""

    def __init__(self, path: str):
        self.path = path
        self._root = chdb.connect(path)  # keeps the engine open between requests
        row = self._root.query("SELECT version(), timezone(), getSetting('enable_http_compression')",
                               "TabSeparated").bytes().decode().rstrip("\n")
        self.version, self.timezone, compression = row.split("\t")
        self.compression = compression in ("1", "true")  # the engine's default for enable_http_compression

    def handle(self):
        return chdb.connect(self.path)


class Session:
    def __init__(self, handle, timeout: float):
        self.handle, self.timeout, self.lock, self.used = handle, timeout, threading.Lock(), time.monotonic()


class Faults:
    """Armed transport faults, each aimed at the nth query whose text matches."""

    def __init__(self):
        self.lock, self.items = threading.Lock(), []

    def arm(self, spec: dict) -> None:
        kind = spec.get("kind")
        if kind not in ("refuse", "stall", "late", "drop", "reset"):
            raise ValueError(f"unknown fault kind {kind!r}")
        spec = {"match": "", "regex": False, "nth": 1, "times": 1, "seconds": 0.0, "status": 503, **spec, "seen": 0}
        with self.lock:
            self.items.append(spec)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()

    def take(self, query: str) -> dict | None:
        with self.lock:
            for spec in self.items:
                hit = re.search(spec["match"], query) if spec["regex"] else spec["match"] in query
                if not hit:
                    continue
                spec["seen"] += 1
                if spec["seen"] < spec["nth"]:
                    continue
                if spec["times"] > 0:
                    spec["times"] -= 1
                    if spec["times"] == 0:
                        self.items.remove(spec)
                return dict(spec)
        return None


def http_status(err: EngineError) -> int:
    match = NAME_RE.search(err.text)
    return STATUS.get(match.group(1), 500) if match else 500


class EngineError(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code, self.text = code, text


def split_insert_data(raw: bytes) -> tuple[str, bytes | None]:
    """(sql, data): an INSERT's data starts after `FORMAT name`, past blanks and at most one newline
    (as ClickHouse's ParserInsertQuery). Anything else is all query."""
    text = raw.decode("latin-1")  # one char per byte: offsets are byte offsets, data may be binary
    words = []
    for kind, start, end in _lex(text):
        if kind in ("space", "comment"):
            continue
        if kind != "word":
            if not words or words[0] != "INSERT":
                break
            words.append(kind)
            continue
        words.append(text[start:end].upper())
        if words[0] != "INSERT":
            break
        if len(words) >= 2 and words[-2] == "FORMAT":
            i = end
            while i < len(text) and text[i] in " \t\r\f\v":
                i += 1
            if i < len(text) and text[i] == "\n":
                i += 1
            return raw[:end].decode(), raw[i:]
    return raw.decode(), None


def form_fields(content_type: str, body: bytes) -> dict:
    """The text fields of a multipart form body (clickhouse-connect sends query and param_* this way when
    they would make the URL too long); file fields (external data) are not supported."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    out = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name and not part.get_filename():
            out[name] = part.get_payload(decode=True).decode()
    return out


def engine_error(exc: Exception, version: str) -> EngineError:
    text = str(exc).strip()
    at = text.find("Code: ")
    text = text[at:] if at > 0 else text
    match = CODE_RE.match(text)
    code = int(match.group(1)) if match else 1000
    if not match:
        text = f"Code: 1000. DB::Exception: {text}. (POCO_EXCEPTION)"
    if "(version " not in text[-40:]:
        text = f"{text} (version {version})"
    return EngineError(code, text)


def _compress(data: bytes, accept: str) -> tuple[bytes, str | None]:
    for method in (m.strip().split(";")[0] for m in accept.split(",")):
        if method == "gzip":
            return gzip.compress(data), method
        if method == "deflate":
            return zlib.compress(data), method
        if method == "lz4":
            import lz4.frame
            return lz4.frame.compress(data), method
        if method == "zstd":
            from clickhouse_connect.driver.compression import _require_zstd
            return _require_zstd().compress(data), method
    return data, None


def _decompress(data: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if not encoding or encoding == "identity":
        return data
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    if encoding == "lz4":
        import lz4.frame
        return lz4.frame.decompress(data)
    if encoding == "zstd":
        from clickhouse_connect.driver.compression import _zstd_decompress
        return _zstd_decompress(data)
    if encoding == "br":
        import brotli
        return brotli.decompress(data)
    raise EngineError(1000, f"Code: 1000. DB::Exception: Unknown HTTP Content-Encoding {encoding!r}. (UNKNOWN_EXCEPTION)")


def read_body(rfile, headers, version: str) -> bytes:
    """The request body as a server reads it (src/Server/HTTP/HTTPServerRequest.cpp): exactly its
    Content-Length (LimitReadBuffer with read_no_less: "Unexpected EOF, got N of M bytes",
    CANNOT_READ_ALL_DATA), or every chunk up to the last one (HTTPChunkedReadBuffer: "Unexpected end of file
    while reading chunk header of HTTP chunked data", UNEXPECTED_END_OF_FILE). A body cut short is refused
    before anything of it runs. (A server parses an INSERT's data as it arrives, so a body longer than one
    insert block can commit its first blocks before the cut; this endpoint reads the body first and commits
    none.)"""
    def fail(code: int, message: str, name: str):
        return EngineError(code, f"Code: {code}. DB::Exception: {message}. ({name}) (version {version})")

    cut = fail(UNEXPECTED_END_OF_FILE, "Unexpected end of file while reading chunk header of HTTP chunked data",
               "UNEXPECTED_END_OF_FILE")
    try:
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                line = rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise cut
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise fail(CORRUPTED_DATA, "Unexpected data instead of HTTP chunk header", "CORRUPTED_DATA") from None
                if size == 0:
                    while rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    break
                part = rfile.read(size)
                if len(part) < size or not rfile.readline(8).endswith(b"\n"):
                    raise cut
                parts.append(part)
            return b"".join(parts)
        length = int(headers.get("Content-Length") or 0)
        data = rfile.read(length)
    except TimeoutError:
        raise fail(SOCKET_TIMEOUT, f"Timeout exceeded while reading from socket ({RECEIVE_TIMEOUT} s)",
                   "SOCKET_TIMEOUT") from None
    if len(data) < length:
        raise fail(CANNOT_READ_ALL_DATA, f"Unexpected EOF, got {len(data)} of {length} bytes", "CANNOT_READ_ALL_DATA")
    return data


def session_timeout(params: dict, version: str) -> float:
    """session_timeout as a server parses it (HTTPHandler's parseSessionTimeout): whole seconds, at most
    max_session_timeout, else INVALID_SESSION_TIMEOUT."""
    raw = params.get("session_timeout")
    if raw is None:
        return DEFAULT_SESSION_TIMEOUT
    if not re.fullmatch(r"\+?[0-9]+", raw):
        raise EngineError(INVALID_SESSION_TIMEOUT, f"Code: 374. DB::Exception: Invalid session timeout: '{raw}'. "
                                                   f"(INVALID_SESSION_TIMEOUT) (version {version})")
    if int(raw) > MAX_SESSION_TIMEOUT:
        raise EngineError(INVALID_SESSION_TIMEOUT, (
            f"Code: 374. DB::Exception: Session timeout '{raw}' is larger than max_session_timeout: "
            f"{MAX_SESSION_TIMEOUT}. Maximum session timeout could be modified in configuration file. "
            f"(INVALID_SESSION_TIMEOUT) (version {version})"))
    return int(raw)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Response:
    """One query's response, written as ClickHouse's WriteBufferFromHTTP1ServerResponse writes it.

    With send_progress_in_http_headers, the status line (200) goes out with the first X-ClickHouse-Progress
    header, once http_headers_progress_interval_ms has passed with progress made, and one more header per
    interval after it. An error after that cannot change the status: it becomes an X-ClickHouse-Exception-Code
    header and an exception block in the body (`__exception__`, a tag, the message, its length and the tag,
    `__exception__`), and the final chunk is left out on purpose (cancelWithException). A write that fails
    because the client is gone tells the caller to cancel the query (onProgress: cancel, then rethrow)."""

    def __init__(self, handler: Handler, send_progress: bool, interval_ms: int, cancel_when_gone: bool):
        self.handler, self.send_progress, self.interval = handler, send_progress, max(interval_ms, 0) / 1000
        self.cancel_when_gone = cancel_when_gone  # a read-only query with cancel_http_readonly_queries_on_client_close
        self.started = False  # the status line is on the wire
        self.gone = False  # the client was found gone: the query is cancelled
        self.headers_sent = 0
        self.progress: dict = {}
        self.moved = False  # progress since the last header
        self.last = time.monotonic()

    def on_progress(self, progress: dict) -> None:
        """The engine's progress callback (on the query's thread)."""
        self.progress, self.moved = progress, True

    def _write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        self.handler.wfile.flush()

    def client_gone(self) -> bool:
        """HTTPServerRequest::checkPeerConnected: a peek that finds the connection closed."""
        sock = self.handler.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)  # (the socket has a timeout: recv would wait)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def tick(self) -> bool:
        """While the query runs; False when the client is gone and the query must be cancelled."""
        if not self.moved:
            return True
        if self.cancel_when_gone and self.client_gone():
            self.gone = True
            return False
        if not self.send_progress or time.monotonic() - self.last < self.interval:
            return True
        self.moved, self.last = False, time.monotonic()
        try:
            if self.client_gone():
                raise BrokenPipeError("the client is gone")
            if not self.started:
                self._write(b"HTTP/1.1 200 OK\r\n")
                self.started = True
            self._write(b"X-ClickHouse-Progress: " + self._progress_json() + b"\r\n")
            self.headers_sent += 1
        except OSError:
            self.handler.close_connection = self.gone = True
            return False
        return True

    def _progress_json(self) -> bytes:
        keys = ("read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read", "result_rows",
                "result_bytes", "elapsed_ns")
        return json.dumps({k: str(self.progress.get(k, 0)) for k in keys}, separators=(",", ":")).encode()

    def _finish_headers(self, headers: dict) -> None:
        lines = [f"{name}: {value}" for name, value in headers.items()]
        self._write(("\r\n".join([*lines, "Transfer-Encoding: chunked", "", ""])).encode())

    def send(self, status: int, body: bytes, headers: dict) -> None:
        """The answer of a query that ended well (or failed before any progress header went out)."""
        if not self.started:
            self.handler._send(status, body, headers)
            return
        self._finish_headers({**headers, "Connection": "close" if self.handler.close_connection else "Keep-Alive"})
        if body and self.handler.command != "HEAD":
            self._write(b"%x\r\n" % len(body) + body + b"\r\n")
        self._write(b"0\r\n\r\n")

    def send_error(self, err: EngineError, headers: dict) -> None:
        """An error: with its own status while none was sent, else after the 200, as the server writes it."""
        if not self.started:
            self.handler._send(http_status(err), (err.text + "\n").encode(),
                               {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(err.code),
                                **headers})
            return
        tag = "".join(random.choices(string.ascii_letters + string.digits, k=16))
        message = (err.text if err.text.endswith("\n") else err.text + "\n").encode()
        block = (b"\r\n__exception__\r\n" + tag.encode() + b"\r\n" + message + str(len(message)).encode() + b" "
                 + tag.encode() + b"\r\n__exception__\r\n")
        self.handler.close_connection = True
        self._finish_headers({**headers, "X-ClickHouse-Exception-Code": str(err.code),
                              "X-ClickHouse-Exception-Tag": tag, "Connection": "close"})
        self._write(b"%x\r\n" % len(block) + block + b"\r\n")  # and no final chunk: the client must not read an end


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = RECEIVE_TIMEOUT  # a stalled request body ends as the server's SOCKET_TIMEOUT, not a hung thread
    server: Endpoint

    def log_message(self, fmt, *args):  # quiet: the query log is at /__log
        pass

    # -- plumbing ------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        data = read_body(self.rfile, self.headers, self.server.engine.version)
        return _decompress(data, self.headers.get("Content-Encoding", ""))

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, err: EngineError, query_id: str) -> None:
        self._send(http_status(err), (err.text + "\n").encode(),
                   {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(err.code),
                    "X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": self.server.engine.timezone})

    def _json(self, status: int, value) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    # -- methods ---------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_DELETE(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/__chaos":
            self._json(*chaos.control(self.server, "DELETE", b""))
            return
        if path == "/__faults":
            self.server.faults.clear()
        elif path == "/__log":
            with self.server.log_lock:
                self.server.log.clear()
        self._json(200, {"ok": True})

    def _dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        try:
            body = self._body() if self.command == "POST" else b""
        except EngineError as err:  # a body cut short: refused, nothing of it runs, the connection is closed
            self.close_connection = True
            self._guarded(self._send_error, err, "")
            return
        if url.path == "/__faults":
            try:
                self.server.faults.arm(json.loads(body or b"{}"))
            except (ValueError, TypeError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, {"ok": True})
            return
        if url.path == "/__chaos":
            self._json(*chaos.control(self.server, self.command, body))
            return
        if url.path == "/__log":
            with self.server.log_lock:
                self._json(200, list(self.server.log))
            return
        if url.path in ("/ping", "/") and "query" not in params and not body:
            self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            return
        if url.path not in ("/", "/query"):
            self._send(404, b"There is no handle " + url.path.encode() + b"\n", {"Content-Type": "text/plain"})
            return
        content_type = self.headers.get("Content-Type", "")
        external = content_type.startswith("multipart/form-data")  # (a urlencoded body is the query, as curl -d sends it)
        if external:
            params, body = {**params, **form_fields(content_type, body)}, b""  # fields: query, param_<name>
        self._query(params, body, external)

    # -- a query -----------------------------------------------------------------------------------------
    def _credentials(self, params: dict) -> tuple[str, str]:
        user = self.headers.get("X-ClickHouse-User") or params.get("user")
        key = self.headers.get("X-ClickHouse-Key") or params.get("password")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                pass
        return user or "default", key or ""

    def _query(self, params: dict, body: bytes, external: bool = False) -> None:
        server, engine = self.server, self.server.engine
        query_id = params.get("query_id") or str(uuid.uuid4())
        user, key = self._credentials(params)
        if server.password is not None and (user != server.user or key != server.password):
            self._send_error(EngineError(AUTHENTICATION_FAILED, (
                f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, or there is no user "
                f"with such name. (AUTHENTICATION_FAILED) (version {engine.version})")), query_id)
            return
        raw = params.get("query", "").encode()
        if raw and body:
            raw += b"\n"
        raw += body
        try:
            sql, data = split_insert_data(raw)
        except UnicodeDecodeError:
            self._send_error(EngineError(36, f"Code: 36. DB::Exception: Query is not valid UTF-8. (BAD_ARGUMENTS) "
                                             f"(version {engine.version})"), query_id)
            return
        # a server skips names ending so only in multipart requests (their external data's own parameters)
        settings = {k: v for k, v in params.items()
                    if k not in RESERVED and not k.startswith("param_")
                    and not (external and k.endswith(("_structure", "_types", "_format")))}
        entry = {"query": sql, "method": self.command, "session_id": params.get("session_id"), "query_id": query_id,
                 "database": params.get("database"), "settings": settings, "data_bytes": len(data or b""),
                 "received": time.time(), "status": None, "progress_headers": 0}
        with server.log_lock:
            server.log.append(entry)
        if not sql.strip():
            self._send_error(EngineError(62, f"Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR) "
                                             f"(version {engine.version})"), query_id)
            entry["status"] = 400
            return
        if len(split_statements(sql)) > 1:  # ClickHouse's parser takes one statement per HTTP request
            entry["status"] = 400
            self._send_error(EngineError(62, f"Code: 62. DB::Exception: Syntax error (Multi-statements are not "
                                             f"allowed): failed at position {len(sql)} (end of query). (SYNTAX_ERROR) "
                                             f"(version {engine.version})"), query_id)
            return
        fault = server.faults.take(sql) or chaos.inject(server.chaos, sql, params, entry)
        kind = entry["fault"] = fault["kind"] if fault else None
        if kind == "refuse":
            entry["status"] = fault["status"]
            self._send(fault["status"], b"<html><body>upstream unavailable</body></html>\n",
                       {"Content-Type": "text/html"})
            return
        if kind == "stall":
            time.sleep(fault["seconds"])
        response = self._response(settings)
        try:
            if not server.query_ids.claim(query_id):
                raise EngineError(QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING, (
                    f"Code: 216. DB::Exception: Query with id = {query_id} is already running. "
                    f"(QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING) (version {engine.version})"))
            try:
                body_out, fmt, summary = self._execute(sql, data, params, settings, response)
            finally:
                server.query_ids.release(query_id)
        except EngineError as err:
            entry["status"] = 200 if response.started else http_status(err)
            entry["error_code"], entry["finished"] = err.code, time.time()
            entry["progress_headers"], entry["client_gone"] = response.headers_sent, response.gone
            if response.gone:  # cancelled at a progress write: nobody to answer
                self.close_connection = True
                return
            if kind in ("late",):
                time.sleep(fault["seconds"])
            if kind in ("drop", "reset"):
                self._abort(b"", kind, started=response.started)
                return
            self._guarded(response.send_error, err, {
                "X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": engine.timezone,
                "X-ClickHouse-Summary": response._progress_json().decode()})
            return
        entry["status"], entry["finished"], entry["progress_headers"] = 200, time.time(), response.headers_sent
        headers = {"Content-Type": CONTENT_TYPES.get(fmt, "application/octet-stream" if fmt in (
                       "Native", "RowBinary", "RowBinaryWithNamesAndTypes", "RowBinaryWithNames") else
                       "text/plain; charset=UTF-8"),
                   "X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Format": fmt,
                   "X-ClickHouse-Timezone": engine.timezone, "X-ClickHouse-Summary": json.dumps(summary)}
        if params.get("session_id"):
            headers["Keep-Alive"] = f"timeout={params.get('session_timeout', '60')}"
        compress = settings["enable_http_compression"] in ("1", "true") if "enable_http_compression" in settings \
            else engine.compression
        if compress and body_out:
            body_out, method = _compress(body_out, self.headers.get("Accept-Encoding", ""))
            if method:
                headers["Content-Encoding"] = method
        if kind == "late":
            time.sleep(fault["seconds"])
        if kind in ("drop", "reset"):
            self._abort(body_out, kind, headers, started=response.started)
            return
        self._guarded(response.send, 200, body_out, headers)

    def _response(self, settings: dict) -> Response:
        """The response writer for this query's progress settings (the URL's; the engine's defaults: off, 100 ms)."""
        def on(name: str) -> bool:
            return settings.get(name, "0").strip().lower() in ("1", "true")
        try:
            interval = int(settings.get("http_headers_progress_interval_ms") or 100)
        except ValueError:
            interval = 100  # the engine refuses the value when it is SET
        readonly = self.command == "GET" or settings.get("readonly", "0") not in ("0", "")
        return Response(self, on("send_progress_in_http_headers"), interval,
                        readonly and on("cancel_http_readonly_queries_on_client_close"))

    def _guarded(self, send, *args) -> None:
        try:
            send(*args)
        except OSError:  # the client went away: the query ran anyway, as on a server
            self.close_connection = True

    def _abort(self, body: bytes, kind: str, headers: dict | None = None, started: bool = False) -> None:
        """drop: close without a word; reset: headers and half the body, then a TCP reset (after progress
        headers: the reset at once)."""
        self.close_connection = True
        try:
            if kind == "reset" and started:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif kind == "reset":
                self.send_response(200)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(max(len(body), 2)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if kind == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
        except OSError:
            pass

    def _execute(self, sql: str, data: bytes | None, params: dict, settings: dict,
                 response: Response) -> tuple[bytes, str, dict]:
        server, engine = self.server, self.server.engine
        session_id = params.get("session_id")
        if self.command == "GET":
            settings = {**settings, "readonly": "2"}
        # the engine takes no query id: this query is found for a cancel by its log_comment (system.processes' Settings)
        settings = {**settings, "log_comment": settings.get("log_comment") or f"chhttp-{uuid.uuid4()}"}
        binds = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        fmt = params.get("default_format") or "TabSeparated"
        trailing = TRAILING_FORMAT_RE.search(sql) if data is None else None
        out_fmt = trailing.group(1) if trailing else fmt
        tmp = None
        if data is not None:  # the INSERT's own data, handed to the engine as a file
            match = re.search(r"(\bSETTINGS\b.*)?\bFORMAT\s+\w+\s*$", sql, re.IGNORECASE | re.DOTALL)
            fd, tmp = tempfile.mkstemp(prefix="chhttp-", dir=server.tmpdir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            sql = f"{sql[:match.start()]} FROM INFILE {_quote(tmp)} {sql[match.start():]}"
        session = None
        try:
            if session_id:
                session = server.session(session_id, params, engine)
                # a GET applies readonly to its own query only (and the engine cannot take readonly back)
                handle = readonly_copy(session.handle, engine) if self.command == "GET" else session.handle
            else:
                handle = engine.handle()
            try:
                body, summary = self._run(handle, sql, fmt, binds, settings, params.get("database"),
                                          session is not None and handle is session.handle,
                                          response)
                return body, out_fmt, summary
            finally:
                if session is None or handle is not session.handle:
                    handle.close()
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine's own error, passed on as ClickHouse would
            raise engine_error(exc, engine.version) from None
        finally:
            if session is not None:
                session.used = time.monotonic()
                session.lock.release()
            if tmp:
                os.unlink(tmp)

    def _run(self, handle, sql, fmt, binds, settings, database, keep, response: Response):
        """SET the request's settings (and USE its database), run, and in a session put them back."""
        restore, old_db = {}, None
        if keep and (settings or database):
            names = ", ".join(_quote(k) for k in settings)
            if names:
                got = handle.query(f"SELECT name, value FROM system.settings WHERE name IN ({names})", "JSONEachRow")
                restore = {row["name"]: row["value"] for row in map(json.loads, got.bytes().decode().splitlines())}
            old_db = handle.query("SELECT currentDatabase()", "TabSeparated").bytes().decode().rstrip("\n")
        try:
            for name, value in settings.items():
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise EngineError(115, f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING) "
                                           f"(version {self.server.engine.version})")
                handle.query(f"SET {name} = {_quote(value)}", "TabSeparated")
            if database:
                handle.query(f"USE `{database.replace('`', '``')}`", "TabSeparated")
            result = self._watched(handle, sql, fmt, binds, response, settings["log_comment"])
            summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read()),
                       "elapsed_ns": str(int(result.elapsed() * 1e9))}
            return result.bytes() or b"", summary
        finally:
            for name, value in restore.items():
                handle.query(f"SET {name} = {_quote(value)}", "TabSeparated")
            if old_db:
                handle.query(f"USE `{old_db.replace('`', '``')}`", "TabSeparated")


    def _watched(self, handle, sql, fmt, binds, response: Response, marker: str):
        """Run the query on a worker thread while this one writes its progress headers; a client found gone
        at a progress write cancels it, as a server does (KILL QUERY ... SYNC from another handle: the
        engine stops at its next block; the blocks inserted before stay)."""
        out = {}

        def work():
            try:
                out["result"] = handle.query(sql, fmt, params=binds) if binds else handle.query(sql, fmt)
            except Exception as exc:  # noqa: BLE001 - handed to the request's thread
                out["error"] = exc
        handle.set_progress_callback(response.on_progress)
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            cancelled = False
            while worker.is_alive():
                worker.join(0.02)
                if worker.is_alive() and not cancelled and not response.tick():
                    cancelled = True
                    killer = self.server.engine.handle()
                    try:
                        killer.query(f"KILL QUERY WHERE Settings['log_comment'] = {_quote(marker)} SYNC", "TabSeparated")
                    finally:
                        killer.close()
        finally:
            worker.join()
            handle.set_progress_callback(None)
        if "error" in out:
            raise out["error"]
        return out["result"]


class QueryIds:
    """The query ids running now: a second query with one of them is refused, as a server refuses it."""

    def __init__(self):
        self.lock, self.running = threading.Lock(), set()

    def claim(self, query_id: str) -> bool:
        with self.lock:
            if query_id in self.running:
                return False
            self.running.add(query_id)
            return True

    def release(self, query_id: str) -> None:
        with self.lock:
            self.running.discard(query_id)


def readonly_copy(handle, engine: Engine):
    """A handle with a session's changed settings and current database, for one GET (read-only) query."""
    rows = handle.query("SELECT name, value FROM system.settings WHERE changed", "JSONEachRow").bytes().decode()
    database = handle.query("SELECT currentDatabase()", "TabSeparated").bytes().decode().rstrip("\n")
    copy = engine.handle()
    try:
        for row in map(json.loads, rows.splitlines()):
            copy.query(f"SET {row['name']} = {_quote(row['value'])}", "TabSeparated")
        copy.query(f"USE `{database.replace('`', '``')}`", "TabSeparated")
    except Exception:
        copy.close()
        raise
    return copy


class Endpoint(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, engine: Engine, user: str = "default", password: str | None = None):
        super().__init__(address, Handler)
        self.engine, self.user, self.password = engine, user, password
        self.faults, self.log, self.log_lock = Faults(), [], threading.Lock()
        self.sessions: dict[str, Session] = {}
        self.chaos: chaos.Chaos | None = None  # a seeded random fault schedule (--chaos, /__chaos)
        self.query_ids = QueryIds()
        self.sessions_lock = threading.Lock()
        self.tmpdir = tempfile.mkdtemp(prefix="chhttp-")

    def session(self, session_id: str, params: dict, engine: Engine) -> Session:
        """The session, locked for this query (SESSION_IS_LOCKED if another query holds it); its timeout is
        the latest request's, as a server keeps it."""
        timeout = session_timeout(params, engine.version)
        now = time.monotonic()
        with self.sessions_lock:
            for sid, s in list(self.sessions.items()):
                if now - s.used > s.timeout and s.lock.acquire(blocking=False):
                    s.handle.close()
                    del self.sessions[sid]
            session = self.sessions.get(session_id)
            if session is None:
                if params.get("session_check") in ("1", "true"):
                    raise EngineError(SESSION_NOT_FOUND, f"Code: 372. DB::Exception: Session {session_id} not found. "
                                                         f"(SESSION_NOT_FOUND) (version {engine.version})")
                session = Session(engine.handle(), timeout)
                self.sessions[session_id] = session
            if not session.lock.acquire(blocking=False):
                raise EngineError(SESSION_IS_LOCKED, f"Code: 373. DB::Exception: Session {session_id} is locked by a "
                                                     f"concurrent client. (SESSION_IS_LOCKED) (version {engine.version})")
            session.timeout = timeout
            return session


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the chDB store directory this process owns")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123, help="0: any free port (printed on stdout)")
    parser.add_argument("--user", default="default")
    parser.add_argument("--password", default=os.environ.get("CHHTTP_PASSWORD"),
                        help="require this password (default: none; or CHHTTP_PASSWORD)")
    parser.add_argument("--chaos", metavar="SEED:RATE", type=chaos.parse,
                        help="inject transport faults into a seeded random fraction of requests (tests/chaos.py)")
    args = parser.parse_args(argv)
    server = Endpoint((args.host, args.port), Engine(args.store), args.user, args.password)
    if args.chaos:
        server.chaos = chaos.Chaos(**args.chaos)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"listening on http://{args.host}:{server.server_address[1]}/ store {args.store} "
          f"(engine {server.engine.version})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
