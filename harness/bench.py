"""Throughput of crash trials per platform, each against a bare loop run in the same process.

The bare loop does the same work (start the writer, wait for N commits, kill, verify) with no
harness around it: the ratio is what the harness costs. Prints a table and writes JSON.

    python -m harness.bench [--trials N] [--only host,container,vm] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .results import RunStore
from .scenario import loads
from .targets.base import WORKLOAD_PY

COMMITS = 50


def _scenario(platform: str, fault: str, extra: str = ""):
    return loads(f"""
name: bench-{platform}-{fault}
seed: 1
sqlite: {{journal_mode: WAL, synchronous: NORMAL}}
platform: {{kind: {platform}{extra}}}
workload: {{kind: transfers, rows_per_txn: 4}}
fault: {{kind: {fault}, after_commits: {COMMITS}}}
""", f"<bench {platform}>")


def harness_trials(platform: str, fault: str, trials: int, extra: str = "",
                   warmup: int = 1) -> list[float]:
    """Seconds per trial through the real runner and target."""
    from . import runner
    from .targets import target_class
    sc = _scenario(platform, fault, extra)
    cell = sc.cells[0]
    with tempfile.TemporaryDirectory(prefix="crashlab-bench-") as tmp:
        store = RunStore(Path(tmp), f"bench-{os.getpid()}")
        times = []
        try:
            with runner.session(store) as ctx, target_class(platform)(cell, ctx) as target:
                for n in range(warmup + trials):
                    t0 = time.perf_counter()
                    rec = runner.run_trial(target, sc, cell, n, store, keep="none")
                    if rec["verdict"] == "error":
                        raise RuntimeError(f"bench trial failed: {rec['error']}")
                    if n >= warmup:
                        times.append(time.perf_counter() - t0)
        finally:
            store.close()
    return times


def bare_host(trials: int, warmup: int = 1) -> list[float]:
    """Writer subprocess, wait for COMMITS acks, SIGKILL, verifier subprocess: no harness."""
    times = []
    with tempfile.TemporaryDirectory(prefix="crashlab-bench-") as tmp:
        for n in range(warmup + trials):
            db = os.path.join(tmp, f"b{n}.db")
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, str(WORKLOAD_PY), "write", "--db", db,
                                  "--journal-mode", "WAL", "--synchronous", "NORMAL"],
                                 stdout=subprocess.PIPE)
            acks = 0
            for line in p.stdout:
                if b'"ack"' in line:
                    acks += 1
                    if acks > COMMITS:
                        break
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            p.stdout.close()
            subprocess.run([sys.executable, str(WORKLOAD_PY), "verify", "--db", db],
                           capture_output=True, check=True)
            if n >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def _row(name: str, harness: list[float], bare: list[float] | None) -> dict:
    h = statistics.median(harness)
    row = {"platform": name, "trials": len(harness), "harness_median_s": round(h, 4),
           "harness_per_min": round(60 / h, 1)}
    if bare:
        b = statistics.median(bare)
        row.update({"bare_median_s": round(b, 4), "bare_per_min": round(60 / b, 1),
                    "ratio": round(h / b, 3)})
    return row


def bench_host(trials: int) -> dict:
    bare = bare_host(trials)
    harness = harness_trials("host", "kill-writer", trials)
    return _row("host kill-writer", harness, bare)


SECTIONS: dict[str, Callable[[int], list[dict]]] = {
    "host": lambda n: [bench_host(n)],
}


def _register_optional() -> None:
    try:
        from .bench_container import bench_containers
        SECTIONS["container"] = bench_containers
    except ImportError:
        pass
    try:
        from .bench_vm import bench_vm
        SECTIONS["vm"] = lambda n: [bench_vm("native", max(3, n // 10))]
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    _register_optional()
    ap = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=30, help="measured trials per row")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument("--json", default="results/bench.json", help="where to write the figures")
    args = ap.parse_args(argv)
    rows = []
    for name in args.only.split(","):
        if name not in SECTIONS:
            print(f"Error: unknown section {name!r}; one of {', '.join(SECTIONS)}",
                  file=sys.stderr)
            return 2
        print(f"bench {name}: {args.trials} trials ...", file=sys.stderr, flush=True)
        for row in SECTIONS[name](args.trials):
            rows.append(row)
            print(json.dumps(row), flush=True)
    from rich.console import Console
    from rich.table import Table
    t = Table(title="crash trials per minute (median trial time)", header_style="bold")
    for col in ("platform", "trials", "harness /min", "bare /min", "ratio harness/bare", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["platform"], str(r["trials"]), f"{r['harness_per_min']:.0f}",
                  f"{r['bare_per_min']:.0f}" if "bare_per_min" in r else "-",
                  f"{r['ratio']:.2f}" if "ratio" in r else "-", r.get("note", ""))
    Console(width=140).print(t)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "when": time.strftime("%F %T")},
                                          indent=2) + "\n")
    print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
