"""`python -m backfill_plugin ...`: the backfill commands with the same global options as `migrate`."""
import click

from migrator.cli import global_options, run
from migrator.plugins import load_plugins

from .ops.cli import add_plugin_options, backfill


@click.group(cls=click.Group, commands=backfill.commands, help=backfill.help)
@global_options
def main():
    """`python -m backfill_plugin`: the backfill group with the same global options."""
    pass


if __name__ == "__main__":
    load_plugins()
    add_plugin_options()
    run(main)
