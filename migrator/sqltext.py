"""SQL text handling the migrator needs: statement splitting, `{db}`, and `--cluster` rewriting.

Kept to plain text transforms so that they can be unit-tested without a server.
"""
from __future__ import annotations

import re

from .errors import MigrateError

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_identifier(name: str, what: str = "database") -> str:
    """Refuse a name we would otherwise have to quote, so it can never break the SQL it lands in."""
    if not IDENT_RE.match(name or ""):
        raise MigrateError(f"{what} name {name!r} is not a valid identifier (letters, digits, _; not starting with a digit)")
    return name


def split_statements(sql: str) -> list[str]:
    """Split where ClickHouse's own lexer sees a `;`, so a file runs as the statements the engine would see.

    Pieces that hold only whitespace and comments are dropped; each piece keeps its comments and is
    stripped of surrounding whitespace. A string, quoted name or block comment left open runs to the
    end of the text, as in ClickHouse, so nothing after it is split.
    """
    out: list[str] = []
    first = last = -1  # extent of the current statement's non-whitespace tokens
    meaningful = False
    for kind, start, end in _lex(sql):
        if kind == ";":
            if meaningful:
                out.append(sql[first:last])
            first, meaningful = -1, False
            continue
        if kind == "space":
            continue
        if first < 0:
            first = start
        last = end
        meaningful = meaningful or kind != "comment"
    if meaningful:
        out.append(sql[first:last])
    return out


# ASCII whitespace plus the Unicode spaces ClickHouse skips (skipWhitespacesUTF8): U+0085 U+00A0 U+180E
# U+2000..200D U+2028 U+2029 U+202F U+205F U+2060 U+3000 U+FEFF
_SPACE = frozenset(" \t\n\r\f\v\x85\xa0\u180e\u2028\u2029\u202f\u205f\u2060\u3000\ufeff"
                   + "".join(map(chr, range(0x2000, 0x200E))))
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
# token kinds after which `.` followed by a digit is tuple access, not the start of a number
_DOT_AFTER = frozenset({"close", "word", "quoted", "number"})


def _lex(sql: str):
    """Yield (kind, start, end) with token extents as in ClickHouse's src/Parsers/Lexer.cpp.

    Only extents matter here, so kinds are coarse: space, comment, `;`, number, word, quoted
    (identifiers), string, dot, close, and `other` for any other one-character token or error.
    """
    i, n, prev = 0, len(sql), ""
    while i < n:
        ch, start = sql[i], i
        nxt = sql[i + 1] if i + 1 < n else ""
        if ch in _SPACE:
            while i < n and sql[i] in _SPACE:
                i += 1
            yield "space", start, i
            continue
        if ch in "-/" and nxt == ch or ch == "#" and nxt in (" ", "!"):  # --, //, "# ", "#!"
            j = sql.find("\n", i)
            kind, i = "comment", n if j < 0 else j
        elif ch == "/" and nxt == "*":  # left open it is an error token, kept so that the engine reports it
            close = _block_comment_end(sql, i + 2)
            kind, i = ("comment", close) if close else ("other", n)
        elif ch in "'\"`":
            kind, i = ("string" if ch == "'" else "quoted"), _quoted_end(sql, i, ch)
        elif ch in "\u2018\u201c" and len(sql[i + 1:i + 4].encode()) >= 3:  # ‘string’, “name”
            j = sql.find("\u2019" if ch == "\u2018" else "\u201d", i + 1)
            kind, i = ("string" if ch == "\u2018" else "quoted"), n if j < 0 else j + 1
        elif ch in _DIGITS:
            kind, i = _number(sql, i, after_dot=prev == "dot")
        elif ch == ".":
            if i > 0 and (nxt not in _DIGITS or prev in _DOT_AFTER):
                kind, i = "dot", i + 1
            else:
                kind, i = "number", _exponent(sql, _digits(sql, i + 1, False), False)
        elif ch == "\\" and nxt == "G":  # \G, the vertical-output terminator of clickhouse-client
            kind, i = "other", i + 2
        elif ch == "$" and (end := _heredoc_end(sql, i)):
            kind, i = "string", end
        elif ch == "$" and nxt not in _WORD:  # a lone `$`
            kind, i = "other", i + 1
        elif ch in "xXbB" and nxt == "'" and i + 2 < n:  # x'4142', b'0101': no escapes; unclosed eats the rest
            digits = _HEX if ch in "xX" else frozenset("01")
            j = i + 2
            while j < n and sql[j] in digits:
                j += 1
            kind, i = "string", j + 1 if j < n and sql[j] == "'" else n
        elif ch in _WORD or ch == "$":
            i += 1
            while i < n and (sql[i] in _WORD or sql[i] == "$"):
                i += 1
            kind = "word"
        else:  # `;`, brackets, operators, a lone `#` (an error in ClickHouse), anything else
            kind = ";" if ch == ";" else "close" if ch in ")]" else "other"
            i += 1
        if kind != "comment":
            prev = kind
        yield kind, start, i


