"""`exactly_once`: the backfill run uninterrupted as the reference, then killed (-9) at each phase of
the batch protocol and at random instants, resumed each time, and compared with the reference.

Every run is a real `migrate` subprocess on a store of its own: an embedded store is one process's
at a time, and kill -9 needs a process to kill. Each scenario gets its own database in that store,
set up by the user's up files (and `data`), so one failure names its phase and nothing else.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MIGRATE = [sys.executable, "-m", "migrator"]
PHASES = {
    "claimed": "killed after the claim, before any range was written ahead",
    "written_ahead": "killed after the range was written ahead, before its INSERT",
    "committed": "killed after the INSERT committed, before the checkpoint",
}
FAULTS_ENTRY_POINT = "[migrator]\nbackfill_faults = backfill_plugin.testing.faults\n"


class ExactlyOnceFailure(AssertionError):
    """The target differs from the reference run's; the message names the phase, range and keys."""


def fault_site(directory: Path) -> Path:
    """A directory that, on PYTHONPATH, registers the fault plugin as a `migrator` entry point."""
    info = directory / "backfill_faults-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: backfill-faults\nVersion: 0\n")
    (info / "entry_points.txt").write_text(FAULTS_ENTRY_POINT)
    return directory


# Runs in a subprocess on the store: statements in, JSON rows out (one list per statement).
STORE_SCRIPT = r"""
import json, sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
out = []
for sql in json.loads(sys.argv[2]):
    if sql.lstrip().upper().startswith(("SELECT", "WITH", "SHOW", "DESCRIBE")):
        out.append([[v if isinstance(v, (int, float)) or v is None else str(v) for v in r]
                    for r in client.query(sql).result_rows])
    else:
        client.command(sql)
        out.append(None)
print(json.dumps(out))
"""
# Runs in a subprocess: `migrate up` for several databases in one process (one start-up, not one each).
SETUP_SCRIPT = r"""
import json, sys, clickhouse_connect
from pathlib import Path
from migrator.runner import Context, Migrator
client = clickhouse_connect.get_client(dsn=sys.argv[1])
for database, statements in json.loads(sys.argv[3]).items():
    Migrator(Context(client=client, database=database, migrations_dir=Path(sys.argv[2]), cluster=None,
                     dry_run=False, echo=lambda line: None)).up()
    for sql in statements:
        client.command(sql.replace("{db}", database))
"""


