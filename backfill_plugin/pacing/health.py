"""Throttling on ClickHouse's own health signals: the runner waits, starting no batch, while one is over its limit.

Checked before each batch, on the target table only, with cheap system-table queries:
- active parts in the target's fullest partition (`system.parts`): past the table's
  `parts_to_delay_insert` ClickHouse itself starts delaying every insert, production's included;
- mutations pending on the target (`system.mutations`): a rewrite of the table is queued on the
  merge pool that the backfill's new parts also need;
- on Replicated tables, how far the replicas lag (`system.replicas.absolute_delay`): readers
  behind a load balancer would see stale data, and the lag only grows while the backfill writes.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

from migrator import transport

from ..errors import BackfillError, one_line
from ..spec.meta import AUTO, OFF
from .sizing import nap


@dataclass(frozen=True)
class Throttle:
    """One signal over its limit: what `status` shows while the runner waits."""

    signal: str  # "target_parts", "pending_mutations" or "replica_delay"
    value: float
    limit: float
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Limits:
    """Each limit a number, or "off"; max_target_parts "auto" is the table's own parts_to_delay_insert."""

    max_target_parts: int | str = AUTO
    max_pending_mutations: int | str = 10
    max_replica_delay_seconds: float | str = 300

    @classmethod
    def from_meta(cls, meta: dict, **overrides) -> "Limits":
        """The meta's limits, with command-line values (None: not given) winning."""
        values = {f: meta.get(f, getattr(cls, f)) for f in cls.__dataclass_fields__}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _off(value) -> bool:
    return value is None or value == OFF


