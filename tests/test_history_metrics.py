"""Watching a backfill: the batch history, the Prometheus metrics plugin, the example alert rules and dashboard,
`status --watch`, and a last batch that reads 100%.

Runs are `migrate` subprocesses on a store private to each test, as an operator runs them; `/metrics` is
scraped over HTTP while the run lasts and parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backfill_metrics import exporter
from backfill_plugin.testing.harness import fault_site
from tests.conftest import REPO, run_migrate, start_migrate, store_query

ROWS = 6000
UP = f"""CREATE TABLE {{db}}.src (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b);
INSERT INTO {{db}}.src SELECT toString(number % 7), toUInt32(number), 'v' FROM numbers({ROWS // 2});
INSERT INTO {{db}}.src SELECT toString(number % 7), toUInt32(number), 'v' FROM numbers({ROWS // 2}, {ROWS // 2});
CREATE TABLE {{db}}.dst (a String, b UInt32, v String) ENGINE = MergeTree ORDER BY (a, b)
SETTINGS non_replicated_deduplication_window = 1000;
"""
SQL = "INSERT INTO {db}.dst SELECT a, b, v FROM {db}.src WHERE {batch_range}"
META = {
    "migration_version": 1,
    "batch_size": 500,
    "min_batch_size": 100,
    "checkpoint_columns": ["a", "b"],
    "source_table": "src",
}
EXAMPLES = REPO / "examples" / "monitoring"


@pytest.fixture
def project(private_store_backfill):
    """(store, migrations) with version 1 applied: 6,000 source rows in two parts, batches of 500."""
    return private_store_backfill(UP, SQL, META)


def migrate(project, *args, **env):
    store, root = project
    return run_migrate([str(a) for a in args], store, migrations_dir=root, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str, **labels) -> float | None:
    for s in fams[family].samples if family in fams else []:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def scrape(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return families(resp.read().decode())
    except OSError:
        return None


def history(project) -> dict:
    proc = migrate(project, "backfill", "history", "1", "--json", "--last", "0")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_metrics_are_scraped_over_http_while_the_run_lasts(project):
    """Two scrapes during a real run: the rows counter grows and the batch histogram fills; the rate ceiling only
    makes the run last long enough to be scraped more than once."""
    store, root = project
    port = free_port()
    proc = start_migrate(
        ["backfill", "run", "1", "--max-rows-per-second", "2500"],
        store,
        migrations_dir=root,
        env={"MIGRATE_METRICS_PORT": str(port)},
    )  # the environment variable, as a deployment sets it
    scrapes, deadline = [], time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            fams = scrape(port)
            rows = fams and sample(fams, "migrate_backfill_rows", "migrate_backfill_rows_total", backfill="d_1")
            if rows and (not scrapes or rows > scrapes[-1][0]):
                scrapes.append((rows, fams))
            time.sleep(0.2)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert len(scrapes) >= 2, f"scraped {len(scrapes)} times with rows during the run: {out}\n{err}"
    first, last = scrapes[0], scrapes[-1]
    assert 0 < first[0] < last[0] <= ROWS
    count = sample(
        last[1],
        "migrate_backfill_batch_duration_seconds",
        "migrate_backfill_batch_duration_seconds_count",
        backfill="d_1",
        shard="",
    )
    assert count >= 2 and count == sample(
        last[1], "migrate_backfill_batches", "migrate_backfill_batches_total", backfill="d_1", outcome="committed"
    )
    assert (
        sample(
            last[1],
            "migrate_backfill_batch_duration_seconds",
            "migrate_backfill_batch_duration_seconds_bucket",
            le="+Inf",
        )
        == count
    )
    assert sample(last[1], "migrate_backfill_status", "migrate_backfill_status", status="running") == 1
    assert 0 < sample(last[1], "migrate_backfill_progress_ratio", "migrate_backfill_progress_ratio") <= 1
    assert sample(last[1], "migrate_backfill_batch_size", "migrate_backfill_batch_size") == 500
    assert scrape(port) is None  # served while the run lasts, not after


def test_textfile_watch_and_the_last_batch_at_100_percent(project):
    """--metrics-file is rewritten after every batch and holds the final state; `status --watch` (no terminal: plain
    blocks) follows the run from another process and exits 0 when it completes; a last batch that takes exactly a
    batch size of rows still reads 100%, not the index estimate's 99.x%."""
    store, root = project
    prom = store.parent / "metrics" / "backfill.prom"
    prom.parent.mkdir()
    runner = start_migrate(
        ["backfill", "run", "1", "--metrics-file", str(prom), "--max-rows-per-second", "4000"],
        store,
        migrations_dir=root,
    )
    deadline = time.monotonic() + 60
    while not prom.exists() and time.monotonic() < deadline:  # the runner is up
        time.sleep(0.1)
    watch = start_migrate(["backfill", "status", "1", "--watch", "0.3"], store, migrations_dir=root)
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 0, err
    w_out, w_err = watch.communicate(timeout=120)
    assert watch.returncode == 0, w_err
    assert w_out.rstrip().endswith("backfill 1: completed") and "status          completed" in w_out
    lines = [line for line in out.splitlines() if line.startswith("batch ")]
    assert len(lines) == ROWS // 500 and "total 6,000 (100.0%)" in lines[-1], lines[-2:]
    assert all("(100.0%)" not in line for line in lines[:-1])
    fams = families(prom.read_text())
    assert sample(fams, "migrate_backfill_rows", "migrate_backfill_rows_total", backfill="d_1", shard="") == ROWS
    assert sample(fams, "migrate_backfill_status", "migrate_backfill_status", status="completed") == 1
    assert sample(fams, "migrate_backfill_progress_ratio", "migrate_backfill_progress_ratio") == 1
    assert sample(fams, "migrate_backfill_attempts", "migrate_backfill_attempts_total", outcome="committed") == 12
    assert not list(prom.parent.glob("*.tmp*"))  # written by rename: no half-written file left behind
    paused = migrate(project, "backfill", "status", "1", "--watch")
    assert paused.returncode == 0 and "backfill 1: completed" in paused.stdout  # already stopped: one block, exit 0


def test_watch_exits_with_the_paused_outcome(project):
    run = migrate(project, "backfill", "run", "1", "--max-batches", "1")
    assert run.returncode == 0, run.stderr
    proc = migrate(project, "backfill", "status", "1", "--watch", "0.2")
    assert proc.returncode == 3, proc.stderr
    assert "status          paused" in proc.stdout and "recent batches" in proc.stdout


def test_kill_9_then_resume_history_shows_the_replay_and_sums_to_rows_processed(project, tmp_path):
    """kill -9 after batch 2's INSERT committed and before its completion was saved (the fault plugin); the resumed
    run replays that range, and the history says so; the committed ranges sum to rows_processed."""
    store, root = project
    site = fault_site(tmp_path / "faults")
    killed = migrate(project, "backfill", "run", "1", BACKFILL_KILL_AT="committed:2", PYTHONPATH=str(site))
    assert killed.returncode == -9, killed.stderr
    resumed = migrate(project, "backfill", "run", "1")
    assert resumed.returncode == 0 and "completed" in resumed.stdout, resumed.stderr
    doc = history(project)
    committed = [e for e in doc["events"] if e["outcome"] == "committed"]
    second = [e for e in committed if e["batch_number"] == 2]
    # The replay, by the second runner; the first commit too, unless the kill came before the writer wrote it.
    assert [e["replay"] for e in second] in ([False, True], [True]), second
    assert len({json.dumps(e["range_end"]) for e in second}) == 1 and second[-1]["runner"] != killed_runner(doc)
    ranges = {json.dumps([e["range_start"], e["range_end"]]): e["rows"] for e in committed}
    assert doc["rows_processed"] == ROWS
    # The killed process's writer thread may not have written batch 1 before the kill on a loaded machine (seen
    # once in a fresh-clone run): the rows of its queue are lost with it; every range from the replay on is there.
    lost = ROWS // 500 - len(ranges)
    assert lost in (0, 1) and sum(ranges.values()) == doc["committed_rows"] == ROWS - 500 * lost, (lost, ranges)
    assert doc["committed_ranges"] == len(ranges)
    text = migrate(project, "backfill", "history", "1")
    assert "batch 2 attempt 1: committed" in text.stdout and "replay" in text.stdout
    # One INSERT per batch: rows written together share the INSERT's recorded_at, and no batch has two.
    per_batch = store_query(
        store,
        "SELECT batch_number, backfill_started_at, runner, uniqExact(recorded_at) FROM "
        "db_management.backfill_history GROUP BY ALL HAVING uniqExact(recorded_at) > 1",
    )[0]
    assert per_batch == []


def killed_runner(doc: dict) -> str:
    """The runner of batch 1 (the killed process), or None when its row was lost with the process."""
    return next((e["runner"] for e in doc["events"] if e["batch_number"] == 1 and not e["replay"]), None)


def test_history_records_retries_and_is_created_only_by_commands_that_write(project):
    """A real error of the engine on the first attempt only (sleepEachRow: TIMEOUT_EXCEEDED or TOO_SLOW, by the
    block's size) is retried: the history holds the retried attempt and the committed replay of the same batch;
    `status` and `list` before any run create no history table."""
    store, root = project
    assert migrate(project, "backfill", "status", "1").returncode == 0
    assert migrate(project, "backfill", "list").returncode == 0
    assert store_query(store, "EXISTS TABLE db_management.backfill_history")[0] == [[0]]
    slow = {**META, "batch_size": 100, "timeout_seconds": 1, "max_retries": 1}
    (root / "001_x.backfill.meta").write_text(json.dumps(slow))
    (root / "001_x.backfill.sql").write_text(SQL + " AND sleepEachRow(if({retry_count} = 0, 0.02, 0)) = 0")
    proc = migrate(project, "backfill", "run", "1", "--max-batches", "1")
    assert proc.returncode == 0, proc.stderr
    events = history(project)["events"]
    assert [(e["batch_number"], e["attempt"], e["outcome"], e["replay"]) for e in events] == [
        (1, 1, "retried", False),
        (1, 2, "committed", True),
    ], events
    assert events[0]["error"].startswith("Code: 1")  # the engine's own error, one line (159 or 160 by block size)


def served_names() -> set[str]:
    """Every sample name the exporter serves once each kind of event has happened."""
    ex = exporter.Exporter()
    labels = ("d_1", "")
    ex.start(labels)
    ex.attempted(
        labels, {"outcome": "throttled", "signal": "target_parts", "seconds": 2.0, "waiting": True, "started_at": 1.0}
    )
    for outcome in ("retried", "committed"):
        ex.attempted(labels, {"outcome": outcome})
    ex.completed(
        labels,
        {"rows": 10, "seconds": 0.5, "next_batch_size": 10, "progress_percent": 50.0, "eta_seconds": 3.0},
        time.time(),
    )
    return {s.name for f in text_string_to_metric_families(ex.text()) for s in f.samples}


def named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bmigrate_backfill_\w+", text))


def test_alert_rules_and_dashboard_name_only_served_metrics():
    served = served_names()
    assert {n for n in served if not n.endswith("_created")} >= {
        "migrate_backfill_" + name for name in exporter.METRICS if not name.endswith("duration_seconds")
    }
    rules = json.loads((EXAMPLES / "backfill-alerts.rules.json").read_text())  # JSON is YAML: Prometheus loads it
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) == {"BackfillFailed", "BackfillStalled", "BackfillThrottledLong"}
    assert all(r["expr"] and r["annotations"]["summary"] for r in alerts.values())
    dashboard = json.loads((EXAMPLES / "grafana-backfills.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 9
    for where, text in (("alert rules", json.dumps(rules)), ("dashboard", json.dumps(dashboard))):
        names = named_metrics(text)
        assert names and names <= served, f"{where} name metrics the exporter does not serve: {names - served}"
    assert named_metrics("rate(migrate_backfill_rowz_total[5m])") - served  # the check is not vacuous


def test_metrics_options_without_the_extra_are_one_line_errors(project, tmp_path):
    """Without prometheus-client (hidden here by a module that fails to import) the options stay and say what to
    install; nothing runs."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    proc = migrate(project, "backfill", "run", "1", "--metrics-file", str(tmp_path / "m.prom"), PYTHONPATH=str(blocker))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: --metrics-port and --metrics-file need prometheus-client: pip install 'clickhouse-migrator[metrics]'"
    )
    assert not Path(tmp_path / "m.prom").exists()
