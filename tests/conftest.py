"""Shared fixtures: scenario files in a temp dir, and the rule that CI never skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    """Skip when a real part is missing; in CI a missing part is a failure, never a skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {why}: integration tests may not skip in CI")
    pytest.skip(why)


@pytest.fixture
def write_scenario(tmp_path):
    def _write(text: str, name: str = "s.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text).lstrip("\n"))
        return p
    return _write


def crashlab(*args, **kw) -> subprocess.CompletedProcess:
    """Run the real command line in a child process."""
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True,
                          text=True, **kw)


def only_run(out: Path) -> Path:
    """The single run folder under an --out directory."""
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
