#!/usr/bin/python3
"""crashlab guest init: PID 1 of the VM, and the agent the host gives its orders to.

Started by the initramfs (switch_root) on the read-only root disk. It mounts /proc, /sys and
tmpfs on /tmp and /run, loads any extra modules named by ``crashlab.modules=a,b`` on the kernel
command line, finds its two virtio-serial ports by name and then serves the host:

    org.crashlab.ctl     JSON lines both ways: {"id": N, "cmd": ...} in, {"id": N, "ok": ...} out,
                         and unsolicited {"event": "writer-exit", ...} when the writer ends
    org.crashlab.events  the writer's stdout, byte for byte (its events never touch a disk),
                         followed by one end-of-stream line {"eos": 1} once the writer is gone

Commands: hello, mount (the data disk, virtio serial crashlab-data, on /data), write (start
``python3 /opt/crashlab/workload.py write ...``), kill-writer (SIGKILL to it), panic
(``c`` to /proc/sysrq-trigger), verify (run the verifier, return its census), files (the
database files, base64), sync, poweroff.

The data disk is mounted only when the host asks, so a guest saved right after boot (the
host's snapshot) has never read it: a restored copy sees each trial's disk as a fresh boot would.
Standard library only; the kernel console gets this program's own diagnostics.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import platform
import select
import signal
import subprocess
import sys
import threading
import time

WORKLOAD = "/opt/crashlab/workload.py"
CTL_PORT = "org.crashlab.ctl"
EVENTS_PORT = "org.crashlab.events"
DATA_SERIAL = "crashlab-data"
DATA = "/data"
EOS = b'{"eos":1}\n'
MAX_FILES_BYTES = 256 << 20

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
RB_POWER_OFF = 0x4321FEDC

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def say(msg: str) -> None:
    try:
        sys.stderr.write(f"crashlab-init: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


def mount(src: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if libc.mount(src.encode(), target.encode(), fstype.encode(), flags,
                  data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {target} ({fstype}): {os.strerror(err)}")


def umount(target: str) -> None:
    if libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def uptime() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0])


def cmdline() -> dict[str, str]:
    out = {}
    with open("/proc/cmdline") as fh:
        for word in fh.read().split():
            k, _, v = word.partition("=")
            out[k] = v
    return out


def find_port(name: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            for entry in os.listdir("/sys/class/virtio-ports"):
                try:
                    with open(f"/sys/class/virtio-ports/{entry}/name") as fh:
                        if fh.read().strip() == name:
                            return f"/dev/{entry}"
                except OSError:
                    continue
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {name} after {timeout:g} s")
        time.sleep(0.02)


def find_disk(serial: str) -> str:
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/serial") as fh:
                if fh.read().strip() == serial:
                    return f"/dev/{name}"
        except OSError:
            continue
    raise RuntimeError(f"no virtio disk with serial {serial}: {sorted(os.listdir('/sys/block'))}")


class Agent:
    def __init__(self) -> None:
        self.ctl = os.open(find_port(CTL_PORT), os.O_RDWR)
        self.events = os.open(find_port(EVENTS_PORT), os.O_WRONLY)
        self.lock = threading.Lock()
        self.writer: subprocess.Popen | None = None
        self.mounted = False
        self.info = self._info()

    def _info(self) -> dict:
        import sqlite3
        return {"kernel": platform.release(), "machine": platform.machine(),
                "python": platform.python_version(), "sqlite_version": sqlite3.sqlite_version,
                "uptime_s": uptime()}

    # -- the control port ------------------------------------------------------------------
    def send(self, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self.lock:
            view = memoryview(data)
            while view:
                n = os.write(self.ctl, view)
                view = view[n:]

    def lines(self):
        """Lines from the host. A read of 0 bytes means no host is connected yet: wait."""
        buf = b""
        poller = select.poll()
        poller.register(self.ctl, select.POLLIN)
        while True:
            poller.poll(1000)
            try:
                chunk = os.read(self.ctl, 65536)
            except InterruptedError:
                continue
            if not chunk:
                time.sleep(0.02)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line

    def serve(self) -> None:
        self.send({"event": "ready", **self.info})
        for line in self.lines():
            try:
                msg = json.loads(line)
            except ValueError:
                say(f"not JSON on the control port: {line[:80]!r}")
                continue
            rid = msg.get("id")
            handler = getattr(self, "cmd_" + str(msg.get("cmd", "")).replace("-", "_"), None)
            if handler is None:
                self.send({"id": rid, "ok": False, "error": f"unknown command {msg.get('cmd')!r}"})
                continue
            try:
                reply = handler(msg) or {}
                self.send({"id": rid, "ok": True, **reply})
            except Exception as exc:  # the host hears every failure, PID 1 lives on
                self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    # -- commands --------------------------------------------------------------------------
    def cmd_hello(self, msg: dict) -> dict:
        entropy = msg.get("entropy")
        if entropy:
            # A guest restored from one snapshot would otherwise replay one random stream.
            with open("/dev/urandom", "wb") as fh:
                fh.write(bytes.fromhex(entropy))
        return {"info": {**self.info, "uptime_s": uptime()}}

    def cmd_mount(self, msg: dict) -> dict:
        if self.mounted:
            return {"device": find_disk(DATA_SERIAL), "mount_s": 0.0}
        dev = find_disk(DATA_SERIAL)
        t0 = time.monotonic()
        mount(dev, DATA, "ext4", MS_NOSUID | MS_NODEV, msg.get("options", ""))
        self.mounted = True
        return {"device": dev, "mount_s": round(time.monotonic() - t0, 4)}

    def cmd_write(self, msg: dict) -> dict:
        if self.writer is not None and self.writer.poll() is None:
            raise RuntimeError("a writer is already running")
        self.writer = subprocess.Popen(
            [sys.executable, WORKLOAD, *msg["args"]], stdout=self.events,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=DATA, close_fds=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
        threading.Thread(target=self._reap, args=(self.writer,), daemon=True).start()
        return {"pid": self.writer.pid}

    def _reap(self, proc: subprocess.Popen) -> None:
        err = proc.stderr.read() if proc.stderr else b""
        rc = proc.wait()
        try:
            os.write(self.events, EOS)
        except OSError as exc:
            say(f"cannot end the event stream: {exc}")
        self.send({"event": "writer-exit", "pid": proc.pid, "rc": rc,
                   "stderr": err[-2000:].decode("utf-8", "replace")})

    def cmd_kill_writer(self, msg: dict) -> dict:
        if self.writer is None or self.writer.poll() is not None:
            return {"killed": False}
        os.kill(self.writer.pid, signal.SIGKILL)
        return {"killed": True, "pid": self.writer.pid}

    def cmd_panic(self, msg: dict) -> dict:
        # No sync, no reply awaited: the kernel and its page cache die here.
        with open("/proc/sysrq-trigger", "w") as fh:
            fh.write("c")
        return {}

    def cmd_verify(self, msg: dict) -> dict:
        res = subprocess.run([sys.executable, WORKLOAD, *msg["args"]], capture_output=True,
                             stdin=subprocess.DEVNULL, cwd=DATA, timeout=msg.get("timeout", 600),
                             check=False)
        return {"rc": res.returncode, "stdout": res.stdout.decode("utf-8", "replace"),
                "stderr": res.stderr[-2000:].decode("utf-8", "replace")}

    def cmd_files(self, msg: dict) -> dict:
        out, total = {}, 0
        for name in msg["names"]:
            path = os.path.join(DATA, os.path.basename(name))
            try:
                with open(path, "rb") as fh:
                    data = fh.read(MAX_FILES_BYTES - total + 1)
            except FileNotFoundError:
                continue
            total += len(data)
            if total > MAX_FILES_BYTES:
                raise RuntimeError(f"database files exceed {MAX_FILES_BYTES >> 20} MiB")
            out[os.path.basename(name)] = base64.b64encode(data).decode()
        return {"files": out}

    def cmd_sync(self, msg: dict) -> dict:
        os.sync()
        return {}

    def cmd_poweroff(self, msg: dict) -> dict:
        if self.mounted:
            os.sync()
            umount(DATA)
            self.mounted = False
        threading.Thread(target=lambda: (time.sleep(0.1), libc.reboot(RB_POWER_OFF)),
                         daemon=True).start()
        return {}


def setup() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for target in ("/tmp", "/run"):
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    extra = [m for m in cmdline().get("crashlab.modules", "").split(",") if m]
    if extra:
        subprocess.run(["modprobe", "-a", *extra], check=False)
    # Warm the page cache with what the writer's interpreter reads at start, so a guest saved
    # after boot starts its writer quickly when restored.
    subprocess.run([sys.executable, WORKLOAD, "--help"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


def main() -> None:
    try:
        setup()
        Agent().serve()
    except BaseException as exc:  # PID 1 must not return: say why, then power off
        say(f"fatal: {type(exc).__name__}: {exc}")
    os.sync()
    libc.reboot(RB_POWER_OFF)
    time.sleep(3600)


if __name__ == "__main__":
    main()
