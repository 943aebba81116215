"""The small protocol every target (host process, container, VM) speaks.

A target is opened once per cell (images, long-lived helpers) and then runs trials:
``prepare`` fresh storage → ``start_writer`` (a stream of the writer's stdout lines) → ``strike``
the fault → ``settle`` until the writer is gone → ``snapshot`` the files as the fault left them
→ ``verify`` on a fresh process as after a reboot → ``finish_trial`` (always called).
"""

from __future__ import annotations

import abc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import TargetError
from ..scenario import Cell

WORKLOAD_PY = Path(__file__).resolve().parent.parent / "workload.py"
DB_NAME = "trial.db"
DB_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class WriterSpec:
    """What the writer and the verifier are told; the same on every platform."""

    journal_mode: str
    synchronous: str
    workload: str
    rows_per_txn: int
    accounts: int
    payload_bytes: int
    checkpoint_every: int
    checkpoint_mode: str
    wal_autocheckpoint: int | None
    max_txns: int
    seed: int

    @classmethod
    def from_cell(cls, cell: Cell, seed: int) -> "WriterSpec":
        return cls(
            journal_mode=cell["sqlite.journal_mode"], synchronous=cell["sqlite.synchronous"],
            workload=cell["workload.kind"], rows_per_txn=cell["workload.rows_per_txn"],
            accounts=cell["workload.accounts"], payload_bytes=cell["workload.payload_bytes"],
            checkpoint_every=cell["workload.checkpoint_every"],
            checkpoint_mode=cell["workload.checkpoint_mode"],
            wal_autocheckpoint=cell.get("sqlite.wal_autocheckpoint"),
            max_txns=cell["workload.max_txns"], seed=seed)

    def _common(self, db: str) -> list[str]:
        return ["--db", db, "--workload", self.workload, "--rows-per-txn",
                str(self.rows_per_txn), "--accounts", str(self.accounts)]

    def write_args(self, db: str) -> list[str]:
        args = ["write", *self._common(db), "--journal-mode", self.journal_mode,
                "--synchronous", self.synchronous, "--payload-bytes", str(self.payload_bytes),
                "--checkpoint-every", str(self.checkpoint_every),
                "--checkpoint-mode", self.checkpoint_mode, "--max-txns", str(self.max_txns),
                "--seed", str(self.seed)]
        if self.wal_autocheckpoint is not None:
            args += ["--wal-autocheckpoint", str(self.wal_autocheckpoint)]
        if self.max_txns:
            args.append("--linger")
        return args

    def verify_args(self, db: str) -> list[str]:
        return ["verify", *self._common(db)]


@dataclass
class RunContext:
    """What every target of one run shares."""

    run_id: str
    run_dir: Path
    work_dir: Path                      # scratch space, removed when the run ends
    log: Callable[[str], None] = lambda s: None
    _docker: object | None = None
    _said: set = field(default_factory=set)

    def log_once(self, message: str) -> None:
        """Log a message the first time it is said in this run (e.g. which image is reused)."""
        if message not in self._said:
            self._said.add(message)
            self.log(message)

    def docker(self):
        """The run's Docker client, connected on first use."""
        if self._docker is None:
            from .. import engine
            self._docker = engine.connect()
        return self._docker


@dataclass
class TrialContext:
    trial_id: str
    seed: int
    artifacts: Path                     # where snapshot() copies the files


class Target(abc.ABC):
    """One platform running one cell's trials."""

    kind = "?"
    # True when verify() checks a copy and leaves the files as the fault left them: the runner
    # then snapshots after the verdict, and only the trials it keeps.
    snapshot_after_verify = False

    def __init__(self, cell: Cell, run: RunContext):
        self.cell = cell
        self.run = run

    @classmethod
    def preflight(cls, cell: Cell) -> None:
        """Raise EnvironmentProblem if this machine cannot run the cell (before any result
        folder is made); cheap checks only."""

    def __enter__(self) -> "Target":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Acquire what the cell's trials share (image, helper container, ...)."""

    def close(self) -> None:
        """Release everything open() acquired; must be safe to call after a failed open()."""

    def fingerprint(self) -> dict:
        """What this target runs on, for the run's environment record."""
        return {}

    @abc.abstractmethod
    def prepare(self, trial: TrialContext) -> None:
        """Fresh, empty storage for one trial."""

    @abc.abstractmethod
    def start_writer(self, spec: WriterSpec) -> Iterator[str]:
        """Start the writer; return its stdout as lines (blocking, ends at the writer's end)."""

    @abc.abstractmethod
    def strike(self, fault: str) -> None:
        """Inject the fault now."""

    def settle(self) -> None:
        """Wait (bounded) until the writer and whatever the fault ends are gone."""

    @abc.abstractmethod
    def snapshot(self, dest: Path) -> None:
        """Copy the database files as the fault left them into dest."""

    @abc.abstractmethod
    def verify(self, spec: WriterSpec) -> dict:
        """Open the database fresh, as after a reboot, and return the verifier's census."""

    def extra_views(self, spec: WriterSpec) -> dict:
        """Other views of the same files (e.g. the host's view of a bind mount)."""
        return {}

    def stderr_tail(self) -> str:
        return ""

    def finish_trial(self) -> None:
        """Remove the trial's resources; always called."""


def census_from(stdout: str, *, target: str, stderr: str = "") -> dict:
    """The census a verifier printed (its last stdout line), or a TargetError saying why not."""
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TargetError("verifier printed no census", target=target,
                          stderr_tail=stderr or stdout) from None


def copy_db_files(src_dir: Path, dest: Path, name: str = DB_NAME) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for suffix in DB_SUFFIXES:
        p = src_dir / (name + suffix)
        if p.exists():
            shutil.copy2(p, dest / p.name)
            copied.append(p.name)
    return copied
