"""The next batch's range, looked up while the current batch runs.

Finding a batch's last key and counting its rows takes two small queries (about 40 ms on the
2M-call benchmark). Run between two INSERTs they are a fixed cost of every batch; run on their own
handle while the INSERT before them works, they cost nothing in wall time. One starts only when the
size held since the last batch, since a changed size makes the lookup useless. A lookup is only a
candidate: it is used when the batch before it committed exactly the range it was started from and
the size did not change; otherwise (and when it found no keys left, since rows may have arrived
meanwhile) the range is looked up again. The protocol does not change: the range is still written
ahead before its INSERT starts.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("backfill")


class Lookahead:
    """At most one lookup in flight, on a client of its own (see `checkpoint.state_client`)."""

    def __init__(self, keys, client):
        self.keys, self.client = keys, client
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-lookahead")
        self._pending: tuple[tuple, Future] | None = None
        self._last_size: int | None = None  # the size at the last write-ahead

    def after_write_ahead(self, position: list, batch_size: int, until: list | None) -> None:
        """The batch ending at `position` is written ahead: look up the next one if the size held since
        the last batch (while a target duration still moves it, a lookup would mostly be made twice)."""
        held, self._last_size = self._last_size == int(batch_size), int(batch_size)
        if held:
            self.start(position, batch_size, until)

    def start(self, position: list, batch_size: int, until: list | None) -> None:
        """Look up the batch after `position` (the end of the batch about to run)."""
        args = (position, int(batch_size), until)
        self._pending = (args, self._pool.submit(self.keys.next_batch, self.client, *args))

    def next_batch(self, client, position: list | None, batch_size: int, until: list | None):
        """`KeySpace.next_batch` for these arguments: the lookup started for them, else a new one on `client`."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (position, int(batch_size), until):
            try:
                found = pending[1].result()
            except Exception as exc:  # looked up again below, where an error reaches the caller
                log.debug("lookahead of the next batch failed, looking it up again: %s", exc)
            else:
                if found is not None:  # "no keys left" is asked again: rows may have arrived meanwhile
                    return found
        return self.keys.next_batch(client, position, batch_size, until)

    def close(self) -> None:
        """A lookup still running finishes on its own; nothing waits for it."""
        self._pending = None
        self._pool.shutdown(wait=False)
