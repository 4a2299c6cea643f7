"""Validate `.backfill.meta` so a typo fails before the first batch, naming file and field."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from migrator.discovery import Migration, discover

from ..errors import BackfillError
from . import keytypes

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED = {"db", "batch_size", "retry_count", "batch_range"}
SCALARS = (str, int, float, bool)
MAX_INT = 2 ** 63 - 1  # what ClickHouse takes as a LIMIT or a setting


def _int(min_value, max_value=MAX_INT):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        if value < min_value:
            return f"must be >= {min_value}"
        if value > max_value:
            return f"must be <= {max_value}"
    return check


def _number_pos(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    if not math.isfinite(value):  # JSON's NaN/Infinity: ClickHouse refuses them only at the first batch
        return "must be a finite number"
    if value <= 0:
        return "must be > 0"


OFF, AUTO = "off", "auto"  # a pacing limit turned off; max_target_parts from the table's parts_to_delay_insert


def _or_words(check, *words):
    """A pacing field: a number checked by `check`, or one of the words (spelled the same on the CLI)."""
    quoted = [f'"{w}"' for w in words]
    alternatives = (", " if len(quoted) > 1 else " or ") + ", ".join(quoted[:-1]) + \
        (" or " if len(quoted) > 1 else "") + quoted[-1]

    def wrapped(value):
        if isinstance(value, str) and value in words:
            return None
        problem = check(value)
        return problem + alternatives if problem else None
    return wrapped


def _bool(value):
    return None if isinstance(value, bool) else "must be true or false"


def _str(value):
    return None if isinstance(value, str) else "must be a string"


def _ident(value):
    if not isinstance(value, str) or not IDENT.match(value):
        return "must be a table name (letters, digits, _)"


def _columns(value):
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of column names"
    if not all(isinstance(c, str) and IDENT.match(c) for c in value):
        return "must list plain column names"
    if len(set(value)) != len(value):
        return "must not repeat a column"


# Settings the batch protocol sets itself: a meta value would win over them (a fixed token
# deduplicates every batch after the first away: silent loss) or be silently overridden.
OWNED_SETTINGS = {
    "insert_deduplicate": "is set by the backfill itself (exactly-once replays); remove it",
    "insert_deduplication_token": "is set by the backfill itself (one token per batch range); remove it",
    "max_execution_time": "is set from field 'timeout_seconds'; use that field",
}


def _settings(value):
    if not isinstance(value, dict):
        return "must be an object of ClickHouse settings"
    for key, val in value.items():
        if not IDENT.match(key) or not isinstance(val, SCALARS):
            return f"entry {key!r} must be a setting name with a scalar value"
        if key.lower() in OWNED_SETTINGS:
            return f"entry {key!r} {OWNED_SETTINGS[key.lower()]}"


def _params(value):
    if not isinstance(value, dict):
        return "must be an object of name: value"
    for key, val in value.items():
        if not IDENT.match(key) or key in RESERVED or key.startswith(("checkpoint_", "batch_end_")):
            return f"name {key!r} is not allowed (identifier, not a framework placeholder)"
        is_sql = isinstance(val, dict) and set(val) == {"sql"} and isinstance(val["sql"], str)
        if not (is_sql or isinstance(val, SCALARS)):
            return f"{key!r} must be a constant or {{\"sql\": \"SELECT ...\"}}"


PUBLISH_MODES = ("exchange", "partitions")
# field of the `publish` block: (required, check)
PUBLISH_FIELDS = {"mode": (True, lambda v: None if v in PUBLISH_MODES else 'must be "exchange" or "partitions"'),
                  "staging_table": (True, _ident), "live_table": (True, _ident), "kept_table": (False, _ident)}


def _publish(value):
    """The optional rebuild block: which table the SQL fills, which live table it replaces, and how."""
    if not isinstance(value, dict):
        return "must be an object with mode, staging_table, live_table (and kept_table)"
    for key in value:
        if key not in PUBLISH_FIELDS:
            return f".{key} is not a known field (allowed: {', '.join(PUBLISH_FIELDS)})"
    for key, (required, check) in PUBLISH_FIELDS.items():
        if key not in value:
            if required:
                return f".{key} is missing"
            continue
        problem = check(value[key])
        if problem:
            return f".{key} {problem}"
    names = [value[k] for k in ("staging_table", "live_table", "kept_table") if k in value]
    if len(set(names)) != len(names):
        return "must name different tables for staging_table, live_table and kept_table"


# field: (required, default, check)
FIELDS = {
    "migration_version": (True, None, _int(0)),
    "batch_size": (True, None, _int(1)),
    "checkpoint_columns": (True, None, _columns),
    "source_table": (True, None, _ident),
    "description": (False, "", _str),
    "timeout_seconds": (False, 3600, _number_pos),
    "run_on_startup": (False, False, _bool),
    "max_retries": (False, 3, _int(0)),
    "min_batch_size": (False, None, _int(1)),  # default: min(1000, batch_size), set below
    "max_batch_size": (False, None, _int(1)),  # default: 10 x batch_size, set below
    "target_batch_seconds": (False, OFF, _or_words(_number_pos, OFF)),
    "max_rows_per_second": (False, OFF, _or_words(_number_pos, OFF)),
    "max_target_parts": (False, AUTO, _or_words(_int(1), AUTO, OFF)),
    # 10: a few routine mutations (lightweight deletes) run beside the backfill; a longer queue means
    # the merge pool is busy rewriting the table and the backfill's new parts compete with it.
    "max_pending_mutations": (False, 10, _or_words(_int(0), OFF)),
    "max_replica_delay_seconds": (False, 300, _or_words(_number_pos, OFF)),
    "settings": (False, {}, _settings),
    "params": (False, {}, _params),
    "publish": (False, None, _publish),
}


@dataclass
class BackfillSpec:
    """A validated backfill: its files and its metadata with defaults filled in."""

    version: int
    name: str
    sql_path: Path
    meta_path: Path
    validate_path: Path | None
    meta: dict

    @property
    def description(self) -> str:
        return self.meta["description"] or self.name.replace("_", " ")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    """json.loads keeps the last of two equal keys silently; a meta file with both is ambiguous."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_spec(migration: Migration) -> BackfillSpec:
    """Parse and check a migration's meta file (not yet against the database)."""
    path = migration.backfill_meta
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise BackfillError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise BackfillError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise BackfillError(f"{path}: duplicate field {exc.args[0]!r}") from None
    if not isinstance(raw, dict):
        raise BackfillError(f"{path}: must be a JSON object")
    for key in raw:
        if key not in FIELDS:
            raise BackfillError(f"{path}: unknown field {key!r} (allowed: {', '.join(FIELDS)})")
    meta = {}
    for key, (required, default, check) in FIELDS.items():
        if key not in raw:
            if required:
                raise BackfillError(f"{path}: missing required field {key!r}")
            meta[key] = default
            continue
        problem = check(raw[key])
        if problem and problem.startswith("."):  # a field of a nested block: named as 'publish.mode'
            sub, problem = problem[1:].split(" ", 1)
            value = raw[key].get(sub) if isinstance(raw[key], dict) else raw[key]
            raise BackfillError(f"{path}: field '{key}.{sub}' {problem} (got {json.dumps(value)[:60]})")
        if problem:
            raise BackfillError(f"{path}: field {key!r} {problem} (got {json.dumps(raw[key])[:60]})")
        meta[key] = raw[key]
    if meta["migration_version"] != migration.version:
        raise BackfillError(f"{path}: field 'migration_version' is {meta['migration_version']} "
                            f"but the file name says {migration.version}")
    if meta["min_batch_size"] is None:  # a default never makes a valid file invalid
        meta["min_batch_size"] = min(1000, meta["batch_size"])
    if meta["min_batch_size"] > meta["batch_size"]:
        raise BackfillError(f"{path}: field 'min_batch_size' ({meta['min_batch_size']}) "
                            f"is larger than 'batch_size' ({meta['batch_size']})")
    if meta["max_batch_size"] is None:
        meta["max_batch_size"] = min(10 * meta["batch_size"], MAX_INT)
    if meta["max_batch_size"] < meta["batch_size"]:
        raise BackfillError(f"{path}: field 'max_batch_size' ({meta['max_batch_size']}) "
                            f"is smaller than 'batch_size' ({meta['batch_size']})")
    target = meta["target_batch_seconds"]
    if target != OFF and target >= meta["timeout_seconds"]:
        raise BackfillError(f"{path}: field 'target_batch_seconds' ({target}) must be below "
                            f"'timeout_seconds' ({meta['timeout_seconds']})")
    if meta["publish"] is not None:  # the old table's name after the swap, or the saved partitions' table
        meta["publish"] = {"kept_table": f"{meta['publish']['live_table']}_kept_{migration.version}", **meta["publish"]}
    return BackfillSpec(migration.version, migration.name, migration.backfill_sql, path,
                        migration.backfill_validate, meta)


