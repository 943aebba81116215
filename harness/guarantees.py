"""What SQLite promises for (journal_mode, synchronous, fault class), with where it says so.

Every row cites the sqlite.org page it comes from. Flushes are assumed honest: a disk that lies
about them voids every promise (howtocorrupt.html §3.1), and no row here covers that case.

Fault classes:
  process-crash  the writer dies; the kernel and its page cache live on (SIGKILL, container kill).
  os-crash       the kernel dies with the writer; what reached the disk stays (VM killed, panic).
  power-loss     as os-crash, for a machine that loses power with honest flushes.
"""

from __future__ import annotations

from dataclasses import dataclass

JOURNAL_MODES = ("DELETE", "TRUNCATE", "PERSIST", "WAL", "MEMORY", "OFF")
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
FAULT_CLASSES = ("process-crash", "os-crash", "power-loss")

VERDICTS = ("intact", "lost-allowed", "lost", "torn", "corrupt", "error")
"""intact: all acknowledged present, nothing half-applied, integrity ok.
lost-allowed: acknowledged commits missing where the configuration does not promise them.
lost: acknowledged commits missing where the configuration promises them (durability).
torn: a transaction half-applied or an invariant broken (atomicity).
corrupt: the file does not open, integrity_check fails, or holds what was never written.
error: the harness itself failed; never counted against SQLite."""

PRAGMA = "https://www.sqlite.org/pragma.html#pragma_synchronous"
PRAGMA_JM = "https://www.sqlite.org/pragma.html#pragma_journal_mode"
WAL = "https://www.sqlite.org/wal.html#durability"
ATOMIC = "https://www.sqlite.org/atomiccommit.html"
CORRUPT = "https://www.sqlite.org/howtocorrupt.html"


@dataclass(frozen=True)
class Guarantee:
    """What one configuration promises under one fault class."""

    durable: bool   # every acknowledged commit survives
    atomic: bool    # no transaction is half-applied
    intact: bool    # the file opens and passes integrity_check
    source: str     # the sqlite.org page that says so
    quote: str      # the sentence it rests on

    @property
    def allowed(self) -> frozenset[str]:
        """The verdicts a trial of this configuration may have without a violation."""
        ok = {"intact"}
        if not self.durable:
            ok.add("lost-allowed")
        if not self.atomic:
            ok.add("torn")
        if not self.intact:
            ok.add("corrupt")
        return frozenset(ok)


_PROCESS_SAFE = Guarantee(
    True, True, True, PRAGMA,
    "Transactions are durable across application crashes regardless of the synchronous "
    "setting or journal mode.")
_NO_ROLLBACK_JOURNAL = Guarantee(
    True, False, False, PRAGMA_JM,
    "If the application crashes in the middle of a transaction when the OFF journaling mode is "
    "set, then the database file will very likely go corrupt. (MEMORY: likewise, the journal "
    "lives in volatile RAM.)")
_UNSYNCED = Guarantee(
    False, False, False, PRAGMA,
    "With synchronous OFF ... if the operating system crashes or the computer loses power "
    "before that data has been written to the disk surface ... the database might become "
    "corrupted.")
_WAL_NORMAL = Guarantee(
    False, True, True, PRAGMA,
    "WAL mode is always consistent with synchronous=NORMAL, but WAL mode does lose durability. "
    "A transaction committed in WAL mode with synchronous=NORMAL might roll back following a "
    "power loss or system crash.")
_WAL_FULL = Guarantee(
    True, True, True, PRAGMA,
    "With synchronous=FULL in WAL mode, an additional sync operation of the WAL file happens "
    "after each transaction commit. The extra WAL sync following each transaction helps ensure "
    "that transactions are durable across a power loss. (wal.html: writers sync the WAL on "
    "every transaction commit if PRAGMA synchronous is set to FULL.)")
_ROLLBACK_NORMAL = Guarantee(
    False, True, False, PRAGMA,
    "When synchronous is NORMAL ... There is a very small (though non-zero) chance that a power "
    "failure at just the wrong time could corrupt the database in journal_mode=DELETE on an "
    "older filesystem.")
_DELETE_FULL = Guarantee(
    False, True, True, PRAGMA,
    "EXTRA synchronous is like FULL with the addition that the directory containing a rollback "
    "journal is synced after that journal is unlinked to commit a transaction in DELETE mode. "
    "EXTRA provides additional durability if the commit is followed closely by a power loss.")
_ROLLBACK_FULL = Guarantee(
    True, True, True, ATOMIC,
    "When synchronous is FULL, the SQLite database engine will use the xSync method of the VFS "
    "to ensure that all content is safely written to the disk surface prior to continuing "
    "(pragma.html). TRUNCATE and PERSIST commit by truncating the journal or zeroing its header "
    "(atomiccommit.html, pragma.html#pragma_journal_mode); at FULL SQLite syncs that change "
    "before COMMIT returns (pager.c: 'Otherwise the journal might resurrect following a power "
    "loss'), which the docs do not state in so many words.")
_DELETE_EXTRA = Guarantee(
    True, True, True, PRAGMA,
    "EXTRA synchronous is like FULL with the addition that the directory containing a rollback "
    "journal is synced after that journal is unlinked to commit a transaction in DELETE mode.")


def guarantee(journal_mode: str, synchronous: str, fault_class: str) -> Guarantee:
    """Look up what SQLite promises for one configuration under one fault class."""
    jm, sync = journal_mode.upper(), synchronous.upper()
    if jm not in JOURNAL_MODES:
        raise ValueError(f"unknown journal_mode {journal_mode!r}")
    if sync not in SYNCHRONOUS:
        raise ValueError(f"unknown synchronous {synchronous!r}")
    if fault_class not in FAULT_CLASSES:
        raise ValueError(f"unknown fault class {fault_class!r}")
    if jm in ("OFF", "MEMORY"):
        return _NO_ROLLBACK_JOURNAL if fault_class == "process-crash" else _UNSYNCED
    if fault_class == "process-crash":
        return _PROCESS_SAFE
    # os-crash and power-loss: the kernel's page cache is gone with the fault.
    if sync == "OFF":
        return _UNSYNCED
    if jm == "WAL":
        return _WAL_NORMAL if sync == "NORMAL" else _WAL_FULL
    if sync == "NORMAL":
        return _ROLLBACK_NORMAL
    if jm == "DELETE" and sync == "FULL":
        return _DELETE_FULL
    if jm == "DELETE":
        return _DELETE_EXTRA
    return _ROLLBACK_FULL


def table() -> list[dict]:
    """The whole table, one row per configuration and fault class (for reports and docs)."""
    rows = []
    for fc in FAULT_CLASSES:
        for jm in JOURNAL_MODES:
            for sync in SYNCHRONOUS:
                g = guarantee(jm, sync, fc)
                rows.append({"fault_class": fc, "journal_mode": jm, "synchronous": sync,
                             "durable": g.durable, "atomic": g.atomic, "intact": g.intact,
                             "allowed": sorted(g.allowed), "source": g.source})
    return rows
