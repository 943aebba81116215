"""The vm platform: the writer runs in a QEMU guest whose kernel dies with it.

One guest per trial writes to its own virtio data disk (a raw ext4 image that outlives QEMU) and
sends the writer's events over a virtio-serial port, never through a disk. A second port carries
the host's orders to the guest init (``docker/vm/guest_init.py``): mount, write, kill-writer,
panic, verify, files. Faults:

    vm-kill      SIGKILL to QEMU: the guest kernel and its page cache die (os-crash)
    vm-panic     ``c`` to /proc/sysrq-trigger: a kernel panic; panic=-1 and -no-reboot end QEMU
    vm-stop      QMP ``stop`` (the vCPUs freeze), then ``quit``
    kill-writer  SIGKILL to the writer inside the guest; the guest lives on (process-crash)

After an os-crash the data disk is checked as after a reboot: a new guest mounts it (the guest
kernel replays the ext4 journal) and runs the verifier. After kill-writer the same guest, whose
page cache lives on, runs the verifier.

Speed: under TCG a cold boot costs ~4 s. Each target saves a booted, idle guest once (QMP
``migrate`` to a file; the data disk not yet mounted, so nothing of it is cached in the guest)
and starts every writer and checker guest from that state (``-incoming``) in a fraction of a
second. The saved state is cached beside the VM assets; ``CRASHLAB_VM_BOOT=cold`` boots every
guest from scratch instead (tests show both give the same census on the same crashed disk).

Every QEMU is started with ``-name crashlab-<run>-...``, a pidfile, an owner in its environment and
(on Linux) a parent-death signal; :func:`sweep_vms` kills those whose owner is gone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tenacity import (Retrying, retry_if_exception_type, stop_after_delay, wait_fixed)

from ..arch import native_arch as host_arch
from ..arch import resolve_arch
from ..errors import EnvironmentProblem, TargetError
from .base import DB_NAME, DB_SUFFIXES, Target, TrialContext, WriterSpec, census_from

SNAPSHOT_FORMAT = "crashlab-vm-snapshot/1"
DATA_MB = 256                    # the data disk (sparse): the trial database is a few MB
GUEST_DB = "/data/" + DB_NAME
EOS = b'{"eos":1}'
OWNER_ENV = "CRASHLAB_VM_OWNER"
NAME_PREFIX = "crashlab-"
DIR_PREFIX = "crashlab-vm-"
BINARIES = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
CACHE_MODES = ("writeback", "none", "directsync", "unsafe")
KEEP_SAVED = 4                   # saved guests kept per asset folder (per memory size, cache)


# --------------------------------------------------------------------------- machine

_version_cache: dict[str, str] = {}
_accel_cache: dict[str, tuple[str, str]] = {}


def qemu_version(binary: str) -> str:
    if binary not in _version_cache:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        first = (out.stdout or out.stderr).strip().splitlines()
        _version_cache[binary] = first[0] if first else "unknown"
    return _version_cache[binary]


def find_qemu(arch: str) -> str:
    binary = BINARIES[arch]
    path = shutil.which(binary)
    if path is None:
        hint = "apt-get install qemu-system-x86 qemu-system-arm" if sys.platform.startswith(
            "linux") else "brew install qemu"
        raise EnvironmentProblem(f"vm {arch}: {binary} not found ({hint})")
    return path


def choose_accel(arch: str, binary: str) -> tuple[str, str]:
    """(accel, why): kvm or hvf when the guest is the host's arch and it really works, else tcg.

    /dev/kvm can exist and even create a VM while running a vCPU fails (nested virtualisation):
    so a probe QEMU runs firmware under KVM for a moment and must still be running.
    ``CRASHLAB_VM_ACCEL`` forces a choice.
    """
    forced = os.environ.get("CRASHLAB_VM_ACCEL")
    if forced:
        return forced, "CRASHLAB_VM_ACCEL"
    if arch != host_arch():
        return "tcg", f"guest {arch} on a {host_arch()} host"
    if arch in _accel_cache:
        return _accel_cache[arch]
    if sys.platform == "darwin":
        result = ("hvf", "macOS, native arch")
    elif not (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        result = ("tcg", "no usable /dev/kvm")
    else:
        ok, detail = _probe_kvm(arch, binary)
        result = ("kvm", "KVM probe ran a vCPU") if ok else ("tcg", f"KVM does not work: {detail}")
    _accel_cache[arch] = result
    return result


def _probe_kvm(arch: str, binary: str) -> tuple[bool, str]:
    machine = "q35" if arch == "amd64" else "virt"
    with tempfile.TemporaryDirectory(prefix=DIR_PREFIX + "kvm-") as d:
        qsock = os.path.join(d, "q")
        proc = subprocess.Popen(
            [binary, "-name", NAME_PREFIX + "kvm-probe", "-accel", "kvm", "-cpu", "host",
             "-M", machine, "-nodefaults", "-no-user-config", "-display", "none", "-m", "64",
             "-qmp", f"unix:{qsock},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=dict(os.environ, **{OWNER_ENV: _owner_token()}))
        try:
            time.sleep(1.5)
            if proc.poll() is not None:
                out = (proc.stdout.read() if proc.stdout else b"").decode("utf-8", "replace")
                return False, (out.strip().splitlines() or ["QEMU exited"])[0][:160]
            try:
                with QMP(qsock, proc, timeout=5) as q:
                    status = q.execute("query-status")["status"]
                    kvm = q.execute("query-kvm")
            except (TargetError, OSError) as exc:
                return False, str(exc)[:160]
            if status != "running" or not kvm.get("enabled"):
                return False, f"status {status}, kvm {kvm}"
            return True, "running"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


@dataclass(frozen=True)
class Machine:
    """The guest's hardware: the same for every guest of a target, so saved states fit."""

    arch: str
    binary: str
    qemu_version: str
    accel: str
    machine: str
    cpu: str
    console: str
    memory_mb: int
    cache: str

    @classmethod
    def for_arch(cls, arch: str, memory_mb: int, cache: str) -> "Machine":
        binary = find_qemu(arch)
        accel, _ = choose_accel(arch, binary)
        if accel in ("kvm", "hvf"):
            cpu = "host"
        elif arch == "arm64":
            # pauth-impdef: pointer authentication with a cheap hash instead of QARMA, which is
            # what makes -cpu max slow under TCG (boot to init ~4 s instead of ~10 s).
            cpu = "max,pauth-impdef=on"
        else:
            cpu = "max"
        return cls(arch=arch, binary=binary, qemu_version=qemu_version(binary), accel=accel,
                   machine="q35" if arch == "amd64" else "virt", cpu=cpu,
                   console="ttyS0" if arch == "amd64" else "ttyAMA0", memory_mb=memory_mb,
                   cache=cache)

    @property
    def write_cache(self) -> bool:
        """Whether the guest sees a volatile write cache (and so sends flushes)."""
        return self.cache != "directsync"

    @property
    def slow(self) -> float:
        """How much longer than a KVM guest a TCG guest may take, for timeouts."""
        if self.accel != "tcg":
            return 1.0
        return 3.0 if self.arch == host_arch() else 8.0

    def kernel_cmdline(self) -> str:
        return f"console={self.console} quiet panic=-1"

    def argv(self, assets, folder: Path, data: Path, name: str,
             incoming: Path | None = None) -> list[str]:
        cache = self.cache
        argv = [
            self.binary, "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
            "-M", self.machine, "-accel", self.accel, "-cpu", self.cpu, "-smp", "1",
            "-m", str(self.memory_mb), "-no-reboot",
            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
            "-append", self.kernel_cmdline(),
            "-drive", f"file={assets.root},format=raw,if=none,id=root,readonly=on",
            "-device", "virtio-blk-pci,drive=root,serial=crashlab-root",
            "-drive", f"file={data},format=raw,if=none,id=data,cache={cache}",
            "-device", ("virtio-blk-pci,drive=data,serial=crashlab-data,"
                        f"write-cache={'on' if self.write_cache else 'off'}"),
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=ctl,path={folder / 'c'},server=on,wait=off",
            "-device", "virtserialport,bus=vser.0,chardev=ctl,name=org.crashlab.ctl",
            "-chardev", f"socket,id=ev,path={folder / 'e'},server=on,wait=off",
            "-device", "virtserialport,bus=vser.0,chardev=ev,name=org.crashlab.events",
            "-chardev", f"file,id=con,path={folder / 'console.log'}",
            "-serial", "chardev:con",
            "-qmp", f"unix:{folder / 'q'},server=on,wait=off",
            "-pidfile", str(folder / "qemu.pid"),
        ]
        if incoming is not None:
            argv += ["-incoming", "exec:cat " + shlex.quote(str(incoming))]
        return argv

    def snapshot_key(self, assets) -> str:
        """What a saved guest depends on: assets, QEMU, and the guest-visible hardware."""
        template = self.argv(assets, Path("/F"), Path("/D"), "N")
        # The host-side cache mode is not in the saved state; what the guest sees of it is.
        template = [re.sub(r",cache=\w+", "", a) for a in template]
        material = json.dumps([SNAPSHOT_FORMAT, assets.key, self.qemu_version, self.accel,
                               self.write_cache, DATA_MB, template])
        return hashlib.sha256(material.encode()).hexdigest()


