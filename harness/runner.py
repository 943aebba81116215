"""The orchestrator: every cell of every scenario, trial by trial, into the run store.

For each trial: fresh storage, the writer started, its events read as they come, the fault
struck at the seeded point, the files snapshotted as the fault left them, the database
verified as after a reboot, the oracle's verdict appended to trials.jsonl.
"""

from __future__ import annotations

import json
import queue
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from . import oracle
from .errors import CrashlabError, TargetError
from .faults import Trigger
from .guarantees import guarantee
from .results import RunStore
from .scenario import Cell, Scenario
from .targets import RunContext, TrialContext, WriterSpec, target_class

KEEP = ("failures", "all", "none")
_EOF = object()


class EventReader:
    """Reads a target's output lines on a thread, so waits can have timeouts."""

    def __init__(self, lines: Iterable[str]):
        self._q: "queue.Queue" = queue.Queue()
        self.noise: list[str] = []
        self._t = threading.Thread(target=self._pump, args=(lines,), daemon=True)
        self._t.start()

    def _pump(self, lines: Iterable[str]) -> None:
        try:
            for line in lines:
                self._q.put(line)
        except Exception as exc:  # the stream broke: the trial sees EOF and says why
            self._q.put(("__error__", f"{type(exc).__name__}: {exc}"))
        finally:
            self._q.put(_EOF)

    def get(self, timeout: float):
        """The next event (a dict), _EOF at the end, or None when nothing came in time."""
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            try:
                item = self._q.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return None
            if item is _EOF:
                return _EOF
            if isinstance(item, tuple):
                self.noise.append(item[1])
                continue
            ev = parse_event(item)
            if ev is None:
                if item.strip():
                    self.noise.append(item.rstrip()[:300])
                continue
            return ev

    def drain(self, timeout: float) -> list[dict]:
        """Everything left until the stream ends (or the timeout passes)."""
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            ev = self.get(deadline - time.monotonic())
            if ev is None or ev is _EOF:
                return out
            out.append(ev)


def parse_event(line: str) -> dict | None:
    """A writer event from one output line; None for anything else (e.g. a console's noise)."""
    s = line.strip()
    i = s.find('{"ev"')
    if i < 0:
        return None
    try:
        ev = json.loads(s[i:])
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


@dataclass
class Options:
    keep: str = "failures"
    trials: int | None = None
    progress: Callable[[str, dict | None], None] = lambda what, record: None
    log: Callable[[str], None] = lambda s: None


def _trial_id(cell: Cell, n: int) -> str:
    return f"c{cell.index:03d}-t{n:03d}"


