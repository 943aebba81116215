#!/usr/bin/env python3
"""The code that runs inside a target: the writer, the verifier and an idle keeper.

Standard library only, so the same file runs unchanged on the host, in a container and in a VM.

The writer prints one JSON object per line on stdout and flushes it before going on, so that what
the orchestrator reads never depends on the disk under test:

    {"ev": "ready", "pid": ..., "sqlite_version": ..., "machine": ..., "journal_mode": ...}
    {"ev": "begin", "txn": N}      printed before BEGIN: a transaction not begun must be absent
    {"ev": "ack", "txn": N}        printed after COMMIT returned: the transaction is acknowledged
    {"ev": "ckpt_start", "txn": N} / {"ev": "ckpt_end", "txn": N, "result": [busy, log, done]}
    {"ev": "done", "txn": N}       the writer reached max_txns
    {"ev": "error", "txn": N, "error": "..."}

Transaction 0 creates the schema (and the accounts of the transfers workload); transactions
1, 2, ... each write ``rows_per_txn`` rows. The verifier opens the database fresh, as after a
reboot, and prints one JSON census on stdout.

Usage:
    workload.py write  --db PATH [options]
    workload.py verify --db PATH [options]
    workload.py idle
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import sys
import time

INITIAL_BALANCE = 1000
CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _connect(db: str, create: bool) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    uri = "file:" + db.replace("?", "%3f").replace("#", "%23") + "?mode=" + mode
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
    return conn


def _schema(conn: sqlite3.Connection, args: argparse.Namespace) -> None:
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value)")
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("workload", args.workload), ("rows_per_txn", args.rows_per_txn),
         ("accounts", args.accounts), ("initial_balance", INITIAL_BALANCE)],
    )
    if args.workload == "inserts":
        conn.execute("CREATE TABLE log(txn INTEGER NOT NULL, i INTEGER NOT NULL, payload BLOB,"
                     " PRIMARY KEY (txn, i))")
    else:
        conn.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        conn.execute("CREATE TABLE ledger(txn INTEGER NOT NULL, leg INTEGER NOT NULL,"
                     " account INTEGER NOT NULL, delta INTEGER NOT NULL, payload BLOB,"
                     " PRIMARY KEY (txn, leg))")
        conn.executemany("INSERT INTO accounts VALUES (?, ?)",
                         [(i, INITIAL_BALANCE) for i in range(args.accounts)])


def _write_txn(conn: sqlite3.Connection, args: argparse.Namespace, rng: random.Random,
               txn: int) -> None:
    n = args.rows_per_txn
    if args.workload == "inserts":
        conn.executemany(
            "INSERT INTO log VALUES (?, ?, ?)",
            [(txn, i, rng.randbytes(args.payload_bytes)) for i in range(n)],
        )
        return
    # transfers: n legs over distinct accounts whose deltas sum to zero
    k = min(n, args.accounts)
    accounts = rng.sample(range(args.accounts), k)
    deltas = [rng.randint(-50, 50) for _ in range(n - 1)]
    deltas.append(-sum(deltas))
    for leg, delta in enumerate(deltas):
        account = accounts[leg % k]
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (delta, account))
        conn.execute("INSERT INTO ledger VALUES (?, ?, ?, ?, ?)",
                     (txn, leg, account, delta, rng.randbytes(args.payload_bytes)))


def cmd_write(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    conn = _connect(args.db, create=True)
    mode = conn.execute("PRAGMA journal_mode=" + args.journal_mode).fetchone()[0]
    conn.execute("PRAGMA synchronous=" + args.synchronous)
    if args.wal_autocheckpoint is not None:
        conn.execute("PRAGMA wal_autocheckpoint=%d" % args.wal_autocheckpoint)
    emit({
        "ev": "ready", "pid": os.getpid(), "sqlite_version": sqlite3.sqlite_version,
        "machine": platform.machine(), "journal_mode": mode,
        "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
        "python": platform.python_version(),
    })
    txn = 0
    try:
        while args.max_txns <= 0 or txn <= args.max_txns:
            emit({"ev": "begin", "txn": txn})
            conn.execute("BEGIN IMMEDIATE")
            if txn == 0:
                _schema(conn, args)
            else:
                _write_txn(conn, args, rng, txn)
            conn.execute("COMMIT")
            emit({"ev": "ack", "txn": txn})
            if args.checkpoint_every and txn and txn % args.checkpoint_every == 0:
                emit({"ev": "ckpt_start", "txn": txn})
                res = conn.execute("PRAGMA wal_checkpoint(%s)" % args.checkpoint_mode).fetchone()
                emit({"ev": "ckpt_end", "txn": txn, "result": list(res) if res else None})
            if args.delay_ms:
                time.sleep(args.delay_ms / 1000.0)
            txn += 1
    except sqlite3.Error as exc:
        emit({"ev": "error", "txn": txn, "error": "%s: %s" % (type(exc).__name__, exc)})
        return 1
    emit({"ev": "done", "txn": txn - 1})
    if args.linger:
        # Keep the connection (and its locks and -shm) open until killed.
        while True:
            time.sleep(3600)
    conn.close()
    return 0


def _ranges(ids: list) -> list:
    """Sorted ints -> [[first, last], ...] runs."""
    out: list = []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _files(db: str) -> dict:
    sizes = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            sizes["db" + suffix] = os.stat(db + suffix).st_size
        except OSError:
            pass
    return sizes


def census(args: argparse.Namespace) -> dict:
    out: dict = {
        "sqlite_version": sqlite3.sqlite_version, "machine": platform.machine(),
        "files_before": _files(args.db), "exists": os.path.exists(args.db),
        "opened": False, "integrity": None, "present": [], "partial": {},
        "invariant": None, "error": None,
    }
    if not out["exists"]:
        out["opened"] = True
        out["integrity"] = ["ok"]
        out["note"] = "database file does not exist"
        return out
    try:
        conn = _connect(args.db, create=False)
        out["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        out["opened"] = True
        out["integrity"] = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            out["files_after"] = _files(args.db)
            return out
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        rows_per_txn = int(meta.get("rows_per_txn", args.rows_per_txn))
        table = "log" if meta.get("workload") == "inserts" else "ledger"
        counts = conn.execute(
            "SELECT txn, count(*) FROM %s GROUP BY txn ORDER BY txn" % table).fetchall()
        full = [0] + [t for t, c in counts if c == rows_per_txn]
        out["present"] = _ranges(sorted(set(full)))
        out["partial"] = {str(t): c for t, c in counts if c != rows_per_txn}
        if table == "ledger":
            n_acc, total = conn.execute("SELECT count(*), total(balance) FROM accounts").fetchone()
            expected_total = int(meta.get("accounts", args.accounts)) * int(
                meta.get("initial_balance", INITIAL_BALANCE))
            mismatched = conn.execute(
                "SELECT count(*) FROM accounts a LEFT JOIN (SELECT account, sum(delta) AS d"
                " FROM ledger GROUP BY account) l ON l.account = a.id"
                " WHERE a.balance != ? + coalesce(l.d, 0)",
                (int(meta.get("initial_balance", INITIAL_BALANCE)),)).fetchone()[0]
            ok = int(total) == expected_total and mismatched == 0
            out["invariant"] = {
                "ok": ok, "total": int(total), "expected_total": expected_total,
                "accounts": n_acc, "accounts_mismatched": mismatched,
            }
        conn.close()
    except sqlite3.Error as exc:
        out["error"] = "%s: %s" % (type(exc).__name__, exc)
    out["files_after"] = _files(args.db)
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    emit(census(args))
    return 0


def cmd_idle(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="crashlab workload: writer, verifier, idle keeper")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("write", "verify"):
        s = sub.add_parser(name)
        s.add_argument("--db", required=True)
        s.add_argument("--workload", choices=("inserts", "transfers"), default="transfers")
        s.add_argument("--rows-per-txn", type=int, default=4)
        s.add_argument("--accounts", type=int, default=64)
        if name == "write":
            s.add_argument("--journal-mode", default="WAL")
            s.add_argument("--synchronous", default="FULL")
            s.add_argument("--wal-autocheckpoint", type=int, default=None)
            s.add_argument("--payload-bytes", type=int, default=64)
            s.add_argument("--checkpoint-every", type=int, default=0)
            s.add_argument("--checkpoint-mode", choices=CHECKPOINT_MODES, default="PASSIVE")
            s.add_argument("--max-txns", type=int, default=0, help="0: until killed")
            s.add_argument("--delay-ms", type=float, default=0.0)
            s.add_argument("--linger", action="store_true")
            s.add_argument("--seed", type=int, default=0)
    sub.add_parser("idle")
    return p


def main(argv: list | None = None) -> int:
    args = parser().parse_args(argv)
    return {"write": cmd_write, "verify": cmd_verify, "idle": cmd_idle}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
