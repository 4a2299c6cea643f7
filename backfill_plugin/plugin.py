"""The backfill plugin's implementations of the migrator's hooks."""
import click

from migrator import hookimpl


@hookimpl
def register_commands(cli):
    @cli.group()
    def backfill():
        """Resumable data backfills."""