def run_trial(target, scenario: Scenario, cell: Cell, n: int, store: RunStore,
              keep: str) -> dict:
    """Run one trial on an opened target and return its record (already appended)."""
    seed = scenario.trial_seed(cell, n)
    rng = random.Random(seed)
    trigger = Trigger.draw(rng, cell["fault.after_commits"], cell["fault.after_ms"])
    spec = WriterSpec.from_cell(cell, seed=rng.getrandbits(31))
    trial_id = _trial_id(cell, n)
    tdir = store.trial_dir(trial_id)
    promise = guarantee(cell.journal_mode, cell.synchronous, cell.fault_class)
    events: list[dict] = []
    census: dict | None = None
    views: dict = {}
    error: str | None = None
    noise: list[str] = []
    struck_after: dict = {}
    t0 = time.monotonic()
    deadline = t0 + scenario.timeout_s
    try:
        target.prepare(TrialContext(trial_id, seed, tdir))
        reader = EventReader(target.start_writer(spec))
        first = None
        acked = 0
        done = False
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TargetError(f"trial took longer than timeout_s={scenario.timeout_s:g}"
                                  f" before the fault", stderr_tail=target.stderr_tail())
            wait = deadline - now
            if first is not None and trigger.after_ms is not None:
                wait = min(wait, first + trigger.after_ms / 1000 - now)
            ev = reader.get(wait)
            now = time.monotonic()
            if ev is _EOF:
                raise TargetError("the writer ended before the fault struck",
                                  stderr_tail=target.stderr_tail() + "\n".join(reader.noise))
            if ev is not None:
                events.append(ev)
                first = first if first is not None else now
                kind = ev.get("ev")
                if kind == "ack" and int(ev.get("txn", 0)) > 0:
                    acked += 1
                elif kind == "error":
                    raise TargetError(f"the writer failed: {ev.get('error')}",
                                      stderr_tail=target.stderr_tail())
                elif kind == "done":
                    done = True
            elapsed_ms = (now - first) * 1000 if first is not None else 0.0
            if done or (first is not None and trigger.due(acked, elapsed_ms)):
                struck_after = {"acked": acked, "ms": round(elapsed_ms, 1)}
                target.strike(cell.fault)
                break
        target.settle()
        events.extend(reader.drain(timeout=15))
        noise = reader.noise
        if not target.snapshot_after_verify:
            target.snapshot(tdir)
        census = target.verify(spec)
        views = target.extra_views(spec)
    except TargetError as exc:
        error = str(exc)
    except CrashlabError:
        target.finish_trial()
        raise
    except BaseException as exc:
        if not isinstance(exc, Exception):  # KeyboardInterrupt: clean up, then stop the run
            target.finish_trial()
            raise
        # an engine or QEMU hiccup: this trial is an error, the run goes on
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
    judgement = oracle.judge(events, census, promise, harness_error=error)
    kept = keep == "all" or (keep == "failures" and (judgement.violation or error))
    try:
        if kept and target.snapshot_after_verify:
            # verify() checked a copy: the files are still as the fault left them
            target.snapshot(tdir)
    except Exception as exc:  # noqa: BLE001 - the verdict stands; say what is missing
        noise.append(f"snapshot failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            target.finish_trial()
        except CrashlabError as exc:
            error = error or f"cleanup failed: {exc}"
    view_verdicts = {}
    for name, view in (views or {}).items():
        vj = oracle.judge(events, view, promise)
        view_verdicts[name] = {"verdict": vj.verdict, "violation": vj.violation,
                               "lost_acked": vj.lost_acked, "integrity": vj.integrity,
                               "reasons": vj.reasons, "sqlite_version": view.get("sqlite_version"),
                               "machine": view.get("machine")}
    ready = next((e for e in events if e.get("ev") == "ready"), {})
    record = {
        "trial_id": trial_id,
        "run_id": store.run_id,
        "scenario": scenario.name,
        "scenario_path": scenario.path,
        "cell": cell.axes(),
        "cell_index": cell.index,
        "cell_label": cell.label,
        "seed": seed,
        "scenario_seed": scenario.seed,
        "trigger": trigger.to_dict(),
        "struck_after": struck_after,
        "verdict": judgement.verdict,
        "expected": judgement.expected,
        "violation": judgement.violation,
        "acked": judgement.acked,
        "begun": judgement.begun,
        "in_flight": judgement.in_flight,
        "in_flight_applied": judgement.in_flight_applied,
        "present": judgement.present,
        "lost_acked": judgement.lost_acked,
        "lost_acked_txns": judgement.lost_acked_txns,
        "partial_txns": judgement.partial_txns,
        "phantom_txns": judgement.phantom_txns,
        "integrity": judgement.integrity,
        "invariant_ok": judgement.invariant_ok,
        "reasons": judgement.reasons,
        "guarantee": {"durable": promise.durable, "atomic": promise.atomic,
                      "intact": promise.intact, "source": promise.source},
        "sqlite_version": (census or {}).get("sqlite_version") or ready.get("sqlite_version"),
        "writer_sqlite_version": ready.get("sqlite_version"),
        "machine": ready.get("machine") or (census or {}).get("machine"),
        "verifier_machine": (census or {}).get("machine"),
        "files": (census or {}).get("files_before"),
        "views": view_verdicts,
        "error": error,
        "duration_s": round(time.monotonic() - t0, 3),
    }
    if kept:
        tdir.mkdir(parents=True, exist_ok=True)
        with open(tdir / "events.jsonl", "w") as fh:
            for ev in events:
                fh.write(json.dumps(ev) + "\n")
        (tdir / "census.json").write_text(json.dumps(census, indent=2) + "\n")
        if noise:
            (tdir / "console.txt").write_text("\n".join(noise) + "\n")
        (tdir / "record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        record["artifacts"] = str(tdir)
    else:
        shutil.rmtree(tdir, ignore_errors=True)
    store.append_trial(record)
    return record


@contextmanager
def session(store: RunStore, log: Callable[[str], None] = lambda s: None
            ) -> Iterator[RunContext]:
    """The RunContext of one run; on the way out (even on Ctrl-C) removes what the run's label
    names in the engine and the run's scratch space."""
    ctx = RunContext(run_id=store.run_id, run_dir=store.dir, work_dir=store.work_dir, log=log)
    try:
        yield ctx
    finally:
        with _shielded():
            if ctx._docker is not None:
                from . import engine
                try:
                    engine.sweep(ctx._docker, store.run_id)
                finally:
                    ctx._docker.close()
            shutil.rmtree(store.work_dir, ignore_errors=True)


def run(scenarios: list[Scenario], store: RunStore, opts: Options) -> list[dict]:
    """Run every cell of every scenario; returns the trial records in order."""
    with session(store, opts.log) as ctx:
        return _run(scenarios, store, opts, ctx)


def _run(scenarios: list[Scenario], store: RunStore, opts: Options,
         ctx: RunContext) -> list[dict]:
    records: list[dict] = []
    fingerprints: dict = {}
    if any(c.platform == "container" for sc in scenarios for c in sc.cells):
        from . import engine
        swept = engine.sweep_stale(ctx.docker())
        if any(swept.values()):
            opts.log("swept leftovers of dead runs: " +
                     ", ".join(f"{n} {k}" for k, n in swept.items()))
    try:
        for sc in scenarios:
            trials = opts.trials if opts.trials is not None else sc.trials
            for cell in sc.cells:
                cls = target_class(cell.platform)
                with cls(cell, ctx) as target:
                    fp = target.fingerprint()
                    if fp:
                        fingerprints[f"{sc.name}::{cell.label}"] = fp
                    for n in range(trials):
                        opts.progress("start", {"scenario": sc.name, "cell": cell.label,
                                                "trial": n})
                        rec = run_trial(target, sc, cell, n, store, opts.keep)
                        records.append(rec)
                        opts.progress("done", rec)
    finally:
        with _shielded():
            store.write_json("targets.json", fingerprints)
    return records


class _shielded:
    """Cleanup that a second Ctrl-C cannot cut short (main thread only)."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def iter_cells(scenarios: list[Scenario]) -> Iterator[tuple[Scenario, Cell]]:
    for sc in scenarios:
        for cell in sc.cells:
            yield sc, cell