# --------------------------------------------------------------------------- channels

def _connect_unix(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> socket.socket:
    """Connect to a socket QEMU listens on, as soon as it exists; fail fast if QEMU exits."""

    def attempt() -> socket.socket:
        if proc.poll() is not None:
            raise TargetError(f"QEMU exited (status {proc.returncode}) before its {what} socket "
                              f"accepted a connection")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except OSError:
            s.close()
            raise
        return s

    try:
        return Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.02),
                        retry=retry_if_exception_type(OSError), reraise=True)(attempt)
    except OSError as exc:
        raise TargetError(f"QEMU's {what} socket {path} did not accept a connection within "
                          f"{timeout:g} s: {exc}") from None


class QMP:
    """A minimal QMP client: synchronous commands, events kept in a list."""

    def __init__(self, path, proc: subprocess.Popen, timeout: float = 20.0):
        self.sock = _connect_unix(Path(path), proc, timeout, "QMP")
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self.timeout = timeout
        greeting = self._read()
        if "QMP" not in greeting:
            raise TargetError(f"QMP greeting expected, got {greeting}")
        self.execute("qmp_capabilities")

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> dict:
        try:
            line = self.file.readline()
        except OSError as exc:  # a timeout is an OSError too
            raise TargetError(f"no answer on QMP within {self.timeout:g} s ({exc})") from None
        if not line:
            raise TargetError("QMP closed: QEMU exited")
        return json.loads(line)

    def execute(self, command: str, timeout: float | None = None, **arguments) -> dict:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.settimeout(timeout or self.timeout)
        try:
            self.file.write(json.dumps(msg).encode() + b"\n")
            self.file.flush()
        except OSError as exc:
            raise TargetError(f"QMP {command}: QEMU is gone ({exc})") from None
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise TargetError(f"QMP {command} failed: {reply['error'].get('desc')}")
            return reply.get("return", {})

    def close(self) -> None:
        for c in (self.file, self.sock):
            try:
                c.close()
            except OSError:
                pass


