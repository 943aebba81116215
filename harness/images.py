"""Target images: one Docker image per (arch, base, Dockerfile, workload.py), built once, reused.

The tag carries a hash of everything that goes into the image, so a changed ``workload.py`` gives
a new tag and an unchanged one is found in milliseconds. The base is taken, in this order, from
the engine (already present for the arch), from a registry (pull), or made offline with
``docker/make-base.sh`` (debootstrap; for machines that reach Debian's mirror but no registry).

Engine calls go through the docker SDK only. Every wait is bounded.

A quirk of engines without the containerd image store (Docker 20.10): a tag names one image of one
arch, so pulling ``debian:bookworm-slim`` for arm64 replaces a local amd64 one under that tag.
The target images are unaffected (they are tagged per arch); the next build for the other arch
pulls again.
"""

from __future__ import annotations

import collections
import hashlib
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .arch import ARCH_SPECS, ARCHES, native_arch, resolve_arch  # noqa: F401 (API)
from .errors import EnvironmentProblem, ImageError

DEFAULT_BASE = "debian:bookworm-slim"
TARGET_REPO = "crashlab/target"
OFFLINE_BASE = "crashlab/base:bookworm-{arch}"

LABEL_IMAGE = "org.crashlab.image"
LABEL_HASH = "org.crashlab.content-hash"
LABEL_BASE = "org.crashlab.base"
LABEL_BASE_PATH = "org.crashlab.base-path"

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
MAKE_BASE = REPO_ROOT / "docker" / "make-base.sh"
WORKLOAD = Path(__file__).resolve().parent / "workload.py"

# A registry that answers sends progress within seconds; one that does not can keep a pull open
# for minutes (the SDK's pull has no timeout), so give up after a silence of PULL_STALL_S.
PULL_STALL_S = 20.0
PULL_TOTAL_S = 900.0
MAKE_BASE_TIMEOUT_S = 1800.0   # arm64 debootstrap under QEMU user emulation: ~2 min here
BUILD_STALL_S = 600.0          # one silent build step (apt-get under emulation) may take long
BUILD_TOTAL_S = 1800.0

# The legacy builder colours a step's stderr and narrates its own steps; neither helps an error.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CHATTER = re.compile(r"^ ---> |^Removing intermediate container |^Step \d+/\d+ : ")

_lock = threading.Lock()       # one build at a time per process; the engine has 2 cores anyway


@dataclass(frozen=True)
class ImageInfo:
    """A target image ready in the engine."""

    tag: str      # crashlab/target:ARCH-<12 hex of the content hash>
    arch: str     # docker platform arch: amd64 | arm64
    base: str     # the base image actually used
    path: str     # how the base was obtained: local | pulled | offline-debootstrap
    built: bool   # False when an existing image was reused


def content_hash(arch: str, base: str) -> str:
    """sha256 over the Dockerfile, workload.py, the requested base name and the arch."""
    h = hashlib.sha256()
    for part in (b"crashlab-target/1", arch.encode(), base.encode(),
                 _read(DOCKERFILE), _read(WORKLOAD)):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def target_tag(arch: str, base: str = DEFAULT_BASE) -> str:
    return f"{TARGET_REPO}:{arch}-{content_hash(arch, base)[:12]}"


