"""How a batch INSERT stays exactly-once on a replay: the settings it sends, and the target's window.

Two kinds of backfill SQL (docs/backfill_developer_guide.md, "Exactly once"):
- SQL that reads `{retry_count}` skips keys already in the target on a retry, so a retry must not
  reuse the token: its first block would carry the token of a block committed earlier and be dropped.
- Other SQL relies on the token alone: its batch is squashed into one block that a replay either
  duplicates whole (and the target drops it) or not at all. That only holds while the target still
  remembers the token, so the target's dedup window is checked before the first batch.
"""
from __future__ import annotations

import re
import time

from ..errors import BackfillError

ONE_BLOCK = 1 << 40
# Settings that keep INSERT SELECT dedup on across server versions; only those the server knows are sent.
# 26.x turns INSERT SELECT dedup off for "unstable" SELECTs unless asked: a batch is one block with
# our own token, so the stability of the SELECT does not matter here.
VERSIONED = {"deduplicate_insert_select": "enable_even_for_bad_queries", "deduplicate_insert": "enable"}


def batch_settings(token: str, retry_count: int, skips_existing: bool, known: set[str]) -> dict:
    """The dedup settings of one attempt (see the module docstring for the two kinds of SQL)."""
    if skips_existing and retry_count > 0:
        return {"insert_deduplicate": 0}
    out = {"insert_deduplicate": 1, "insert_deduplication_token": token}
    if not skips_existing:
        out.update(min_insert_block_size_rows=ONE_BLOCK, min_insert_block_size_bytes=ONE_BLOCK, max_insert_threads=1)
        out.update({k: v for k, v in VERSIONED.items() if k in known})
    return out


def known_settings(client, also=()) -> set[str]:
    """Which of the version-dependent settings (these and `also`) this server has (asked once per run)."""
    rows = client.query("SELECT name FROM system.settings WHERE name IN {names:Array(String)}",
                        parameters={"names": [*VERSIONED, *also]}).result_rows
    return {r[0] for r in rows}


def _setting(client, engine_full: str, name: str) -> int:
    match = re.search(rf"\b{name}\s*=\s*(\d+)", engine_full or "")
    if match:
        return int(match.group(1))
    rows = client.query("SELECT value FROM system.merge_tree_settings WHERE name = {n:String}",
                        parameters={"n": name}).result_rows
    return int(rows[0][0]) if rows else 0


def window(client, database: str, table: str) -> dict:
    """The target's engine and how long it remembers a token: blocks, and seconds (None: no time limit)."""
    rows = client.query("SELECT engine, engine_full FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                        parameters={"d": database, "t": table}).result_rows
    if not rows:
        raise BackfillError(f"target table {database}.{table} of the backfill SQL does not exist")
    engine, full = rows[0]
    replicated = engine.startswith(("Replicated", "Shared"))
    if replicated:
        blocks = _setting(client, full, "replicated_deduplication_window")
        seconds = _setting(client, full, "replicated_deduplication_window_seconds")
        return {"engine": engine, "blocks": blocks, "seconds": seconds or None,
                "setting": "replicated_deduplication_window"}
    return {"engine": engine, "blocks": _setting(client, full, "non_replicated_deduplication_window"),
            "seconds": None, "setting": "non_replicated_deduplication_window"}


def check_window(target: tuple[str, str], win: dict, horizon_seconds: float) -> None:
    """Refuse token-only SQL when a replay could fall outside the target's dedup window."""
    name = f"{target[0]}.{target[1]}"
    hint = ("or make the SQL skip keys already in the target on a retry (read {retry_count}; "
            "see the developer guide, 'Exactly once')")
    if not win["engine"].endswith("MergeTree"):
        raise BackfillError(f"target {name} is {win['engine']}, which does not deduplicate inserts; the backfill SQL "
                            f"relies on insert_deduplication_token alone: write to a MergeTree table {hint}")
    if win["blocks"] <= 0:
        raise BackfillError(f"target {name} has {win['setting']} = 0, so a replayed batch would be inserted twice; "
                            f"ALTER TABLE {name} MODIFY SETTING {win['setting']} = 1000, {hint}")
    if win["seconds"] is not None and win["seconds"] < horizon_seconds:
        raise BackfillError(f"target {name} forgets insert tokens after replicated_deduplication_window_seconds = "
                            f"{win['seconds']}, less than a batch's timeout plus the lease ({horizon_seconds:.0f}s): "
                            f"raise it with ALTER TABLE {name} MODIFY SETTING replicated_deduplication_window_seconds = "
                            f"{int(horizon_seconds) * 2}, {hint}")


def check_replay_age(target: tuple[str, str], win: dict, first_attempt_at: float | None) -> None:
    """A token-only replay after the window has passed would insert the batch a second time."""
    if first_attempt_at is None or win["seconds"] is None:
        return
    age = time.time() - first_attempt_at
    if age > win["seconds"]:
        raise BackfillError(f"the in-flight batch first ran {age:.0f}s ago, longer than {target[0]}.{target[1]}'s "
                            f"replicated_deduplication_window_seconds ({win['seconds']}); replaying it could "
                            f"duplicate rows. Check the target for that range, then 'migrate backfill reset' or "
                            f"repair by hand")
