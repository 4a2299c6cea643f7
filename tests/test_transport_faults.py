"""What the chaos soak (tests/test_chaos_soak.py) found, each pinned by a fault aimed at one statement.

Faults are injected at the transport by tests/chhttp.py (named in each test); every query result and
every ClickHouse error comes from the engine. Seeds are those of the soak run that found the defect.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from backfill_plugin.errors import BackfillError
from backfill_plugin.protocol import preflight
from migrator import connection, tracking
from tests import test_http_endpoint as http_tests
from tests.test_http_endpoint import migrate, ok

hclient, hdb, hsetup = http_tests.hclient, http_tests.hdb, http_tests.hsetup  # the HTTP suite's fixtures


def _one_line(proc) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_preflight_explain_read_timeout_is_a_network_error_not_the_sqls(http_endpoint, hdb, hsetup, monkeypatch):
    """Issue 31's example: the endpoint answers the preflight's EXPLAIN 3 s late and the client's real read
    timeout (1 s) fires. Once: the EXPLAIN is asked again and passes. Always: the line says network error
    and that the SQL was not checked, and does not read `<file>.backfill.sql: ...` as if the SQL were wrong."""
    root = hsetup(200, 100)
    monkeypatch.setenv("MIGRATE_RECEIVE_TIMEOUT", "1")
    client = connection.connect(connection.resolve(http_endpoint.url))
    sql = f"INSERT INTO {hdb}.dst SELECT a, b, v FROM {hdb}.src WHERE 1"
    run = SimpleNamespace(client=client, spec=SimpleNamespace(sql_path=root / "001_x.backfill.sql"))
    sleeps = []
    http_endpoint.fault("late", f"EXPLAIN PIPELINE {sql}", seconds=3)
    preflight.explain_first_range(run, sql, None, sleep=sleeps.append)
    assert sleeps == [0.5]  # one read timeout, asked again
    http_endpoint.fault("late", f"EXPLAIN PIPELINE {sql}", seconds=3, times=-1)
    with pytest.raises(BackfillError) as caught:
        preflight.explain_first_range(run, sql, None, sleep=sleeps.append)
    http_endpoint.clear_faults()
    message = str(caught.value)
    assert message.startswith("network error: no answer within the read timeout"), message
    assert not re.search(r"\.backfill\.sql: ", message), message
    assert "did not run, nothing was written" in message
    # The engine's own refusal of the SQL still names the file.
    with pytest.raises(BackfillError, match=r"001_x\.backfill\.sql: Code: 60\."):
        preflight.explain_first_range(run, sql.replace(".src", ".nope"), None, sleep=sleeps.append)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("reset", r"error: network error: connection broken in the middle of the answer; the statement may have run "),
        ("refuse", r"error: server error: HTTP 502 with no ClickHouse error in the answer "),
    ],
)
def test_cli_error_names_the_network_or_the_server(http_endpoint, hdb, hsetup, kind, expected):
    """Found by the chaos soak, seed 31: status reads reset mid-answer or refused by a 502 (every time, so
    the driver's and the product's retries give up) ended `error: StreamFailureError: Stream failed ...` and
    `error: DatabaseError: HTTP driver received HTTP status 502 ...`, which do not say what failed."""
    root = hsetup(200, 100)
    http_endpoint.fault(kind, "FROM db_management.backfills", times=-1, status=502)
    try:
        line = _one_line(migrate(http_endpoint.url, hdb, root, "backfill", "status", "1"))
    finally:
        http_endpoint.clear_faults()
    assert re.match(expected, line), line


def test_state_write_is_written_again_across_one_dropped_connection(http_endpoint, hclient, hdb, hsetup):
    """Found by the chaos soak, seed 31: a checkpoint write whose connection was dropped after it ran stopped
    `migrate backfill run` (exit 1). A state row is safe to write twice (same version, same content), so it is
    written again and the run completes; the target is exact."""
    from tests.conftest import assert_copied_exactly

    rows = 400
    root = hsetup(rows, 100)
    http_endpoint.fault("drop", "INSERT INTO db_management.backfills", nth=3)
    out = ok(migrate(http_endpoint.url, hdb, root, "backfill", "run", "1"))
    assert "backfill 1: completed" in out
    writes = [e for e in http_endpoint.log() if e["query"].startswith("INSERT INTO db_management.backfills")]
    dropped = [e for e in writes if e.get("fault")]
    assert len(dropped) == 1 and dropped[0]["status"] == 200  # it ran, then the answer was lost
    again = hclient.command(
        "SELECT count() - uniqExact(version) FROM db_management.backfills WHERE db_name = {d:String}",
        parameters={"d": hdb},
    )
    assert again == 1  # the dropped row was written a second time, as the same version
    assert_copied_exactly(hclient, hdb, rows)


def test_a_lock_claim_whose_answer_was_lost_is_given_back(http_endpoint, hclient, hdb):
    """Found by the chaos soak (seed 31 of the weighted short form, `migration DDL` request 0 reset): the claim
    row of the migrate lock lands, its answer is reset, and the claim stayed live for its 600 s lease, naming a
    process that had given up. The claimant releases what may have landed; a second claimant in the same live
    process (so that no exited-process rule can help) gets the lock at once. The reset is the endpoint's."""
    tracking.ensure_schema(hclient)
    http_endpoint.fault("reset", "INSERT INTO db_management.migration_locks")
    with pytest.raises(Exception) as caught:
        tracking.AdvisoryLock(hclient, hdb).acquire()
    assert connection.transport.cause(caught.value) == "network", caught.value
    other = tracking.AdvisoryLock(connection.connect(connection.resolve(http_endpoint.url)), hdb)
    other.acquire()
    other.release()


def test_a_migration_statement_whose_answer_was_lost_names_the_network_not_the_file(http_endpoint, hdb, tmp_path):
    """Found by the 30-minute chaos soak (seed 1796661514, `migration DDL` drop): `migrate up` ended
    `error: 040_late.up.sql: version 40 failed: network error: ...`, a line that reads as if the file were wrong.
    The line now starts with what failed and still names the version and its file; the version stays dirty, as
    its statement may have run (the runbook's repair applies). The drop is the endpoint's."""
    root = tmp_path / "migrations"
    root.mkdir()
    (root / "001_late.up.sql").write_text("CREATE TABLE IF NOT EXISTS {db}.late (x UInt8) ENGINE = MergeTree ORDER BY x")
    (root / "001_late.down.sql").write_text("DROP TABLE IF EXISTS {db}.late")
    http_endpoint.fault("drop", "CREATE TABLE IF NOT EXISTS " + hdb + ".late")
    line = _one_line(migrate(http_endpoint.url, hdb, root, "up"))
    assert line.startswith("error: network error: connection closed without an answer"), line
    assert "version 1 (001_late.up.sql, statement 1 of 1) did not finish" in line, line
    assert not re.search(r"\.sql: ", line), line
