"""Faults: what strikes, which class of crash it is, where it applies, and when it strikes.

The class tells the oracle which promises hold (see :mod:`harness.guarantees`). The trigger is
decided from the trial's seed alone, so a trial replays to the same point.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultKind:
    name: str
    fault_class: str
    platforms: tuple[str, ...]
    summary: str


FAULTS: dict[str, FaultKind] = {f.name: f for f in (
    FaultKind("kill-writer", "process-crash", ("host", "container", "vm"),
              "SIGKILL to the writer process only; everything else lives on"),
    FaultKind("kill-container", "process-crash", ("container",),
              "SIGKILL to the container (every process in it)"),
    FaultKind("stop-container", "process-crash", ("container",),
              "SIGTERM to the container, then SIGKILL after fault.grace_s"),
    FaultKind("pause-kill", "process-crash", ("container",),
              "freeze the container's cgroup mid-write, then kill it"),
    FaultKind("vm-kill", "os-crash", ("vm",),
              "SIGKILL to QEMU: the guest kernel and its page cache die"),
    FaultKind("vm-panic", "os-crash", ("vm",),
              "a kernel panic inside the guest"),
    FaultKind("vm-stop", "os-crash", ("vm",),
              "freeze the guest through QMP, then quit QEMU"),
)}


@dataclass(frozen=True)
class Trigger:
    """When a fault strikes: after N acknowledged commits or M ms after the writer's first event."""

    after_commits: int | None = None
    after_ms: float | None = None

    @classmethod
    def draw(cls, rng: random.Random, after_commits=None, after_ms=None) -> "Trigger":
        """Pick the point inside the scenario's range, from the trial's own random stream."""
        if after_commits is not None:
            lo, hi = _pair(after_commits)
            return cls(after_commits=rng.randint(int(lo), int(hi)))
        if after_ms is not None:
            lo, hi = _pair(after_ms)
            return cls(after_ms=round(rng.uniform(float(lo), float(hi)), 1))
        return cls(after_commits=rng.randint(20, 400))

    def due(self, acked: int, elapsed_ms: float) -> bool:
        if self.after_commits is not None:
            return acked >= self.after_commits
        return self.after_ms is not None and elapsed_ms >= self.after_ms

    def describe(self) -> str:
        if self.after_commits is not None:
            return f"after {self.after_commits} commits"
        return f"after {self.after_ms} ms"

    def to_dict(self) -> dict:
        return {"after_commits": self.after_commits, "after_ms": self.after_ms}


def _pair(value) -> tuple:
    if isinstance(value, (list, tuple)):
        return value[0], value[1]
    return value, value
