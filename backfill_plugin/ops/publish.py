"""`migrate backfill publish` / `unpublish`: put a rebuilt (staging) table in place of its live table.

The steps and their crash safety live in protocol/publish.py; this module holds the operator's side:
refusals in one line, the warning before partitions are replaced for good, progress lines.
"""
from __future__ import annotations

import click

from migrator.cli import App, pass_app

from ..errors import BackfillError
from ..protocol.checkpoint import backfill_id
from ..protocol.publish import Publisher, reset_refusal
from . import shards
from .control import manager_for


def publisher(app: App, version: int) -> Publisher:
    """The publisher of one backfill over this command line's target."""
    mgr = manager_for(app.client, app.migrations_dir, app.cluster, app.target)
    return Publisher(mgr.ch_client, mgr.store, mgr.spec(version), app.database, mgr.owner, app.cluster)


def refuse_reset_if_published(mgr, database: str, version: int) -> None:
    """`reset` keeps a published backfill's publish record: one line saying to unpublish first."""
    try:
        row = mgr.store.load(backfill_id(database, version))
    except BackfillError:  # a corrupt checkpoint is exactly what reset is for
        return
    problem = reset_refusal(mgr.ch_client, row, mgr.spec(version))
    if problem:
        raise BackfillError(problem)


@click.command()
@click.argument("version", type=int)
@click.option("--dry-run", is_flag=True, help="list the statements publish would run; change nothing")
@click.option("--keep-replaced", is_flag=True,
              help="partitions mode: save each partition of the live table into the kept table before replacing it")
@click.option("--yes", is_flag=True, help="partitions mode: accept that the replaced partitions are not kept")
@pass_app
@shards.fan_out("publish")
def publish(app: App, version, dry_run, keep_replaced, yes):
    """Put a completed, validated rebuild in place of its live table (resumable)."""
    pub = publisher(app, version)
    pub.check()
    conf, st = pub.conf, pub.state
    if dry_run:
        click.echo(f"backfill {version}: publish in {conf['mode']} mode would run:")
        for line in pub.plan(keep_replaced):
            click.echo(f"  {line}")
        if conf["mode"] == "partitions" and not (keep_replaced or st.get("keep_replaced")):
            click.echo(f"the rows these partitions of {pub.live} hold now are gone afterwards and unpublish cannot "
                       f"bring them back; --keep-replaced saves them into {pub.kept} first")
        return
    if pub.published:
        click.echo(f"backfill {version} was already published at {st.get('published_at')}")
        return
    resumed = st.get("partitions") is not None
    if conf["mode"] == "partitions" and not (keep_replaced or yes or resumed):
        raise BackfillError(f"publish replaces {len(pub.staging_partitions())} partitions of {pub.live}; the rows they "
                            f"hold now are gone afterwards and unpublish cannot bring them back. Add --keep-replaced to "
                            f"save them into {pub.kept} first, or --yes to accept")
    if resumed:
        click.echo(f"resuming the publish of backfill {version} ({len(st['done'])}/{len(st['partitions'])} partitions done)")
    st = pub.publish(keep_replaced or bool(st.get("keep_replaced")), on_step=click.echo)
    if conf["mode"] == "exchange":
        click.echo(f"published backfill {version}: {pub.live} is the rebuilt table; the old one is {pub.kept} "
                   f"(unpublish swaps back; drop it on purpose once it is no longer needed)")
    else:
        kept = f"; the replaced partitions are in {pub.kept}" if st.get("keep_replaced") else ""
        click.echo(f"published backfill {version}: {len(st['done'])} partitions of {pub.live} replaced{kept}")


@click.command()
@click.argument("version", type=int)
@pass_app
@shards.fan_out("unpublish")
def unpublish(app: App, version):
    """Undo a publish: swap the kept table back (exchange) or restore the kept partitions."""
    pub = publisher(app, version)
    pub.unpublish(on_step=click.echo)
    click.echo(f"unpublished backfill {version}: {pub.live} holds the table from before the publish again")
