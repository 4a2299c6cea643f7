"""Publishing a rebuilt table: the staging table a backfill filled takes the place of its live table.

The meta's `publish` block picks the mode. `exchange` swaps the whole table at once with EXCHANGE
TABLES (atomic: a reader sees the whole old or the whole new table) and keeps the old one under
`kept_table`. `partitions` replaces each partition that staging holds with REPLACE PARTITION ... FROM,
so rows that keep arriving into live's other partitions stay. Each step is written ahead into the
backfill's state row (`checkpoint["publish"]`), so a killed publish resumes without doing a step twice:
- exchange: the tables' UUIDs, recorded before the swap, tell whether the swap already happened;
- partitions: the partition in flight is recorded first; on resume it is replaced again only if live's
  partition does not already hold exactly staging's parts. Measured on the engine: a REPLACE PARTITION
  killed midway can leave some of the new parts committed beside the old ones; running it again
  replaces them all, so a replay fixes it. The copy into the kept table is recorded before live is
  touched, so it is only ever taken from the old partition, and a replay whose record lacks it takes it.
"""
from __future__ import annotations

from migrator.plugins import pm

from ..errors import BackfillError
from .checkpoint import backfill_id, utcnow
from .run import BackfillView
from .tables import check_tables, describe


# -- the state and its preconditions --------------------------------------------------------------------
def refusal(row, version: int) -> str | None:
    """Why this backfill may not be published yet: completed, then validated after completion, passing."""
    bid = backfill_id(row.db_name, version) if row else None
    if row is None:
        return f"backfill {version} is not registered; run 'migrate up', then 'migrate backfill run {version}'"
    if row.status != "completed":
        return (f"backfill {bid} is {row.status}; publish needs it completed ('migrate backfill run {version}' to the end),"
                f" then validated ('migrate backfill validate {version}')")
    cp = row.checkpoint
    val = cp.get("validation") or {}
    basis = val.get("basis") or {}
    if not val:
        return f"backfill {bid} has not been validated; run 'migrate backfill validate {version}' before publishing"
    if basis.get("status") != "completed" or basis.get("rows_processed") != int(cp.get("rows_processed") or 0):
        return (f"backfill {bid} was last validated before it completed; run 'migrate backfill validate {version}' "
                f"again before publishing")
    if not val.get("finished"):
        return f"the validation of backfill {bid} has not finished; run 'migrate backfill validate {version}' to the end"
    failed = [c.get("check") for c in val.get("checks") or [] if not c.get("ok")]
    if failed:
        return (f"the last validation of backfill {bid} failed ({', '.join(map(str, failed))}); repair the differing "
                f"ranges and run 'migrate backfill validate {version}' again before publishing")
    return None


