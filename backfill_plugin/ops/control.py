"""Flag files beside an embedded store (as gh-ost's): a live status file and pause requests, and
the one way hooks and commands build a manager that reads and writes them.

An embedded store is locked by the process running the backfill, so another terminal cannot
query it; these files are how `status` and `pause` reach that runner.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from migrator.connection import control_dir

from ..errors import BackfillError
from ..protocol.manager import ClickHouseBackfillManager

log = logging.getLogger("backfill")


class ControlChannel:
    """Files in `<store>.control/`: status-<id>.json written by the runner, pause-<id> by others."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def _status(self, bid: str) -> Path:
        return self.dir / f"status-{bid}.json"

    def _pause(self, bid: str) -> Path:
        return self.dir / f"pause-{bid}"

    def write_status(self, bid: str, status: dict) -> None:
        """Publish the runner's status atomically for `status` in another terminal."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._status(bid)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**status, "runner_pid": os.getpid(), "written_at": time.time()}, default=str))
        os.replace(tmp, path)  # readers never see a half-written file

    def read_status(self, bid: str) -> dict | None:
        """The last status a runner published (None if there is none or it is unreadable)."""
        try:
            return json.loads(self._status(bid).read_text())
        except (OSError, ValueError):
            return None

    def running(self, pid) -> list[str]:
        """The backfills the process `pid` runs now, from the live status files it wrote."""
        out = []
        for path in sorted(self.dir.glob("status-*.json")):
            info = self.read_status(path.name[len("status-"):-len(".json")]) or {}
            if info.get("runner_pid") == pid and info.get("status") == "running":
                out.append(str(info.get("backfill_id")))
        return out

    def live(self, bid: str, owner: dict) -> dict:
        """The live status of `bid` when the process holding the store (`owner`) is its runner; else one
        line naming what that process runs. A second terminal acts on the backfill named or on none."""
        pid, info = owner.get("pid"), self.read_status(bid)
        if info is not None and pid is not None and info.get("runner_pid") == pid:
            return info
        others = self.running(pid) if pid is not None else []
        runs = f"the one running ({', '.join(others)})" if others else "running: the process holding the store runs none now"
        raise BackfillError(f"backfill {bid} is not {runs}; the store is held by pid {pid if pid is not None else '?'} "
                            f"({owner.get('command') or 'unknown command'}); act on {bid} once it has stopped")

    def request_pause(self, bid: str, owner: dict) -> Path:
        """Ask the runner holding the store to stop `bid` at its next batch boundary: only when it runs `bid`."""
        info = self.live(bid, owner)
        if info.get("status") != "running":
            raise BackfillError(f"backfill {bid} is {info.get('status')} already; its runner pid {owner.get('pid')} "
                                f"is stopping")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._pause(bid)
        path.write_text(json.dumps({"requested_at": time.time(), "runner_pid": owner.get("pid"), "by_pid": os.getpid()}))
        return path

    def take_pause_request(self, bid: str) -> bool:
        """Consume a pause request; True if there was one."""
        try:
            self._pause(bid).unlink()
            return True
        except FileNotFoundError:
            return False

    def discard_stale_pause(self, bid: str) -> None:
        """A run starting: a pause request still there was for a runner that is gone (a pause is accepted
        only for the runner holding the store). This run is the operator's later word, so it goes on, and
        says so: a pause the runner never saw is not dropped without a word."""
        path = self._pause(bid)
        try:
            text = path.read_text()
            path.unlink()
        except FileNotFoundError:
            return
        try:
            left = json.loads(text)
        except ValueError:
            left = {}
        when = left.get("requested_at") if isinstance(left, dict) else None
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
        log.warning("warning: discarded a pause request for %s made at %s for runner pid %s, which stopped "
                    "before it saw it; this run goes on (pause it again to stop it)", bid, at,
                    left.get("runner_pid", "?") if isinstance(left, dict) else "?")


def manager_for(client, migrations_dir, cluster=None, target=None) -> ClickHouseBackfillManager:
    """The one way hooks and CLI build a manager: an embedded store also gets its control channel,
    so `backfill status` and `pause` from another terminal reach a run inline in `migrate up` too."""
    directory = control_dir(target) if target is not None else None
    return ClickHouseBackfillManager(client, migrations_dir=migrations_dir, cluster=cluster,
                                     control=ControlChannel(directory) if directory else None)