class Health:
    """The health signals of one target table (`database.table`), on every replica of `cluster` if given."""

    def __init__(self, client, database: str, table: str, limits: Limits, cluster: str | None = None):
        self.client, self.database, self.table, self.limits, self.cluster = client, database, table, limits, cluster
        self.name = f"{database}.{table}"
        self.readings: dict[str, tuple[float, float]] = {}  # signal -> (value, limit) of the last check

    def _system(self, table: str) -> str:
        return f"clusterAllReplicas({self.cluster}, system.{table})" if self.cluster else f"system.{table}"

    def _query(self, field: str, sql: str) -> list:
        """Rows of a system-table query; a failure names the limit that turns the signal off."""
        try:
            return transport.retry(lambda: self.client.query(sql, parameters={"d": self.database, "t": self.table})
                                   .result_rows, f"health of {self.name}")
        except Exception as exc:
            if transport.cause(exc):  # not a missing grant: the server was out of reach
                raise BackfillError(f"cannot read the health of {self.name} for {field}: {one_line(exc)}") from exc
            raise BackfillError(f"cannot read the health of {self.name} for {field} ({one_line(exc)}); "
                                f"grant access to the system table or set {field} to \"off\"") from exc

    def check(self) -> Throttle | None:
        """The first signal over its limit, or None when the batch may start."""
        engine, needs = None, [f for f in ("max_target_parts", "max_replica_delay_seconds")
                               if not _off(getattr(self.limits, f))]
        self.readings = {}
        if needs:  # read on every check: an ALTER ... MODIFY SETTING during the wait counts
            rows = self._query(needs[0], "SELECT engine, engine_full FROM system.tables "
                                         "WHERE database = {d:String} AND name = {t:String}")
            engine = rows[0] if rows else ("", "")
        return (self.target_parts(engine) or self.pending_mutations()
                or self.replica_delay(engine[0] if engine else ""))

    def _parts_limit(self, engine_full: str) -> tuple[int | None, str]:
        limit = self.limits.max_target_parts
        if limit != AUTO:
            return (None, "") if _off(limit) else (int(limit), f"max_target_parts {limit}")
        match = re.search(r"\bparts_to_delay_insert\s*=\s*(\d+)", engine_full or "")
        if match:
            value = int(match.group(1))
        else:
            rows = self._query("max_target_parts", "SELECT value FROM system.merge_tree_settings "
                                                   "WHERE name = 'parts_to_delay_insert'")
            value = int(rows[0][0]) if rows else 0
        return (value or None), f"the table's parts_to_delay_insert {value}"  # 0: ClickHouse never delays

    def target_parts(self, engine: tuple | None) -> Throttle | None:
        """Active parts in the target's fullest partition against max_target_parts / parts_to_delay_insert."""
        if _off(self.limits.max_target_parts) or engine is None:
            return None
        limit, label = self._parts_limit(engine[1])
        if limit is None:
            return None
        rows = self._query("max_target_parts", f"SELECT partition_id, count() AS parts FROM {self._system('parts')} "
                                               "WHERE database = {d:String} AND table = {t:String} AND active "
                                               "GROUP BY hostName(), partition_id ORDER BY parts DESC LIMIT 1")
        self.readings["target_parts"] = (int(rows[0][1]) if rows else 0, limit)
        if not rows or rows[0][1] <= limit:
            return None
        partition, parts = rows[0][0], int(rows[0][1])
        return Throttle("target_parts", parts, limit,
                        f"{self.name} partition {partition} has {parts} active parts, over {label} "
                        f"(merges are behind)")

    def pending_mutations(self) -> Throttle | None:
        """Mutations not yet done on the target against max_pending_mutations."""
        limit = self.limits.max_pending_mutations
        if _off(limit):
            return None
        rows = self._query("max_pending_mutations",
                           f"SELECT count() AS pending, min(create_time), argMin(mutation_id, create_time), "
                           f"anyIf(latest_fail_reason, latest_fail_reason != '') FROM {self._system('mutations')} "
                           "WHERE database = {d:String} AND table = {t:String} AND NOT is_done "
                           "GROUP BY hostName() ORDER BY pending DESC LIMIT 1")  # each replica lists the same one
        count = int(rows[0][0]) if rows else 0
        self.readings["pending_mutations"] = (count, int(limit))
        if count <= int(limit):
            return None
        reason = (f"{self.name} has {count} pending mutation{'s' * (count != 1)}, over max_pending_mutations "
                  f"{limit} (oldest {rows[0][2]} since {rows[0][1]})")
        if rows[0][3]:
            reason += f"; failing: {one_line(rows[0][3])[:100]}"
        return Throttle("pending_mutations", count, int(limit), reason)

    def replica_delay(self, engine: str) -> Throttle | None:
        """On a Replicated target only: the most-lagging replica's absolute_delay against max_replica_delay_seconds."""
        limit = self.limits.max_replica_delay_seconds
        if _off(limit) or not engine.startswith("Replicated"):
            return None
        rows = self._query("max_replica_delay_seconds",
                           f"SELECT replica_name, absolute_delay FROM {self._system('replicas')} "
                           "WHERE database = {d:String} AND table = {t:String} ORDER BY absolute_delay DESC LIMIT 1")
        self.readings["replica_delay"] = (float(rows[0][1]) if rows else 0.0, float(limit))
        if not rows or rows[0][1] <= limit:
            return None
        return Throttle("replica_delay", int(rows[0][1]), limit,
                        f"replica {rows[0][0]} of {self.name} is {int(rows[0][1])} s behind, over "
                        f"max_replica_delay_seconds {limit}")


def wait_until_healthy(check, should_stop, on_throttled=None, sleep=time.sleep, clock=time.monotonic,
                       first_delay: float = 1.0, max_delay: float = 30.0) -> str | None:
    """Return None as soon as `check()` finds nothing over its limit, or should_stop()'s reason.

    While throttled: `on_throttled(throttle)` after every check that is over a limit (publish
    `throttled`), then a wait doubling from `first_delay` to `max_delay`, during which
    `should_stop()` is asked at least every second (pause, SIGTERM and stop requests work here).
    """
    delay = first_delay
    while True:
        throttle = check()
        if throttle is None:
            return None
        if on_throttled:
            on_throttled(throttle)
        reason = nap(delay, should_stop, sleep, clock)
        if reason:
            return reason
        delay = min(delay * 2, max_delay)
