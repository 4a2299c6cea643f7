"""What EXCHANGE TABLES and REPLACE PARTITION need of a rebuild's tables, checked before any batch.

Measured on the engine (ClickHouse 26.9): REPLACE PARTITION refuses different column types, partition
key, sorting or primary key, or data skipping indices, and non-MergeTree tables; it accepts a different
engine of the family, codecs, TTL, table settings and column order. EXCHANGE needs an Atomic or
Replicated database.
"""
from __future__ import annotations

from ..errors import BackfillError

EXCHANGE_DATABASES = ("Atomic", "Replicated")  # the database engines that implement EXCHANGE TABLES


# -- what the engine would refuse, asked before any batch ----------------------------------------------
def describe(client, database: str, table: str) -> dict | None:
    """A table's uuid, engine and keys from system.tables (None when it does not exist)."""
    rows = client.query("SELECT toString(uuid), engine, partition_key, sorting_key, primary_key, storage_policy "
                        "FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                        parameters={"d": database, "t": table}).result_rows
    if not rows:
        return None
    keys = ("uuid", "engine", "partition key", "sorting key", "primary key", "storage policy")
    return dict(zip(keys, rows[0]))


def columns(client, database: str, table: str) -> dict[str, str]:
    """Column name -> type, in the table's order."""
    return dict(client.query("SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String} "
                             "ORDER BY position", parameters={"d": database, "t": table}).result_rows)


def _indices(client, database: str, table: str) -> list:
    return sorted(client.query("SELECT name, type_full, expr, granularity FROM system.data_skipping_indices "
                               "WHERE database = {d:String} AND table = {t:String}",
                               parameters={"d": database, "t": table}).result_rows)


def check_tables(client, database: str, conf: dict, where) -> None:
    """Refuse, in one line naming file and tables, what EXCHANGE or REPLACE PARTITION would refuse later."""
    live, staging = conf["live_table"], conf["staging_table"]
    found = {}
    for name in (staging, live):
        found[name] = describe(client, database, name)
        if found[name] is None:
            raise BackfillError(f"{where}: field 'publish': table {database}.{name} does not exist")
    a, b = columns(client, database, staging), columns(client, database, live)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))
        name = diff[0][0]
        raise BackfillError(f"{where}: field 'publish': {database}.{staging} and {database}.{live} differ in column "
                            f"{name!r} ({a.get(name, 'missing')} vs {b.get(name, 'missing')}); publish needs the same columns")
    if conf["mode"] == "exchange":
        engine = client.command("SELECT engine FROM system.databases WHERE name = {d:String}", parameters={"d": database})
        if engine not in EXCHANGE_DATABASES:
            raise BackfillError(f"{where}: field 'publish.mode' is exchange but database {database} has engine "
                                f"{engine}, which cannot EXCHANGE TABLES (needs Atomic or Replicated)")
        return
    s, li = found[staging], found[live]
    for name, info in ((staging, s), (live, li)):
        if "MergeTree" not in info["engine"]:
            raise BackfillError(f"{where}: field 'publish.mode' is partitions but {database}.{name} is {info['engine']}; "
                                f"REPLACE PARTITION needs MergeTree tables")
    for key in ("partition key", "sorting key", "primary key", "storage policy"):
        if s[key] != li[key]:
            hint = "; use mode exchange to change it" if key in ("sorting key", "primary key", "partition key") else ""
            raise BackfillError(f"{where}: field 'publish.mode' is partitions, but REPLACE PARTITION needs the same "
                                f"{key}: {database}.{live} has {li[key] or 'none'!r}, {database}.{staging} has "
                                f"{s[key] or 'none'!r}{hint}")
    if _indices(client, database, staging) != _indices(client, database, live):
        raise BackfillError(f"{where}: field 'publish.mode' is partitions, but {database}.{staging} and "
                            f"{database}.{live} have different data skipping indices; REPLACE PARTITION needs the same")
