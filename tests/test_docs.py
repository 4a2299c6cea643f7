"""Every code block in the docs is either run by the suite or says why not.

A block a user would copy must not rot: the line just before each fenced block in README.md and
docs/*.md is an HTML comment, `<!-- run by tests/FILE.py -->` (that file must exist and read this
document) or `<!-- not run: REASON -->`. A new block without either fails here. The examples that
are run are run below, or in the test file the marker names.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MARK = re.compile(r"^<!-- (?:run by (tests/\S+\.py)|not run: (.+\S)) -->$")


def blocks(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, language, the line before, text) of every fenced block."""
    text, out = path.read_text(), []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").splitlines()
        out.append((line, match.group(1), before[-1].strip() if before else "", match.group(2)))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_code_block_is_run_or_says_why_not(doc):
    unmarked, wrong = [], []
    for line, _, before, _ in blocks(doc):
        mark = MARK.match(before)
        if not mark:
            unmarked.append(line)
        elif mark.group(1):
            runner = REPO / mark.group(1)
            if not runner.exists() or doc.name not in runner.read_text():
                wrong.append(f"{line} ({mark.group(1)} does not read {doc.name})")
    assert not unmarked, f"{doc.name}: blocks at lines {unmarked} need <!-- run by tests/... --> or <!-- not run: why -->"
    assert not wrong, f"{doc.name}: {wrong}"


def test_the_checker_sees_an_unmarked_block(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```sql\nSELECT 1\n```\n<!-- not run: shown -->\n```\nout\n```\n")
    found = blocks(doc)
    assert [(b[0], bool(MARK.match(b[2]))) for b in found] == [(3, False), (7, True)]


def test_python_fragments_in_the_docs_compile():
    """Fragments that are not run (hook examples, a plugin module's parts) at least parse."""
    for doc in DOCS:
        for line, lang, _, text in blocks(doc):
            if lang == "python":
                compile(text, f"{doc.name}:{line}", "exec")


# -- the developer guide's "Example: copy a table", run as written --------------------------------------
GUIDE = REPO / "docs" / "backfill_developer_guide.md"


def _section(text: str, heading: str) -> str:
    body = text[text.index(heading):]
    return body[:body.index("\n## ", 1)]


def test_the_guide_copy_a_table_example_runs_as_written(tmp_path):
    """Every command of the example is run as shown; `new --from` writes exactly the files the example
    shows, and they run (up, run, validate) as they are."""
    section = _section(GUIDE.read_text(), "## Example: copy a table")
    files = dict(re.findall(r"^`(\d{3}_\w+\.[\w.]+)`:[^\n]*(?:\n[^\n`][^\n]*)*\n\n(?:<!--[^\n]*-->\n)?```\w+\n(.*?)^```",
                            section, re.S | re.M))
    shown = {"002_orders_v2.up.sql", "002_orders_v2.down.sql", "002_orders_v2.backfill.meta",
             "002_orders_v2.backfill.sql"}
    assert set(files) == shown, sorted(files)
    assert json.loads(files["002_orders_v2.backfill.meta"])["checkpoint_columns"] == ["tenant", "id"]
    root = tmp_path / "migrations"
    root.mkdir()
    # Migration 001 is described in the text: the orders table it names, with rows to copy.
    (root / "001_orders.up.sql").write_text(
        "CREATE TABLE {db}.orders (tenant String, id UInt64, amount Decimal(18, 2), created_at DateTime64(3)) "
        "ENGINE = MergeTree ORDER BY (tenant, id);\nINSERT INTO {db}.orders SELECT ['a', 'b', 'c'][number % 3 + 1], "
        "number, number / 100, toDateTime64('2026-01-01', 3) + number FROM numbers(250000)")
    (root / "001_orders.down.sql").write_text("DROP TABLE {db}.orders")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "MIGRATE_"))}
    env.update(CLICKHOUSE_URL=f"chdb://{tmp_path / 'store'}", MIGRATE_DIR="migrations")
    transcripts = re.findall(r"^```\n(\$ migrate .*?)^```", section, re.S | re.M)
    assert len(transcripts) == 2
    for transcript in transcripts:
        for command in re.findall(r"^\$ (migrate .+)$", transcript, re.M):
            done = subprocess.run([sys.executable, "-m", "migrator", *command.split()[1:]], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, f"{command}: {done.stderr}"
            expected = transcript.split(f"$ {command}\n", 1)[1].split("\n$ ")[0].strip().splitlines()
            if command.startswith("migrate new"):
                assert done.stdout.splitlines() == expected, done.stdout
                for name, text in files.items():  # the files as the example shows them, exactly
                    assert (root / name).read_text().strip() == text.strip(), name
                continue
            assert done.stdout.strip().splitlines()[-1].split(";")[0] == expected[-1].split(";")[0], (command, done.stdout)
    # The plain scaffold of the "Files" section: the files it lists, in that order.
    scaffold = re.search(r"^```\n\$ migrate new (\w+) --backfill\n(.*?)^```", GUIDE.read_text(), re.S | re.M)
    project = tmp_path / "scaffold"
    (project / "migrations").mkdir(parents=True)
    for name in ("001_orders.up.sql", "001_orders.down.sql"):
        (project / "migrations" / name).write_text((root / name).read_text())
    made = subprocess.run([sys.executable, "-m", "migrator", "--migrations-dir", "migrations", "new", scaffold.group(1),
                           "--backfill"], env=env, cwd=project, capture_output=True, text=True, timeout=60)
    assert made.stdout.splitlines() == scaffold.group(2).splitlines(), made.stdout


RUNBOOK = REPO / "docs" / "backfill_runbook.md"


def test_the_runbook_checkpoint_repair_statement_restores_a_row(ch_client, db, shared_store_backfill):
    """`Repairing a corrupt checkpoint`: the statement copies the newest valid row as a new version."""
    from backfill_plugin import ClickHouseBackfillManager
    root = shared_store_backfill(
        "CREATE TABLE {db}.src (a String, b UInt32) ENGINE = MergeTree ORDER BY (a, b);\n"
        "INSERT INTO {db}.src SELECT toString(number % 7), number FROM numbers(500);\n"
        "CREATE TABLE {db}.dst (a String, b UInt32) ENGINE = MergeTree ORDER BY (a, b) "
        "SETTINGS non_replicated_deduplication_window = 1000",
        "INSERT INTO {db}.dst SELECT a, b FROM {db}.src WHERE {batch_range}",
        {"migration_version": 1, "batch_size": 100, "checkpoint_columns": ["a", "b"], "source_table": "src"})
    manager = ClickHouseBackfillManager(ch_client, migrations_dir=root)
    manager.run_backfill(db, 1, max_batches=2)
    bid = f"{db}_1"
    ch_client.command("INSERT INTO db_management.backfills (backfill_id, migration_version, db_name, status, "
                      "checkpoint_data, version) VALUES ({b:String}, 1, {d:String}, 'running', '{broken', "
                      "toUInt64(toUnixTimestamp64Nano(now64(9))))", parameters={"b": bid, "d": db})
    sql = re.search(r"^```sql\n(INSERT INTO db_management.backfills.*?)^```", RUNBOOK.read_text(), re.S | re.M).group(1)
    ch_client.command(sql.replace("'demo_21'", f"'{bid}'").rstrip().rstrip(";"))
    status = manager.get_status(db, 1)
    assert status["status"] == "paused" and status["batches_completed"] == 2
    assert manager.resume_backfill(db, 1)["status"] == "completed"