PACING = ("max_batch_size", "target_batch_seconds", "max_rows_per_second", "max_target_parts",
          "max_pending_mutations", "max_replica_delay_seconds")


def all_specs(migrations_dir) -> dict[int, BackfillSpec]:
    """Every version in the directory that ships backfill files, read and checked."""
    return {v: load_spec(m) for v, m in discover(migrations_dir).items() if m.has_backfill}


def find_spec(migrations_dir, version: int) -> BackfillSpec:
    """The validated files of one version's backfill; a one-line error if there are none."""
    for v, mig in discover(migrations_dir).items():
        if v == version and mig.has_backfill:
            return load_spec(mig)
    raise BackfillError(f"no backfill for version {version} in {migrations_dir} "
                        f"(expected {version:03d}_name.backfill.sql + .backfill.meta)")


def parse_override(field: str, text: str):
    """A pacing field given on the command line (`--max-target-parts off`), checked like the meta's."""
    if field not in PACING:
        raise ValueError(f"{field!r} is not a pacing field")
    value: object = text.strip()
    try:
        value = int(value)
    except ValueError:
        try:
            value = float(value)
        except ValueError:
            pass
    problem = FIELDS[field][2](value)
    if problem:
        raise BackfillError(f"--{field.replace('_', '-')} {problem} (got {text!r})")
    return value


