"""Targets: where the writer runs. One module per platform kind."""

from __future__ import annotations

from .base import RunContext, Target, TrialContext, WriterSpec


def target_class(kind: str) -> type[Target]:
    """The Target class for a platform kind (imported on demand: each has its own needs)."""
    if kind == "host":
        from .host import HostTarget
        return HostTarget
    if kind == "container":
        from .container import ContainerTarget
        return ContainerTarget
    if kind == "vm":
        from .vm import VMTarget
        return VMTarget
    raise ValueError(f"unknown platform kind {kind!r}")


__all__ = ["RunContext", "Target", "TrialContext", "WriterSpec", "target_class"]
