"""Real host trials: real SQLite writers SIGKILLed mid-write, verified fresh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import crashlab, records
from tests.conftest import only_run as run_dir

REQUIRED = {"trial_id", "cell", "seed", "verdict", "expected", "acked", "in_flight",
            "lost_acked", "integrity", "sqlite_version", "machine", "duration_s"}
CELL_KEYS = {"journal_mode", "synchronous", "platform", "arch", "storage", "fault", "workload"}


def test_process_crash_loses_nothing_in_any_mode(write_scenario, tmp_path):
    sc = write_scenario("""
        name: host-matrix
        trials: 2
        seed: 5
        sqlite:
          journal_mode: [WAL, DELETE, TRUNCATE]
          synchronous: [OFF, NORMAL, FULL]
        platform: {kind: host}
        workload: {kind: [transfers, inserts], rows_per_txn: 4}
        fault: {kind: kill-writer, after_commits: [20, 300]}
    """)
    out = tmp_path / "out"
    r = crashlab("run", str(sc), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    d = run_dir(out)
    recs = records(d)
    assert len(recs) == 3 * 3 * 2 * 2
    for rec in recs:
        assert REQUIRED <= rec.keys() and CELL_KEYS <= rec["cell"].keys()
        assert rec["verdict"] == "intact", rec
        assert rec["expected"] == ["intact"]
        # the fault struck mid-write, at the seeded point, after real commits
        assert rec["acked"] >= rec["trigger"]["after_commits"] >= 20
        assert rec["integrity"] == ["ok"]
        assert rec["machine"] == os.uname().machine
    assert {(r["cell"]["journal_mode"], r["cell"]["synchronous"]) for r in recs} == {
        (j, s) for j in ("WAL", "DELETE", "TRUNCATE") for s in ("OFF", "NORMAL", "FULL")}
    summary = json.loads((d / "summary.json").read_text())
    assert summary["totals"]["intact"] == len(recs) and summary["violations"] == 0
    assert "| WAL+FULL host kill-writer transfers |" in (d / "summary.md").read_text()
    assert "WAL+FULL host kill-writer transfers" in r.stdout
    # passing trials keep no artifacts by default, and scratch space is gone
    assert list((d / "trials").iterdir()) == []
    assert not (d / ".work").exists()


def test_after_ms_and_keep_all(write_scenario, tmp_path):
    sc = write_scenario("""
        name: timed
        trials: 2
        sqlite: {journal_mode: WAL, synchronous: NORMAL}
        fault: {kind: kill-writer, after_ms: [50, 150]}
    """)
    out = tmp_path / "out"
    r = crashlab("run", str(sc), "--out", str(out), "--keep", "all", "--jsonl")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2
    d = run_dir(out)
    for rec in records(d):
        assert 50 <= rec["trigger"]["after_ms"] <= 150
        assert rec["struck_after"]["ms"] >= rec["trigger"]["after_ms"]
        t = d / "trials" / rec["trial_id"]
        names = {p.name for p in t.iterdir()}
        assert {"events.jsonl", "census.json", "record.json", "trial.db"} <= names
        assert "trial.db-wal" in names  # the WAL as the kill left it
        events = [json.loads(x) for x in (t / "events.jsonl").read_text().splitlines()]
        assert sum(e["ev"] == "ack" for e in events) == rec["acked"]


def test_same_seed_same_fault_points(write_scenario, tmp_path):
    sc = write_scenario("name: seeded\ntrials: 3\nseed: 9\n")
    points = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert crashlab("run", str(sc), "--out", str(out), "-q").returncode == 0
        points.append([(r["seed"], r["trigger"]["after_commits"]) for r in records(run_dir(out))])
    assert points[0] == points[1] and len(set(points[0])) == 3


def test_sigint_mid_run_keeps_whole_records(write_scenario, tmp_path):
    sc = write_scenario("name: long\ntrials: 200\nfault: {kind: kill-writer, "
                        "after_commits: [300, 400]}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(sc), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and any(out.iterdir()):
            d = run_dir(out)
            if (d / "trials.jsonl").exists() and (d / "trials.jsonl").stat().st_size > 0:
                break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    d = run_dir(out)
    recs = records(d)  # every line parses: only whole records
    assert 1 <= len(recs) < 200
    summary = json.loads((d / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["trials"] == len(recs)
    assert not (d / ".work").exists()
    leftover = subprocess.run(["pgrep", "-f", str(d)], capture_output=True, text=True).stdout
    assert leftover == ""


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_is_handled_like_sigint(write_scenario, tmp_path, sig):
    sc = write_scenario("name: long\ntrials: 200\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(sc), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert json.loads((run_dir(out) / "summary.json").read_text())["interrupted"] is True


def test_replay_repeats_a_trial_at_the_same_fault_point(write_scenario, tmp_path):
    sc = write_scenario("name: replayable\ntrials: 2\nseed: 4\n"
                        "sqlite: {journal_mode: [WAL, DELETE]}\n")
    out = tmp_path / "out"
    assert crashlab("run", str(sc), "--out", str(out), "-q").returncode == 0
    sc.write_text("name: changed-after-the-run\n")  # the run replays from its own copy
    d = run_dir(out)
    old = next(r for r in records(d) if r["trial_id"] == "c001-t001")
    r = crashlab("replay", str(d), "c001-t001", "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    (new,) = records(run_dir(tmp_path / "again"))
    assert (new["seed"], new["trigger"], new["cell_label"]) == (
        old["seed"], old["trigger"], old["cell_label"])
    assert new["verdict"] == "intact"
    bad = crashlab("replay", str(d), "c009-t000")
    assert bad.returncode == 2 and "no trial 'c009-t000'" in bad.stderr