def ensure_image(client, arch: str, base: str = DEFAULT_BASE,
                 log: Callable[[str], None] = lambda s: None) -> ImageInfo:
    """Return the target image for ``arch``, building it (and its base) when it does not exist.

    Args:
        client: a ``docker.DockerClient``.
        arch: ``amd64`` or ``arm64`` (see :func:`resolve_arch`).
        base: the base image asked for; the hash, hence the tag, covers this name, so an image
            built on the offline substitute is reused as the image for ``debian:bookworm-slim``.
        log: called with one human line per step.

    Raises:
        ImageError: the base could not be obtained or the build failed (with the build's last
            lines).
        EnvironmentProblem: the engine does not answer.
    """
    from docker.errors import DockerException
    from requests.exceptions import ConnectionError as EngineGone

    if arch not in ARCHES:
        raise ImageError(f"image: arch must be one of {', '.join(ARCHES)}; got {arch!r}")
    with _lock:
        try:
            digest = content_hash(arch, base)
            tag = f"{TARGET_REPO}:{arch}-{digest[:12]}"
            image = _get(client, tag)
            if image is not None and image.attrs.get("Architecture") == arch:
                labels = image.labels or {}
                log(f"image {arch}: reusing {tag}")
                return ImageInfo(tag, arch, labels.get(LABEL_BASE, base),
                                 labels.get(LABEL_BASE_PATH, "local"), built=False)

            base_used, path, why = _resolve_base(client, arch, base, log)
            log(f"image {arch}: base {base_used} ({path}{', ' + why if why else ''})")
            t0 = time.monotonic()
            _build(client, arch, tag, base_used, {
                LABEL_IMAGE: "target", LABEL_HASH: digest,
                LABEL_BASE: base_used, LABEL_BASE_PATH: path,
            })
            log(f"image {arch}: built {tag} in {time.monotonic() - t0:.1f} s")
            return ImageInfo(tag, arch, base_used, path, built=True)
        except (DockerException, EngineGone) as exc:
            raise EnvironmentProblem(f"image {arch}: the Docker engine failed: "
                                     f"{_short(exc)}") from None


# --- base -----------------------------------------------------------------------------------

def _resolve_base(client, arch: str, base: str,
                  log: Callable[[str], None]) -> tuple[str, str, str]:
    """(base actually used, how it was obtained, why) -- local, else pulled, else offline."""
    if _arch_of(client, base) == arch:
        return base, "local", ""

    pull_error = _pull(client, base, arch)
    if pull_error is None:
        got = _arch_of(client, base)
        if got == arch:
            return base, "pulled", ""
        pull_error = f"the registry gave {got or 'nothing'}, not {arch}"

    offline = OFFLINE_BASE.format(arch=arch)
    if not _bookworm(base, offline):
        raise ImageError(f"image {arch}: base {base} is not in the engine for {arch} and the "
                         f"pull failed ({pull_error}); only a Debian bookworm base can be "
                         f"made offline")
    if _arch_of(client, offline) == arch:
        return offline, "offline-debootstrap", "no registry answered"
    log(f"image {arch}: no registry answered ({pull_error}); making {offline} with "
        f"docker/make-base.sh (debootstrap, 1-2 min)")
    _make_base(arch, log)
    got = _arch_of(client, offline)
    if got != arch:
        raise ImageError(f"image {arch}: docker/make-base.sh {arch} ran but {offline} is "
                         f"{'missing' if got is None else got}")
    return offline, "offline-debootstrap", "no registry answered"


def _bookworm(base: str, offline: str) -> bool:
    if base == offline:
        return True
    from docker.utils import parse_repository_tag
    repo, tag = parse_repository_tag(base)
    repo = repo.removeprefix("docker.io/").removeprefix("library/")
    return repo == "debian" and bool(tag) and tag.startswith(("bookworm", "12"))