def _quoted_end(sql: str, i: int, quote: str) -> int:
    """End of '...', "..." or `...`: a backslash escapes the next character, a doubled quote itself."""
    n, i = len(sql), i + 1
    while i < n:
        if sql[i] == "\\":
            i += 2
        elif sql[i] == quote:
            if sql[i + 1:i + 2] != quote:
                return i + 1
            i += 2
        else:
            i += 1
    return n


def _block_comment_end(sql: str, i: int) -> int:
    """End of a /* */ comment that started just before i (they nest, as in the SQL standard); 0 if open."""
    depth, n = 1, len(sql)
    while i + 1 < n:
        two = sql[i:i + 2]
        if two == "/*":
            depth, i = depth + 1, i + 2
        elif two == "*/":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return 0


def _heredoc_end(sql: str, i: int) -> int:
    """End of a heredoc `$tag$ ... $tag$` starting at i (the tag may be empty), or 0 if there is none."""
    close = sql.find("$", i + 1)
    if close < 0:
        return 0
    tag = sql[i:close + 1]
    found = sql.find(tag, close + 1)
    return 0 if found < 0 else found + len(tag)


def _digits(sql: str, i: int, hex_: bool, block_start: bool = True) -> int:
    """Skip digits and `_` separators between digits (`1_000`), as ClickHouse's number scanner does."""
    n, ok = len(sql), _HEX if hex_ else _DIGITS
    while i < n:
        if sql[i] in ok:
            block_start = False
        elif not (sql[i] == "_" and not block_start and i + 1 < n and sql[i + 1] in ok):
            break
        i += 1
    return i


def _exponent(sql: str, i: int, hex_: bool) -> int:
    """Skip `e-5` (`p-5` after hex digits): the sign is taken even with no digit after it."""
    n = len(sql)
    if i + 1 < n and sql[i] in ("pP" if hex_ else "eE"):
        i += 1
        if i + 1 < n and sql[i] in "+-":
            i += 1
        i = _digits(sql, i, False)
    return i


def _number(sql: str, i: int, after_dot: bool) -> tuple[str, int]:
    """A number, or a word that starts with digits (`1abc`); after a dot only digits (`t.1.2`)."""
    n, start = len(sql), i
    if after_dot:
        i = _digits(sql, i + 1, False, block_start=False)
    else:
        hex_ = False
        if i + 2 < n and sql[i] == "0" and sql[i + 1] in "xXbB":
            hex_ = sql[i + 1] in "xX" and sql[i + 2] in _HEX
            prefix = hex_ or (sql[i + 1] in "bB" and sql[i + 2] in "01")  # 0x1F, 0b101; else `0` then a word
            i = _digits(sql, i + 2 if prefix else i + 1, hex_, block_start=prefix)
        else:
            i = _digits(sql, i + 1, False, block_start=False)
        if i < n and sql[i] == ".":
            i = _digits(sql, i + 1, hex_)
        i = _exponent(sql, i, hex_)
    if i < n and sql[i] in _WORD:
        while i < n and sql[i] in _WORD:
            i += 1
        return ("word" if all(c in _WORD for c in sql[start:i]) else "other"), i  # `1e5x` is an error
    return "number", i