def reset_refusal(client, row, spec) -> str | None:
    """Why `reset` must wait: it would drop the publish record unpublish needs, or a publish half done.

    Refused rather than kept across the reset: a reset backfill runs again into its staging table, which
    an exchange publish has moved to the kept table, and a second publish would write a second record
    over the first. Allowed when the record can restore nothing (partitions without a kept copy, or the
    exchange's kept table dropped on purpose)."""
    st = (row.checkpoint.get("publish") or {}) if row is not None else {}
    bid, version, conf = backfill_id(row.db_name, spec.version) if row else "", spec.version, spec.meta.get("publish")
    if st.get("undo"):
        return (f"backfill {bid} is being unpublished; finish it with 'migrate backfill unpublish {version}', "
                f"then reset")
    if not st.get("published"):
        if st.get("swap") or st.get("partitions") is not None:
            return (f"backfill {bid} is being published; finish it with 'migrate backfill publish {version}' "
                    f"(then 'migrate backfill unpublish {version}' to undo it) before reset")
        return None
    if st.get("mode") == "partitions" and not st.get("keep_replaced"):
        return None
    if st.get("mode") == "exchange" and (conf is None or describe(client, row.db_name, conf["kept_table"]) is None):
        return None
    return (f"backfill {bid} is published ({st.get('mode')} mode, at {st.get('published_at')}); reset would forget "
            f"what unpublish needs to put the table from before back: run 'migrate backfill unpublish {version}' "
            f"first, then reset")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Publisher:
    """Publish or unpublish one backfill's staging table; every step written ahead into its state row."""

    def __init__(self, client, store, spec, database: str, owner: str, cluster: str | None = None):
        self.client, self.store, self.spec, self.db, self.owner = client, store, spec, database, owner
        self.conf = spec.meta.get("publish")
        if self.conf is None:
            raise BackfillError(f"{spec.meta_path}: has no 'publish' block; nothing to publish for version "
                                f"{spec.version}")
        self.on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
        self.bid = backfill_id(database, spec.version)
        self.row = store.load(self.bid)
        self.live, self.staging, self.kept = (f"{database}.{self.conf[k]}" for k in
                                              ("live_table", "staging_table", "kept_table"))

    @property
    def state(self) -> dict:
        return self.row.checkpoint.setdefault("publish", {"mode": self.conf["mode"], "published": False})

    @property
    def published(self) -> bool:
        return bool(self.row and (self.row.checkpoint.get("publish") or {}).get("published"))

    def _save(self) -> None:
        """A new version of the state row, refused if anyone else wrote it since (a second publish, a run)."""
        fresh = self.store.load(self.bid)
        if fresh is None or fresh.version != self.row.version:
            raise BackfillError(f"backfill {self.bid} changed while it was being published (another publish?); "
                                f"stopped; run the command again once the other one has ended")
        self.row.writer = self.owner
        self.row = self.store.save(self.row)

    def _uuid(self, qualified: str) -> str | None:
        info = describe(self.client, *qualified.split(".", 1))
        return info["uuid"] if info else None

    def check(self) -> None:
        """The backfill may be published (completed, validated) and the tables still fit the mode."""
        problem = refusal(self.row, self.spec.version)
        if problem:
            raise BackfillError(problem)
        if not self.state.get("swap") and not self.state.get("partitions"):  # a resumed publish moved tables already
            check_tables(self.client, self.db, self.conf, self.spec.meta_path)

    # -- partitions -------------------------------------------------------------------------------
    def staging_partitions(self) -> list[tuple[str, str, int]]:
        """(partition_id, partition, rows) of every partition staging holds, in id order."""
        return [(str(p), str(v), int(r)) for p, v, r in self.client.query(
            "SELECT partition_id, any(partition), sum(rows) FROM system.parts WHERE database = {d:String} "
            "AND table = {t:String} AND active GROUP BY partition_id ORDER BY partition_id",
            parameters={"d": self.db, "t": self.conf["staging_table"]}).result_rows]

    def _live_has(self, pid: str) -> bool:
        return bool(self.client.command(
            "SELECT count() FROM system.parts WHERE database = {d:String} AND table = {t:String} AND active "
            "AND partition_id = {p:String}", parameters={"d": self.db, "t": self.conf["live_table"], "p": pid}))

    def _parts(self, table: str, pid: str) -> list[str]:
        return [str(h) for (h,) in self.client.query(
            "SELECT hash_of_all_files FROM system.parts WHERE database = {d:String} AND table = {t:String} AND active "
            "AND partition_id = {p:String} ORDER BY hash_of_all_files",
            parameters={"d": self.db, "t": table.split(".", 1)[1], "p": pid}).result_rows]

    def _same(self, table: str, other: str, pid: str) -> bool:
        """Both hold the very same parts in the partition (a REPLACE done before a kill, not yet recorded).

        Parts, not rows: a REPLACE PARTITION clone keeps its source part's files and so its
        hash_of_all_files (measured), while a rebuild that only changes storage (a codec, the granularity)
        holds the same rows as live before the REPLACE too; by rows it would be taken as replaced already."""
        return self._parts(table, pid) == self._parts(other, pid)

    def plan(self, keep_replaced: bool = False) -> list[str]:
        """What publish would do, one line a step (`--dry-run`)."""
        st = self.state
        if st.get("published"):
            return [f"nothing: backfill {self.bid} was published at {st.get('published_at')}"]
        if self.conf["mode"] == "exchange":
            return [f"EXCHANGE TABLES {self.live} AND {self.staging}{self.on_cluster}",
                    f"RENAME TABLE {self.staging} TO {self.kept}{self.on_cluster}  (the old table, until dropped on purpose)"]
        done = set(st.get("done") or [])
        lines = [f"CREATE TABLE IF NOT EXISTS {self.kept}{self.on_cluster} AS {self.live}"] if keep_replaced else []
        for pid, value, rows in self.staging_partitions():
            if pid in done:
                continue
            if keep_replaced and self._live_has(pid):
                lines.append(f"ALTER TABLE {self.kept} REPLACE PARTITION ID {_quote(pid)} FROM {self.live}")
            lines.append(f"ALTER TABLE {self.live} REPLACE PARTITION ID {_quote(pid)} FROM {self.staging}  "
                         f"(partition {value}, {rows:,} rows)")
        return lines

    def publish(self, keep_replaced: bool = False, on_step=lambda text: None) -> dict:
        """Publish (or finish a killed publish); returns the publish state."""
        self.check()
        if self.published:
            return self.state
        if self.conf["mode"] == "exchange":
            self._exchange(on_step)
            partitions = None
        else:
            partitions = self._replace_partitions(keep_replaced, on_step)
        st = self.state
        st.update(published=True, published_at=utcnow().isoformat(sep=" "), unpublished_at=None)
        self._save()
        view = BackfillView(self.bid, self.spec.version, self.db, self.spec.meta)
        pm.hook.backfill_published(backfill=view, mode=self.conf["mode"], partitions=partitions)
        return st

    def _exchange(self, on_step) -> None:
        st = self.state
        if not st.get("swap"):
            if self._uuid(self.kept):
                raise BackfillError(f"the kept table {self.kept} already exists; drop it or name another "
                                    f"'publish.kept_table' in {self.spec.meta_path}")
            st["swap"] = {"live_uuid": self._uuid(self.live), "staging_uuid": self._uuid(self.staging)}
            self._save()  # written ahead: after a kill, the UUIDs tell whether the swap happened
        swap = st["swap"]
        self._swap(self.live, self.staging, swap["live_uuid"], swap["staging_uuid"], on_step)
        if self._uuid(self.kept) != swap["live_uuid"]:
            self._rename(self.staging, self.kept, swap["live_uuid"], on_step)

    def _swap(self, live: str, other: str, before: str, after: str, on_step) -> None:
        """EXCHANGE unless live already holds `after` (a killed run swapped and died)."""
        now = self._uuid(live)
        if now == before:
            self.client.command(f"EXCHANGE TABLES {live} AND {other}{self.on_cluster}")
            on_step(f"exchanged {live} and {other}")
        elif now != after:
            raise BackfillError(f"{live} is neither the table publish recorded nor its replacement (uuid {now}); "
                                f"someone moved it: compare checkpoint.publish.swap with system.tables")

    def _rename(self, src: str, dst: str, uuid: str, on_step) -> None:
        if self._uuid(src) != uuid:
            raise BackfillError(f"{src} is not the table publish recorded (uuid {uuid}); someone moved it")
        self.client.command(f"RENAME TABLE {src} TO {dst}{self.on_cluster}")
        on_step(f"renamed {src} to {dst}")

    def _replace_partitions(self, keep_replaced: bool, on_step) -> list[str]:
        st = self.state
        if st.get("partitions") is None:  # the plan is fixed at first start: a resume walks the same list
            if keep_replaced and self._uuid(self.kept):
                raise BackfillError(f"the kept table {self.kept} already exists; drop it or name another "
                                    f"'publish.kept_table' in {self.spec.meta_path}")
            st.update(partitions=[p for p, _, _ in self.staging_partitions()], done=[], replaced=[],
                      keep_replaced=keep_replaced, in_flight=None)
            self._save()
        elif bool(st.get("keep_replaced")) != keep_replaced:
            flag = "with" if st.get("keep_replaced") else "without"
            raise BackfillError(f"backfill {self.bid}'s publish started {flag} --keep-replaced; resume it the same way")
        if st["keep_replaced"]:
            self.client.command(f"CREATE TABLE IF NOT EXISTS {self.kept}{self.on_cluster} AS {self.live}")
        total = len(st["partitions"])
        for pid in st["partitions"]:
            if pid in st["done"]:
                continue
            flight = st.get("in_flight")
            replay = bool(flight and flight["partition"] == pid)
            if not replay:  # what live held is recorded before it is gone
                st["in_flight"] = flight = {"partition": pid, "live_had_it": self._live_has(pid)}
                self._save()
            # The copy is recorded before live is touched: a REPLACE killed midway leaves some new parts
            # committed beside the old ones (measured), so live is copied only while it is still the old one.
            # A record without the copy therefore means live was not touched yet: the copy is taken (again,
            # it replaces) and live replaced, on a replay too, so unpublish always finds the kept partition.
            copy = st["keep_replaced"] and flight["live_had_it"] and not flight.get("kept")
            if copy or not (replay and self._same(self.live, self.staging, pid)):
                if copy:
                    self.client.command(f"ALTER TABLE {self.kept} REPLACE PARTITION ID {_quote(pid)} FROM {self.live}")
                    flight["kept"] = True
                    self._save()
                self.client.command(f"ALTER TABLE {self.live} REPLACE PARTITION ID {_quote(pid)} FROM {self.staging}")
            if flight["live_had_it"]:
                st["replaced"].append(pid)
            st["done"].append(pid)
            st["in_flight"] = None
            self._save()
            on_step(f"partition {pid} published ({len(st['done'])}/{total})")
        return list(st["done"])

    # -- going back ---------------------------------------------------------------------------------
    def unpublish(self, on_step=lambda text: None) -> dict:
        """Exchange: swap back while the kept table exists. Partitions: restore from the kept table, if any."""
        if self.row is None or not self.row.checkpoint.get("publish"):
            raise BackfillError(f"backfill {self.bid} has not been published; nothing to unpublish")
        st = self.state
        if not st.get("published") and not st.get("undo"):
            raise BackfillError(f"backfill {self.bid} has not been published (or was unpublished at "
                                f"{st.get('unpublished_at')}); nothing to unpublish")
        if st["mode"] == "exchange":
            swap = st["swap"]
            if not st.get("undo"):
                if self._uuid(self.kept) != swap["live_uuid"]:
                    raise BackfillError(f"the kept table {self.kept} (the table before publish) no longer exists; "
                                        f"there is nothing to swap back")
                st["undo"] = True
                self._save()
            self._swap(self.live, self.kept, swap["staging_uuid"], swap["live_uuid"], on_step)
            if self._uuid(self.staging) != swap["staging_uuid"]:
                self._rename(self.kept, self.staging, swap["staging_uuid"], on_step)
            st.pop("swap")
        else:
            if not st.get("keep_replaced"):
                raise BackfillError(
                    f"backfill {self.bid} was published in partitions mode without --keep-replaced: the rows of the "
                    f"{len(st.get('replaced') or [])} partitions it replaced in {self.live} are gone and nothing can "
                    f"swap them back; {self.staging} still holds what was published")
            st["undo"] = True
            self._save()
            for pid in st["done"]:  # both steps are idempotent: a killed unpublish simply runs again
                if pid in st["replaced"]:
                    self.client.command(f"ALTER TABLE {self.live} REPLACE PARTITION ID {_quote(pid)} FROM {self.kept}")
                else:
                    self.client.command(f"ALTER TABLE {self.live} DROP PARTITION ID {_quote(pid)}")
                on_step(f"partition {pid} restored")
            for key in ("partitions", "done", "replaced", "in_flight", "keep_replaced"):
                st.pop(key, None)
        st.update(published=False, undo=False, unpublished_at=utcnow().isoformat(sep=" "))
        self._save()
        return st
