"""The metrics, on a registry of their own, and the two ways out: an HTTP `/metrics` endpoint while a run lasts,
and a textfile for node_exporter's textfile collector, rewritten atomically after every batch.

Names follow Prometheus' conventions: a `migrate_backfill_` prefix, base units (`_seconds`), `_total` on
counters, and the labels `backfill` (the backfill id) and `shard` (empty when the backfill is not sharded).
"""

from __future__ import annotations

import math

try:
    import prometheus_client as prom
except ImportError:  # the plugin loads without the extra; its options then say what to install
    prom = None

PREFIX = "migrate_backfill_"
LABELS = ("backfill", "shard")
STATUSES = ("pending", "running", "paused", "completed", "failed")
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# name -> (kind, help, extra labels); the docs (runbook "Metrics") and examples/monitoring name only these.
METRICS = {
    "rows_total": ("counter", "Source rows walked by committed batches (this process)", ()),
    "batches_total": ("counter", "Batches by how they ended: committed, failed, refused", ("outcome",)),
    "attempts_total": (
        "counter",
        "Batch attempts by outcome: committed, retried, halved, failed, refused",
        ("outcome",),
    ),
    "batch_duration_seconds": ("histogram", "Statement time of committed batches", ()),
    "batch_size": ("gauge", "Source rows per batch the next batch runs with", ()),
    "throttled_seconds_total": ("counter", "Seconds spent waiting on a health signal, by signal", ("reason",)),
    "throttled": ("gauge", "1 while the runner waits on this health signal, else 0", ("reason",)),
    "progress_ratio": ("gauge", "Rows processed / (rows processed + rows remaining), 0 to 1", ()),
    "eta_seconds": ("gauge", "Seconds left at the recent rate (NaN while unknown)", ()),
    "status": ("gauge", "1 for the backfill's current status, 0 for the others", ("status",)),
    "last_batch_timestamp_seconds": ("gauge", "Unix time the last batch committed", ()),
}


def available() -> bool:
    return prom is not None


class Exporter:
    """The metrics of every backfill this process runs, on one registry."""

    def __init__(self):
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.m = {}
        for name, (kind, text, extra) in METRICS.items():
            base = name[: -len("_total")] if kind == "counter" else name
            cls = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}[kind]
            kwargs = {"buckets": BUCKETS} if kind == "histogram" else {}
            self.m[name] = cls(PREFIX + base, text, LABELS + extra, registry=self.registry, **kwargs)
        self.waited: dict[tuple, float] = {}  # (labels, wait start) -> seconds of that wait already counted
        self.signals: dict[tuple, set] = {}  # labels -> the health signals the backfill has waited on

    def start(self, labels: tuple, status: str = "running") -> None:
        """Every series of the backfill exists from the first scrape (a counter at 0, not absent)."""
        self.m["rows_total"].labels(*labels)
        self.m["batch_duration_seconds"].labels(*labels)
        for outcome in ("committed", "failed", "refused"):
            self.m["batches_total"].labels(*labels, outcome)
        self.set_status(labels, status)

    def set_status(self, labels: tuple, status: str) -> None:
        for s in STATUSES:
            self.m["status"].labels(*labels, s).set(1 if s == status else 0)
        if status == "completed":
            self.m["progress_ratio"].labels(*labels).set(1)
            self.m["eta_seconds"].labels(*labels).set(0)
        if status != "running":  # a stopped runner waits on nothing
            for signal in self.signals.get(labels, ()):
                self.m["throttled"].labels(*labels, signal).set(0)

    def attempted(self, labels: tuple, event: dict) -> None:
        outcome = event["outcome"]
        if outcome == "throttled":
            key = (labels, event["started_at"])
            counted = self.waited.pop(key, 0.0)
            self.m["throttled_seconds_total"].labels(*labels, event["signal"]).inc(max(0.0, event["seconds"] - counted))
            self.m["throttled"].labels(*labels, event["signal"]).set(1 if event["waiting"] else 0)
            self.signals.setdefault(labels, set()).add(event["signal"])
            if event["waiting"]:
                self.waited[key] = max(counted, event["seconds"])
            return
        self.m["attempts_total"].labels(*labels, outcome).inc()
        if outcome in ("failed", "refused"):
            self.m["batches_total"].labels(*labels, outcome).inc()

    def completed(self, labels: tuple, batch: dict, now: float) -> None:
        self.m["rows_total"].labels(*labels).inc(batch["rows"])
        self.m["batches_total"].labels(*labels, "committed").inc()
        self.m["batch_duration_seconds"].labels(*labels).observe(batch["seconds"])
        self.m["batch_size"].labels(*labels).set(batch["next_batch_size"])
        self.m["last_batch_timestamp_seconds"].labels(*labels).set(now)
        percent, eta = batch.get("progress_percent"), batch.get("eta_seconds")
        self.m["progress_ratio"].labels(*labels).set(math.nan if percent is None else percent / 100.0)
        self.m["eta_seconds"].labels(*labels).set(math.nan if eta is None else eta)

    def text(self) -> str:
        """The exposition text, as `/metrics` serves it."""
        return prom.generate_latest(self.registry).decode()

    def write_textfile(self, path: str) -> None:
        """Atomically (a temporary file renamed over it): the collector never reads half a file."""
        prom.write_to_textfile(path, self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve `/metrics` on a daemon thread; returns the server (`server_port`, `shutdown()`)."""
        server, _thread = prom.start_http_server(port, addr=addr, registry=self.registry)
        return server
