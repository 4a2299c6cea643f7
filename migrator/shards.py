"""The shard map of a sharded cluster: which server holds each shard's data, and how to reach it.

Two ways to name the shards (DESIGN.md, "Connection"): `--shards URL,URL,...` (replicas of one shard
separated by `|`), or `--cluster NAME` on a cluster with several shards, read from `system.clusters`
on the server behind `--url` and reached with that URL's scheme, port and credentials. A shard
answers at the first of its replicas that does; the map is printed with every password masked.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from . import connection
from .errors import MigrateError, one_line
from .sqltext import check_identifier


class ShardUnreachable(MigrateError):
    """No replica of a shard answered: that shard's work ends, the others' goes on."""


@dataclass
class Shard:
    """One shard: its number (1-based, as system.clusters counts) and its replicas' URLs in the order tried."""

    num: int
    replicas: tuple[str, ...]
    url: str | None = None  # the replica that answered last
    client: object = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How every line about this shard names it: number and the URL used (password masked)."""
        return f"shard {self.num} ({connection.redact(self.url or self.replicas[0])})"

    def describe(self) -> str:
        """One line of the printed shard map."""
        used = connection.redact(self.url or self.replicas[0])
        others = [connection.redact(r) for r in self.replicas if r != (self.url or self.replicas[0])]
        return f"shard {self.num}: {used}" + (f" (replicas: {', '.join(others)})" if others else "")

    def as_json(self) -> dict:
        return {
            "shard": self.num,
            "url": connection.redact(self.url or self.replicas[0]),
            "replicas": [connection.redact(r) for r in self.replicas],
        }


def _check_url(url: str, where: str) -> str:
    url = url.strip()
    if not url:
        raise MigrateError(f"{where}: empty URL in the list")
    target = connection.resolve(url)
    if target.embedded:
        raise MigrateError(
            f"{where}: {connection.redact(url)!r} is an embedded store; each shard is a server "
            f"reached over http(s)://host:port"
        )
    return target.url


def parse(text: str, where: str = "--shards") -> list[Shard]:
    """`URL,URL|URL,...`: one entry per shard in order, `|` between replicas of one shard."""
    entries = [e for e in (text or "").split(",")]
    if not any(e.strip() for e in entries):
        raise MigrateError(f"{where}: expected URL,URL,... (replicas of one shard separated by '|')")
    return [
        Shard(num, tuple(_check_url(r, f"{where} shard {num}") for r in entry.split("|")))
        for num, entry in enumerate(entries, start=1)
    ]


def replica_url(seed: str, host: str) -> str:
    """The seed URL with its host replaced: same scheme, port, user, password and path."""
    parts = urllib.parse.urlsplit(seed)
    userinfo = parts.netloc.rpartition("@")[0]
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    netloc = (userinfo + "@" if userinfo else "") + name + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def cluster_hosts(client, cluster: str, missing_ok: bool = False) -> list[tuple[int, list[str]]]:
    """(shard_num, replica host names in replica order) for each shard of `cluster` in system.clusters
    (`missing_ok`: [] for a cluster the server does not know, which the commands treat as one server)."""
    check_identifier(cluster, "cluster")
    rows = client.query(
        "SELECT shard_num, arrayMap(x -> x.2, arraySort(groupArray((replica_num, host_name)))) "
        "FROM system.clusters WHERE cluster = {c:String} GROUP BY shard_num ORDER BY shard_num",
        parameters={"c": cluster},
    ).result_rows
    if not rows and not missing_ok:
        raise MigrateError(f"--cluster {cluster}: no such cluster in system.clusters")
    return [(int(num), list(hosts)) for num, hosts in rows]


def from_cluster(client, cluster: str, seed_url: str) -> list[Shard]:
    """The shards of `cluster`, each replica at its host name with the scheme, port and credentials of `--url`."""
    hosts = cluster_hosts(client, cluster)
    if len(hosts) > 1 and connection.resolve(seed_url).embedded:
        raise MigrateError(
            f"--cluster {cluster} has {len(hosts)} shards; they are reached over HTTP with the "
            f"scheme, port and credentials of --url, which is an embedded store: give an "
            f"http(s):// --url or name the shards with --shards"
        )
    return [Shard(num, tuple(replica_url(seed_url, h) for h in names)) for num, names in hosts]


def for_app(app) -> list[Shard] | None:
    """The command line's shard map (cached on the app): None for one server (no --shards, and no
    --cluster, or a cluster of one shard)."""
    if getattr(app, "_shard_map", False) is not False:
        return app._shard_map
    found = None
    if getattr(app, "shards", None):
        found = parse(app.shards)
    elif app.cluster and len(cluster_hosts(app.client, app.cluster, missing_ok=True)) > 1:
        found = from_cluster(app.client, app.cluster, app.target.url)
    app._shard_map = found
    return found


def connect(shard: Shard, argv: list[str] | None = None):
    """A client of the shard's first replica that answers (kept on the shard); ShardUnreachable names them all."""
    errors = []
    for url in shard.replicas:
        try:
            client = connection.connect(connection.resolve(url), argv)
            client.command("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - the next replica may answer; each failure is reported
            text = one_line(exc)
            text = "connection refused" if "Connection refused" in text else text
            errors.append(f"{connection.redact(url)}: {connection.redact(text)}")
            continue
        shard.url, shard.client = url, client
        return client
    raise ShardUnreachable(f"shard {shard.num} is unreachable: " + "; ".join(errors))


def describe(shards: list[Shard]) -> list[str]:
    """The printed shard map: a heading, then one line per shard."""
    return [f"shard map: {len(shards)} shards"] + ["  " + s.describe() for s in shards]
