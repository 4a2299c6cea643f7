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
    r"(?:TEMPORARY\s+)?(?P<kind>TABLE|MATERIALIZED\s+VIEW|VIEW|DATABASE|DICTIONARY|TABLES)\s+"
    r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?)(?P<name>(?:`[^`]+`|[\w.]+)(?:\s*\.\s*(?:`[^`]+`|\w+))?)",
    re.IGNORECASE)
# Replicated* and Shared* engines (ClickHouse Cloud's SharedMergeTree) already replicate: never rewrite them.
_ENGINE_RE = re.compile(r"\bENGINE\s*=\s*(?!Replicated|Shared)(?P<kind>\w*)MergeTree\b"
                        r"(?P<args>\s*\((?:[^()]|\([^()]*\))*\))?", re.IGNORECASE)
_COMMENT_RE = re.compile(r"\s+|--[^\n]*|#[^\n]*|/\*.*?(?:\*/|$)", re.DOTALL)
_QUALIFIED_RE = re.compile(r"(`[^`]+`|\w+)\s*\.\s*(?:`[^`]+`|\w+)")


def _leading_comments(statement: str) -> int:
    """Length of the whitespace and comments before a statement's first keyword (a file header)."""
    i = 0
    while (m := _COMMENT_RE.match(statement, i)) and m.end() > i:
        i = m.end()
    return i


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
    start = _leading_comments(statement)
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