class AgentChannel:
    """JSON lines to and from the guest init over the org.crashlab.ctl port."""

    def __init__(self, sock: socket.socket, describe):
        self.sock = sock
        self.describe = describe                   # () -> str: the guest's state, for errors
        self.replies: dict[int, dict] = {}
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.cond = threading.Condition()
        self.closed = False
        self.next_id = 0
        self.thread = threading.Thread(target=self._pump, daemon=True, name="crashlab-vm-ctl")
        self.thread.start()

    def _pump(self) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    break
                start = len(buf)
                buf += chunk
                # Search only the new bytes: a reply carrying the database files is megabytes.
                while (i := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[:i])
                    del buf[:i + 1]
                    start = 0
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "id" in msg and msg["id"] is not None:
                        with self.cond:
                            self.replies[msg["id"]] = msg
                            self.cond.notify_all()
                    else:
                        self.events.put(msg)
        except OSError:
            pass
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            self.events.put({"event": "closed"})

    def send(self, cmd: str, **kw) -> int:
        with self.cond:
            self.next_id += 1
            rid = self.next_id
        data = json.dumps({"id": rid, "cmd": cmd, **kw}).encode() + b"\n"
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise TargetError(f"guest agent: cannot send {cmd}: {exc}; {self.describe()}") from None
        return rid

    def request(self, cmd: str, timeout: float, **kw) -> dict:
        rid = self.send(cmd, **kw)
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.replies:
                left = deadline - time.monotonic()
                if self.closed:
                    raise TargetError(f"guest agent: the control port closed while waiting for "
                                      f"{cmd}; {self.describe()}")
                if left <= 0:
                    raise TargetError(f"guest agent did not answer {cmd} within {timeout:g} s; "
                                      f"{self.describe()}")
                self.cond.wait(left)
            reply = self.replies.pop(rid)
        if not reply.get("ok"):
            raise TargetError(f"guest agent: {cmd} failed: {reply.get('error')}")
        return reply

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"guest agent: no {name} event within {timeout:g} s; "
                                  f"{self.describe()}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("event") == name:
                return ev
            if ev.get("event") == "closed":
                raise TargetError(f"guest agent: the control port closed while waiting for "
                                  f"{name}; {self.describe()}")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------- one guest

