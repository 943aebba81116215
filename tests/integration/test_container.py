"""Containers on the real Docker engine: every storage x arch x fault, judged; nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import engine
from harness.doctor import binfmt_handler, native_arch, other_arch
from tests.conftest import crashlab, need, only_run, records

pytestmark = [pytest.mark.docker]

MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}


@pytest.fixture(scope="module")
def client():
    try:
        c = engine.connect(timeout=30)
    except Exception as exc:  # noqa: BLE001 - any failure means no engine
        need(False, f"no Docker engine: {exc}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def emulation():
    need(binfmt_handler(other_arch()) is not None,
         f"no binfmt_misc handler for {other_arch()} (make setup registers it)")


@pytest.mark.slow
@pytest.mark.emulated
def test_every_storage_arch_and_fault_is_intact(client, emulation, write_scenario, tmp_path):
    sc = write_scenario("""
        name: container-grid
        trials: 1
        seed: 11
        sqlite: {journal_mode: [WAL, DELETE], synchronous: NORMAL}
        platform:
          kind: container
          arch: [native, emulated]
          storage: [bind, volume, layer, tmpfs]
        fault:
          kind: [kill-writer, kill-container, stop-container, pause-kill]
          after_commits: [10, 60]
          grace_s: 1
        exclude:
          - {sqlite.journal_mode: DELETE, fault.kind: [stop-container, pause-kill]}
    """)
    out = tmp_path / "out"
    r = crashlab("run", str(sc), "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = only_run(out)
    recs = records(d)
    seen = set()
    for rec in recs:
        cell = rec["cell"]
        seen.add((cell["arch"], cell["storage"], cell["fault"]))
        assert rec["verdict"] == "intact", rec
        assert rec["acked"] >= 10 and rec["integrity"] == ["ok"]
        want = native_arch() if cell["arch"] == "native" else other_arch()
        assert rec["machine"] == MACHINE[want], rec
        assert rec["verifier_machine"] == MACHINE[want]
        if cell["storage"] == "bind":
            assert rec["views"]["host"]["verdict"] == "intact"
            assert rec["views"]["host"]["machine"] == os.uname().machine
    expected = {(a, s, f) for a in ("native", "emulated")
                for s in ("bind", "volume", "layer", "tmpfs")
                for f in ("kill-writer", "kill-container", "stop-container", "pause-kill")
                if not (s == "tmpfs" and f != "kill-writer")}
    assert seen == expected
    run_id = d.name
    assert engine.leftovers(client, run_id) == {"containers": [], "volumes": [], "networks": []}
    assert not (d / ".work").exists()
    targets = json.loads((d / "targets.json").read_text())
    fp = next(v for k, v in targets.items() if "emulated/volume" in k)
    assert fp["image_arch"] == other_arch() and fp["engine_version"]
    assert "binfmt_misc" in fp["emulation"] and fp["data_mount"]
    env = json.loads((d / "environment.json").read_text())
    assert env["docker"]["storage_driver"]


def test_stop_container_waits_for_the_grace_period(client, write_scenario, tmp_path):
    sc = write_scenario("""
        name: stop
        trials: 1
        platform: {kind: container, storage: volume}
        fault: {kind: stop-container, after_commits: 20, grace_s: 2}
    """)
    out = tmp_path / "out"
    r = crashlab("run", str(sc), "--out", str(out), "--keep", "all")
    assert r.returncode == 0, r.stderr
    (rec,) = records(only_run(out))
    # the writer (PID 1, no SIGTERM handler) ignores SIGTERM and writes on until the SIGKILL
    assert rec["duration_s"] >= 2 and rec["acked"] > rec["struck_after"]["acked"]
    assert rec["verdict"] == "intact"
    kept = Path(rec["artifacts"])
    assert (kept / "trial.db").exists() and (kept / "events.jsonl").exists()
    # kept as the fault left them: the WAL the verifier's recovery would have checkpointed away
    assert (kept / "trial.db-wal").stat().st_size > 0


def test_sigint_mid_trial_leaves_nothing(client, write_scenario, tmp_path):
    sc = write_scenario("""
        name: interrupted
        trials: 50
        platform: {kind: container, storage: [volume, bind]}
        fault: {kind: [kill-container, kill-writer], after_commits: [200, 400]}
    """)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(sc), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run_id is None:
        for c in client.containers.list(filters={"label": engine.LABEL}):
            if "interrupted" in c.labels.get(engine.RUN_LABEL, ""):
                run_id = c.labels[engine.RUN_LABEL]
        time.sleep(0.1)
    assert run_id, "no container of the run appeared"
    trials = out / run_id / "trials.jsonl"
    while time.monotonic() < deadline and (not trials.exists() or trials.stat().st_size == 0):
        time.sleep(0.05)
    time.sleep(0.15)  # now mid-trial
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert engine.leftovers(client, run_id) == {"containers": [], "volumes": [], "networks": []}
    recs = records(out / run_id)
    assert 1 <= len(recs) < 200
    assert json.loads((out / run_id / "summary.json").read_text())["interrupted"] is True


def test_a_killed_harness_is_swept_by_the_next_run(client, write_scenario, tmp_path):
    sc = write_scenario("""
        name: orphan
        trials: 100
        platform: {kind: container, storage: volume}
        fault: {kind: kill-writer, after_commits: [200, 400]}
    """)
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(sc), "--out",
                             str(tmp_path / "a")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    owner = None
    while time.monotonic() < deadline and owner is None:
        for c in client.containers.list(filters={"label": engine.LABEL}):
            if c.labels.get(engine.OWNER_LABEL, "").endswith(f":{proc.pid}"):
                owner = c.labels[engine.OWNER_LABEL]
        time.sleep(0.1)
    assert owner
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait()
    run_id = client.containers.list(all=True, filters={
        "label": f"{engine.OWNER_LABEL}={owner}"})[0].labels[engine.RUN_LABEL]
    assert engine.leftovers(client, run_id)["containers"]
    r = crashlab("run", str(write_scenario("name: next\ntrials: 1\nplatform: {kind: container}"
                                           "\n", "next.yaml")), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "swept leftovers of dead runs" in r.stderr
    assert engine.leftovers(client, run_id) == {"containers": [], "volumes": [], "networks": []}


def test_clean_removes_labelled_resources(client):
    run_id = f"clean-test-{os.getpid()}"
    labels = engine.labels(run_id)
    vol = client.volumes.create(name=f"crashlab-{run_id}", labels=labels)
    assert engine.leftovers(client, run_id)["volumes"] == [vol.name]
    r = crashlab("clean", "--run", run_id)
    assert r.returncode == 0 and "1 volumes" in r.stdout
    assert engine.leftovers(client, run_id)["volumes"] == []


def test_doctor_reports_the_engine(client):
    r = crashlab("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["docker engine"]["ok"] is True
    assert checks["docker engine"]["detail"].startswith(client.version()["Version"])
