"""tests/chhttp.py refuses and keeps what a ClickHouse server refuses and keeps, checked on raw bytes over a socket.

Each rule is the server's (src/Server/HTTP/HTTPServerRequest.cpp, HTTPHandler.cpp,
HTTP1/HTTP1ServerResponse.cpp); every result and error message comes from the engine or names the server's
own error. A body cut short is refused before anything of it runs; settings named `*_format`, `*_types`,
`*_structure` are settings except in multipart requests; a GET in a session is read-only for that query only;
session_timeout is checked; a second running query with the same query_id is refused; progress headers carry
the status, and an error after them is written as the server writes it.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.parse
import uuid

import pytest


def raw(endpoint, data: bytes, shut: bool = True) -> bytes:
    """Send bytes, (optionally) close our sending side as a client killed mid-request does, read to EOF."""
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=60) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def request(
    method: str,
    params: dict,
    body: bytes = b"",
    headers: dict | None = None,
    length: int | None = None,
    close: bool = True,
) -> bytes:
    head = {
        "Host": "x",
        **({"Content-Length": str(len(body) if length is None else length)} if method == "POST" else {}),
        **({"Connection": "close"} if close else {}),
        **(headers or {}),
    }
    lines = [f"{method} /?{urllib.parse.urlencode(params)} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    return "\r\n".join(lines).encode() + body


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def header(response: bytes, name: str) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0].decode()
    match = re.search(rf"^{name}: (.*)$", head, re.IGNORECASE | re.MULTILINE)
    return match.group(1).strip() if match else None


@pytest.fixture
def table(http_endpoint):
    name = "t_raw_" + uuid.uuid4().hex[:10]
    run = lambda sql: raw(http_endpoint, request("POST", {}, sql.encode()))  # noqa: E731
    assert status(run(f"CREATE TABLE {name} (x String) ENGINE = MergeTree ORDER BY x")) == 200
    yield name, run
    run(f"DROP TABLE IF EXISTS {name}")


def count(run, table_name: str) -> bytes:
    return run(f"SELECT count() FROM {table_name}").rsplit(b"\r\n\r\n", 1)[1]


def test_a_body_shorter_than_its_content_length_is_refused(http_endpoint, table):
    """The runner killed while sending a checkpoint row: 30 bytes of a 60-byte body, then the connection ends.
    The server's LimitReadBuffer: CANNOT_READ_ALL_DATA (33); nothing is inserted."""
    name, run = table
    body = f'INSERT INTO {name} FORMAT TSV\n{{"position": [1, 2]}}\n'.encode()
    answer = raw(http_endpoint, request("POST", {}, body[:-10], length=len(body)))
    assert status(answer) == 500 and header(answer, "X-ClickHouse-Exception-Code") == "33", answer
    assert b"Unexpected EOF, got " in answer and b"(CANNOT_READ_ALL_DATA)" in answer
    assert count(run, name) == b"0\n"


def test_a_chunked_body_without_its_last_chunk_is_refused(http_endpoint, table):
    """Chunks, then the end of the connection instead of `0\\r\\n\\r\\n`: UNEXPECTED_END_OF_FILE (3)."""
    name, run = table
    data = f"INSERT INTO {name} FORMAT TSV\na\nb\n".encode()
    chunked = b"%x\r\n" % len(data) + data + b"\r\n"
    answer = raw(
        http_endpoint,
        request("POST", {}, chunked, headers={"Transfer-Encoding": "chunked"}, length=None).replace(
            b"Content-Length: %d\r\n" % len(chunked), b""
        ),
    )
    assert status(answer) == 500 and header(answer, "X-ClickHouse-Exception-Code") == "3", answer
    assert b"while reading chunk header of HTTP chunked data" in answer
    assert count(run, name) == b"0\n"
    whole = raw(
        http_endpoint,
        request("POST", {}, chunked + b"0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}).replace(
            b"Content-Length: %d\r\n" % len(chunked + b"0\r\n\r\n"), b""
        ),
    )
    assert status(whole) == 200 and count(run, name) == b"2\n"  # the same body, ended: it runs


