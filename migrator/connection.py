"""Turn a URL into a clickhouse-connect client: embedded chDB by default, a server over HTTP otherwise.

The password never leaves this module in any printable form: `redact()` is what callers show.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect

from . import transport
from .errors import MigrateError, one_line

DEFAULT_STORE = ".chdb"


@dataclass(frozen=True)
class Target:
    """Where to connect: an embedded store path or a server URL (password kept out of repr)."""

    url: str
    store_path: Path | None  # set for embedded chDB

    @property
    def embedded(self) -> bool:
        return self.store_path is not None

    def __repr__(self) -> str:  # never leak a password through a repr in a traceback
        return f"Target({redact(self.url)!r})"


def resolve(url: str | None) -> Target:
    """Default to an embedded store in ./.chdb so `migrate up` works with no server at all."""
    url = url or os.environ.get("CLICKHOUSE_URL") or ""
    if not url:
        url = "chdb://" + str(Path(DEFAULT_STORE).resolve())
    if url.startswith("chdb:"):
        raw = url[len("chdb:"):]
        if raw.startswith("//"):
            raw = raw[2:]
        if not raw.startswith("/"):
            raw = str(Path(raw or DEFAULT_STORE).resolve())
        return Target("chdb://" + raw, Path(raw))
    password = url_password(url)
    if password and len(password) >= MIN_SECRET:
        _SECRETS.add(password)  # hidden from every later message of this process, wherever it appears
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - validates the port
        # The parser ends the user-info at the first / ? #; a password holding one parses as a host.
        readable = password is None or parsed.password == password
    except ValueError:  # the parser's message may quote a piece of the password: not shown
        readable = False
    if not readable:
        raise MigrateError(f"--url {redact(url)!r}: cannot be read as a URL; percent-encode the characters "
                           f"# / ? [ ] @ : % in the user and password (# is %23, / is %2F, ? is %3F, @ is %40)")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MigrateError(f"--url {redact(url)!r}: expected chdb:///path or http(s)://user@host:port")
    return Target(url, None)


MIN_SECRET = 4  # a shorter password is masked inside its URL only: masked everywhere it would mangle the text
_SECRETS: set[str] = set()
# scheme://user-info@ with the user-info running to the last @ before a space or quote, so a password
# holding # / ? [ or an unencoded @ is covered whether or not the URL parses.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"<>]*)@")


def url_password(url: str) -> str | None:
    """The password of a URL's user-info (as written, not decoded), found without parsing the URL: the
    user-info is everything between `://` and the last `@`, the password what follows its first `:`."""
    _, scheme, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    return (userinfo.partition(":")[2] or None) if scheme and at else None


def _mask(match: re.Match) -> str:
    user, colon, _ = match.group(2).partition(":")
    return f"{match.group(1)}{user}{':***' if colon else ''}@"


def redact(text: str) -> str:
    """Mask the password of every URL in the text (parsable or not), and CLICKHOUSE_PASSWORD and the
    passwords of the URLs this process resolved wherever they appear, raw or percent-encoded."""
    if not text:
        return text
    text = _USERINFO.sub(_mask, text)
    env = os.environ.get("CLICKHOUSE_PASSWORD") or ""
    forms = {env, urllib.parse.quote(env, safe="")}
    for secret in _SECRETS:
        forms |= {f for f in (secret, urllib.parse.unquote(secret), urllib.parse.quote(secret, safe=""))
                  if len(f) >= MIN_SECRET}
    for form in sorted(filter(None, forms), key=len, reverse=True):
        text = text.replace(form, "***")
    return text


class StoreHeld(MigrateError):
    """The embedded store is open in another process (chDB allows one process per store)."""


def control_dir(target: Target) -> Path | None:
    """The folder beside an embedded store for flag files (owner, live status, pause requests)."""
    if target.store_path is None:
        return None
    return target.store_path.with_name(target.store_path.name + ".control")


def _owner_file(target: Target) -> Path | None:
    cdir = control_dir(target)
    return cdir / "owner.json" if cdir else None


def store_owner(target: Target) -> dict | None:
    """Who holds an embedded store, as recorded by the process that opened it (None if unknown)."""
    path = _owner_file(target)
    try:
        return json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None


def _claim_store(target: Target, argv: list[str]) -> None:
    path = _owner_file(target)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(argv)}))
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_stderr():
    """chDB prints its own lock error on fd 2 before raising; the user gets our one line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


RECEIVE_TIMEOUT_ENV = "MIGRATE_RECEIVE_TIMEOUT"
DEFAULT_RECEIVE_TIMEOUT = 3900  # above a backfill batch's default timeout_seconds (3600)


def receive_timeout() -> int:
    """Seconds the HTTP client waits for an answer: longer than a batch may run, or the client would
    give up on a batch that the server keeps executing."""
    raw = os.environ.get(RECEIVE_TIMEOUT_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_RECEIVE_TIMEOUT
    except ValueError:
        raise MigrateError(f"{RECEIVE_TIMEOUT_ENV}={raw!r}: expected a whole number of seconds") from None
    if value <= 0:
        raise MigrateError(f"{RECEIVE_TIMEOUT_ENV}={raw!r}: must be > 0")
    return value


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held(target: Target, owner: dict | None, cause: str) -> StoreHeld:
    who = f"pid {owner['pid']} ({owner.get('command', '?')})" if owner else "another process"
    return StoreHeld(f"store {target.store_path} is held by {who}; wait for it to finish, or use "
                     f"'migrate backfill status|pause' which work while a run holds the store ({cause})")


def connect(target: Target, argv: list[str] | None = None):
    """Open the client; a store held by another process is a one-line error naming that process."""
    if target.embedded:
        target.store_path.parent.mkdir(parents=True, exist_ok=True)
        owner = store_owner(target)
        if (owner and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
                and owner["pid"] != os.getpid() and pid_alive(owner["pid"])):
            # Known live holder: do not even try. A refused chDB open can leave the process hanging at exit.
            raise _held(target, owner, "recorded owner is running")
        try:
            with _quiet_stderr():
                client = clickhouse_connect.get_client(dsn=target.url)
        except Exception as exc:  # chDB refuses a store another process holds
            raise _held(target, store_owner(target), type(exc).__name__) from None
        _claim_store(target, argv or ["migrate"])
        return client
    parsed = urllib.parse.urlsplit(target.url)
    try:
        return transport.retry(lambda: clickhouse_connect.get_client(  # its first request reads the version
            host=parsed.hostname,
            port=parsed.port or (8443 if parsed.scheme == "https" else 8123),
            username=urllib.parse.unquote(parsed.username or "default"),
            password=os.environ.get("CLICKHOUSE_PASSWORD") or urllib.parse.unquote(parsed.password or ""),
            secure=parsed.scheme == "https",
            autogenerate_session_id=False,  # no session: threads (heartbeat, batch) may share the client
            send_receive_timeout=receive_timeout(),
        ), f"connecting to {redact(target.url)}")
    except Exception as exc:
        raise MigrateError(f"cannot connect to {redact(target.url)}: {redact(one_line(exc))}") from None