def check_source(client, spec: BackfillSpec, database: str) -> dict[str, str]:
    """The checkpoint columns must exist and be a prefix of the source's sorting key; returns their types."""
    table = spec.meta["source_table"]
    rows = client.query("SELECT sorting_key FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                        parameters={"d": database, "t": table}).result_rows
    if not rows:
        raise BackfillError(f"{spec.meta_path}: field 'source_table': table {database}.{table} does not exist")
    types = dict(client.query("SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String}",
                              parameters={"d": database, "t": table}).result_rows)
    cols = spec.meta["checkpoint_columns"]
    for col in cols:
        if col not in types:
            raise BackfillError(f"{spec.meta_path}: field 'checkpoint_columns': column {col!r} "
                                f"is not in {database}.{table}")
        if "Nullable(" in types[col]:  # NULL compares as neither < nor >: those rows would be skipped
            raise BackfillError(f"{spec.meta_path}: field 'checkpoint_columns': column {col!r} is "
                                f"{types[col]}; a checkpoint column must not be Nullable")
        if keytypes.kind(types[col]) is None:  # the walk could not read its position back exactly
            raise BackfillError(f"{spec.meta_path}: field 'checkpoint_columns': column {col!r} is {types[col]}, "
                                f"a type the walk cannot hold exactly (it holds {keytypes.SUPPORTED})")
    key = keytypes.sorting_columns(rows[0][0])
    if key[:len(cols)] != cols:
        at = next(i for i, col in enumerate(cols) if i >= len(key) or key[i] != col)
        there = f"the key has {key[at]}" if at < len(key) else "the key has no column"
        raise BackfillError(f"{spec.meta_path}: field 'checkpoint_columns' {cols} must be a prefix of "
                            f"{database}.{table}'s sorting key ({', '.join(key) or 'none'}): column {cols[at]!r} "
                            f"({types[cols[at]]}) is at position {at + 1}, where {there}")
    return {col: types[col] for col in cols}
