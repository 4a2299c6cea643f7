"""Extension points the backfill plugin adds to the `migrator` plugin manager (see docs/plugins.md)."""
import pluggy

hookspec = pluggy.HookspecMarker("migrator")


@hookspec
def backfill_placeholders(backfill, checkpoint):
    """Return a dict of extra placeholder values for the batch about to run (or None).

    `backfill` exposes version, database and metadata; `checkpoint` is the current checkpoint dict.
    """


@hookspec
def backfill_batch_completed(backfill, batch):
    """Called after each committed batch, for metrics and notifications.

    `batch` is a dict: number, range_start, range_end, rows, seconds, batch_size, rows_processed.
    """


@hookspec
def backfill_status_changed(backfill, status, error):
    """Called when a backfill moves to running, paused, completed or failed (error set on failed)."""


@hookspec
def backfill_published(backfill, mode, partitions):
    """Called once a rebuilt table is published (`migrate backfill publish`), e.g. to tell readers.

    `mode` is "exchange" or "partitions"; `partitions` lists the partition ids replaced in
    partitions mode (None in exchange mode).
    """
