"""The guarantee table: what each configuration may lose under each fault class."""

from __future__ import annotations

import pytest

from harness.guarantees import FAULT_CLASSES, JOURNAL_MODES, SYNCHRONOUS, guarantee, table


@pytest.mark.parametrize("jm", ["DELETE", "TRUNCATE", "PERSIST", "WAL"])
@pytest.mark.parametrize("sync", SYNCHRONOUS)
def test_process_crash_loses_nothing_with_a_rollback_journal_or_wal(jm, sync):
    g = guarantee(jm, sync, "process-crash")
    assert g.allowed == {"intact"}
    assert "regardless of the synchronous" in g.quote


@pytest.mark.parametrize("jm", ["OFF", "MEMORY"])
def test_no_journal_may_corrupt_even_on_a_process_crash(jm):
    g = guarantee(jm, "FULL", "process-crash")
    assert {"torn", "corrupt"} <= g.allowed and "lost-allowed" not in g.allowed


def test_os_crash_wal():
    assert guarantee("WAL", "NORMAL", "os-crash").allowed == {"intact", "lost-allowed"}
    assert guarantee("WAL", "FULL", "os-crash").allowed == {"intact"}
    assert guarantee("WAL", "EXTRA", "power-loss").allowed == {"intact"}
    assert guarantee("WAL", "OFF", "os-crash").allowed == {
        "intact", "lost-allowed", "torn", "corrupt"}


def test_os_crash_rollback_journals():
    assert guarantee("DELETE", "NORMAL", "os-crash").allowed == {
        "intact", "lost-allowed", "corrupt"}
    # DELETE at FULL: a commit followed closely by power loss can roll back; EXTRA syncs the dir
    assert guarantee("DELETE", "FULL", "os-crash").allowed == {"intact", "lost-allowed"}
    assert guarantee("DELETE", "EXTRA", "os-crash").allowed == {"intact"}
    assert guarantee("TRUNCATE", "FULL", "os-crash").allowed == {"intact"}
    assert guarantee("TRUNCATE", "NORMAL", "os-crash").durable is False


def test_every_row_cites_sqlite_org():
    rows = table()
    assert len(rows) == len(FAULT_CLASSES) * len(JOURNAL_MODES) * len(SYNCHRONOUS)
    assert all(r["source"].startswith("https://www.sqlite.org/") for r in rows)


def test_case_insensitive_and_unknown_values():
    assert guarantee("wal", "full", "os-crash") == guarantee("WAL", "FULL", "os-crash")
    with pytest.raises(ValueError):
        guarantee("WAL", "FULL", "meteor")
    with pytest.raises(ValueError):
        guarantee("WALL", "FULL", "os-crash")
