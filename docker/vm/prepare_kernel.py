#!/usr/bin/env python3
"""Unpack a Debian kernel package for the crashlab guest (runs inside the VM image build).

    prepare_kernel.py linux-image-VERSION_ARCH.deb

Installs /boot/vmlinuz-VERSION (and, for x86, /boot/vmlinux-VERSION: the ELF inside the
compressed bzImage, which QEMU boots directly through its PVH entry, skipping the decompression
that costs ~3 s under TCG), only the modules the guest loads (and what they depend on) under
/lib/modules/VERSION, and writes /boot/initrd.img-VERSION: an uncompressed newc cpio holding a
static busybox, those modules in load order and initramfs_init.sh as /init. No udev, no
initramfs-tools: the guest's devices are fixed, and a small initramfs unpacks fast under TCG.
Standard library only.
"""

from __future__ import annotations

import lzma
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

# What the guest loads before its root disk is mounted: PCI virtio transport, disks, the
# virtio-serial ports that carry the control channel and the writer's events, and ext4 (whose
# softdep names crc32c, provided by crc32c_generic on every arch).
WANTED = ("virtio_pci", "virtio_blk", "virtio_console", "ext4", "crc32c_generic")
HERE = Path(__file__).resolve().parent
BUSYBOX = Path("/bin/busybox")


def modinfo(path: Path) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (found by scanning the file)."""
    data = path.read_bytes()
    out: dict[str, list[str]] = {}
    for key in (b"depends", b"softdep", b"name"):
        start = 0
        while True:
            i = data.find(b"\0" + key + b"=", start)
            if i < 0:
                break
            j = data.find(b"\0", i + 1)
            out.setdefault(key.decode(), []).append(data[i + len(key) + 2:j].decode())
            start = j
    return out


def resolve(root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Wanted modules and their dependencies, dependencies first."""
    index = {p.name[:-3].replace("-", "_"): p for p in root.rglob("*.ko")}
    builtin = set()
    bfile = root / "modules.builtin"
    if bfile.exists():
        builtin = {Path(ln.strip()).name[:-3].replace("-", "_")
                   for ln in bfile.read_text().splitlines() if ln.strip()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, required: bool) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            if required:
                raise SystemExit(f"prepare_kernel: module {name} is neither built in nor shipped")
            return
        info = modinfo(path)
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(dep, True)
        for soft in info.get("softdep", []):
            pre = soft.split("post:")[0].replace("pre:", " ").split()
            for dep in pre:
                visit(dep, False)
        order.append(path)

    for name in wanted:
        visit(name, True)
    return order


# An ELF note named "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): the kernel has a PVH entry.
PVH_NOTE = re.compile(rb"\x04\x00\x00\x00.\x00\x00\x00\x12\x00\x00\x00Xen\x00", re.DOTALL)


def pvh_elf(bzimage: bytes) -> bytes | None:
    """The vmlinux ELF inside an xz-compressed x86 bzImage, if it has a PVH entry."""
    if bzimage[0x202:0x206] != b"HdrS":
        return None
    i = bzimage.find(b"\xfd7zXZ\x00")
    if i < 0:
        return None
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[i:])
    except lzma.LZMAError:
        return None
    if elf[:4] != b"\x7fELF" or not PVH_NOTE.search(elf):
        return None
    return elf


class Cpio:
    """A newc archive, written entry by entry."""

    def __init__(self, out):
        self.out = out
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(head + nb + b"\0" * (-(len(head) + len(nb)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    deb = Path(argv[1])
    with tempfile.TemporaryDirectory(prefix="kernel-") as tmp:
        x = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
        (vmlinuz,) = (x / "boot").glob("vmlinuz-*")
        version = vmlinuz.name[len("vmlinuz-"):]
        kroot = x / "lib" / "modules" / version
        mods = resolve(kroot, WANTED)
        boot = Path("/boot")
        boot.mkdir(exist_ok=True)
        shutil.copy2(vmlinuz, boot / vmlinuz.name)
        elf = pvh_elf(vmlinuz.read_bytes())
        if elf is not None:
            (boot / f"vmlinux-{version}").write_bytes(elf)
        for cfg in (x / "boot").glob("config-*"):
            shutil.copy2(cfg, boot / cfg.name)
        dest = Path("/lib/modules") / version
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (kroot / name).exists():
                shutil.copy2(kroot / name, dest / name)
        for m in mods:
            target = dest / m.relative_to(kroot)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(m, target)
        subprocess.run(["depmod", version], check=True)

        initrd = boot / f"initrd.img-{version}"
        with open(initrd, "wb") as fh:
            c = Cpio(fh)
            for d in (".", "bin", "dev", "proc", "sys", "newroot", "modules"):
                c.dir(d)
            c.chardev("dev/console", 5, 1)
            c.chardev("dev/null", 1, 3)
            c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
            c.file("init", (HERE / "initramfs_init.sh").read_bytes(), 0o755)
            names = []
            for n, m in enumerate(mods):
                name = f"modules/{n:02d}-{m.name}"
                c.file(name, m.read_bytes())
                names.append("/" + name)
            c.file("modules.load", ("\n".join(names) + "\n").encode())
            c.close()
    pvh = " (PVH vmlinux extracted)" if elf else ""
    print(f"prepare_kernel: {version}{pvh}: {len(mods)} modules "
          f"({', '.join(m.name[:-3] for m in mods)}); initrd {initrd.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
