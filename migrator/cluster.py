"""What DDL on a server or cluster needs beyond the SQL text: Replicated databases, macros, 517 retries."""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from .errors import MigrateError, error_code

CANNOT_ASSIGN_ALTER = 517
DDL_TRIES = 5
DDL_FIRST_DELAY = 0.2  # seconds; doubles on each try (0.2, 0.4, 0.8, 1.6)

# Replicated*MergeTree without arguments takes the server's default_replica_path
# ('/clickhouse/tables/{uuid}/{shard}') and default_replica_name ('{replica}').
_DEFAULT_PATH_RE = re.compile(r"\bENGINE\s*=\s*Replicated\w*MergeTree\b(?!\s*\(\s*')", re.IGNORECASE)
_ENGINE_ARGS_RE = re.compile(r"\bENGINE\s*=\s*Replicated\w*MergeTree\s*\(([^)]*)\)", re.IGNORECASE)
NEEDED_MACROS = ("shard", "replica")


def replicated_databases(client) -> frozenset[str]:
    """Databases with the Replicated engine: they replicate DDL themselves and refuse ON CLUSTER."""
    rows = client.query("SELECT name FROM system.databases WHERE engine = 'Replicated'").result_rows
    return frozenset(r[0] for r in rows)


def required_macros(statements: Iterable[str]) -> set[str]:
    """The {shard}/{replica} macros that the Replicated engines in these statements resolve on the server."""
    needed: set[str] = set()
    for stmt in statements:
        if _DEFAULT_PATH_RE.search(stmt):
            needed.update(NEEDED_MACROS)  # server defaults: .../{shard} and {replica}
        for args in _ENGINE_ARGS_RE.findall(stmt):
            needed.update(m for m in NEEDED_MACROS if "{" + m + "}" in args)
    return needed


def check_macros(client, statements: Iterable[str]) -> None:
    """Before anything is applied: a missing macro is one line, not a half-applied cluster."""
    needed = required_macros(statements)
    if not needed:
        return
    present = {r[0] for r in client.query("SELECT macro FROM system.macros").result_rows}
    missing = sorted(needed - present)
    if missing:
        names = ", ".join("{" + m + "}" for m in missing)
        raise MigrateError(f"--cluster: macro {names} is not defined on this server (system.macros); the "
                           "replicated engines need it: define it in the server's <macros> config")


def run_ddl(client, statement: str, tries: int = DDL_TRIES, delay: float = DDL_FIRST_DELAY,
            sleep: Callable[[float], None] = time.sleep):
    """Send one DDL statement; CANNOT_ASSIGN_ALTER (517: the replica's metadata is behind the previous
    ALTER, common between back-to-back DDL on a cluster) is retried with a doubling backoff."""
    for attempt in range(tries):
        try:
            return client.command(statement)
        except Exception as exc:
            if error_code(exc) != CANNOT_ASSIGN_ALTER or attempt == tries - 1:
                raise
            sleep(delay * 2 ** attempt)


def check_cluster(client, cluster: str) -> None:
    """Before anything is applied: `--cluster NAME` must name a cluster of this server (system.clusters),
    or every ON CLUSTER statement would fail after the tracking state was touched."""
    known = [r[0] for r in client.query("SELECT DISTINCT cluster FROM system.clusters ORDER BY cluster").result_rows]
    if cluster not in known:
        have = f"it has {', '.join(known)}" if known else "it has none"
        raise MigrateError(f"--cluster {cluster}: no such cluster on this server (system.clusters; {have}); "
                           f"nothing applied")
