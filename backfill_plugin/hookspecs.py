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
def backfill_batch_attempted(backfill, event):
    """Called for every attempt of a batch and every throttle wait before one (the batch history, metrics).

    `event` is a dict: number, attempt, outcome (committed, retried, halved, failed, refused, throttled),
    replay, range_start, range_end, rows, batch_size, seconds, error, signal, waiting, started_at,
    runner, scope, backfill_started_at (see docs/plugins.md).
    """


@hookspec
def backfill_run_options():
    """Return a list of click options to add to `migrate backfill run` and `resume` (or None).

    Their values reach `backfill_run_context` as `options`.
    """


@hookspec
def backfill_run_context(backfill, options):
    """Return a context manager to hold while `run` or `resume` runs the backfill (or None).

    `options` maps each option name that plugins added (`backfill_run_options`) to its value.
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
