"""The runner's own failure paths, with a scripted stand-in target (real targets: integration)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness import runner
from harness.errors import TargetError
from harness.results import RunStore, read_trials
from harness.scenario import loads
from harness.targets.base import Target


class Scripted(Target):
    """Prints the given lines as the writer would, then answers verify with `census`."""

    kind = "scripted"

    def __init__(self, lines, census=None, strike_error=None, verify_error=None, delay=0.0):
        self.lines, self.census, self.delay = lines, census, delay
        self.strike_error, self.verify_error = strike_error, verify_error
        self.calls: list[str] = []

    def prepare(self, trial):
        self.calls.append("prepare")

    def start_writer(self, spec):
        self.calls.append("start")

        def gen():
            for line in self.lines:
                time.sleep(self.delay)
                yield line
        return gen()

    def strike(self, fault):
        self.calls.append("strike")
        if self.strike_error:
            raise self.strike_error

    def snapshot(self, dest: Path):
        self.calls.append("snapshot")

    def verify(self, spec):
        self.calls.append("verify")
        if self.verify_error:
            raise self.verify_error
        return self.census

    def finish_trial(self):
        self.calls.append("finish")


def ev(**kw) -> str:
    return json.dumps(kw) + "\n"


def writer_lines(n: int) -> list[str]:
    out = [ev(ev="ready", pid=1, sqlite_version="3.40.1", machine="x86_64")]
    for t in range(n + 1):
        out += [ev(ev="begin", txn=t), ev(ev="ack", txn=t)]
    return out


def census(last: int) -> dict:
    return {"opened": True, "integrity": ["ok"], "present": [[0, last]], "partial": {},
            "invariant": {"ok": True}, "error": None, "sqlite_version": "3.40.1",
            "machine": "x86_64"}


def setup(tmp_path, text="name: t\nfault: {kind: kill-writer, after_commits: 5}\ntimeout_s: 2\n"):
    sc = loads(text)
    store = RunStore(tmp_path, "r1")
    return sc, sc.cells[0], store


def test_strikes_after_the_seeded_commit_and_judges(tmp_path):
    sc, cell, store = setup(tmp_path)
    t = Scripted(writer_lines(20), census(20))
    rec = runner.run_trial(t, sc, cell, 0, store, keep="none")
    assert rec["verdict"] == "intact" and rec["struck_after"]["acked"] == 5
    # every line already printed counts: 21 acks incl. txn 0
    assert rec["acked"] == 21
    assert t.calls == ["prepare", "start", "strike", "snapshot", "verify", "finish"]
    store.close()
    assert read_trials(tmp_path / "r1")[0]["trial_id"] == "c000-t000"


def test_writer_ending_before_the_fault_is_an_error_not_a_verdict(tmp_path):
    sc, cell, store = setup(tmp_path)
    t = Scripted(writer_lines(2), census(2))
    rec = runner.run_trial(t, sc, cell, 0, store, keep="failures")
    assert rec["verdict"] == "error" and not rec["violation"]
    assert "ended before the fault" in rec["error"]
    assert t.calls[-1] == "finish"
    assert (tmp_path / "r1" / "trials" / "c000-t000" / "record.json").exists()


def test_silence_past_timeout_is_an_error(tmp_path):
    sc, cell, store = setup(tmp_path, "name: t\ntimeout_s: 1\n"
                                      "fault: {kind: kill-writer, after_commits: 5}\n")
    t = Scripted(writer_lines(1) + ["x\n"] * 1000, delay=0.01)
    t0 = time.monotonic()
    rec = runner.run_trial(t, sc, cell, 0, store, keep="none")
    assert rec["verdict"] == "error" and "timeout_s=1" in rec["error"]
    assert time.monotonic() - t0 < 10


def test_a_writer_error_event_is_reported(tmp_path):
    sc, cell, store = setup(tmp_path)
    lines = writer_lines(1) + [ev(ev="error", txn=2, error="OperationalError: disk I/O error")]
    rec = runner.run_trial(Scripted(lines), sc, cell, 0, store, keep="none")
    assert rec["verdict"] == "error" and "disk I/O error" in rec["error"]


def test_an_unexpected_exception_in_a_target_is_one_trial_error(tmp_path):
    sc, cell, store = setup(tmp_path)
    t = Scripted(writer_lines(20), census(20), strike_error=RuntimeError("engine hiccup"))
    rec = runner.run_trial(t, sc, cell, 0, store, keep="none")
    assert rec["verdict"] == "error" and rec["error"] == "RuntimeError: engine hiccup"
    assert t.calls[-1] == "finish"


def test_verifier_failure_is_an_error(tmp_path):
    sc, cell, store = setup(tmp_path)
    t = Scripted(writer_lines(20), verify_error=TargetError("verifier failed", status=1))
    rec = runner.run_trial(t, sc, cell, 0, store, keep="none")
    assert rec["verdict"] == "error" and "exit status 1" in rec["error"]


def test_noise_between_events_is_ignored():
    assert runner.parse_event('[  3.1] random: crng init done\n') is None
    assert runner.parse_event('\r{"ev": "ack", "txn": 3}\r\n') == {"ev": "ack", "txn": 3}
    assert runner.parse_event('garbage {"ev": "ack", "txn": 4}') == {"ev": "ack", "txn": 4}
    assert runner.parse_event('{"ev": "ack", "txn": ') is None
