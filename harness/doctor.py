"""What this machine offers: SQLite, the Docker engine, emulation, QEMU, acceleration."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass

from .arch import native_arch, other_arch


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    needed_for: str = ""


def _version(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def binfmt_handler(arch: str) -> str | None:
    """The binfmt_misc handler that runs `arch` binaries here, if one is registered and on."""
    name = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}[arch]
    path = f"/proc/sys/fs/binfmt_misc/{name}"
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    if not text.startswith("enabled"):
        return None
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("flags:")), "")
    return f"{name} (flags {flags})"


def checks() -> list[Check]:
    out = [
        Check("python", True, f"{platform.python_version()} ({sys.executable})", "everything"),
        Check("sqlite (host)", True, sqlite3.sqlite_version, "host platform"),
        Check("host arch", True, f"{platform.machine()} (native {native_arch()}, "
                                 f"emulated {other_arch()})"),
    ]
    try:
        import apsw  # type: ignore
        out.append(Check("apsw", True, f"{apsw.apswversion()} bundling SQLite "
                                       f"{apsw.sqlitelibversion()}", "pinned SQLite versions"))
    except ImportError:
        out.append(Check("apsw", False, "not installed (pip install apsw)",
                         "pinned SQLite versions"))
    try:
        from . import engine
        client = engine.connect(timeout=10)
        fp = engine.fingerprint(client)
        out.append(Check("docker engine", True,
                         f"{fp['engine_version']} (API {fp['api_version']}) on {fp['engine_os']},"
                         f" kernel {fp['kernel']}, driver {fp['storage_driver']}",
                         "container platform"))
        client.close()
    except Exception as exc:  # doctor reports, it does not fail
        out.append(Check("docker engine", False, str(exc), "container platform"))
    if platform.system() == "Linux":
        h = binfmt_handler(other_arch())
        out.append(Check(f"emulation ({other_arch()})", h is not None,
                         h or "no binfmt_misc handler registered (make setup)",
                         "container platform, arch emulated"))
    else:
        out.append(Check(f"emulation ({other_arch()})", True,
                         "provided by Docker Desktop (QEMU or Rosetta)",
                         "container platform, arch emulated"))
    for arch, binary in (("amd64", "qemu-system-x86_64"), ("arm64", "qemu-system-aarch64")):
        v = _version([binary, "--version"])
        out.append(Check(binary, v is not None, v or "not installed (make setup)",
                         f"vm platform, {arch}"))
    kvm = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    out.append(Check("kvm", kvm, "/dev/kvm present (used only if it works; TCG otherwise)"
                     if kvm else "absent: VMs run under TCG (slower)", "vm speed"))
    return out
