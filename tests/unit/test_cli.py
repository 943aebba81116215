"""The command line: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from harness.cli import main
from harness.targets.base import WORKLOAD_PY


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_validate_ok(write_scenario):
    p = write_scenario("name: x\nsqlite:\n  journal_mode: [WAL, DELETE]\n")
    r = invoke("validate", str(p))
    assert r.exit_code == 0
    assert r.output == f"{p}: ok: x: 2 cell(s) x 3 trial(s) = 6 trial(s)\n"


def test_validate_bad_file_lists_every_error_and_exits_2(write_scenario):
    good = write_scenario("name: x\n", "good.yaml")
    bad = write_scenario("name: x\nsqlite:\n  journal_mode: WALL\n  sync: FULL\n", "bad.yaml")
    r = invoke("validate", str(good), str(bad))
    assert r.exit_code == 2
    lines = r.output.splitlines()
    assert lines[0].startswith(f"{good}: ok")
    assert lines[1] == (f"Error: {bad}:3: sqlite.journal_mode: expected one of DELETE, TRUNCATE, "
                        f"PERSIST, WAL, MEMORY, OFF; got 'WALL' (did you mean 'WAL'?)")
    assert lines[2].startswith(f"Error: {bad}:4: sqlite.sync: unknown key")
    assert "Traceback" not in r.output


def test_validate_missing_file(tmp_path):
    r = invoke("validate", str(tmp_path / "none.yaml"))
    assert r.exit_code == 2 and r.output.strip() == f"Error: {tmp_path / 'none.yaml'}: no such file"


def test_run_with_a_bad_file_writes_nothing(write_scenario, tmp_path):
    bad = write_scenario("name: x\nfault:\n  kind: explode\n")
    out = tmp_path / "out"
    r = invoke("run", str(bad), "--out", str(out))
    assert r.exit_code == 2
    assert "fault.kind: expected one of" in r.output
    assert not out.exists()


def test_run_only_matching_nothing(write_scenario, tmp_path):
    p = write_scenario("name: x\n")
    r = invoke("run", str(p), "--out", str(tmp_path / "o"), "--only", "nothing-like-this")
    assert r.exit_code == 2 and "no cell matches --only" in r.output


def test_verify_judges_a_database_and_event_log(tmp_path):
    db = tmp_path / "t.db"
    events = tmp_path / "events.jsonl"
    with open(events, "w") as fh:
        subprocess.run([sys.executable, str(WORKLOAD_PY), "write", "--db", str(db),
                        "--workload", "inserts", "--max-txns", "12", "--journal-mode", "WAL"],
                       stdout=fh, check=True)
    args = ["verify", "--db", str(db), "--events", str(events), "--journal-mode", "WAL",
            "--synchronous", "FULL", "--fault-class", "process-crash", "--workload", "inserts"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["verdict"], out["acked"], out["lost_acked"]) == ("intact", 13, 0)

    conn = __import__("sqlite3").connect(db)
    conn.execute("DELETE FROM log WHERE txn = 12")
    conn.commit()
    conn.close()
    r = invoke(*args)
    assert r.exit_code == 1
    assert json.loads(r.output)["verdict"] == "lost"


def test_verify_rejects_a_non_event_log(tmp_path):
    (tmp_path / "e.jsonl").write_text("hello\n")
    r = invoke("verify", "--db", str(tmp_path / "x.db"), "--events", str(tmp_path / "e.jsonl"),
               "--journal-mode", "WAL", "--synchronous", "FULL", "--fault-class", "os-crash")
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: {tmp_path / 'e.jsonl'}:1: not a writer event: 'hello'"


def test_verify_bad_option_is_exit_2(tmp_path):
    r = invoke("verify", "--db", "x", "--events", "y", "--journal-mode", "WALL",
               "--synchronous", "FULL", "--fault-class", "os-crash")
    assert r.exit_code == 2


def test_guarantees_table_prints():
    r = invoke("guarantees", "--fault-class", "os-crash", "--json")
    rows = json.loads(r.output)
    assert r.exit_code == 0 and len(rows) == 24


def test_report_on_a_non_run_folder(tmp_path):
    r = invoke("report", str(tmp_path))
    assert r.exit_code == 2 and "not a run folder" in r.output


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "harness", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "validate" in r.stdout and "Exit codes" in r.stdout


def test_run_without_an_engine_says_so_and_writes_nothing(write_scenario, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    p = write_scenario("name: c\nplatform: {kind: container}\n")
    out = tmp_path / "out"
    r = invoke("run", str(p), "--out", str(out))
    assert r.exit_code == 3
    assert r.output.startswith("Error: no Docker engine answers (")
    assert not out.exists()
