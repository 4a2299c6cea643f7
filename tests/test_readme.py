"""The README's walk through a first backfill, run as a user would copy it: every file it shows is
written, every shell line it shows is run (by bash, in a new folder, on the embedded default store),
and each must succeed. If the README or the scaffold changes so that the walk breaks, this fails."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE = re.compile(r"^`([^`]+)`[^\n`]*:\s*$")


def walk(section: str) -> list[tuple[str, str, str]]:
    """(kind, path or '', text) for each block of the README section, in order."""
    text = (REPO / "README.md").read_text()
    body = text[text.index(section):]
    body = body[:body.index("\n## ", 1)]
    steps = []
    for match in FENCE.finditer(body):
        before = [line for line in body[:match.start()].rstrip().splitlines() if line.strip() and not line.startswith("<!--")][-1]
        named = FILE.match(before.strip())
        if named and match.group(1) in ("sql", "json"):
            steps.append(("file", named.group(1), match.group(2)))
        elif match.group(1) == "sh":
            steps.append(("sh", "", match.group(2)))
    return steps


def test_the_readme_walk_runs_as_written(tmp_path):
    steps = walk("## Write your first backfill")
    assert [k for k, _, _ in steps].count("sh") >= 3 and any(k == "file" for k, _, _ in steps)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "MIGRATE_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    outputs = []
    for kind, path, text in steps:
        if kind == "file":
            assert (tmp_path / path).exists(), f"the README edits {path}, which the walk has not created"
            (tmp_path / path).write_text(text)
            continue
        for line in text.splitlines():
            command = line.split("  #")[0].strip()
            if not command:
                continue
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=180)
            assert done.returncode == 0, f"{command!r} failed:\n{done.stdout}\n{done.stderr}"
            outputs.append((command, done.stdout))
    said = dict(outputs)
    assert "completed" in said["migrate backfill run 2"]
    assert "validation of backfill" in said["migrate backfill validate 2"] and "passed" in said["migrate backfill validate 2"]
    assert "completed" in said["migrate backfill status 2"]
    # The scaffolded validation can fail: one row changed, one missing, one duplicated in the target.
    damage = ("import clickhouse_connect; c = clickhouse_connect.get_client(dsn='chdb://' + __import__('os').getcwd() "
              "+ '/.chdb'); c.command('ALTER TABLE default.events_v2 UPDATE kind = \\'x\\' WHERE id = 5 SETTINGS "
              "mutations_sync = 1'); c.command('DELETE FROM default.events_v2 WHERE id = 7'); "
              "c.command('INSERT INTO default.events_v2 SELECT * FROM default.events WHERE id = 9')")
    subprocess.run([sys.executable, "-c", damage], cwd=tmp_path, env=env, check=True, timeout=120)
    failed = subprocess.run(["migrate", "backfill", "validate", "2", "--restart", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert failed.returncode != 0, failed.stdout
    report = {c["check"]: c for c in __import__("json").loads(failed.stdout)["checks"]}
    assert report["missing_keys_in_target"]["actual"] == 1
    assert report["duplicate_keys_in_target"]["actual"] == 1
    assert report["rows_equal_source"]["expected"] - report["rows_equal_source"]["actual"] == 3
