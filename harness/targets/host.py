"""The host platform: the writer is a process on this machine, the database a local file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import TargetError
from .base import (DB_NAME, WORKLOAD_PY, Target, TrialContext, WriterSpec, census_from,
                   copy_db_files)


class HostTarget(Target):
    kind = "host"

    def __init__(self, cell, run):
        super().__init__(cell, run)
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    def fingerprint(self) -> dict:
        import platform
        import sqlite3
        return {"python": sys.executable, "sqlite_version": sqlite3.sqlite_version,
                "machine": platform.machine()}

    def prepare(self, trial: TrialContext) -> None:
        self.run.work_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=trial.trial_id + "-", dir=self.run.work_dir))

    @property
    def db(self) -> str:
        assert self.dir is not None
        return str(self.dir / DB_NAME)

    def start_writer(self, spec: WriterSpec) -> Iterator[str]:
        assert self.dir is not None
        self._stderr = open(self.dir / "writer.stderr", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKLOAD_PY), *spec.write_args(self.db)],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            start_new_session=True)
        return (line.decode("utf-8", "replace") for line in self.proc.stdout)

    def strike(self, fault: str) -> None:
        if fault != "kill-writer":
            raise TargetError(f"fault {fault} is not available on the host", target="host")
        assert self.proc is not None
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def settle(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise TargetError("writer did not die within 30 s of SIGKILL",
                                  target=f"pid {self.proc.pid}") from None

    def snapshot(self, dest: Path) -> None:
        assert self.dir is not None
        copy_db_files(self.dir, dest)

    def verify(self, spec: WriterSpec) -> dict:
        res = subprocess.run([sys.executable, str(WORKLOAD_PY), *spec.verify_args(self.db)],
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise TargetError("verifier failed", target="host", status=res.returncode,
                              stderr_tail=res.stderr)
        return census_from(res.stdout, target="host", stderr=res.stderr)

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode("utf-8", "replace")

    def finish_trial(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