def _pull(client, base: str, arch: str) -> str | None:
    """Pull ``base`` for ``arch``; None on success, else why not (bounded by PULL_STALL_S)."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            for ev in client.api.pull(base, platform=f"linux/{arch}", stream=True, decode=True):
                events.put(("event", ev))
            events.put(("done", None))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread as a reason
            events.put(("failed", exc))

    # A daemon thread: if the registry never answers we stop waiting; the engine ends the pull.
    threading.Thread(target=run, name=f"crashlab-pull-{arch}", daemon=True).start()
    deadline = time.monotonic() + PULL_TOTAL_S
    while True:
        wait = min(PULL_STALL_S, deadline - time.monotonic())
        if wait <= 0:
            return f"pull still running after {PULL_TOTAL_S:.0f} s"
        try:
            kind, value = events.get(timeout=wait)
        except queue.Empty:
            return f"no answer from the registry for {PULL_STALL_S:.0f} s"
        if kind == "done":
            return None
        if kind == "failed":
            return _short(value)
        if "error" in value:
            return str(value["error"]).splitlines()[0][:200]


def _make_base(arch: str, log: Callable[[str], None]) -> None:
    """Run docker/make-base.sh ARCH, relaying its lines; killed (whole group) at the deadline."""
    if not MAKE_BASE.exists():
        raise ImageError(f"image {arch}: {MAKE_BASE} is missing")
    tail: collections.deque[str] = collections.deque(maxlen=15)
    proc = subprocess.Popen(["bash", str(MAKE_BASE), arch], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    timer = threading.Timer(MAKE_BASE_TIMEOUT_S, kill)
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith("make-base "):
                log(f"image {arch}: {line}")
        status = proc.wait(timeout=60)
    except BaseException:
        kill()
        proc.wait(timeout=60)
        raise
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise ImageError(f"image {arch}: docker/make-base.sh {arch} did not finish within "
                         f"{MAKE_BASE_TIMEOUT_S:.0f} s; last lines: {' | '.join(list(tail)[-5:])}")
    if status != 0:
        raise ImageError(f"image {arch}: docker/make-base.sh {arch} failed (exit status "
                         f"{status}): {' | '.join(list(tail)[-5:])}")


# --- build ----------------------------------------------------------------------------------

def legacy_build(client, what: str, *, stall_s: float = None, total_s: float = None,
                 **build_kwargs) -> None:
    """Run one legacy-builder build through the SDK with bounded waits.

    Raises ImageError naming `what`, with the last lines of the build log, when the build fails,
    stays silent for `stall_s` or runs past `total_s`.
    """
    stall_s = BUILD_STALL_S if stall_s is None else stall_s
    total_s = BUILD_TOTAL_S if total_s is None else total_s
    tail: collections.deque[str] = collections.deque(maxlen=20)
    deadline = time.monotonic() + total_s
    error = None
    try:
        # The SDK's build never asks for BuildKit: this is the legacy builder, which honours
        # platform= for the image's metadata and uses a local base without pulling.
        stream = client.api.build(rm=True, forcerm=True, pull=False, decode=True,
                                  timeout=stall_s, **build_kwargs)
        for ev in stream:
            for line in str(ev.get("stream", "")).splitlines():
                line = _ANSI.sub("", line).rstrip()
                if line.strip() and not _CHATTER.match(line):
                    tail.append(line)
            if "error" in ev:
                error = str(ev["error"]).strip()
                break
            if time.monotonic() > deadline:
                error = f"the build took longer than {total_s:.0f} s"
                break
    except Exception as exc:  # noqa: BLE001 - API errors, and read timeouts from urllib3
        error = (f"no output from the build for {stall_s:.0f} s"
                 if "timed out" in str(exc).lower() else _short(exc))
    if error:
        raise ImageError(f"{what} failed: {error}; last lines: {' | '.join(list(tail)[-6:])}")


def _build(client, arch: str, tag: str, base_used: str, labels: dict[str, str]) -> None:
    """Build with the legacy builder from a context of the Dockerfile and workload.py."""
    with tempfile.TemporaryDirectory(prefix="crashlab-ctx-") as ctx:
        Path(ctx, "Dockerfile").write_bytes(_read(DOCKERFILE))
        Path(ctx, "workload.py").write_bytes(_read(WORKLOAD))
        legacy_build(client, f"image {arch}: build of {tag} from {base_used}", path=ctx,
                     tag=tag, platform=f"linux/{arch}", buildargs={"BASE": base_used},
                     labels=labels)
    got = _arch_of(client, tag)
    if got != arch:
        raise ImageError(f"image {arch}: built {tag} but the engine records its arch as {got}")


# --- helpers --------------------------------------------------------------------------------

def _get(client, name: str):
    from docker.errors import APIError, ImageNotFound
    try:
        return client.images.get(name)
    except ImageNotFound:
        return None
    except APIError as exc:
        if exc.status_code == 400:   # an invalid reference: the user's base name
            raise ImageError(f"image: {name!r} is not a valid image name: "
                             f"{exc.explanation or _short(exc)}") from None
        raise


def _arch_of(client, name: str) -> str | None:
    image = _get(client, name)
    return None if image is None else image.attrs.get("Architecture")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"image: cannot read {path}: {exc.strerror}") from None


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "explanation", None) or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
