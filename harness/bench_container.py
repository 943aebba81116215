"""Container trials per minute: the harness against a bare SDK loop doing the same work.

The bare loop: run a fresh container whose command is the writer (attached before start), read
its output until COMMITS acknowledgements, kill the container, wait for it, run the verifier in
a checker container on the same volume, remove the container. No harness around it.
"""

from __future__ import annotations

import json
import time

from . import engine
from .bench import COMMITS, _row, harness_trials
from .doctor import native_arch
from .images import ensure_image


def bare_kill_container(trials: int, warmup: int = 1) -> list[float]:
    from docker.types import Mount
    client = engine.connect()
    run_id = f"bench-bare-{int(time.time())}"
    labels = engine.labels(run_id)
    image = ensure_image(client, native_arch()).tag
    vol = client.volumes.create(name=f"crashlab-{run_id}", labels=labels)
    mounts = [Mount("/data", vol.name, type="volume")]
    checker = client.containers.run(image, ["python3", "/opt/crashlab/workload.py", "idle"],
                                    detach=True, mounts=mounts, labels=labels,
                                    network_mode="none")
    times = []
    try:
        for n in range(warmup + trials):
            db = f"/data/b{n}/trial.db"
            t0 = time.perf_counter()
            c = client.containers.create(
                image, ["sh", "-c", f"mkdir -p /data/b{n} && exec python3 "
                        f"/opt/crashlab/workload.py write --db {db} --journal-mode WAL "
                        f"--synchronous NORMAL"],
                mounts=mounts, labels=labels, network_mode="none")
            stream = c.attach(stdout=True, stderr=False, stream=True, logs=True)
            c.start()
            acks, buf = 0, b""
            for chunk in stream:
                buf += chunk
                acks += chunk.count(b'"ack"')
                if acks > COMMITS:
                    break
            c.kill()
            c.wait(timeout=30)
            code, out = checker.exec_run(["python3", "/opt/crashlab/workload.py", "verify",
                                          "--db", db])
            assert code == 0 and json.loads(out.decode().splitlines()[-1])["integrity"] == ["ok"]
            c.remove(force=True)
            if n >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        engine.sweep(client, run_id)
        client.close()
    return times


def bench_containers(trials: int) -> list[dict]:
    """Rows: native kill-container (fresh container each) against the bare loop; kill-writer;
    emulated kill-container."""
    bare = bare_kill_container(trials)
    harness = harness_trials("container", "kill-container", trials,
                             extra=", arch: native, storage: volume")
    rows = [_row("container native kill-container (fresh container)", harness, bare)]
    rows[0]["note"] = "target >= 150/min, ratio <= 1.25"
    kw = harness_trials("container", "kill-writer", trials,
                        extra=", arch: native, storage: volume")
    rows.append(_row("container native kill-writer (reused container)", kw, None))
    em = harness_trials("container", "kill-container", max(3, trials // 3),
                        extra=", arch: emulated, storage: volume")
    rows.append(_row("container emulated kill-container", em, None))
    return rows
