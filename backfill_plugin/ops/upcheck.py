"""`migrate up` checks each pending backfill's SQL before anything is applied.

At `up` the tables a backfill reads are often created by the very up file being applied, so the
engine cannot plan the SQL against the target database yet. Instead the pending up files' schema
statements are replayed into a scratch database (tables already in the target database are
copied there empty, by structure), each backfill is planned there right after its own version's
statements (EXPLAIN PIPELINE: column counts, types, unknown names), and the scratch database is
dropped. Data statements are not replayed, except `INSERT ... VALUES` (a settings row a param may
read). An object the copy cannot hold (a view, a materialized view, a dictionary, a Distributed or
other remote table, a function the up file creates) matters only to a backfill whose SQL reads it
(the engine's parse of the SQL names it): that backfill gets the syntax check only, and the run's
preflight plans it on the real tables; every other backfill is planned in full. A param read from
data (`{"sql": ...}`) is computed on the real tables when none of them is changed by a pending up
file, on the scratch copy when every write to them was replayed there, and otherwise the backfill
gets the syntax check only: `up` never refuses SQL for a value the run would not see.
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
from ..spec import sqlast, sqlcheck
from ..spec.meta import check_source, load_spec
from ..spec.render import PLACEHOLDER, Raw, placeholders, read_template, render

log = logging.getLogger("backfill")
SCHEMA = re.compile(r"(CREATE(\s+OR\s+REPLACE)?|ALTER|DROP|RENAME|EXCHANGE)\s+(TABLE|VIEW|MATERIALIZED\s+VIEW)\b",
                    re.IGNORECASE)
# Engines a replay may create: they keep data in the scratch database and talk to nothing else.
LOCAL_ENGINE = re.compile(r"\bENGINE\s*=\s*(?!(?:Replicated|Shared))(\w*MergeTree|Memory|Log|TinyLog|StripeLog|Null|"
                          r"Set|Join)\b", re.IGNORECASE)
# The object a schema statement is about (None for RENAME/EXCHANGE, which name two).
OBJECT = re.compile(r"(?:CREATE(?:\s+OR\s+REPLACE)?|ALTER|DROP)\s+(?:TEMPORARY\s+)?(?:TABLE|VIEW|MATERIALIZED\s+VIEW|"
                    r"DICTIONARY|FUNCTION)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(?:(`[^`]+`|\w+)\s*\.\s*)?(`[^`]+`|\w+)",
                    re.IGNORECASE)
FILLS = re.compile(r"\bPOPULATE\b|\bAS\s*\(?\s*(SELECT|WITH)\b", re.IGNORECASE)
# Statements that only move data: skipping them leaves the schema as the up file leaves it.
DATA = re.compile(r"(INSERT|SELECT|WITH|OPTIMIZE|SYSTEM|TRUNCATE|KILL|SET)\b", re.IGNORECASE)


class Scratch:
    """A throw-away database holding the schema the pending versions will leave behind."""

    def __init__(self, client, database: str):
        self.client, self.database = client, database
        self.name = f"_migrate_check_{uuid.uuid4().hex[:12]}"
        self.faithful: set[str] = set()  # tables with the target's own engine and settings (dedup checks)
        self.complete = True  # False: a statement whose effect on the plan is unknown (a grant, a user...)
        self.missing: set[str] = set()  # objects the copy cannot hold: only SQL that reads one is left unjudged
        self.changed: set[str] = set()  # objects a replayed up file created, altered, dropped or wrote
        self.unreplayed: set[str] = set()  # tables an up file writes in a way the copy did not repeat
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
                self._run(f"CREATE TABLE {dst} AS {src}", name) and self.faithful.add(name)
            elif engine.endswith("MergeTree"):
                self._run(f"CREATE TABLE {dst} AS {src} ENGINE = MergeTree ORDER BY ({key or 'tuple()'})", name)
            elif engine in ("Memory", "Log", "TinyLog", "StripeLog", "Null", "Set", "Join"):
                self._run(f"CREATE TABLE {dst} AS {src}", name)
            else:  # views, dictionaries, Distributed, engines reading other systems
                log.debug("scratch copy cannot hold %s (%s)", name, engine)
                self.missing.add(name)

    def _run(self, sql: str, name: str | None) -> bool:
        try:
            self.client.command(sql)
            return True
        except Exception as exc:  # noqa: BLE001 - the check degrades to syntax; the real `up` reports it
            log.debug("scratch replay skipped %r: %s", sql[:80], exc)
            self._lacks(name)
            return False

    def _lacks(self, name: str | None) -> None:
        """`name` is not as the up files leave it: only SQL reading it is not judged (None: no SQL is)."""
        if name is None:
            self.complete = False
        else:
            self.missing.add(name)

    def _data(self, stmt: str) -> None:
        """A data statement: an `INSERT ... VALUES` into the copy is repeated (a settings row a param reads);
        any other write is recorded, so a param reading that table is not computed on the copy."""
        try:
            shape = sqlast.parse(self.client, stmt, None, "up file")
        except BackfillError:
            self.complete = False
            return
        if shape.kind == "SelectWithUnionQuery":
            return
        target = shape.target_in(self.name) if shape.is_insert else None
        if target and target[0] == self.name and not shape.has_select and self._run(stmt, target[1]):
            self.changed.add(target[1])
            return
        written = {target[1]} if target else {n.split(".")[-1] for n in shape.names}
        self.unreplayed |= written
        self.changed |= written

    def replay(self, up_path) -> None:
        """The schema statements of one up file, on the scratch database; data statements are skipped."""
        previous = getattr(self.client, "database", None) or self.client.command("SELECT currentDatabase()")
        self.client.database = self.name  # unqualified names resolve to the scratch database
        try:
            for stmt in split_statements(substitute_db(read_text(up_path), self.name)):
                body = stmt[leading_comments(stmt):]
                named = OBJECT.match(body)
                name = named and named.group(2).strip("`")
                if named and named.group(1) and named.group(1).strip("`") not in (self.name,):
                    name = None  # another database's object: the `others` check below
                if not SCHEMA.match(body):
                    if DATA.match(body):
                        self._data(stmt)
                    else:  # a function, dictionary, grant...: only SQL naming it needs it
                        log.debug("scratch replay cannot run %r", body[:80])
                        self._lacks(name if re.match(r"CREATE(\s+OR\s+REPLACE)?\s+(FUNCTION|DICTIONARY)\b", body,
                                                     re.IGNORECASE) else None)
                    continue
                creates = re.match(r"CREATE(\s+OR\s+REPLACE)?\s+TABLE\b", body, re.IGNORECASE)
                others = _databases_named(body, self.name) - {self.name}
                if others:  # another database's objects are left alone; a plan that needs them is not judged
                    self.elsewhere |= others
                    continue
                name and self.changed.add(name)
                if name in self.missing:
                    continue  # a statement on an object the copy lacks leaves it lacking
                if (creates and not LOCAL_ENGINE.search(body)) \
                        or (creates and FILLS.search(body)) or re.search(r"\bPOPULATE\b", body, re.IGNORECASE):
                    log.debug("scratch replay cannot run %r", body[:80])
                    self._lacks(name)
                    continue
                if re.match(r"ALTER\b.*\b(UPDATE|DELETE)\b", body, re.IGNORECASE | re.DOTALL) and name:
                    self.unreplayed.add(name)  # a mutation of data the copy does not hold
                if self._run(stmt, name) and creates and name:
                    self.faithful.add(name)
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
            shape = sqlast.parse(context.client, stand_in_render(template, context.database), None, spec.sql_path)
            sqlcheck.warn(sqlcheck.lint(template, spec.sql_path, context.client, shape))
            sqlcheck.check_form(shape, spec.sql_path, "retry_count" in placeholders(template))
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
    """EXPLAIN PIPELINE of the first range on the scratch schema; errors there count unless the SQL reads
    an object the copy lacks (or the replay met a statement it cannot judge)."""
    rename = {scratch.name: context.database}
    if spec.meta["source_table"] in scratch.missing:
        log.debug("backfill %s: its source is not in the scratch copy; the preflight plans it", spec.version)
        return
    values = _params(context, scratch, spec)
    if values is None:
        return
    try:
        keys = KeySpace(scratch.name, spec.meta["source_table"], check_source(context.client, spec, scratch.name),
                        *probe_walk(context.client))
        row = Row(backfill_id(scratch.name, spec.version), spec.version, scratch.name, "pending", new_checkpoint(spec))
        row.checkpoint["params"] = values
        run = Run(context.client, spec, keys, template, row)
        try:
            sql, params = run.render(run.check_batch(), 0)
        except BackfillError as exc:  # e.g. a placeholder a plugin provides only at run time (from its env)
            log.debug("backfill %s: not rendered at up (%s); the preflight renders and plans it", spec.version, exc)
            return
        shape = sqlast.parse(context.client, sql, params, spec.sql_path, rename)
        lacking = sorted(n for n in scratch.missing if shape.mentions(n, (scratch.name, context.database)))
        if lacking:
            log.debug("backfill %s reads %s, which the scratch copy cannot hold; the preflight plans it",
                      spec.version, ", ".join(lacking))
            return
        sqlcheck.explain(context.client, sql, params, spec.sql_path, rename)
        target = None if run.skips_existing else shape.target_in(scratch.name)
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


def _params(context, scratch: Scratch, spec) -> dict | None:
    """The params as the run will fix them, or None when one is read from data neither the real tables
    (a table a pending up file changes) nor the scratch copy (a write it did not repeat) can show."""
    values = {}
    for name, value in spec.meta["params"].items():
        if not isinstance(value, dict):
            values[name] = value
            continue
        where = _data_home(context, scratch, value["sql"], spec)
        if where is None:
            log.debug("backfill %s: param %s reads data up cannot see yet; the preflight plans the SQL",
                      spec.version, name)
            return None
        try:
            values[name] = params_.compute(context.client, value["sql"], where, spec.meta_path)
        except Exception as exc:  # noqa: BLE001 - the run computes it and reports its own error
            log.debug("backfill %s: param %s not computed at up (%s)", spec.version, name, one_line(exc))
            return None
    return values


def _data_home(context, scratch: Scratch, sql: str, spec) -> str | None:
    """Where a `{"sql": ...}` param reads what the run would: the real database when no table it reads is
    changed by the pending up files, the scratch copy when every write to them was repeated there."""
    shape = sqlast.parse(context.client, render(sql, {"db": context.database}, spec.meta_path)[0], None,
                         spec.meta_path)
    if shape.kind != "SelectWithUnionQuery":
        return None  # only a SELECT is run at up
    own = {t.split(".")[-1] for t in shape.tables if "." not in t or t.rsplit(".", 1)[0] == context.database}
    others = {t.rsplit(".", 1)[0] for t in shape.tables if "." in t and t.rsplit(".", 1)[0] != context.database}
    if others & scratch.elsewhere:
        return None
    if not own & scratch.changed:
        return context.database
    if own & (scratch.unreplayed | scratch.missing):
        return None
    existing = {r[0] for r in context.client.query(
        "SELECT name FROM system.tables WHERE database = {d:String} AND name IN {n:Array(String)}",
        parameters={"d": context.database, "n": sorted(own)}).result_rows}
    return None if existing & scratch.changed else scratch.name  # rows from before `up` are not in the copy