class Project:
    """A migrations directory and a store private to one test, driven by `migrate` subprocesses."""

    def __init__(self, migrations_dir: Path, workdir: Path, env: dict | None = None):
        self.migrations_dir, self.workdir = Path(migrations_dir), Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = self.workdir / "store"
        self.extra_env = dict(env or {})

    def env(self, database: str = "d", **extra) -> dict:
        env = {**os.environ, "CLICKHOUSE_URL": f"chdb://{self.store}", "MIGRATE_DATABASE": database,
               "MIGRATE_DIR": str(self.migrations_dir), "PYTHONUNBUFFERED": "1", **self.extra_env, **extra}
        env.pop("MIGRATE_DEBUG", None)
        return env

    def migrate(self, *args, database: str = "d", timeout: float = 600, **extra) -> subprocess.CompletedProcess:
        """`migrate ARGS` in a subprocess; returns the finished process (check returncode yourself)."""
        return subprocess.run(MIGRATE + [str(a) for a in args], env=self.env(database, **extra), capture_output=True,
                              text=True, timeout=timeout, cwd=str(self.workdir))

    def start(self, *args, database: str = "d", **extra) -> subprocess.Popen:
        return subprocess.Popen(MIGRATE + [str(a) for a in args], env=self.env(database, **extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(self.workdir))

    def query(self, *statements: str) -> list:
        """Statements on the store, in a subprocess; one list of rows per SELECT, None per command."""
        proc = subprocess.run([sys.executable, "-c", STORE_SCRIPT, f"chdb://{self.store}", json.dumps(statements)],
                              capture_output=True, text=True, timeout=600, cwd=str(self.workdir), env=self.env())
        if proc.returncode:
            raise RuntimeError(f"query on {self.store} failed: {_last_line(proc.stderr)}")
        return json.loads(proc.stdout)

    def setup(self, databases: dict[str, list[str]]) -> None:
        """`migrate up` into each database, then its data statements (`{db}` is the database)."""
        proc = subprocess.run([sys.executable, "-c", SETUP_SCRIPT, f"chdb://{self.store}", str(self.migrations_dir),
                               json.dumps(databases)], capture_output=True, text=True, timeout=600,
                              cwd=str(self.workdir), env=self.env())
        if proc.returncode:
            raise ExactlyOnceFailure(f"migrate up refused or failed before any run: {_last_line(proc.stderr)}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _spec(migrations_dir: Path, version: int) -> tuple[dict, str]:
    meta = next(Path(migrations_dir).glob(f"{version:03d}_*.backfill.meta"), None)
    if meta is None:
        raise ValueError(f"no backfill for version {version} in {migrations_dir}")
    sql = meta.with_name(meta.name.replace(".backfill.meta", ".backfill.sql")).read_text()
    return json.loads(meta.read_text()), sql


def _target(sql: str) -> str:
    match = re.search(r"INSERT\s+INTO\s+(?:TABLE\s+)?(?:\{db\}\s*\.\s*)?`?(\w+)`?", sql, re.IGNORECASE)
    if not match:
        raise ValueError("cannot tell the target table from the backfill SQL; pass target=")
    return match.group(1)


def _data_statements(data, database: str) -> list[str]:
    if data is None:
        return []
    got = data(database) if callable(data) else data
    return [got] if isinstance(got, str) else list(got)


class Scenario:
    def __init__(self, name: str, database: str, label: str):
        self.name, self.database, self.label, self.kills = name, database, label, []


def exactly_once(migrations_dir: Path, workdir: Path, version: int, *, target: str | None = None,
                 keys: list[str] | None = None, data=None, at_batch: int = 2, random_kills: int = 3,
                 seed: int = 0, checks: str = "refuse", env: dict | None = None) -> dict:
    """Reference run, then kill -9 at each phase and at random instants; raise ExactlyOnceFailure naming
    the phase, the range in flight and the first differing keys. Returns a summary of what ran.

    `data`: SQL (a string, a list, or a callable taking the database name and returning them) run after
    `migrate up` in each database, for projects whose up files do not load data. `checks="warn"` lets
    SQL run that the framework's checks would refuse (to see what it would do to the target)."""
    meta, sql = _spec(migrations_dir, version)
    target = target or _target(sql)
    keys = keys or meta["checkpoint_columns"]
    extra = dict(env or {})
    if checks == "warn":
        extra["BACKFILL_CHECKS"] = "warn"
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    project = Project(migrations_dir, work, extra)
    sites = os.pathsep.join([str(fault_site(work / "faults")), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    scenarios = [Scenario(p, p, f"{PHASES[p]} (batch {at_batch})") for p in PHASES]
    if random_kills:
        scenarios.append(Scenario("random", "random", f"killed at {random_kills} random instants"))
    project.setup({db: _data_statements(data, db) for db in ["reference"] + [s.database for s in scenarios]})

    ref = project.start("backfill", "run", version, database="reference")
    claimed = _wait_for_claim(project, ref, "reference", version)
    out, err = ref.communicate(timeout=3600)
    batches_seconds = time.monotonic() - claimed  # from the claim to the end: where random kills land
    if ref.returncode:
        raise ExactlyOnceFailure(f"the uninterrupted reference run failed: {_last_line(err)}")
    comparison = Comparison(project, target, keys)
    comparison.check_reference()
    rng = random.Random(seed)
    report = work / "kill-report.json"
    for scenario in scenarios:
        kill_env = {"PYTHONPATH": sites, "BACKFILL_KILL_REPORT": str(report)}
        if scenario.name in PHASES:
            kill_env["BACKFILL_KILL_AT"] = f"{scenario.name}:{at_batch}"
            proc = project.migrate("backfill", "run", version, database=scenario.database, **kill_env)
            if proc.returncode != -9:
                raise ExactlyOnceFailure(f"{scenario.label}: the run was not killed (exit {proc.returncode}: "
                                         f"{_last_line(proc.stderr)}); the source needs more than {at_batch} batches")
            scenario.kills.append(json.loads(report.read_text())["in_flight"] if report.exists() else None)
            report.unlink(missing_ok=True)
        else:
            for _ in range(random_kills):
                proc = project.start("backfill", "run", version, database=scenario.database)
                _wait_for_claim(project, proc, scenario.database, version)
                try:
                    proc.communicate(timeout=rng.uniform(0.0, batches_seconds))
                except subprocess.TimeoutExpired:
                    proc.kill()  # SIGKILL
                    proc.communicate()
                    scenario.kills.append(_in_flight(project, scenario.database, version))
                    continue
                break  # it completed before the kill instant: nothing left to interrupt
        done = project.migrate("backfill", "run", version, database=scenario.database)
        if done.returncode:
            raise ExactlyOnceFailure(f"{scenario.label}: resuming failed: {_last_line(done.stderr)}; "
                                     f"{_ranges(scenario)}")
        comparison.check(scenario)
    return comparison.summary


def wait_for_claim(store: Path, proc: subprocess.Popen, database: str, version: int, timeout: float = 300) -> bool:
    """Until runner `proc` has claimed the backfill (its live status file beside the store says so);
    False when it exited or the time ran out first."""
    live = store.with_name(store.name + ".control") / f"status-{database}_{version}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            info = json.loads(live.read_text())
            if info.get("runner_pid") == proc.pid and info.get("status") == "running":
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    return False


def _wait_for_claim(project: Project, proc: subprocess.Popen, database: str, version: int) -> float:
    """Until the runner has claimed the backfill; returns that instant."""
    wait_for_claim(project.store, proc, database, version)
    return time.monotonic()


def _in_flight(project: Project, database: str, version: int):
    rows = project.query(
        "SELECT checkpoint_data FROM db_management.backfills WHERE backfill_id = "
        f"'{database}_{version}' ORDER BY version DESC, writer DESC LIMIT 1")[0]
    if not rows:
        return None
    return (json.loads(rows[0][0]) or {}).get("in_flight")


def _ranges(scenario: Scenario) -> str:
    shown = [f"({k['start']}, {k['end']}]" if k else "none" for k in scenario.kills]
    return "range in flight at the kill: " + ("; ".join(shown) or "none")


class Comparison:
    """The target of each scenario against the reference's: every column (a hash of the whole row), and
    how many keys repeat. The first difference stops the run, naming its phase, range and keys."""

    def __init__(self, project: Project, target: str, keys: list[str]):
        self.project, self.target = project, target
        self.cols = ", ".join(f"`{k}`" for k in keys)
        self.summary = {"target": target, "rows": None, "scenarios": {}}
        self.reference = None

    def _fp(self, db: str) -> str:
        h = "cityHash64(tuple(*))"
        return f"SELECT count(), sum({h}), groupBitXor({h}), count() - uniqExact({self.cols}) FROM {db}.{self.target}"

    def _dups(self, db: str) -> str:
        return (f"SELECT {self.cols}, count() FROM {db}.{self.target} GROUP BY {self.cols} HAVING count() > 1 "
                f"ORDER BY {self.cols} LIMIT 3")

    def _diff(self, a: str, b: str) -> str:
        return (f"SELECT {self.cols} FROM (SELECT {self.cols}, cityHash64(tuple(*)) AS h_ FROM {a}.{self.target}) "
                f"WHERE ({self.cols}, h_) NOT IN (SELECT {self.cols}, cityHash64(tuple(*)) FROM {b}.{self.target}) "
                f"ORDER BY {self.cols} LIMIT 3")

    def check_reference(self) -> None:
        fp, dups = self.project.query(self._fp("reference"), self._dups("reference"))
        self.reference = fp[0]
        self.summary["rows"] = self.reference[0]
        if self.reference[3]:
            raise ExactlyOnceFailure(f"uninterrupted run (the reference, no kill): {self.reference[3]} duplicate "
                                     f"key(s) in {self.target}, first (keys, count): {dups}")

    def check(self, s: Scenario) -> None:
        fp, dups, extra, missing = self.project.query(self._fp(s.database), self._dups(s.database),
                                                      self._diff(s.database, "reference"),
                                                      self._diff("reference", s.database))
        fp = fp[0]
        self.summary["scenarios"][s.name] = {"kills": len(s.kills), "rows": fp[0], "duplicate_keys": fp[3]}
        if fp == self.reference:
            return
        parts = [f"{fp[0]} rows vs {self.reference[0]} in the reference"]
        if fp[3] != self.reference[3]:
            parts.append(f"{fp[3]} duplicate key(s), first (keys, count): {dups}")
        if extra:
            parts.append(f"rows not in the reference at keys {extra}")
        if missing:
            parts.append(f"reference rows missing at keys {missing}")
        raise ExactlyOnceFailure(f"{s.label}: {self.target} differs from the reference: {'; '.join(parts)}; "
                                 f"{_ranges(s)}")
