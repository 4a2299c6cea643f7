"""A backfill on three shards: three tests/chhttp.py endpoints, one store each, rows spread by a hash of the key.

Every shard is a separate engine process reached over HTTP, as separate servers are; `migrate` runs in a
subprocess with `--shards` (or `--cluster`, from the engine's own `remote_servers`). Shard sizes are
uneven (about 5:3:2), so the walks stand at different positions at any instant.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from migrator import connection
from migrator import shards as shardmap
from migrator.errors import MigrateError
from tests.conftest import MIGRATE, REPO, Lines, fingerprint, start_endpoint

ROWS = 6000
SHARE = [(0, 4), (5, 7), (8, 9)]  # cityHash64(key) % 10 ranges: shard 1 gets half, shard 2 30%, shard 3 20%
UP = (
    "CREATE TABLE {db}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);\n"
    "CREATE TABLE {db}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b) "
    "SETTINGS non_replicated_deduplication_window = 1000;\n"
)
COPY = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
VALIDATE = (
    "SELECT 'rows_equal' AS check, (SELECT count() FROM (SELECT a, b, v FROM {db}.src WHERE {batch_range} EXCEPT "
    "SELECT a, b, v FROM {db}.dst WHERE {batch_range})) + (SELECT count() FROM (SELECT a, b, v FROM {db}.dst WHERE "
    "{batch_range} EXCEPT SELECT a, b, v FROM {db}.src WHERE {batch_range})) AS actual, 0 AS expected, "
    "toUInt8(actual = expected) AS ok"
)
META = {
    "migration_version": 1,
    "batch_size": 100,
    "min_batch_size": 50,
    "max_retries": 1,
    "checkpoint_columns": ["a", "b"],
    "source_table": "src",
}


def write_migrations(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "001_x.up.sql").write_text(UP)
    (root / "001_x.down.sql").write_text("DROP TABLE IF EXISTS {db}.dst; DROP TABLE IF EXISTS {db}.src")
    (root / "001_x.backfill.sql").write_text(COPY)
    (root / "001_x.backfill.meta").write_text(json.dumps(META))
    (root / "001_x.backfill.validate.sql").write_text(VALIDATE)
    return root


def client_of(endpoint):
    return connection.connect(connection.resolve(endpoint.url))


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """Three endpoints, one store each: the three shards (shared by this module's tests, one database each)."""
    started = [start_endpoint(tmp_path_factory.mktemp(f"shard{i}") / "store") for i in (1, 2, 3)]
    yield started
    for endpoint in started:  # killed: a terminated endpoint waits for its clients' keep-alive connections
        endpoint.proc.kill()
        endpoint.proc.wait(timeout=30)


class Cluster:
    """This test's database on the three shards: migrate in a subprocess, and each shard's own client."""

    def __init__(self, endpoints, root: Path, database: str, urls: str | None = None, extra=()):
        self.endpoints, self.root, self.database = endpoints, root, database
        self.urls = urls or ",".join(e.url for e in endpoints)
        self.extra = list(extra)

    def env(self) -> dict:
        env = {
            **os.environ,
            "MIGRATE_DIR": str(self.root),
            "MIGRATE_DATABASE": self.database,
            "PYTHONUNBUFFERED": "1",
            "MIGRATE_SHARDS": self.urls,
        }
        for name in ("MIGRATE_DEBUG", "CLICKHOUSE_URL", "MIGRATE_CLUSTER"):
            env.pop(name, None)
        if self.extra:
            env.pop("MIGRATE_SHARDS")
        return env

    def migrate(self, *args, timeout=180) -> subprocess.CompletedProcess:
        return subprocess.run(
            MIGRATE + self.extra + list(args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(REPO),
        )

    def start(self, *args) -> subprocess.Popen:
        return subprocess.Popen(
            MIGRATE + self.extra + list(args),
            env=self.env(),
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def fill(self, rows: int = ROWS, share=SHARE) -> list[int]:
        """Rows spread over the shards by a hash of the key, as a Distributed insert with that sharding key would."""
        counts = []
        for endpoint, (lo, hi) in zip(self.endpoints, share):
            client = client_of(endpoint)
            client.command(
                f"INSERT INTO {self.database}.src SELECT 'k' || toString(number % 991), toUInt32(number), "
                f"concat('v', toString(number)) FROM numbers({rows}) "
                f"WHERE cityHash64('k' || toString(number % 991), toUInt32(number)) % 10 BETWEEN {lo} AND {hi}"
            )
            counts.append(int(client.command(f"SELECT count() FROM {self.database}.src")))
        return counts

    def assert_exact(self, shards=(1, 2, 3)) -> None:
        """Each named shard's target holds exactly its source: every column, no key twice."""
        for num in shards:
            client = client_of(self.endpoints[num - 1])
            want = fingerprint(client, f"{self.database}.src")
            got = fingerprint(client, f"{self.database}.dst")
            assert got == want, f"shard {num}: dst {got} != src {want}"
            assert got[3] == 0

    def positions(self) -> list[tuple[str, int]]:
        """(status, rows_processed) of each shard, read from its own tracking table."""
        out = []
        for endpoint in self.endpoints:
            rows = (
                client_of(endpoint)
                .query(
                    "SELECT status, checkpoint_data FROM db_management.backfills WHERE db_name = {d:String} "
                    "ORDER BY version DESC LIMIT 1",
                    parameters={"d": self.database},
                )
                .result_rows
            )
            out.append((rows[0][0], int(json.loads(rows[0][1]).get("rows_processed", 0))) if rows else ("none", 0))
        return out

    def status(self) -> dict:
        proc = self.migrate("backfill", "status", "1", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def cluster(endpoints, tmp_path):
    """Version 1 applied with `migrate up --shards ...` to a fresh database on every shard, the source filled."""
    c = Cluster(endpoints, write_migrations(tmp_path / "migrations"), "s_" + uuid.uuid4().hex[:10])
    proc = c.migrate("up")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("backfill 1 registered (pending)") == 3, proc.stdout
    c.counts = c.fill()
    assert c.counts[0] > c.counts[1] > c.counts[2] > 0
    return c


def assert_totals(c: Cluster, status: str = "completed") -> dict:
    doc = c.status()
    assert doc["status"] == status
    assert [s["shard"] for s in doc["shards"]] == [1, 2, 3]
    assert doc["rows_processed"] == sum(s["rows_processed"] for s in doc["shards"]) == sum(c.counts)
    assert [s["rows_processed"] for s in doc["shards"]] == c.counts
    return doc


def test_backfill_on_three_shards_each_target_equals_its_source(cluster, tmp_path):
    """Also: one metrics file for every walk, each series labelled with its shard; each shard's history
    holds its own batches."""
    dry = cluster.migrate("backfill", "run", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "shard map: 3 shards" in dry.stdout
    for n, endpoint in enumerate(cluster.endpoints, start=1):
        assert f"  shard {n}: {endpoint.url}" in dry.stdout
    assert dry.stdout.count("-- rendered SQL") == 3
    metrics = tmp_path / "backfill.prom"
    proc = cluster.migrate("backfill", "run", "1", "--metrics-file", str(metrics))
    assert proc.returncode == 0, proc.stderr
    assert "backfill 1: 3 of 3 shards completed" in proc.stdout
    cluster.assert_exact()
    rows = {}
    for family in text_string_to_metric_families(metrics.read_text()):
        for sample in family.samples:
            if sample.name == "migrate_backfill_rows_total":
                rows[sample.labels["shard"]] = sample.value
    assert rows.pop("", 0.0) == 0.0  # the series the run opens before it knows its shards stays at zero
    assert rows == {str(n): float(count) for n, count in enumerate(cluster.counts, start=1)}, rows
    for endpoint, count in zip(cluster.endpoints, cluster.counts):
        shards_seen, copied = client_of(endpoint).query(
            "SELECT groupUniqArray(shard), sumIf(rows, outcome = 'committed') FROM db_management.backfill_history"
        ).result_rows[0]
        assert len(shards_seen) == 1 and int(copied) == count, (shards_seen, copied)
    doc = assert_totals(cluster)
    assert doc["shards_completed"] == [1, 2, 3]
    listed = json.loads(cluster.migrate("backfill", "list", "--json").stdout)
    assert listed[0]["rows_processed"] == sum(cluster.counts) and listed[0]["status"] == "completed"
    status = cluster.migrate("status")
    assert status.returncode == 0 and "the shards disagree" not in status.stdout
    assert status.stdout.count("version 1, pending none") == 3
    valid = cluster.migrate("backfill", "validate", "1")
    assert valid.returncode == 0, valid.stdout + valid.stderr
    client_of(cluster.endpoints[1]).command(f"INSERT INTO {cluster.database}.dst VALUES ('zzz-stray', 1, 'x')")
    stray = cluster.migrate("backfill", "validate", "1", "--restart")
    assert stray.returncode == 1 and "validate 1 failed on 1 of 3 shards: shard 2 " in stray.stderr, stray.stderr
    assert stray.stdout.count("validation of backfill 1 passed") == 2, stray.stdout  # shards 1 and 3


def test_kill_9_of_the_driver_resumes_every_shard_from_its_own_checkpoint(cluster):
    rng = random.Random(os.environ.get("SHARDS_SEED", uuid.uuid4().hex))
    spread, kills = 0, 0
    while spread < 3 and kills < 10:
        proc = cluster.start("backfill", "run", "1")
        lines = Lines(proc)
        try:
            lines.wait_for("shard ", count=rng.randint(1, 12), timeout=90)
        except AssertionError:  # finished before the aimed batch: every shard completed
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        at = cluster.positions()
        walking = [rows for status, rows in at]
        fractions = {round(rows / total, 3) for rows, total in zip(walking, cluster.counts)}
        # Different positions: at least one shard mid-walk, and the shards not all at the same fraction.
        if any(0 < rows < total for rows, total in zip(walking, cluster.counts)) and len(fractions) > 1:
            spread += 1
    assert spread >= 3, f"only {spread} of {kills} kills landed with the shards at different positions"
    final = cluster.migrate("backfill", "run", "1")
    assert final.returncode == 0, final.stderr
    cluster.assert_exact()
    assert_totals(cluster)


def test_a_shard_down_mid_run_never_stops_the_others_and_the_next_run_completes_it(cluster, endpoints):
    proc = cluster.start("backfill", "run", "1")
    lines = Lines(proc)
    lines.wait_for("shard 2: batch", timeout=90)
    down = endpoints[1]
    down.proc.send_signal(signal.SIGKILL)  # the shard's server dies: connection refused from here on
    down.proc.wait(timeout=30)
    try:
        out, err = lines.rest(timeout=120)
        assert proc.returncode == 1, err
        named = [line for line in err.splitlines() if line.startswith(f"shard 2 ({down.url})")]
        assert len(named) == 1 and "its walk stopped, the other shards go on" in named[0], err
        assert "Traceback" not in err
        assert "backfill 1: 2 of 3 shards completed" in out
        cluster.assert_exact(shards=(1, 3))
        doc = cluster.status()
        assert doc["status"] == "failed" and doc["shards_completed"] == [1, 3]
        assert doc["shards"][1]["status"] == "unreachable" and "connection refused" in doc["shards"][1]["error"]
    finally:  # the endpoint again, on the same store and port
        endpoints[1] = start_endpoint(down.store, port=down.port)
    assert cluster.status()["shards"][1]["status"] != "completed"
    again = cluster.migrate("backfill", "run", "1")
    assert again.returncode == 0, again.stderr
    assert "shard 1 (" in again.stdout and "(already completed)" in again.stdout
    cluster.assert_exact()
    assert_totals(cluster)


def test_second_process_on_one_shard_is_refused_while_the_lease_is_fresh(cluster):
    first = cluster.start("backfill", "run", "1")
    lines = Lines(first)
    lines.wait_for("shard 2: batch", timeout=90)
    second = cluster.migrate("backfill", "run", "1", "--shard", "2")
    out, err = lines.rest(timeout=120)
    if second.returncode == 0:  # it got there first after all: then the first skipped shard 2
        assert first.returncode == 1 and "shard 2 (" in err and "already running" in err
    else:
        assert "already running" in second.stderr and "shard 2 (" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert first.returncode == 0, err
    final = cluster.migrate("backfill", "run", "1")
    assert final.returncode == 0, final.stderr
    cluster.assert_exact()
    assert_totals(cluster)


def test_shards_option_parses_shards_and_replicas():
    found = shardmap.parse("http://a:8123|https://u:pw@b:8443/,http://c")
    assert [s.num for s in found] == [1, 2]
    assert found[0].replicas == ("http://a:8123", "https://u:pw@b:8443/")
    assert found[1].replicas == ("http://c",)
    assert "pw" not in found[0].describe() and "***" in found[0].describe()
    with pytest.raises(MigrateError, match="--shards shard 2: .*embedded store"):
        shardmap.parse("http://a,chdb:///tmp/x")
    with pytest.raises(MigrateError, match="--shards: expected URL,URL"):
        shardmap.parse(" , ")
    with pytest.raises(MigrateError, match="--shards shard 2: empty URL"):
        shardmap.parse("http://a,,http://b")
    assert (
        shardmap.replica_url("https://u:p%40ss@seed:8443/x", "shard2.example")
        == "https://u:p%40ss@shard2.example:8443/x"
    )
    assert shardmap.replica_url("http://seed:8123", "::1") == "http://[::1]:8123"


CLUSTER_CONFIG = """<clickhouse><remote_servers><shop>
<shard><replica><host>127.0.0.9</host><port>9000</port></replica><replica><host>127.0.0.2</host><port>9000</port></replica></shard>
<shard><replica><host>127.0.0.3</host><port>9000</port></replica></shard>
<shard><replica><host>127.0.0.4</host><port>9000</port></replica></shard>
</shop></remote_servers></clickhouse>
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs the whole 127.0.0.0/8 on the loopback (Linux)")
def test_shards_discovered_from_the_engines_own_cluster_config(tmp_path):
    """`--cluster shop`: system.clusters of the engine behind --url (its config's remote_servers) names three
    shards; each is reached at its host with --url's scheme and port. Shard 1's first replica (127.0.0.9)
    does not answer, so its second one is used; shard 3 holds no rows and completes at once. A Distributed
    source is refused naming the local table."""
    config = tmp_path / "config.xml"
    config.write_text(CLUSTER_CONFIG)
    first = start_endpoint(tmp_path / "s1" / "store", host="127.0.0.2", config=config)
    started = [first]
    try:
        for n, host in ((2, "127.0.0.3"), (3, "127.0.0.4")):
            started.append(start_endpoint(tmp_path / f"s{n}" / "store", host=host, port=first.port, config=config))
        root = write_migrations(tmp_path / "migrations")
        by_shards = Cluster(started, root, "d")
        assert by_shards.migrate("up").returncode == 0
        by_shards.counts = by_shards.fill(1200, share=[(0, 5), (6, 9), (10, 10)])  # shard 3: no rows
        assert by_shards.counts[2] == 0
        c = Cluster(started, root, "d", extra=["--url", f"http://127.0.0.2:{first.port}/", "--cluster", "shop"])
        status = c.migrate("status")
        assert status.returncode == 0, status.stderr
        assert "shard map: 3 shards" in status.stdout
        assert f"  shard 1: http://127.0.0.9:{first.port}/ (replicas: http://127.0.0.2:{first.port}/)" in status.stdout
        assert f"  shard 3: http://127.0.0.4:{first.port}/" in status.stdout
        run = c.migrate("backfill", "run", "1")
        assert run.returncode == 0, run.stderr
        assert f"shard 1 (http://127.0.0.2:{first.port}/): completed" in run.stdout
        assert f"shard 3 (http://127.0.0.4:{first.port}/): completed; 0 rows processed, 0 batches" in run.stdout
        by_shards.assert_exact()
        # a Distributed source: refused before any batch, naming the local table
        for e in started:
            client_of(e).command("CREATE TABLE d.src_all AS d.src ENGINE = Distributed('shop', 'd', 'src')")
        (root / "001_x.backfill.meta").write_text(json.dumps({**META, "source_table": "src_all"}))
        refused = c.migrate("backfill", "run", "1")
        assert refused.returncode == 1
        assert "source table d.src_all is Distributed; name the shard's local table d.src instead" in refused.stderr
    finally:
        for e in started:
            e.proc.kill()
            e.proc.wait(timeout=30)