def substitute_db(sql: str, database: str) -> str:
    """Replace every `{db}`, in names, string literals and comments alike, as backfill placeholders are.

    Strings need it (`system.tables WHERE database = '{db}'`, a dictionary's `DB '{db}'`), and a
    comment then reads as what runs. The name is a checked identifier, so it can never close a
    string or comment nor add a `;`. `{db:Type}`, `{database}` and other braces are left alone.
    """
    return sql.replace("{db}", check_identifier(database))


_DDL_RE = re.compile(
    r"^(?P<head>\s*(?:CREATE(?:\s+OR\s+REPLACE)?|DROP|ALTER|RENAME|TRUNCATE|EXCHANGE)\s+"
    r"(?:TEMPORARY\s+)?(?P<kind>TABLE|MATERIALIZED\s+VIEW|VIEW|DATABASE|DICTIONARY|TABLES)\s+"
    r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?)(?P<name>(?:`[^`]+`|[\w.]+)(?:\s*\.\s*(?:`[^`]+`|\w+))?)",
    re.IGNORECASE)
# Replicated* and Shared* engines (ClickHouse Cloud's SharedMergeTree) already replicate: never rewrite them.
_ENGINE_RE = re.compile(r"\bENGINE\s*=\s*(?!Replicated|Shared)(?P<kind>\w*)MergeTree\b"
                        r"(?P<args>\s*\((?:[^()]|\([^()]*\))*\))?", re.IGNORECASE)
_QUALIFIED_RE = re.compile(r"(`[^`]+`|\w+)\s*\.\s*(?:`[^`]+`|\w+)")


def leading_comments(statement: str) -> int:
    """Length of the whitespace and comments before a statement's first keyword (a file header),
    by the same lexer as the splitter (nested comments, `#` only where ClickHouse takes it)."""
    for kind, start, _end in _lex(statement):
        if kind not in ("space", "comment"):
            return start
    return len(statement)


def _databases_named(body: str, default_database: str | None) -> set[str]:
    """The databases whose objects a DDL statement changes (unqualified names: the default database)."""
    if re.match(r"(?:RENAME|EXCHANGE)\b", body, re.IGNORECASE):
        names = body.split(" ON CLUSTER ")[0]
        found = {m.group(1).strip("`") for m in _QUALIFIED_RE.finditer(names)}
        return found or {default_database}
    m = _DDL_RE.match(body)
    if not m or m.group("kind").upper() == "DATABASE":  # a database itself is not inside one
        return set()
    qualified = _QUALIFIED_RE.fullmatch(m.group("name"))
    return {qualified.group(1).strip("`")} if qualified else {default_database}


def on_cluster(statement: str, cluster: str | None, replicated_databases=frozenset(),
               default_database: str | None = None) -> str:
    """Add `ON CLUSTER` to a DDL statement and replicate its MergeTree engine, keeping engine args.

    No cluster: the statement as is. DDL on objects inside a `Replicated` database is left alone too:
    that database replicates its DDL itself, refuses ON CLUSTER and picks replicated engines itself.
    """
    if cluster is None:
        return statement
    check_identifier(cluster, "cluster")
    start = leading_comments(statement)
    head, body = statement[:start], statement[start:]
    if replicated_databases and _databases_named(body, default_database) & set(replicated_databases):
        return statement
    if re.search(r"\bON\s+CLUSTER\b", body, re.IGNORECASE):
        out = body
    elif re.match(r"(?:RENAME|EXCHANGE)\b", body, re.IGNORECASE):  # ON CLUSTER goes after the name list
        out = f"{body.rstrip()} ON CLUSTER {cluster}"
    else:
        out = _DDL_RE.sub(lambda m: f"{m.group('head')}{m.group('name')} ON CLUSTER {cluster}", body, count=1)
    return head + _ENGINE_RE.sub(_replicated_engine, out)


def _replicated_engine(match: re.Match) -> str:
    args = (match.group("args") or "").strip()
    return f"ENGINE = Replicated{match.group('kind')}MergeTree{args or '()'}"
