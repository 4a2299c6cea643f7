"""Ctrl-C and SIGTERM for long commands: the first asks for a stop at the next boundary, the second exits now.

A watcher thread reads the signals from a wakeup fd, because the main thread may be inside a long
query that Python cannot interrupt. `run` stops at a batch boundary; `validate` after a range.
"""
from __future__ import annotations

import os
import signal
import threading

import click


class Signals:
    """`on_first()` at the first signal (after printing `first`); at the second, `on_second()` and exit.

    Handlers stay no-ops after the block: a late signal is ignored rather than killing the cleanup.
    """

    def __init__(self, first: str, second: str, on_first=None, on_second=None):
        self.first, self.second, self.on_first, self.on_second = first, second, on_first, on_second
        self.signum, self.previous = None, {}

    def __enter__(self):
        read, write = os.pipe()
        os.set_blocking(write, False)
        self.previous_fd = signal.set_wakeup_fd(write)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, lambda *a: None)  # the watcher acts, not the main thread
        threading.Thread(target=self._watch, args=(read,), daemon=True, name="signals").start()
        return self

    def _watch(self, read: int) -> None:
        while True:
            signum = os.read(read, 1)[0]
            if self.signum is None:
                self.signum = signum
                if self.on_first:
                    self.on_first()
                click.echo(f"\n{signal.Signals(signum).name}: {self.first}", err=True)
                continue
            try:
                if self.on_second:
                    self.on_second()
                click.echo(self.second, err=True)
            finally:
                os._exit(self.exit_code)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous_fd)

    def stop_requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 130