def _owner_token(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _owner_alive(token: str) -> bool:
    pid, _, start = token.partition(":")
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return start in ("?", "") or _start_time(int(pid)) in (start, "?")


def _pdeathsig_prefix() -> list[str]:
    """setpriv --pdeathsig KILL: QEMU dies with the harness even if the harness is SIGKILLed."""
    if sys.platform.startswith("linux") and shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "KILL", "--"]
    return []


class Guest:
    """One QEMU process with its folder (sockets, console log, pidfile) and its two channels."""

    def __init__(self, machine: Machine, assets, folder: Path, data: Path, name: str):
        self.machine = machine
        self.assets = assets
        self.folder = folder
        self.data = data
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.ctl: AgentChannel | None = None
        self.ev: socket.socket | None = None
        self.info: dict = {}
        self.started = 0.0
        self._log = None

    # -- life -------------------------------------------------------------------------------
    def start(self, incoming: Path | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = _pdeathsig_prefix() + self.machine.argv(self.assets, self.folder, self.data,
                                                        self.name, incoming)
        (self.folder / "argv").write_text(shlex.join(argv) + "\n")
        self._log = open(self.folder / "qemu.log", "wb")
        env = dict(os.environ, **{OWNER_ENV: _owner_token()})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.qmp = QMP(self.folder / "q", self.proc, timeout=20 * self.machine.slow)

    def boot(self, timeout: float) -> dict:
        """Cold boot: wait until the guest init says it is ready."""
        self.start()
        self._connect_ctl(timeout=timeout)
        ready = self.ctl.wait_event("ready", timeout=timeout)
        self.info = {k: v for k, v in ready.items() if k != "event"}
        return self.info

    def restore(self, state: Path, timeout: float, entropy: bool = True) -> dict:
        """Start from a saved guest: load the state, resume the vCPUs, hear from the agent."""
        self.start(incoming=state)
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp.execute("query-status")["status"]
            if status != "inmigrate":
                break
            if time.monotonic() > deadline:
                raise TargetError(f"guest state {state} not loaded within {timeout:g} s; "
                                  f"{self.describe()}")
            time.sleep(0.01)
        if status not in ("paused", "postmigrate", "running", "prelaunch"):
            raise TargetError(f"guest state {state} did not load: status {status}; "
                              f"{self.describe()}")
        if status != "running":
            self.qmp.execute("cont")
        self._connect_ctl(timeout=max(1.0, deadline - time.monotonic()))
        kw = {"entropy": os.urandom(32).hex()} if entropy else {}
        reply = self.ctl.request("hello", timeout=max(1.0, deadline - time.monotonic()), **kw)
        self.info = reply.get("info", {})
        return self.info

    def _connect_ctl(self, timeout: float) -> None:
        sock = _connect_unix(self.folder / "c", self.proc, timeout, "control port")
        self.ctl = AgentChannel(sock, self.describe)

    def connect_events(self, timeout: float = 10.0) -> None:
        self.ev = _connect_unix(self.folder / "e", self.proc, timeout, "event port")

    def event_lines(self) -> Iterator[str]:
        """The writer's stdout, line by line, until it ends (EOS) or QEMU is gone (EOF)."""
        assert self.ev is not None
        f = self.ev.makefile("rb")
        try:
            for raw in f:
                if raw.startswith(EOS):
                    return
                yield raw.decode("utf-8", "replace")
        except (OSError, ValueError):
            return
        finally:
            try:
                f.close()
            except OSError:
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float, what: str) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TargetError(f"QEMU did not exit within {timeout:g} s of {what}; "
                              f"{self.describe()}") from None

    def sigkill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Kill QEMU (if it still runs) and close every channel; safe to call twice."""
        self.sigkill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        for ch in (self.ctl, self.qmp):
            if ch is not None:
                ch.close()
        if self.ev is not None:
            try:
                self.ev.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.ev.close()
        self.ctl = self.qmp = self.ev = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- diagnostics ------------------------------------------------------------------------
    def _tail(self, name: str, n: int) -> str:
        try:
            text = (self.folder / name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-n:])

    def console_tail(self, n: int = 12) -> str:
        return self._tail("console.log", n)

    def qemu_log_tail(self, n: int = 5) -> str:
        return self._tail("qemu.log", n)

    def describe(self) -> str:
        state = "not started"
        if self.proc is not None:
            rc = self.proc.poll()
            state = "running" if rc is None else f"QEMU exited with status {rc}"
        parts = [f"guest {self.name}: {state}"]
        q = self.qemu_log_tail(3)
        if q:
            parts.append("qemu: " + " | ".join(q.splitlines()))
        c = self.console_tail(4)
        if c:
            parts.append("console: " + " | ".join(c.splitlines()))
        return "; ".join(parts)


# --------------------------------------------------------------------------- disks

def make_data_disk(path: Path) -> None:
    """A fresh ext4 file system on a sparse raw image, as mke2fs makes it for a new disk."""
    if not shutil.which("mke2fs"):
        raise EnvironmentProblem("vm: mke2fs not found (install e2fsprogs)")
    res = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "crashlab-data", str(path),
                          f"{DATA_MB}M"], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise TargetError(f"mke2fs of the data disk failed: {res.stderr.strip()[-200:]}")


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a sparse image, holes staying holes (only the written extents are read)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        os.ftruncate(fo.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:          # ENXIO: no data after pos
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off, left = start, end - start
            while left > 0:
                if hasattr(os, "copy_file_range"):        # Linux: no trip through user space
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), left, off, off)
                else:
                    n = os.pwrite(fo.fileno(), os.pread(fi.fileno(), min(left, 1 << 20), off),
                                  off)
                if n <= 0:
                    break
                off += n
                left -= n
            pos = end


def short_tmp() -> Path:
    """A temp folder whose socket paths stay under the 108-byte limit of AF_UNIX."""
    t = Path(tempfile.gettempdir())
    return t if len(str(t)) < 40 else Path("/tmp")


# --------------------------------------------------------------------------- saved guests

@dataclass(frozen=True)
class SavedGuest:
    state: Path        # the migration stream of a booted, idle guest
    disk: Path         # the pristine data disk it was saved with (never mounted)
    info: dict


def ensure_saved_guest(machine: Machine, assets, log=lambda s: None) -> SavedGuest:
    """The saved guest for (assets, machine), made by one cold boot if not cached."""
    key = machine.snapshot_key(assets)
    root = assets.dir / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key[:16]
    from ..vmimage import _flock
    with _flock(root / ".lock"):
        found = _load_saved(final)
        if found is not None:
            os.utime(final / "info.json")
            return found
        _prune_saved(root, keep=KEEP_SAVED - 1)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        gdir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX + "save-", dir=short_tmp()))
        _write_owner(gdir)
        guest = Guest(machine, assets, gdir, gdir / "data.img", NAME_PREFIX + "save-" + key[:8])
        try:
            make_data_disk(tmp / "data.img")
            sparse_copy(tmp / "data.img", gdir / "data.img")
            t0 = time.monotonic()
            info = guest.boot(timeout=60 * machine.slow)
            boot_s = time.monotonic() - t0
            guest.qmp.execute("stop")
            t1 = time.monotonic()
            guest.qmp.execute("migrate", uri="exec:cat > " + shlex.quote(str(tmp / "state")))
            deadline = time.monotonic() + 60 * machine.slow
            while True:
                st = guest.qmp.execute("query-migrate")
                if st.get("status") == "completed":
                    break
                if st.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise TargetError(f"saving the booted guest failed: {st.get('status')} "
                                      f"{st.get('error-desc', '')}; {guest.describe()}")
                time.sleep(0.05)
            save_s = time.monotonic() - t1
            try:
                guest.qmp.execute("quit")
            except TargetError:
                pass
            guest.wait_exit(30, "QMP quit")
            meta = {"format": SNAPSHOT_FORMAT, "key": key, "agent": info,
                    "boot_s": round(boot_s, 2), "save_s": round(save_s, 2),
                    "state_bytes": (tmp / "state").stat().st_size,
                    "qemu": machine.qemu_version, "accel": machine.accel,
                    "argv": (gdir / "argv").read_text().strip(), "made": time.strftime("%F %T")}
            (tmp / "info.json").write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            log(f"vm {machine.arch}: booted in {boot_s:.1f} s and saved the idle guest "
                f"({meta['state_bytes'] / 1e6:.0f} MB) in {save_s:.1f} s: {final}")
        finally:
            guest.close()
            shutil.rmtree(gdir, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
        found = _load_saved(final)
        assert found is not None
        return found


def _prune_saved(root: Path, keep: int) -> None:
    """Keep the `keep` most recently used saved guests of an asset folder (each ~100 MB)."""
    saved = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    saved.sort(key=lambda p: (p / "info.json").stat().st_mtime if (p / "info.json").exists()
               else 0, reverse=True)
    for old in saved[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):              # a save cut short by a killed harness
        if time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_saved(folder: Path) -> SavedGuest | None:
    try:
        info = json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("format") != SNAPSHOT_FORMAT:
        return None
    state, disk = folder / "state", folder / "data.img"
    if not (state.is_file() and disk.is_file()):
        return None
    return SavedGuest(state, disk, info)


def _write_owner(folder: Path) -> None:
    (folder / "owner").write_text(_owner_token() + "\n")


# --------------------------------------------------------------------------- the target

class VMTarget(Target):
    """A QEMU guest per trial; the data disk outlives it and is checked by a new guest."""

    kind = "vm"

    def __init__(self, cell, run):
        super().__init__(cell, run)
        self.arch = resolve_arch(cell.get("platform.arch") or "native")
        self.cache = cell.get("platform.cache") or "writeback"
        self.memory_mb = int(cell.get("platform.memory_mb") or 512)
        self.base_image = cell.get("platform.image") or "debian:bookworm-slim"
        self.boot_mode = os.environ.get("CRASHLAB_VM_BOOT", "snapshot")
        self.machine: Machine | None = None
        self.assets = None
        self.saved: SavedGuest | None = None
        self.base: Path | None = None
        self.pristine: Path | None = None
        self.trial: TrialContext | None = None
        self.tdir: Path | None = None
        self.writer: Guest | None = None
        self.checker: Guest | None = None
        self.writer_exit: dict | None = None
        self.fault: str | None = None
        self.timings: dict[str, float] = {}
        self.accel_why = ""
        self._n = 0

    # -- cell ---------------------------------------------------------------------------------
    @classmethod
    def preflight(cls, cell) -> None:
        arch = resolve_arch(cell.get("platform.arch") or "native")
        find_qemu(arch)
        if not shutil.which("mke2fs"):
            raise EnvironmentProblem("vm: mke2fs not found (install e2fsprogs)")
        if os.environ.get("CRASHLAB_VM_BOOT", "snapshot") not in ("snapshot", "cold"):
            raise EnvironmentProblem(f"CRASHLAB_VM_BOOT: expected snapshot or cold; got "
                                     f"{os.environ['CRASHLAB_VM_BOOT']!r}")

    def open(self) -> None:
        from .. import vmimage
        self.preflight(self.cell)
        if self.cache not in CACHE_MODES:
            raise EnvironmentProblem(f"vm: unknown cache mode {self.cache!r}")
        self.machine = Machine.for_arch(self.arch, self.memory_mb, self.cache)
        self.accel_why = choose_accel(self.arch, self.machine.binary)[1]
        self.base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=short_tmp()))
        _write_owner(self.base)
        log = getattr(self.run, "log_once", self.run.log)
        self.assets = vmimage.ensure_assets(self.run.docker(), self.arch, self.base_image, log)
        if self.boot_mode == "snapshot":
            try:
                self.saved = ensure_saved_guest(self.machine, self.assets, self.run.log)
                self.pristine = self.saved.disk
            except TargetError as exc:
                self.run.log(f"vm {self.arch}: cannot save a booted guest ({exc}); "
                             f"booting every guest cold")
                self.boot_mode = "cold"
        if self.pristine is None:
            self.pristine = self.base / "pristine.img"
            make_data_disk(self.pristine)

    def close(self) -> None:
        try:
            self.finish_trial()
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def fingerprint(self) -> dict:
        m = self.machine
        if m is None:
            return {}
        agent = (self.saved.info.get("agent") if self.saved else None) or {}
        fp = {
            "qemu": m.binary, "qemu_version": m.qemu_version, "accel": m.accel,
            "accel_reason": self.accel_why, "machine_type": m.machine, "cpu": m.cpu,
            "memory_mb": m.memory_mb, "cache": m.cache, "write_cache": m.write_cache,
            "guest_arch": self.arch, "boot": self.boot_mode,
            "guest_kernel": agent.get("kernel") or (self.assets.kernel_version
                                                    if self.assets else None),
            "guest_machine": agent.get("machine"), "guest_python": agent.get("python"),
            "guest_sqlite_version": agent.get("sqlite_version"),
        }
        if self.assets is not None:
            fp["assets"] = self.assets.describe()
        if self.saved is not None:
            fp["saved_guest"] = {k: self.saved.info.get(k) for k in ("key", "boot_s",
                                                                     "state_bytes")}
            fp["saved_guest"]["key"] = str(fp["saved_guest"]["key"])[:16]
        return fp

    # -- guests -------------------------------------------------------------------------------
    def _guest(self, role: str, data: Path) -> Guest:
        """A running guest with its agent answering: restored from the saved one, or booted."""
        assert self.machine is not None and self.base is not None
        self._n += 1
        tid = self.trial.trial_id if self.trial else "x"
        folder = self.base / f"{tid}-{role}{self._n}"
        safe_run = re.sub(r"[^A-Za-z0-9_.-]", "-", self.run.run_id)[:60]
        g = Guest(self.machine, self.assets, folder, data,
                  f"{NAME_PREFIX}{safe_run}-{tid}-{role}")
        t0 = time.monotonic()
        try:
            if self.boot_mode == "snapshot" and self.saved is not None:
                try:
                    g.restore(self.saved.state, timeout=30 * self.machine.slow)
                except TargetError as exc:
                    if g.alive():
                        raise
                    # QEMU refused the saved state (e.g. another QEMU build): forget it.
                    self.run.log(f"vm {self.arch}: the saved guest did not load ({exc}); "
                                 f"booting every guest cold from now on")
                    if self.pristine == self.saved.disk:
                        sparse_copy(self.saved.disk, self.base / "pristine.img")
                        self.pristine = self.base / "pristine.img"
                    shutil.rmtree(self.saved.state.parent, ignore_errors=True)
                    self.saved = None
                    self.boot_mode = "cold"
                    g.close()
                    g = Guest(self.machine, self.assets, folder.with_name(folder.name + "b"),
                              data, g.name)
                    g.boot(timeout=60 * self.machine.slow)
            else:
                g.boot(timeout=60 * self.machine.slow)
        except BaseException:
            g.close()
            raise
        self.timings[f"{role}_start_s"] = round(time.monotonic() - t0, 3)
        return g

    # -- trial --------------------------------------------------------------------------------
    def prepare(self, trial: TrialContext) -> None:
        assert self.base is not None and self.pristine is not None
        self.finish_trial()
        self.trial = trial
        self.timings = {}
        self.tdir = self.base / trial.trial_id
        self.tdir.mkdir(parents=True, exist_ok=True)
        sparse_copy(self.pristine, self.tdir / "data.img")

    def start_writer(self, spec: WriterSpec) -> Iterator[str]:
        assert self.tdir is not None and self.machine is not None
        self.writer = self._guest("w", self.tdir / "data.img")
        self.writer.connect_events()
        t0 = time.monotonic()
        self.writer.ctl.request("mount", timeout=30 * self.machine.slow)
        self.writer.ctl.request("write", timeout=30 * self.machine.slow,
                                args=spec.write_args(GUEST_DB))
        self.timings["mount_write_s"] = round(time.monotonic() - t0, 3)
        self.timings["_write_started"] = time.monotonic()
        return self.writer.event_lines()

    def strike(self, fault: str) -> None:
        g = self.writer
        if g is None or not g.alive():
            raise TargetError(f"{fault}: the writer's guest is not running",
                              stderr_tail=g.describe() if g else "")
        self.fault = fault
        if "_write_started" in self.timings:
            self.timings["write_s"] = round(time.monotonic() - self.timings.pop(
                "_write_started"), 3)
        if fault == "vm-kill":
            g.sigkill()
        elif fault == "vm-panic":
            g.ctl.send("panic")
        elif fault == "vm-stop":
            g.qmp.execute("stop")
            try:
                g.qmp.execute("quit")
            except TargetError:
                pass            # QEMU may close QMP before it answers quit
        elif fault == "kill-writer":
            reply = g.ctl.request("kill-writer", timeout=10 * self.machine.slow)
            if not reply.get("killed"):
                raise TargetError("kill-writer: the writer had already exited",
                                  stderr_tail=self.stderr_tail())
        else:
            raise TargetError(f"fault {fault} is not available on the vm platform", target="vm")

    def settle(self) -> None:
        g = self.writer
        if g is None:
            return
        slow = self.machine.slow
        if self.fault == "kill-writer":
            self.writer_exit = g.ctl.wait_event("writer-exit", timeout=30 * slow)
            return
        if self.fault == "vm-panic":
            g.wait_exit(60 * slow, "the guest's panic (sysrq c, panic=-1, -no-reboot)")
            console = (g.folder / "console.log").read_text(errors="replace")
            if "Kernel panic" not in console and "sysrq triggered crash" not in console:
                raise TargetError("vm-panic: QEMU exited but the console shows no kernel panic",
                                  stderr_tail=g.describe())
            return
        g.wait_exit(30 * slow, self.fault or "the fault")

    def snapshot(self, dest: Path) -> None:
        """The database files after the guest's restart (journal replayed), into dest."""
        assert self.tdir is not None and self.machine is not None
        if self.fault == "kill-writer" and self.writer is not None and self.writer.alive():
            self.checker = self.writer         # a process crash: the same kernel reads them
        else:
            t0 = time.monotonic()
            self.checker = self._guest("c", self.tdir / "data.img")
            reply = self.checker.ctl.request("mount", timeout=60 * self.machine.slow)
            self.timings["check_mount_s"] = reply.get("mount_s", 0.0)
            self.timings["check_ready_s"] = round(time.monotonic() - t0, 3)
        t1 = time.monotonic()
        files = self.checker.ctl.request("files", timeout=60 * self.machine.slow,
                                         names=[DB_NAME + s for s in DB_SUFFIXES])
        dest.mkdir(parents=True, exist_ok=True)
        for name, b64 in files.get("files", {}).items():
            (dest / os.path.basename(name)).write_bytes(base64.b64decode(b64))
        self.timings["files_s"] = round(time.monotonic() - t1, 3)

    def verify(self, spec: WriterSpec) -> dict:
        assert self.checker is not None and self.machine is not None
        t0 = time.monotonic()
        reply = self.checker.ctl.request("verify", timeout=300 * self.machine.slow,
                                         args=spec.verify_args(GUEST_DB))
        self.timings["verify_s"] = round(time.monotonic() - t0, 3)
        if reply.get("rc") != 0:
            raise TargetError("verifier failed in the guest", target=self.checker.name,
                              status=reply.get("rc"), stderr_tail=reply.get("stderr", ""))
        return census_from(reply.get("stdout", ""), target=self.checker.name,
                           stderr=reply.get("stderr", ""))

    def check_disk(self, disk: Path, spec: WriterSpec, boot: str) -> dict:
        """Check a crashed data disk in a new guest, saved-state or cold boot (for tests)."""
        assert self.base is not None
        mode = self.boot_mode
        self.boot_mode = boot
        try:
            g = self._guest("k", disk)
        finally:
            self.boot_mode = mode
        try:
            g.ctl.request("mount", timeout=60 * self.machine.slow)
            reply = g.ctl.request("verify", timeout=300 * self.machine.slow,
                                  args=spec.verify_args(GUEST_DB))
            return census_from(reply.get("stdout", ""), target=g.name,
                               stderr=reply.get("stderr", ""))
        finally:
            g.close()
            shutil.rmtree(g.folder, ignore_errors=True)

    @property
    def last_timings(self) -> dict[str, float]:
        """Seconds per phase of the last trial (guest starts, mount, write, check, verify)."""
        return {k: v for k, v in self.timings.items() if not k.startswith("_")}

    def stderr_tail(self) -> str:
        parts = []
        if self.writer_exit and self.writer_exit.get("stderr"):
            parts.append(self.writer_exit["stderr"])
        for g in (self.writer, self.checker):
            if g is not None:
                parts.append(g.describe())
        return "\n".join(parts)

    def finish_trial(self) -> None:
        for g in (self.writer, self.checker):
            if g is not None:
                g.close()
        self.writer = self.checker = None
        self.writer_exit = None
        self.fault = None
        if self.tdir is not None:
            shutil.rmtree(self.tdir, ignore_errors=True)
            self.tdir = None
        if self.base is not None:
            for p in self.base.glob((self.trial.trial_id if self.trial else "x") + "-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.trial = None


# --------------------------------------------------------------------------- sweeping

def list_vms() -> list[dict]:
    """Every crashlab QEMU on this machine: pid, name, owner, whether its owner still runs."""
    out = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0].decode(errors="replace")).startswith(
                "qemu-system"):
            continue
        name = None
        for i, a in enumerate(argv[:-1]):
            if a == b"-name":
                name = argv[i + 1].decode(errors="replace").split(",")[0]
        if not name or not name.startswith(NAME_PREFIX):
            continue
        owner = ""
        try:
            for kv in (p / "environ").read_bytes().split(b"\0"):
                if kv.startswith(OWNER_ENV.encode() + b"="):
                    owner = kv.split(b"=", 1)[1].decode()
        except OSError:
            pass
        out.append({"pid": int(p.name), "name": name, "owner": owner,
                    "owner_alive": bool(owner) and _owner_alive(owner)})
    return out


def sweep_vms(all_vms: bool = False) -> int:
    """Kill crashlab QEMU processes whose harness is gone (or all of them); remove their folders.

    Returns how many processes were killed.
    """
    killed = 0
    for vm in list_vms():
        if all_vms or not vm["owner_alive"]:
            try:
                os.kill(vm["pid"], signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    for folder in short_tmp().glob(DIR_PREFIX + "*"):
        try:
            owner = (folder / "owner").read_text().strip()
        except OSError:
            owner = ""
        if all_vms or not owner or not _owner_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
    return killed