def test_a_truncated_multipart_form_is_refused(http_endpoint, table):
    """clickhouse-connect's form (query and param_* fields) cut short by the end of the connection: refused
    (33) and the INSERT it carried does not run."""
    name, run = table
    boundary = "b" + uuid.uuid4().hex
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="query"\r\n\r\n'
        f"INSERT INTO {name} SELECT {{v:String}}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="param_v"\r\n\r\nkept\r\n--{boundary}--\r\n'
    ).encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    answer = raw(http_endpoint, request("POST", {}, form[: len(form) // 2 + 20], headers=headers, length=len(form)))
    assert status(answer) == 500 and header(answer, "X-ClickHouse-Exception-Code") == "33", answer
    assert count(run, name) == b"0\n"
    assert status(raw(http_endpoint, request("POST", {}, form, headers=headers))) == 200
    assert count(run, name) == b"1\n"


def test_settings_named_like_formats_apply_except_in_multipart_requests(http_endpoint):
    """`date_time_output_format=iso` is a setting (31 settings end in _format, _types or _structure); a server
    skips such names only in multipart requests, where they describe external data."""
    sql = b"SELECT toDateTime('2024-01-02 03:04:05', 'UTC')"
    assert raw(http_endpoint, request("POST", {"date_time_output_format": "iso"}, sql)).endswith(
        b"\r\n\r\n2024-01-02T03:04:05Z\n"
    )
    boundary = "b" + uuid.uuid4().hex
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="query"\r\n\r\n{sql.decode()}\r\n--{boundary}--\r\n'
    ).encode()
    answer = raw(
        http_endpoint,
        request(
            "POST",
            {"date_time_output_format": "iso"},
            form,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        ),
    )
    assert answer.endswith(b"\r\n\r\n2024-01-02 03:04:05\n"), answer


def test_a_get_in_a_session_is_read_only_for_that_query_only(http_endpoint):
    sid = uuid.uuid4().hex
    name = "t_raw_" + uuid.uuid4().hex[:10]
    assert status(raw(http_endpoint, request("POST", {"session_id": sid}, b"SET max_threads = 3"))) == 200
    got = raw(
        http_endpoint,
        request("GET", {"session_id": sid, "query": "SELECT getSetting('max_threads'), getSetting('readonly')"}),
    )
    assert got.endswith(b"\r\n\r\n3\t2\n"), got  # the session's settings, read-only
    refused = raw(
        http_endpoint, request("GET", {"session_id": sid, "query": f"CREATE TABLE {name} (x UInt8) ENGINE = Memory"})
    )
    assert header(refused, "X-ClickHouse-Exception-Code") == "164"  # READONLY
    created = raw(
        http_endpoint, request("POST", {"session_id": sid}, f"CREATE TABLE {name} (x UInt8) ENGINE = Memory".encode())
    )
    assert status(created) == 200, created  # the POST after the GET writes
    assert raw(http_endpoint, request("POST", {"session_id": sid}, b"SELECT getSetting('readonly')")).endswith(
        b"\r\n\r\n0\n"
    )
    raw(http_endpoint, request("POST", {}, f"DROP TABLE {name}".encode()))


@pytest.mark.parametrize(
    "value, text",
    [
        ("abc", b"Invalid session timeout: 'abc'"),
        ("3601", b"Session timeout '3601' is larger than max_session_timeout: 3600"),
    ],
)
def test_session_timeout_is_checked_as_a_server_checks_it(http_endpoint, value, text):
    answer = raw(
        http_endpoint, request("POST", {"session_id": uuid.uuid4().hex, "session_timeout": value}, b"SELECT 1")
    )
    assert header(answer, "X-ClickHouse-Exception-Code") == "374" and text in answer, answer  # INVALID_SESSION_TIMEOUT
    ok = raw(http_endpoint, request("POST", {"session_id": uuid.uuid4().hex, "session_timeout": "3600"}, b"SELECT 1"))
    assert ok.endswith(b"\r\n\r\n1\n")


def test_a_second_running_query_with_the_same_id_is_refused(http_endpoint):
    """QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING (216) while the first runs; the id is free again once it ended.
    (The engine itself never sees the id: the endpoint checks it.)"""
    qid = "q-" + uuid.uuid4().hex
    first = threading.Thread(target=raw, args=(http_endpoint, request("POST", {"query_id": qid}, b"SELECT sleep(1.5)")))
    first.start()
    try:
        time.sleep(0.5)
        second = raw(http_endpoint, request("POST", {"query_id": qid}, b"SELECT 2"))
    finally:
        first.join()
    assert header(second, "X-ClickHouse-Exception-Code") == "216", second
    assert b"Query with id = " + qid.encode() + b" is already running" in second
    assert raw(http_endpoint, request("POST", {"query_id": qid}, b"SELECT 3")).endswith(b"\r\n\r\n3\n")


def test_progress_headers_carry_the_status_and_an_error_after_them_breaks_the_response(http_endpoint):
    """With send_progress_in_http_headers the 200 goes out with the first X-ClickHouse-Progress; a success ends
    with the last chunk, an error (throwIf at the 6th block) after it has X-ClickHouse-Exception-Code among the
    headers, an exception block in the body and no last chunk."""
    params = {"send_progress_in_http_headers": "1", "http_headers_progress_interval_ms": "100"}
    # (the client keeps its side open: a half-closed connection reads as a client gone, and is cancelled)
    ok = raw(
        http_endpoint,
        request("POST", params, b"SELECT sum(sleepEachRow(0.05)) FROM numbers(10) SETTINGS max_block_size = 1"),
        shut=False,
    )
    assert ok.startswith(b"HTTP/1.1 200 OK\r\nX-ClickHouse-Progress: {"), ok
    assert ok.endswith(b"\r\n2\r\n0\n\r\n0\r\n\r\n"), ok
    failed = raw(
        http_endpoint,
        request(
            "POST",
            params,
            b"SELECT throwIf(number = 5) + sleepEachRow(0.05) FROM numbers(10) SETTINGS max_block_size = 1",
        ),
        shut=False,
    )
    assert failed.startswith(b"HTTP/1.1 200 OK\r\nX-ClickHouse-Progress: {"), failed
    assert header(failed, "X-ClickHouse-Exception-Code") == "395" and header(failed, "Connection") == "close"
    tag = header(failed, "X-ClickHouse-Exception-Tag")
    body = failed.split(b"\r\n\r\n", 1)[1]
    assert re.search(
        rb"__exception__\r\n"
        + tag.encode()
        + rb"\r\nCode: 395\. DB::Exception: .*\n\d+ "
        + tag.encode()
        + rb"\r\n__exception__\r\n\r\n$",
        body,
        re.DOTALL,
    ), body
    assert not body.endswith(b"0\r\n\r\n")
