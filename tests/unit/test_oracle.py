"""The oracle on real SQLite files with planted damage (no Docker: the writer runs here)."""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys

import pytest

from harness import oracle, workload
from harness.guarantees import guarantee
from harness.targets.base import WORKLOAD_PY

PROCESS = guarantee("WAL", "FULL", "process-crash")
WAL_NORMAL_OS = guarantee("WAL", "NORMAL", "os-crash")


def write(tmp_path, kind="inserts", txns=30, journal_mode="DELETE"):
    db = tmp_path / "t.db"
    out = subprocess.run(
        [sys.executable, str(WORKLOAD_PY), "write", "--db", str(db), "--workload", kind,
         "--rows-per-txn", "4", "--accounts", "8", "--journal-mode", journal_mode,
         "--max-txns", str(txns), "--seed", "3"],
        capture_output=True, text=True, check=True).stdout
    events = [json.loads(line) for line in out.splitlines()]
    return db, events


def census(db, kind="inserts"):
    return workload.census(argparse.Namespace(db=str(db), workload=kind, rows_per_txn=4,
                                              accounts=8))


def sql(db, statement):
    conn = sqlite3.connect(db)
    conn.execute(statement)
    conn.commit()
    conn.close()


def test_untouched_database_is_intact(tmp_path):
    db, events = write(tmp_path)
    j = oracle.judge(events, census(db), PROCESS)
    assert (j.verdict, j.violation, j.acked, j.lost_acked, j.present) == (
        "intact", False, 31, 0, 31)


def test_transfers_untouched_is_intact_with_invariant(tmp_path):
    db, events = write(tmp_path, "transfers")
    c = census(db, "transfers")
    assert c["invariant"]["ok"] is True
    assert oracle.judge(events, c, PROCESS).verdict == "intact"


def test_acknowledged_rows_deleted_is_lost(tmp_path):
    db, events = write(tmp_path)
    sql(db, "DELETE FROM log WHERE txn >= 25")
    j = oracle.judge(events, census(db), PROCESS)
    assert (j.verdict, j.violation, j.lost_acked) == ("lost", True, 6)
    assert j.lost_acked_txns == [25, 26, 27, 28, 29, 30]


def test_loss_where_the_cell_permits_it_is_lost_allowed(tmp_path):
    db, events = write(tmp_path)
    sql(db, "DELETE FROM log WHERE txn >= 25")
    j = oracle.judge(events, census(db), WAL_NORMAL_OS)
    assert (j.verdict, j.violation, j.lost_acked) == ("lost-allowed", False, 6)


def test_half_a_transaction_is_torn(tmp_path):
    db, events = write(tmp_path)
    sql(db, "DELETE FROM log WHERE txn = 12 AND i >= 2")
    j = oracle.judge(events, census(db), PROCESS)
    assert (j.verdict, j.violation) == ("torn", True)
    assert j.partial_txns == {"12": 2}
    # torn is a violation even where loss is allowed
    assert oracle.judge(events, census(db), WAL_NORMAL_OS).violation


def test_broken_invariant_is_torn(tmp_path):
    db, events = write(tmp_path, "transfers")
    sql(db, "UPDATE accounts SET balance = balance + 1 WHERE id = 3")
    j = oracle.judge(events, census(db, "transfers"), PROCESS)
    assert j.verdict == "torn" and j.invariant_ok is False


def test_damaged_btree_page_is_corrupt(tmp_path):
    db, events = write(tmp_path, txns=200)
    size = db.stat().st_size
    page = 4096
    assert size >= 6 * page
    with open(db, "r+b") as fh:  # scribble over an interior page of the log table
        fh.seek(3 * page + 8)
        fh.write(b"\xff" * 200)
    c = census(db)
    j = oracle.judge(events, c, PROCESS)
    assert j.verdict == "corrupt" and j.violation
    assert c["integrity"] != ["ok"] or c["error"]


def test_garbage_header_does_not_open(tmp_path):
    db, events = write(tmp_path)
    with open(db, "r+b") as fh:
        fh.write(b"not a database at all!!")
    j = oracle.judge(events, census(db), PROCESS)
    assert j.verdict == "corrupt" and "file is not a database" in " ".join(j.reasons)


def test_row_never_begun_is_flagged(tmp_path):
    db, events = write(tmp_path)
    sql(db, "INSERT INTO log SELECT 999, i, payload FROM log WHERE txn = 1")
    j = oracle.judge(events, census(db), PROCESS)
    assert j.verdict == "corrupt" and j.phantom_txns == [999]


def test_in_flight_transaction_may_be_present_or_absent(tmp_path):
    db, events = write(tmp_path)
    last = max(e["txn"] for e in events if e["ev"] == "ack")
    events = [e for e in events if not (e["ev"] == "ack" and e["txn"] == last)]
    events = [e for e in events if e["ev"] != "done"]
    j = oracle.judge(events, census(db), PROCESS)
    assert (j.verdict, j.in_flight, j.in_flight_applied) == ("intact", 1, 1)
    sql(db, f"DELETE FROM log WHERE txn = {last}")
    j = oracle.judge(events, census(db), PROCESS)
    assert (j.verdict, j.in_flight, j.in_flight_applied) == ("intact", 1, 0)


def test_missing_database_with_nothing_acknowledged_is_intact(tmp_path):
    c = census(tmp_path / "never.db")
    assert oracle.judge([{"ev": "ready"}, {"ev": "begin", "txn": 0}], c, PROCESS).verdict == \
        "intact"
    assert oracle.judge([{"ev": "ack", "txn": 0}], c, PROCESS).verdict == "lost"


def test_harness_failure_is_error_never_a_violation():
    j = oracle.judge([], None, PROCESS, harness_error="boom")
    assert (j.verdict, j.violation, j.reasons) == ("error", False, ["boom"])


@pytest.mark.parametrize("mode", ["WAL", "DELETE", "TRUNCATE", "PERSIST"])
def test_writer_leaves_a_valid_database_in_each_mode(tmp_path, mode):
    db, events = write(tmp_path, "transfers", txns=10, journal_mode=mode)
    ready = events[0]
    assert ready["ev"] == "ready" and ready["journal_mode"] == mode.lower()
    assert oracle.judge(events, census(db, "transfers"), PROCESS).verdict == "intact"
