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
    """Split on `;` outside quotes, backticks and comments; drop statements that are only comments."""
    out, buf, i, n = [], [], 0, len(sql)
    meaningful = False
    while i < n:
        ch = sql[i]
        two = sql[i:i + 2]
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if sql[j + 1:j + 2] == ch:  # doubled quote escapes itself
                        j += 2
                        continue
                    break
                j += 1
            buf.append(sql[i:j + 1])
            meaningful = True
            i = j + 1
        elif two == "--" or ch == "#":
            j = sql.find("\n", i)
            j = n if j < 0 else j
            buf.append(sql[i:j])
            i = j
        elif two == "/*":
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            buf.append(sql[i:j])
            i = j
        elif ch == ";":
            if meaningful:
                out.append("".join(buf).strip())
            buf, meaningful = [], False
            i += 1
        else:
            buf.append(ch)
            meaningful = meaningful or not ch.isspace()
            i += 1
    if meaningful:
        out.append("".join(buf).strip())
    return out


def substitute_db(sql: str, database: str) -> str:
    """`{db}` is the only placeholder a schema migration has."""
    return sql.replace("{db}", check_identifier(database))


_DDL_RE = re.compile(
    r"^(?P<head>\s*(?:CREATE(?:\s+OR\s+REPLACE)?|DROP|ALTER|RENAME|TRUNCATE|EXCHANGE)\s+"
    r"(?:TEMPORARY\s+)?(?:TABLE|MATERIALIZED\s+VIEW|VIEW|DATABASE|DICTIONARY|TABLES)\s+"
    r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?)(?P<name>(?:`[^`]+`|[\w.]+)(?:\s*\.\s*(?:`[^`]+`|\w+))?)",
    re.IGNORECASE)
_ENGINE_RE = re.compile(r"\bENGINE\s*=\s*(?!Replicated)(?P<kind>\w*)MergeTree\b(?P<args>\s*\((?:[^()]|\([^()]*\))*\))?", re.IGNORECASE)
_COMMENT_RE = re.compile(r"\s+|--[^\n]*|#[^\n]*|/\*.*?(?:\*/|$)", re.DOTALL)


def _leading_comments(statement: str) -> int:
    """Length of the whitespace and comments before a statement's first keyword (a file header)."""
    i = 0
    while (m := _COMMENT_RE.match(statement, i)) and m.end() > i:
        i = m.end()
    return i


def on_cluster(statement: str, cluster: str) -> str:
    """Add `ON CLUSTER` to a DDL statement and replicate its MergeTree engine, keeping engine args."""
    check_identifier(cluster, "cluster")
    start = _leading_comments(statement)
    head, body = statement[:start], statement[start:]
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
