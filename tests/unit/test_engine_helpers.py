"""Engine helpers that need no engine: labels, ownership, Docker Desktop settings."""

from __future__ import annotations

import json
import os
import platform

from harness import engine


def test_labels_carry_run_and_owner():
    got = engine.labels("r1", cell="3")
    assert got[engine.LABEL] == "1" and got[engine.RUN_LABEL] == "r1"
    assert got[engine.OWNER_LABEL] == f"{platform.node()}:{os.getpid()}"
    assert got["org.crashlab.cell"] == "3"


def test_owner_alive_or_dead():
    assert engine._alive(engine.owner()) is True
    dead = subprocess_dead_pid()
    assert engine._alive(f"{platform.node()}:{dead}") is False
    assert engine._alive(f"another-host:{dead}") is True   # not ours to judge
    assert engine._alive(None) is True


def subprocess_dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_docker_desktop_settings(tmp_path, monkeypatch):
    d = tmp_path / "Library" / "Group Containers" / "group.com.docker"
    d.mkdir(parents=True)
    (d / "settings-store.json").write_text(json.dumps({
        "UseVirtualizationFrameworkVirtioFS": True, "UseVirtualizationFrameworkRosetta": False,
        "FilesharingDirectories": ["/Users"]}))
    monkeypatch.setenv("HOME", str(tmp_path))
    got = engine.desktop_settings()
    assert got["desktop_file_sharing"] == "virtiofs"
    assert got["desktop_rosetta"] is False and got["desktop_file_sharing_dirs"] == ["/Users"]


def test_no_docker_desktop(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert engine.desktop_settings() == {}
