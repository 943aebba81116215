"""Throughput of VM crash trials (boot, write, kill, check) through the real target and runner.

Each trial: a guest started (restored from the saved idle guest, or booted cold), the data disk
mounted and the writer started, WRITE_MS of writing, SIGKILL to QEMU, a new guest mounting the
crashed disk (ext4 journal replay) and running the verifier. The figure is trials per minute
from the median trial time; a note says where the time goes. A few cold-boot trials run too, to
show what starting from the saved guest brings.

    python -m harness.bench_vm [--arch native|emulated|amd64|arm64] [--trials N] [--cold N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .results import RunStore
from .scenario import loads

WRITE_MS = 1000
PHASES = (("writer guest start", "w_start_s"), ("mount + write command", "mount_write_s"),
          ("writer's python start + writing until the kill", "write_s"),
          ("checker guest start + mount (journal replay)", "check_ready_s"),
          ("database files out of the guest", "files_s"),
          ("verifier (integrity_check, census)", "verify_s"))


def _scenario(arch: str):
    return loads(f"""
name: bench-vm-{arch}
seed: 1
sqlite: {{journal_mode: WAL, synchronous: NORMAL}}
platform: {{kind: vm, arch: {arch}}}
workload: {{kind: transfers, rows_per_txn: 4}}
fault: {{kind: vm-kill, after_ms: {WRITE_MS}}}
""", f"<bench vm {arch}>")


def _trials(arch: str, trials: int, boot: str, warmup: int, log) -> tuple[list[dict], dict, float]:
    """(per-trial timings, fingerprint, seconds to open the target) for one boot mode."""
    from . import runner
    from .targets.vm import VMTarget

    sc = _scenario(arch)
    cell = sc.cells[0]
    old = os.environ.get("CRASHLAB_VM_BOOT")
    os.environ["CRASHLAB_VM_BOOT"] = boot
    out: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="crashlab-bench-") as tmp:
            store = RunStore(Path(tmp), f"bench-vm-{boot}-{os.getpid()}")
            try:
                t0 = time.perf_counter()
                with runner.session(store, log) as ctx, VMTarget(cell, ctx) as target:
                    opened = time.perf_counter() - t0
                    fp = target.fingerprint()
                    for n in range(warmup + trials):
                        t1 = time.perf_counter()
                        rec = runner.run_trial(target, sc, cell, n, store, keep="none")
                        took = time.perf_counter() - t1
                        if rec["verdict"] == "error":
                            raise RuntimeError(f"bench trial failed: {rec['error']}")
                        if n >= warmup:
                            out.append({"total_s": took, "verdict": rec["verdict"],
                                        "acked": rec["acked"], "lost": rec["lost_acked"],
                                        **{k: v for k, v in target.last_timings.items()}})
            finally:
                store.close()
    finally:
        if old is None:
            os.environ.pop("CRASHLAB_VM_BOOT", None)
        else:
            os.environ["CRASHLAB_VM_BOOT"] = old
    return out, fp, opened


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else 0.0


def bench_vm(arch: str, trials: int, cold: int = 2, log=lambda s: None,
             breakdown=sys.stderr) -> dict:
    """VM trials per minute for ``arch`` (native | emulated | amd64 | arm64), with a breakdown.

    Args:
        arch: the guest arch, as in a scenario's platform.arch.
        trials: measured trials from the saved guest (after one warm-up trial).
        cold: trials with every guest booted cold, for comparison (0 to skip).
        log: called with progress lines (asset builds, the first save of the booted guest).
        breakdown: where the note of where the time goes is printed (None: not printed).

    Returns:
        A row for ``harness.bench``: platform, trials, harness_median_s, harness_per_min, note,
        plus phases (median seconds per phase), the cold-boot figures and the fingerprint.
    """
    rows, fp, opened = _trials(arch, trials, "snapshot", warmup=1, log=log)
    total = _median(rows, "total_s")
    phases = {name: round(_median(rows, key), 3) for name, key in PHASES}
    phases["harness (disk copy, events, judge, clean up)"] = round(
        max(0.0, total - sum(phases.values())), 3)
    row = {
        "platform": f"vm {fp.get('guest_arch')} vm-kill ({fp.get('accel')})",
        "trials": len(rows), "harness_median_s": round(total, 3),
        "harness_per_min": round(60 / total, 1) if total else 0.0,
        "phases": phases, "open_s": round(opened, 2),
        "saved_guest": fp.get("saved_guest"), "guest_kernel": fp.get("guest_kernel"),
        "acked_median": _median(rows, "acked"), "lost_median": _median(rows, "lost"),
    }
    if cold:
        crows, _, _ = _trials(arch, cold, "cold", warmup=0, log=log)
        ctotal = _median(crows, "total_s")
        row.update({"cold_trials": len(crows), "cold_median_s": round(ctotal, 3),
                    "cold_per_min": round(60 / ctotal, 1) if ctotal else 0.0,
                    "cold_boot_s": round(_median(crows, "w_start_s"), 3)})
    start = phases["writer guest start"] + phases["checker guest start + mount (journal replay)"]
    row["note"] = (f"{WRITE_MS} ms of writing; guests restored from a saved boot "
                   f"({start:.1f} s of {total:.1f} s)" +
                   (f"; cold boots: {row['cold_per_min']:.0f}/min" if cold else ""))
    if breakdown is not None:
        print_breakdown(row, breakdown)
    return row


def print_breakdown(row: dict, file=sys.stderr) -> None:
    print(f"{row['platform']}: {row['harness_per_min']:.1f} trials/min "
          f"(median {row['harness_median_s']:.2f} s over {row['trials']} trials)", file=file)
    for name, s in row["phases"].items():
        share = s / row["harness_median_s"] * 100 if row["harness_median_s"] else 0
        print(f"  {name:<50} {s:6.2f} s  {share:4.0f} %", file=file)
    if "cold_median_s" in row:
        print(f"  every guest booted cold instead: {row['cold_per_min']:.1f} trials/min "
              f"(median {row['cold_median_s']:.2f} s; a boot to the guest init takes "
              f"{row['cold_boot_s']:.1f} s, twice per trial)", file=file)
    sg = row.get("saved_guest") or {}
    if sg:
        print(f"  saved guest: {sg.get('state_bytes', 0) / 1e6:.0f} MB state, made once by a "
              f"{sg.get('boot_s')} s boot", file=file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench_vm",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="native")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--cold", type=int, default=2, help="cold-boot trials for comparison")
    ap.add_argument("--json", help="also write the row here")
    args = ap.parse_args(argv)
    row = bench_vm(args.arch, args.trials, args.cold,
                   log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
