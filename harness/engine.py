"""The Docker engine: connecting, labelling what crashlab creates, sweeping leftovers."""

from __future__ import annotations

import os
import platform as _platform

LABEL = "org.crashlab"            # present on everything crashlab creates
RUN_LABEL = "org.crashlab.run"    # the run id


def connect(timeout: int = 60):
    """A DockerClient for the engine in the environment (DOCKER_HOST or the default socket)."""
    from .errors import EnvironmentProblem
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EnvironmentProblem(f"the docker SDK is not installed: {exc}") from None
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except DockerException as exc:
        hint = ("run `make setup` (Linux: installs docker.io and starts dockerd)"
                if _platform.system() == "Linux" else "start Docker Desktop")
        raise EnvironmentProblem(f"no Docker engine answers ({_short(exc)}); {hint}") from None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


OWNER_LABEL = "org.crashlab.owner"  # host:pid of the harness that created it


def owner() -> str:
    return f"{_platform.node()}:{os.getpid()}"


def labels(run_id: str, **extra: str) -> dict[str, str]:
    out = {LABEL: "1", RUN_LABEL: run_id, OWNER_LABEL: owner()}
    out.update({f"{LABEL}.{k}": v for k, v in extra.items()})
    return out


def sweep(client, run_id: str | None = None) -> dict[str, int]:
    """Remove crashlab's containers, volumes and networks (of one run, or all of them)."""
    from docker.errors import APIError, NotFound
    selector = f"{RUN_LABEL}={run_id}" if run_id else LABEL
    removed = {"containers": 0, "volumes": 0, "networks": 0}
    for c in client.containers.list(all=True, filters={"label": selector}):
        try:
            c.remove(force=True, v=True)
            removed["containers"] += 1
        except NotFound:
            pass
        except APIError as exc:
            if "already in progress" not in str(exc):
                raise
    for v in client.volumes.list(filters={"label": selector}):
        try:
            v.remove(force=True)
            removed["volumes"] += 1
        except NotFound:
            pass
    for img in client.images.list(filters={"label": f"{RUN_LABEL}={run_id}" if run_id
                                           else RUN_LABEL}):
        try:  # committed trial layers; the reusable target images carry no run label
            client.images.remove(img.id, force=True)
            removed["images"] = removed.get("images", 0) + 1
        except (NotFound, APIError):
            pass
    for n in client.networks.list(filters={"label": selector}):
        try:
            n.remove()
            removed["networks"] += 1
        except NotFound:
            pass
    return removed


def _alive(owner_label: str | None) -> bool:
    """Whether the harness process that owns a resource still runs (unknown owners: yes)."""
    if not owner_label or ":" not in owner_label:
        return True
    host, _, pid = owner_label.rpartition(":")
    if host != _platform.node():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def sweep_stale(client) -> dict[str, int]:
    """Remove what runs on this machine left behind when their harness died (e.g. SIGKILL)."""
    from docker.errors import APIError, NotFound
    removed = {"containers": 0, "volumes": 0}
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        if not _alive(c.labels.get(OWNER_LABEL)):
            try:
                c.remove(force=True, v=True)
                removed["containers"] += 1
            except (NotFound, APIError):
                pass
    for v in client.volumes.list(filters={"label": LABEL}):
        if not _alive((v.attrs.get("Labels") or {}).get(OWNER_LABEL)):
            try:
                v.remove(force=True)
                removed["volumes"] += 1
            except (NotFound, APIError):
                pass
    return removed


def leftovers(client, run_id: str | None = None) -> dict[str, list[str]]:
    selector = f"{RUN_LABEL}={run_id}" if run_id else LABEL
    return {
        "containers": [c.name for c in client.containers.list(all=True,
                                                                filters={"label": selector})],
        "volumes": [v.name for v in client.volumes.list(filters={"label": selector})],
        "networks": [n.name for n in client.networks.list(filters={"label": selector})],
    }


def fingerprint(client) -> dict:
    """What the engine is: version, OS (Docker Desktop or a Linux engine), driver, arch."""
    info = client.info()
    version = client.version()
    os_name = info.get("OperatingSystem", "")
    return {
        "engine_version": version.get("Version"),
        "api_version": version.get("ApiVersion"),
        "engine_os": os_name,
        "docker_desktop": "Docker Desktop" in os_name,
        "kernel": info.get("KernelVersion"),
        "storage_driver": info.get("Driver"),
        "engine_arch": info.get("Architecture"),
        "host_arch": _platform.machine(),
        "cgroup": f"v{info.get('CgroupVersion', '?')} {info.get('CgroupDriver', '')}".strip(),
        "runtimes": sorted((info.get("Runtimes") or {}).keys()),
        **desktop_settings(),
    }


_DESKTOP_KEYS = {
    "usevirtualizationframeworkvirtiofs": "desktop_virtiofs",
    "usegrpcfuse": "desktop_grpcfuse",
    "usevirtualizationframeworkrosetta": "desktop_rosetta",
    "usevirtualizationframework": "desktop_virtualization_framework",
    "filesharingdirectories": "desktop_file_sharing_dirs",
}


def desktop_settings() -> dict:
    """Docker Desktop's file-sharing and emulation settings, where this machine has them."""
    import json
    from pathlib import Path
    base = Path.home() / "Library" / "Group Containers" / "group.com.docker"
    for name in ("settings-store.json", "settings.json"):
        try:
            data = json.loads((base / name).read_text())
        except (OSError, ValueError):
            continue
        out = {"desktop_settings": str(base / name)}
        for key, value in data.items():
            if key.lower() in _DESKTOP_KEYS:
                out[_DESKTOP_KEYS[key.lower()]] = value
        if out.get("desktop_virtiofs"):
            out["desktop_file_sharing"] = "virtiofs"
        elif out.get("desktop_grpcfuse"):
            out["desktop_file_sharing"] = "gRPC FUSE"
        elif len(out) > 1:
            out["desktop_file_sharing"] = "osxfs (legacy)"
        return out
    return {}
