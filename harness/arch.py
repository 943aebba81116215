"""Architectures: this machine's, the emulated one, and the names Docker and QEMU use."""

from __future__ import annotations

import platform

from .errors import EnvironmentProblem

ARCHES = ("amd64", "arm64")
ARCH_SPECS = ("native", "emulated") + ARCHES
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}   # what platform.machine() says inside


def native_arch() -> str:
    """This machine's architecture in Docker's naming (amd64 or arm64)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "amd64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    raise EnvironmentProblem(f"unsupported host architecture {platform.machine()!r}: "
                             f"crashlab runs on x86_64 and arm64")


def other_arch() -> str:
    """The arch that runs emulated here: arm64 on x86_64, amd64 on an M1 Mac."""
    return "arm64" if native_arch() == "amd64" else "amd64"


def resolve_arch(spec: str) -> str:
    """Map native | emulated | amd64 | arm64 (or x86_64 | aarch64) to amd64 or arm64."""
    s = spec.strip().lower()
    s = {"x86_64": "amd64", "aarch64": "arm64"}.get(s, s)
    if s in ARCHES:
        return s
    if s == "native":
        return native_arch()
    if s == "emulated":
        return other_arch()
    raise ValueError(f"platform.arch: expected one of {', '.join(ARCH_SPECS)}; got {spec!r}")
