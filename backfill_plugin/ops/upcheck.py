"""`migrate up` checks each pending backfill's SQL before anything is applied.

At `up` the tables a backfill reads are often created by the very up file being applied, so the
engine cannot plan the SQL against the target database yet. Instead the pending up files' schema
statements are replayed into a scratch database (tables already in the target database are
copied there empty, by structure), each backfill is planned there right after its own version's
statements (EXPLAIN PIPELINE: column counts, types, unknown names), and the scratch database is
dropped. Data statements (INSERT ...) are not replayed. When the replay cannot be faithful (a
dictionary, a Replicated engine with its own path, an engine that talks to another system, a
statement on another database), only the syntax is checked at `up` (EXPLAIN AST) and the rest
waits for the run's preflight, which plans the SQL against the real tables before the first batch.
`up --dry-run` writes nothing, so it checks text and syntax only.
"""
from __future__ import annotations

import logging
import re
import uuid

from migrator.discovery import read_text
from migrator.sqltext import _databases_named, leading_comments, split_statements, substitute_db

from ..errors import BackfillError, one_line
from ..protocol import dedup
from ..protocol.checkpoint import Row, backfill_id, new_checkpoint
from ..protocol.keys import KeySpace, probe_walk
from ..protocol.lease import lease_seconds
from ..protocol.run import Run
from ..spec import params as params_
from ..spec import sqlcheck
from ..spec.meta import check_source, load_spec
from ..spec.render import PLACEHOLDER, Raw, read_template, render

log = logging.getLogger("backfill")
SCHEMA = re.compile(r"(CREATE(\s+OR\s+REPLACE)?|ALTER|DROP|RENAME|EXCHANGE)\s+(TABLE|VIEW|MATERIALIZED\s+VIEW)\b",
                    re.IGNORECASE)
# Engines a replay may create: they keep data in the scratch database and talk to nothing else.
LOCAL_ENGINE = re.compile(r"\bENGINE\s*=\s*(?!(?:Replicated|Shared))(\w*MergeTree|Memory|Log|TinyLog|StripeLog|Null|"
                          r"Set|Join)\b", re.IGNORECASE)
FILLS = re.compile(r"\bPOPULATE\b|\bAS\s*\(?\s*(SELECT|WITH)\b", re.IGNORECASE)
# Statements that only move data: skipping them leaves the schema as the up file leaves it.
DATA = re.compile(r"(INSERT|SELECT|WITH|OPTIMIZE|SYSTEM|TRUNCATE|KILL|SET)\b", re.IGNORECASE)


