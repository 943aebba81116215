"""The container platform: the writer runs in a Docker container, through the Docker SDK only.

Storage (``platform.storage``):
  bind    a host directory bind-mounted at /data (the host's view is recorded too)
  volume  a named volume at /data
  layer   the container's own writable layer
  tmpfs   a tmpfs at /data (dies with the container: kill-writer only)

Two shapes of trial, chosen by the fault:
  kill-writer   one keeper container per cell lives across trials; each trial execs a writer in
                it and kills only that process; the verifier is another exec there.
  kill-container, stop-container, pause-kill
                a fresh container per trial whose command is the writer; after the fault a
                checker container on the same storage (or, for the layer, a container made from
                the dead one's committed layer) runs the verifier, as after a restart.
Every container and volume carries the run's labels; close() and the run's sweep remove them.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
import platform as _platform
import shutil
import tarfile
import time
from pathlib import Path
from typing import Iterator

from .. import engine
from ..arch import native_arch, resolve_arch
from ..doctor import binfmt_handler
from ..errors import EnvironmentProblem, TargetError
from .base import (DB_NAME, DB_SUFFIXES, Target, TrialContext, WriterSpec, census_from,
                   copy_db_files)

WORKLOAD = "/opt/crashlab/workload.py"
DATA = "/data"
LAYER = "/var/lib/crashlab"
KEEPER_CMD = ["python3", WORKLOAD, "idle"]
ENDING = ("kill-container", "stop-container", "pause-kill")


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    buf = b""
    for chunk in chunks:
        if isinstance(chunk, tuple):  # demuxed exec output: (stdout, stderr)
            chunk = chunk[0] or b""
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


class ContainerTarget(Target):
    kind = "container"
    snapshot_after_verify = True

    def __init__(self, cell, run):
        super().__init__(cell, run)
        self.client = None
        self.arch = resolve_arch(cell["platform.arch"])
        self.storage = cell["platform.storage"]
        self.fault = cell.fault
        self.image = None
        self.volume = None
        self.bind_dir: Path | None = None
        self.keeper = None        # kill-writer: the long-lived container the writer runs in
        self.checker = None       # container-ending faults: verifies on the same storage
        self.writer = None        # container-ending faults: this trial's container
        self.trial_dir = ""       # this trial's directory inside the container
        self.writer_pid: int | None = None
        self.exec_id: str | None = None
        self._fingerprint: dict = {}
        self._labels = engine.labels(run.run_id, cell=str(cell.index))
        # Removing a trial's container and files is off the critical path of the next trial.
        self._janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crashlab-clean")

    # ------------------------------------------------------------------ cell lifecycle

    @classmethod
    def preflight(cls, cell) -> None:
        arch = resolve_arch(cell["platform.arch"])
        if arch != native_arch() and _platform.system() == "Linux" \
                and binfmt_handler(arch) is None:
            raise EnvironmentProblem(
                f"platform.arch {cell['platform.arch']} needs {arch} emulation, and no "
                f"binfmt_misc handler for it is registered; run `make setup`")

    def open(self) -> None:
        from ..images import ensure_image
        self.preflight(self.cell)
        self.client = self.run.docker()
        self.image = ensure_image(self.client, self.arch, self.cell["platform.image"] or
                                  "debian:bookworm-slim", log=self.run.log_once)
        if self.storage == "volume":
            self.volume = self.client.volumes.create(
                name=f"crashlab-{self.run.run_id}-c{self.cell.index:03d}",
                labels=self._labels)
        elif self.storage == "bind":
            self.bind_dir = self.run.work_dir / f"bind-c{self.cell.index:03d}"
            self.bind_dir.mkdir(parents=True, exist_ok=True)
        if self.fault == "kill-writer":
            self.keeper = self._run_container(KEEPER_CMD, name_suffix="keeper")
        elif self.storage in ("bind", "volume"):
            self.checker = self._run_container(KEEPER_CMD, name_suffix="checker")
        probe = self.keeper or self.checker
        self._fingerprint = {
            "image": self.image.tag, "image_arch": self.image.arch,
            "base": self.image.base, "base_path": self.image.path,
            "arch": self.arch, "emulation": self._emulation(),
            "storage": self.storage, **engine.fingerprint(self.client),
        }
        if probe is not None:
            self._fingerprint["data_mount"] = self._mount_of(probe)

    def close(self) -> None:
        self._janitor.shutdown(wait=True)
        for c in (self.writer, self.keeper, self.checker):
            self._remove(c)
        self.writer = self.keeper = self.checker = None
        if self.volume is not None:
            try:
                self.volume.remove(force=True)
            except Exception:
                pass
            self.volume = None
        if self.bind_dir is not None:
            shutil.rmtree(self.bind_dir, ignore_errors=True)

    def fingerprint(self) -> dict:
        return self._fingerprint

    def _emulation(self) -> str:
        if self.arch == native_arch():
            return "none (native)"
        if _platform.system() == "Linux":
            return f"binfmt_misc {binfmt_handler(self.arch)}"
        return "Docker Desktop (QEMU or Rosetta)"

    def _mount_of(self, container) -> str:
        path = LAYER if self.storage == "layer" else DATA
        code, out = container.exec_run(["sh", "-c", f"grep ' {path} ' /proc/mounts || "
                                                    f"grep ' / ' /proc/mounts"])
        line = out.decode(errors="replace").strip().splitlines()
        if not line:
            return "?"
        parts = line[0].split()
        return f"{parts[2]} ({parts[0]} on {parts[1]})" if len(parts) > 2 else line[0]

    def _mounts(self) -> dict:
        from docker.types import Mount
        if self.storage == "volume":
            return {"mounts": [Mount(DATA, self.volume.name, type="volume")]}
        if self.storage == "bind":
            return {"mounts": [Mount(DATA, str(self.bind_dir.resolve()), type="bind")]}
        if self.storage == "tmpfs":
            return {"tmpfs": {DATA: "rw,size=256m"}}
        return {}

    def _run_container(self, command: list[str], name_suffix: str, image: str | None = None,
                       start: bool = True, mounts: bool = True):
        name = f"crashlab-{self.run.run_id}-c{self.cell.index:03d}-{name_suffix}"
        kwargs = dict(image=image or self.image.tag, command=command, name=name,
                      labels=self._labels, network_mode="none", detach=True,
                      platform=f"linux/{self.arch}", stdin_open=False, tty=False)
        if mounts:
            kwargs.update(self._mounts())
        try:
            if start:
                return self.client.containers.run(**kwargs)
            kwargs.pop("detach")
            return self.client.containers.create(**kwargs)
        except Exception as exc:
            raise TargetError(f"could not start container {name}: {exc}") from None

    def _remove(self, container) -> None:
        if container is None:
            return
        try:
            container.remove(force=True, v=True)
        except Exception:
            pass

    # ------------------------------------------------------------------ trials

    def _dir(self, trial_id: str) -> str:
        base = LAYER if self.storage == "layer" else DATA
        return f"{base}/{trial_id}"

    def prepare(self, trial: TrialContext) -> None:
        self.trial_dir = self._dir(trial.trial_id)
        self.writer_pid = None
        self.exec_id = None
        self.writer = None
        self._trial_id = trial.trial_id

    @property
    def db(self) -> str:
        return f"{self.trial_dir}/{DB_NAME}"

    def start_writer(self, spec: WriterSpec) -> Iterator[str]:
        argv = ["python3", WORKLOAD, *spec.write_args(self.db)]
        script = f"mkdir -p {self.trial_dir} && exec " + " ".join(argv)
        if self.keeper is not None:
            api = self.client.api
            self.exec_id = api.exec_create(self.keeper.id, ["sh", "-c", script],
                                           stdout=True, stderr=True)["Id"]
            stream = api.exec_start(self.exec_id, stream=True, demux=True)
            return self._watch_pid(_lines(stream))
        suffix = f"{self._trial_id}"
        self.writer = self._run_container(["sh", "-c", script], name_suffix=suffix, start=False)
        stream = self.writer.attach(stdout=True, stderr=False, stream=True, logs=True)
        self.writer.start()
        return _lines(stream)

    def _watch_pid(self, lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            if self.writer_pid is None and '"ready"' in line:
                try:
                    self.writer_pid = int(json.loads(line[line.index("{"):])["pid"])
                except (ValueError, KeyError):
                    pass
            yield line

    def strike(self, fault: str) -> None:
        if fault == "kill-writer":
            if self.writer_pid is None:
                raise TargetError("the writer's pid is unknown (no ready event)")
            code, out = self.keeper.exec_run(["sh", "-c", f"kill -9 {self.writer_pid}"])
            if code not in (0, None):
                raise TargetError(f"kill -9 {self.writer_pid} failed in the keeper",
                                  status=code, stderr_tail=out.decode(errors="replace"))
            return
        c = self.writer
        if fault == "kill-container":
            c.kill()
        elif fault == "stop-container":
            c.stop(timeout=int(round(self.cell["fault.grace_s"])))
        elif fault == "pause-kill":
            c.pause()
            time.sleep(self.cell["fault.pause_ms"] / 1000)
            c.kill()
        else:
            raise TargetError(f"fault {fault} is not available in a container")

    def settle(self) -> None:
        if self.writer is not None:
            try:
                self.writer.wait(timeout=30)
            except Exception as exc:
                raise TargetError(f"container {self.writer.name} did not end within 30 s of "
                                  f"{self.fault}: {exc}") from None
        elif self.exec_id is not None:
            deadline = time.monotonic() + 30
            while self.client.api.exec_inspect(self.exec_id).get("Running"):
                if time.monotonic() > deadline:
                    raise TargetError("the writer did not die within 30 s of kill -9")
                time.sleep(0.005)

    def _reader(self):
        """A container that can read this trial's files: keeper, checker or the dead writer."""
        return self.keeper or self.checker or self.writer

    def snapshot(self, dest: Path) -> None:
        if self.storage == "bind":
            copy_db_files(self.bind_dir / self._trial_id, dest)
            return
        try:
            bits, _ = self._reader().get_archive(self.trial_dir)
        except Exception as exc:
            if "No such" in str(exc) or "404" in str(exc):
                dest.mkdir(parents=True, exist_ok=True)
                return  # the writer never created its directory
            raise TargetError(f"could not copy {self.trial_dir} out: {exc}") from None
        data = io.BytesIO(b"".join(bits))
        dest.mkdir(parents=True, exist_ok=True)
        wanted = {DB_NAME + s for s in DB_SUFFIXES}
        with tarfile.open(fileobj=data) as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                if m.isfile() and name in wanted:
                    with tar.extractfile(m) as src, open(dest / name, "wb") as out:
                        shutil.copyfileobj(src, out)

    def verify(self, spec: WriterSpec) -> dict:
        argv = ["python3", WORKLOAD, *spec.verify_args(self.db)]
        if self.keeper is not None or self.checker is not None:
            # A copy on the same storage, opened fresh: recovery rewrites the copy, and the
            # files stay as the fault left them for a snapshot of a kept trial.
            copy = f"{self.trial_dir}.verify"
            vargv = ["python3", WORKLOAD, *spec.verify_args(f"{copy}/{DB_NAME}")]
            script = (f"mkdir -p {copy} && {{ cp -a {self.trial_dir}/. {copy}/ 2>/dev/null "
                      f"|| true; }} && exec " + " ".join(vargv))
            code, out = self._reader().exec_run(["sh", "-c", script], stdout=True, stderr=True,
                                                demux=True)
            stdout, stderr = out
            return self._census(code, stdout or b"", stderr or b"")
        # layer storage after a container-ending fault: restart from the dead one's layer
        image = self.writer.commit(repository="crashlab/trial-layer",
                                   tag=f"{self.run.run_id}-{self._trial_id}".lower(),
                                   conf={"Labels": self._labels})
        checker = None
        try:
            checker = self._run_container(argv, name_suffix=f"{self._trial_id}-verify",
                                          image=image.id, start=False, mounts=False)
            checker.start()
            status = checker.wait(timeout=120)
            stdout = checker.logs(stdout=True, stderr=False)
            stderr = checker.logs(stdout=False, stderr=True)
            return self._census(status.get("StatusCode"), stdout, stderr)
        finally:
            self._remove(checker)
            try:
                self.client.images.remove(image.id, force=True, noprune=False)
            except Exception:
                pass

    def _census(self, code, stdout: bytes, stderr: bytes) -> dict:
        if code not in (0, None):
            raise TargetError("verifier failed in the container", status=code,
                              stderr_tail=stderr.decode(errors="replace"))
        return census_from(stdout.decode(errors="replace"), target="container",
                           stderr=stderr.decode(errors="replace"))

    def extra_views(self, spec: WriterSpec) -> dict:
        """For a bind mount: the host opens the files too (a copy, as the fault left them)."""
        if self.storage != "bind":
            return {}
        import tempfile

        from .. import workload
        with tempfile.TemporaryDirectory(dir=self.run.work_dir) as tmp:
            copy_db_files(self.bind_dir / self._trial_id, Path(tmp))
            args = workload.parser().parse_args(spec.verify_args(str(Path(tmp) / DB_NAME)))
            census = workload.census(args)
        return {"host": census}

    def stderr_tail(self) -> str:
        try:
            if self.writer is not None:
                return self.writer.logs(stdout=False, stderr=True, tail=20).decode(
                    errors="replace")
        except Exception:
            return ""
        return ""

    def finish_trial(self) -> None:
        if self.keeper is not None and self.writer_pid is not None:
            try:  # the writer may still run if the trial failed before the fault
                self.keeper.exec_run(["sh", "-c", f"kill -9 {self.writer_pid} 2>/dev/null"])
            except Exception:
                pass
        writer, self.writer = self.writer, None
        reader = self.keeper or self.checker
        trial_dir = self.trial_dir
        self._janitor.submit(self._clean, writer, reader, trial_dir)

    def _clean(self, writer, reader, trial_dir: str) -> None:
        self._remove(writer)
        if reader is not None and trial_dir:
            try:
                reader.exec_run(["rm", "-rf", trial_dir, f"{trial_dir}.verify"])
            except Exception:
                pass
