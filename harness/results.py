"""The run store: one folder per run with every trial's record and the kept artifacts.

    OUT/<run-id>/trials.jsonl          one JSON object per trial, appended as each trial ends
    OUT/<run-id>/summary.json|.md      written when the run ends (also after an interruption)
    OUT/<run-id>/environment.json      what the run ran on
    OUT/<run-id>/trials/<trial-id>/    events.jsonl, census.json, record.json, the database files
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path


def new_run_id(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{secrets.token_hex(2)}"


class RunStore:
    def __init__(self, out: Path, run_id: str):
        self.run_id = run_id
        self.dir = Path(out) / run_id
        self.dir.mkdir(parents=True, exist_ok=False)
        (self.dir / "trials").mkdir()
        self._trials = open(self.dir / "trials.jsonl", "a", encoding="utf-8")

    @property
    def work_dir(self) -> Path:
        return self.dir / ".work"

    def trial_dir(self, trial_id: str) -> Path:
        return self.dir / "trials" / trial_id

    def append_trial(self, record: dict) -> None:
        """Append one whole line and push it to disk, so an interrupted run keeps whole lines."""
        self._trials.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._trials.flush()
        os.fsync(self._trials.fileno())

    def write_json(self, name: str, obj) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if not self._trials.closed:
            self._trials.close()


def read_trials(run_dir: Path) -> list[dict]:
    """Every whole record of a run's trials.jsonl (a torn last line is skipped)."""
    out = []
    with open(Path(run_dir) / "trials.jsonl", encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
