"""Flag files beside an embedded store (as gh-ost's): a live status file and pause requests, and
the one way hooks and commands build a manager that reads and writes them.

An embedded store is locked by the process running the backfill, so another terminal cannot
query it; these files are how `status` and `pause` reach that runner.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from migrator.connection import control_dir

from ..protocol.manager import ClickHouseBackfillManager


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

    def request_pause(self, bid: str) -> Path:
        """Ask the runner holding the store to stop at its next batch boundary."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._pause(bid)
        path.write_text(str(time.time()))
        return path

    def take_pause_request(self, bid: str) -> bool:
        """Consume a pause request; True if there was one."""
        try:
            self._pause(bid).unlink()
            return True
        except FileNotFoundError:
            return False


def manager_for(client, migrations_dir, cluster=None, target=None) -> ClickHouseBackfillManager:
    """The one way hooks and CLI build a manager: an embedded store also gets its control channel,
    so `backfill status` and `pause` from another terminal reach a run inline in `migrate up` too."""
    directory = control_dir(target) if target is not None else None
    return ClickHouseBackfillManager(client, migrations_dir=migrations_dir, cluster=cluster,
                                     control=ControlChannel(directory) if directory else None)
