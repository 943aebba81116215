"""VM assets per arch: a kernel, an initrd and a read-only root disk, built from the target image.

The guest runs what the containers run: the VM image ``crashlab/vm:ARCH-<key>`` is built FROM the
target image of :mod:`harness.images` (python3, sqlite3, workload.py) with ``docker/vm/Dockerfile``
(kernel, the few modules the guest loads, a busybox initramfs, the guest init). Its filesystem is
exported through the Docker SDK; the kernel (``/boot/vmlinux-*``, the PVH-bootable ELF, where the
image has one, else ``/boot/vmlinuz-*``) and ``/boot/initrd.img-*`` are taken out, and the rest
becomes ``root.img`` (``mke2fs -t ext4 -d``, no journal: it is only ever read).

Everything is cached under ``$CRASHLAB_CACHE/vm/`` (else ``~/.cache/crashlab/vm/``) in a folder
named by a content hash of the target image id, ``docker/vm/*`` and the arch, and reused while
those are unchanged. The arm64 build runs under qemu-user and takes minutes; a reuse takes
milliseconds. Each step is reported through the ``log`` callback.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import EnvironmentProblem, ImageError

FORMAT = "crashlab-vm-assets/1"      # bump when the way assets are made changes
VM_DIR = Path(__file__).resolve().parent.parent / "docker" / "vm"
VM_REPO = "crashlab/vm"
KEEP_PER_ARCH = 2                     # asset folders kept per arch (the newest)
BUILD_STALL_S = 900.0                 # one silent step (apt under qemu-user) may take long
BUILD_TOTAL_S = 2400.0
MKE2FS_TIMEOUT_S = 300.0



@dataclass(frozen=True)
class VMAssets:
    """What a guest of one arch boots from."""

    arch: str             # amd64 | arm64
    key: str              # content hash (hex) of everything the assets are made from
    dir: Path             # the cache folder holding them
    kernel: Path
    initrd: Path
    root: Path            # raw ext4 image, attached read-only
    kernel_version: str
    target_image: str     # the crashlab/target tag the root filesystem comes from
    built: bool           # False when reused from the cache

    def describe(self) -> dict:
        return {"arch": self.arch, "key": self.key[:12], "dir": str(self.dir),
                "kernel_version": self.kernel_version, "target_image": self.target_image,
                "sizes": {p.name: p.stat().st_size for p in (self.kernel, self.initrd, self.root)
                          if p.exists()}}


def cache_root() -> Path:
    """Where VM assets live: $CRASHLAB_CACHE/vm, else ~/.cache/crashlab/vm."""
    env = os.environ.get("CRASHLAB_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "crashlab") / "vm"


def definition_files() -> list[Path]:
    return sorted(p for p in VM_DIR.iterdir() if p.is_file())


def assets_key(arch: str, target_image_id: str) -> str:
    """sha256 over the format, the arch, the target image id and every file of docker/vm/."""
    h = hashlib.sha256()
    parts = [FORMAT.encode(), arch.encode(), target_image_id.encode()]
    for p in definition_files():
        parts += [p.name.encode(), p.read_bytes()]
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def ensure_assets(client, arch: str, base: str = "debian:bookworm-slim",
                  log: Callable[[str], None] = lambda s: None) -> VMAssets:
    """The VM assets for ``arch``, built (target image, VM image, export, root disk) if missing.

    Raises:
        ImageError: a build or export step failed (with the step's last lines).
        EnvironmentProblem: the engine or mke2fs is missing.
    """
    from docker.errors import DockerException

    from . import images

    if arch not in images.ARCHES:
        raise ImageError(f"vm assets: arch must be one of {', '.join(images.ARCHES)}; got {arch!r}")
    try:
        target = images.ensure_image(client, arch, base, log)
        target_id = client.images.get(target.tag).id
    except DockerException as exc:
        raise EnvironmentProblem(f"vm assets {arch}: the Docker engine failed: {exc}") from None
    key = assets_key(arch, target_id)
    root = cache_root()
    folder = root / f"{arch}-{key[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    with _flock(root / f".{arch}.lock"):
        found = _load(folder, arch, key, target.tag)
        if found is not None:
            os.utime(folder / "assets.json")
            log(f"vm assets {arch}: reusing {folder} (kernel {found.kernel_version})")
            return found
        t0 = time.monotonic()
        vm_tag = f"{VM_REPO}:{arch}-{key[:12]}"
        try:
            if _image_arch(client, vm_tag) == arch:
                log(f"vm assets {arch}: VM image {vm_tag} present")
            else:
                slow = "; minutes under qemu-user" if arch != images.native_arch() else ""
                log(f"vm assets {arch}: building {vm_tag} FROM {target.tag} (kernel, modules, "
                    f"initramfs, guest init{slow})")
                _build(client, arch, vm_tag, target.tag, key)
                log(f"vm assets {arch}: built {vm_tag} in {time.monotonic() - t0:.0f} s")
            assets = _export(client, arch, vm_tag, folder, key, target.tag, log)
        except DockerException as exc:
            raise EnvironmentProblem(f"vm assets {arch}: the Docker engine failed: {exc}") from None
        log(f"vm assets {arch}: ready in {folder} after {time.monotonic() - t0:.0f} s "
            f"({_mb(assets.root)} root disk, {_mb(assets.kernel)} kernel, "
            f"{_mb(assets.initrd)} initrd)")
        _prune(client, root, arch, keep=folder, log=log)
        return assets


# --- cache ----------------------------------------------------------------------------------

def _load(folder: Path, arch: str, key: str, target_tag: str) -> VMAssets | None:
    try:
        meta = json.loads((folder / "assets.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or meta.get("format") != FORMAT:
        return None
    files = {n: folder / n for n in ("kernel", "initrd.img", "root.img")}
    if not all(p.is_file() for p in files.values()):
        return None
    return VMAssets(arch, key, folder, files["kernel"], files["initrd.img"], files["root.img"],
                    meta["kernel_version"], meta.get("target_image", target_tag), built=False)


def _prune(client, root: Path, arch: str, keep: Path, log: Callable[[str], None]) -> None:
    """Keep the newest KEEP_PER_ARCH asset folders of one arch; remove older ones and their
    VM images (the target image and the layers the kept images share stay)."""
    from docker.errors import APIError, ImageNotFound
    folders = [p for p in root.glob(f"{arch}-*") if p.is_dir() and p != keep]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[KEEP_PER_ARCH - 1:]:
        try:
            tag = json.loads((old / "assets.json").read_text()).get("vm_image")
        except (OSError, ValueError):
            tag = None
        shutil.rmtree(old, ignore_errors=True)
        if tag:
            try:
                client.images.remove(tag)
            except (ImageNotFound, APIError):
                pass            # gone already, or used by a container: `crashlab clean` later
        log(f"vm assets {arch}: removed old {old.name}" + (f" and {tag}" if tag else ""))


class _flock:
    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def _mb(p: Path) -> str:
    """Size on disk (the root image is sparse) in MB."""
    st = p.stat()
    return f"{st.st_blocks * 512 / 1e6:.0f} MB"


# --- build ----------------------------------------------------------------------------------

def _image_arch(client, tag: str) -> str | None:
    from docker.errors import ImageNotFound
    try:
        return client.images.get(tag).attrs.get("Architecture")
    except ImageNotFound:
        return None


def _build(client, arch: str, tag: str, target_tag: str, key: str) -> None:
    from .images import legacy_build
    legacy_build(
        client, f"vm assets {arch}: build of {tag}", stall_s=BUILD_STALL_S,
        total_s=BUILD_TOTAL_S, path=str(VM_DIR), tag=tag, platform=f"linux/{arch}",
        buildargs={"TARGET_IMAGE": target_tag, "KERNEL_META": f"linux-image-{arch}"},
        labels={"org.crashlab.image": "vm", "org.crashlab.content-hash": key,
                "org.crashlab.target": target_tag})
    if _image_arch(client, tag) != arch:
        raise ImageError(f"vm assets {arch}: built {tag} but the engine records another arch")


class _ChunkReader(io.RawIOBase):
    """A file object over the export's chunk iterator, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            try:
                self.buf = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _export(client, arch: str, vm_tag: str, folder: Path, key: str, target_tag: str,
            log: Callable[[str], None]) -> VMAssets:
    if not shutil.which("mke2fs"):
        raise EnvironmentProblem("vm assets: mke2fs not found (install e2fsprogs)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    container = None
    try:
        t0 = time.monotonic()
        container = client.containers.create(vm_tag, command=["/bin/true"],
                                             network_disabled=True,
                                             labels={"org.crashlab": "1",
                                                     "org.crashlab.role": "vm-export"})
        tree = tmp / "rootfs"
        tree.mkdir()
        kernel = initrd = kernel_file = None
        files = 0
        as_root = os.geteuid() == 0
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(iter(container.export()))),
                          mode="r|") as tar:
            for m in tar:
                name = m.name.lstrip("./")
                if name.startswith(("boot/vmlinuz-", "boot/vmlinux-")) and m.isfile():
                    # Both come in the order of the tar; the ELF (vmlinux) wins when present.
                    if kernel is None or name.startswith("boot/vmlinux-"):
                        kernel = name[len("boot/vmlinuz-"):]
                        kernel_file = name
                        _extract_to(tar, m, tmp / "kernel")
                    continue
                if name.startswith("boot/initrd.img-") and m.isfile():
                    initrd = name
                    _extract_to(tar, m, tmp / "initrd.img")
                    continue
                top = name.split("/", 1)[0]
                if top in ("boot", "proc", "sys", "dev") and "/" in name:
                    continue            # the kernel mounts these; /boot stays outside
                if name == ".dockerenv" or (not as_root and (m.ischr() or m.isblk()
                                                             or m.isfifo())):
                    continue
                tar.extract(m, tree, set_attrs=True, numeric_owner=True)
                files += 1
        if kernel is None or initrd is None:
            raise ImageError(f"vm assets {arch}: {vm_tag} has no /boot/vmlinu[xz]-* and "
                             f"/boot/initrd.img-*: is docker/vm/Dockerfile intact?")
        log(f"vm assets {arch}: exported {files} entries in {time.monotonic() - t0:.1f} s")
        size = _tree_bytes(tree)
        mb = max(64, int(size * 1.15 / 2**20) + 48)
        t1 = time.monotonic()
        cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "crashlab-root",
               "-b", "4096", "-m", "0", "-N", str(files + 2048), "-E", "root_owner=0:0",
               "-d", str(tree), str(tmp / "root.img"), f"{mb}M"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=MKE2FS_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise ImageError(f"vm assets {arch}: mke2fs failed (exit status {res.returncode}): "
                             f"{(res.stderr or res.stdout).strip()[-300:]}")
        shutil.rmtree(tree, ignore_errors=True)
        log(f"vm assets {arch}: root disk {mb} MB ({size / 1e6:.0f} MB of files) made with "
            f"mke2fs -d in {time.monotonic() - t1:.1f} s")
        meta = {"format": FORMAT, "key": key, "arch": arch, "kernel_version": kernel,
                "kernel_file": kernel_file,
                "target_image": target_tag, "vm_image": vm_tag, "made": time.strftime("%F %T"),
                "root_mb": mb, "files": files}
        (tmp / "assets.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except Exception:  # noqa: BLE001 - best effort; `crashlab clean` sweeps by label
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    found = _load(folder, arch, key, target_tag)
    assert found is not None
    return VMAssets(**{**found.__dict__, "built": True})


def _extract_to(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    src = tar.extractfile(member)
    assert src is not None
    with open(dest, "wb") as fh:
        shutil.copyfileobj(src, fh)


def _tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            total += -(-st.st_size // 4096) * 4096
    return total