class Scratch:
    """A throw-away database holding the schema the pending versions will leave behind."""

    def __init__(self, client, database: str):
        self.client, self.database = client, database
        self.name = f"_migrate_check_{uuid.uuid4().hex[:12]}"
        self.faithful: set[str] = set()  # tables with the target's own engine and settings (dedup checks)
        self.complete = True
        self.elsewhere: set[str] = set()  # other databases the up files change (not replayed)

    def __enter__(self):
        self.client.command(f"CREATE DATABASE {self.name}")
        try:
            self._copy_existing()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.client.command(f"DROP DATABASE IF EXISTS {self.name} SYNC")
        except Exception as err:  # noqa: BLE001 - a leftover empty database must not fail `up`
            log.warning("warning: could not drop the scratch database %s: %s", self.name, err)

    def _copy_existing(self) -> None:
        rows = self.client.query("SELECT name, engine, sorting_key FROM system.tables WHERE database = {d:String}",
                                 parameters={"d": self.database}).result_rows
        for name, engine, key in rows:
            src, dst = f"`{self.database}`.`{name}`", f"{self.name}.`{name}`"
            if engine.endswith("MergeTree") and not engine.startswith(("Replicated", "Shared")):
                self._run(f"CREATE TABLE {dst} AS {src}") and self.faithful.add(name)
            elif engine.endswith("MergeTree"):
                self._run(f"CREATE TABLE {dst} AS {src} ENGINE = MergeTree ORDER BY ({key or 'tuple()'})")
            elif engine in ("Memory", "Log", "TinyLog", "StripeLog", "Null", "Set", "Join"):
                self._run(f"CREATE TABLE {dst} AS {src}")
            else:  # views, dictionaries, Distributed, engines reading other systems
                log.debug("scratch copy cannot hold %s (%s)", name, engine)
                self.complete = False

    def _run(self, sql: str) -> bool:
        try:
            self.client.command(sql)
            return True
        except Exception as exc:  # noqa: BLE001 - the check degrades to syntax; the real `up` reports it
            log.debug("scratch replay skipped %r: %s", sql[:80], exc)
            self.complete = False
            return False

    def replay(self, up_path) -> None:
        """The schema statements of one up file, on the scratch database; data statements are skipped."""
        previous = getattr(self.client, "database", None) or self.client.command("SELECT currentDatabase()")
        self.client.database = self.name  # unqualified names resolve to the scratch database
        try:
            for stmt in split_statements(substitute_db(read_text(up_path), self.name)):
                body = stmt[leading_comments(stmt):]
                if not SCHEMA.match(body):
                    if not DATA.match(body):  # a function, dictionary, grant...: the SQL may need it
                        log.debug("scratch replay cannot run %r", body[:80])
                        self.complete = False
                    continue
                creates = re.match(r"CREATE(\s+OR\s+REPLACE)?\s+TABLE\b", body, re.IGNORECASE)
                others = _databases_named(body, self.name) - {self.name}
                if others:  # another database's objects are left alone; a plan that needs them is not judged
                    self.elsewhere |= others
                    continue
                if (creates and not LOCAL_ENGINE.search(body)) \
                        or (creates and FILLS.search(body)) or re.search(r"\bPOPULATE\b", body, re.IGNORECASE):
                    log.debug("scratch replay cannot run %r", body[:80])
                    self.complete = False
                    continue
                if self._run(stmt) and creates:
                    name = re.match(r"CREATE(?:\s+OR\s+REPLACE)?\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                                    r"(?:(?:`[^`]+`|\w+)\s*\.\s*)?`?(\w+)", body, re.IGNORECASE)
                    name and self.faithful.add(name.group(1))
        finally:
            self.client.database = previous


def stand_in_render(template: str, database: str) -> str:
    """The SQL with every placeholder replaced by a stand-in the parser accepts (for EXPLAIN AST)."""
    values = {m.group(1): 0 for m in PLACEHOLDER.finditer(template)}
    values.update(db=database, batch_range=Raw("batch_range"))  # an engine message then shows its name
    sql, _ = render(template, values)
    return PLACEHOLDER.sub(lambda m: f"CAST(NULL, 'Nullable({m.group(2)})')" if m.group(2) else m.group(0), sql)


def check_pending(context, migrations) -> None:
    """Lint every pending backfill, then plan its first range on the schema its version leaves."""
    pending = sorted(migrations, key=lambda m: m.version)
    checks = {}
    for mig in pending:
        if mig.has_backfill:
            spec = load_spec(mig)
            template = read_template(spec.sql_path)
            sqlcheck.warn(sqlcheck.lint(template, spec.sql_path))
            sqlcheck.explain(context.client, stand_in_render(template, context.database), None, spec.sql_path,
                             syntax_only=True)
            checks[mig.version] = (spec, template)
    if not checks or context.dry_run:
        return
    try:
        scratch = Scratch(context.client, context.database).__enter__()
    except Exception as exc:  # noqa: BLE001 - no scratch database (rights): the preflight plans it later
        log.warning("warning: no scratch database to plan the backfill SQL at up (%s); its first batch plans it",
                    one_line(exc))
        return
    try:
        for mig in pending:
            scratch.replay(mig.up)
            if mig.version in checks:
                _plan(context, scratch, *checks[mig.version])
    finally:
        scratch.__exit__(None, None, None)


def _plan(context, scratch: Scratch, spec, template: str) -> None:
    """EXPLAIN PIPELINE of the first range on the scratch schema; errors there count only if it is faithful."""
    rename = {scratch.name: context.database}
    try:
        keys = KeySpace(scratch.name, spec.meta["source_table"], check_source(context.client, spec, scratch.name),
                        *probe_walk(context.client))
        row = Row(backfill_id(scratch.name, spec.version), spec.version, scratch.name, "pending", new_checkpoint(spec))
        row.checkpoint["params"] = params_.resolve(context.client, spec, scratch.name, None, None)
        if None in row.checkpoint["params"].values():  # a param read from data the empty copy lacks
            log.debug("backfill %s: a param has no value on the empty schema; the preflight plans the SQL", spec.version)
            return
        run = Run(context.client, spec, keys, template, row)
        try:
            sql, params = run.render(run.check_batch(), 0)
        except BackfillError as exc:  # e.g. a placeholder a plugin provides only at run time (from its env)
            log.debug("backfill %s: not rendered at up (%s); the preflight renders and plans it", spec.version, exc)
            return
        sqlcheck.explain(context.client, sql, params, spec.sql_path, rename)
        target = None if run.skips_existing else dedup.target_table(sql, scratch.name)
        if target and target[0] == scratch.name and target[1] in scratch.faithful:
            try:
                dedup.check_window((context.database, target[1]), dedup.window(context.client, *target),
                                   spec.meta["timeout_seconds"] + lease_seconds())
            except BackfillError as exc:
                sqlcheck.refuse(f"{spec.sql_path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - only a faithful replay's verdict stops `up`
        if scratch.complete and isinstance(exc, BackfillError) and not any(d in str(exc) for d in scratch.elsewhere):
            message = str(exc)
            for old, new in rename.items():
                message = message.replace(old, new)
            raise BackfillError(message if str(spec.sql_path) in message or str(spec.meta_path) in message
                                else f"{spec.sql_path}: {message}") from None
        log.debug("backfill SQL check at up left to the preflight: %s", exc)
