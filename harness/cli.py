"""The crashlab command line. Turns domain errors into `Error: ...` and an exit code."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import (EXIT_BAD_INPUT, EXIT_HARNESS_ERROR, EXIT_OK,
                     EXIT_VIOLATION, CrashlabError, ScenarioError, UsageError)
from .guarantees import FAULT_CLASSES, JOURNAL_MODES, SYNCHRONOUS

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _fail(exc: CrashlabError) -> None:
    if isinstance(exc, ScenarioError):
        for p in exc.problems:
            click.echo(f"Error: {p}", err=True)
    else:
        click.echo(f"Error: {exc}", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CrashlabError as exc:
            _fail(exc)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crashlab")
def main() -> None:
    """crashlab: kill real SQLite mid-write, reopen, and judge what survived.

    Exit codes: 0 every trial as its cell allows, 1 a violation, 2 bad input,
    3 the environment cannot run it, 4 the harness failed in some trial, 130 interrupted.
    """


def _load_all(files, trials=None, seed=None):
    from .scenario import load
    scenarios, problems = [], []
    for f in files:
        try:
            scenarios.append(load(f, trials=trials, seed=seed))
        except ScenarioError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ScenarioError(problems)
    return scenarios


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--cells", is_flag=True, help="List every cell of the matrix.")
def validate(files, cells):
    """Check scenario files; print every problem as FILE:LINE: key: message."""
    from .scenario import load
    bad = []
    for f in files:
        try:
            sc = load(f)
        except ScenarioError as exc:
            for p in exc.problems:
                click.echo(f"Error: {p}", err=True)
            bad.append(f)
            continue
        n = len(sc.cells)
        click.echo(f"{sc.path}: ok: {sc.name}: {n} cell(s) x {sc.trials} trial(s)"
                   f" = {n * sc.trials} trial(s)")
        for note in sc.notes:
            click.echo(f"{sc.path}: note: {note}")
        if cells:
            for c in sc.cells:
                click.echo(f"  c{c.index:03d} {c.label}")
    if bad:
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Where runs are stored (OUT/<run-id>/).")
@click.option("--trials", type=click.IntRange(min=1), help="Trials per cell (overrides files).")
@click.option("--seed", type=click.IntRange(min=0), help="Scenario seed (overrides files).")
@click.option("--keep", type=click.Choice(["failures", "all", "none"]), default="failures",
              show_default=True, help="Whose database files and events to keep.")
@click.option("--only", "only", multiple=True,
              help="Run only cells whose label contains this text (repeatable; all must match).")
@click.option("--jsonl", is_flag=True, help="Print each trial record as a JSON line on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no table.")
def run(files, out, trials, seed, keep, only, jsonl, quiet):
    """Run every cell of the scenario FILES and report the matrix."""
    from . import runner
    from .report import markdown, print_table, summarize
    from .results import RunStore, new_run_id, read_trials

    scenarios = _load_all(files, trials=trials, seed=seed)
    if only:
        for sc in scenarios:
            sc.cells = [c for c in sc.cells if all(o in c.label for o in only)]
        scenarios = [sc for sc in scenarios if sc.cells]
        if not scenarios:
            raise UsageError(f"no cell matches --only {' '.join(only)}")
    total = sum(len(sc.cells) * (trials or sc.trials) for sc in scenarios)
    name = scenarios[0].name if len(scenarios) == 1 else "matrix"
    env = environment(scenarios)  # fails (exit 3) before any result folder exists
    store = RunStore(Path(out), new_run_id(name))
    store.write_json("environment.json", env)
    copies = []
    for i, sc in enumerate(scenarios):  # a run replays from its own copy of each file
        copies.append(store.write_text(f"scenario-{i}.yaml", Path(sc.path).read_text()).name)
    store.write_json("scenarios.json", [{"path": sc.path, "copy": copy, "name": sc.name,
                                         "seed": sc.seed, "trials": trials or sc.trials,
                                         "cells": len(sc.cells), "notes": sc.notes}
                                        for sc, copy in zip(scenarios, copies)])
    show = not quiet and err_console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, disable=not show,
                        transient=True)
    task = progress.add_task("trials", total=total)
    counts: dict[str, int] = {}

    def on_progress(what: str, rec: dict | None) -> None:
        if what == "start":
            progress.update(task, description=f"{rec['cell']} #{rec['trial']}")
        elif what == "done":
            counts[rec["verdict"]] = counts.get(rec["verdict"], 0) + 1
            progress.advance(task)
            if jsonl:
                click.echo(json.dumps(rec, sort_keys=True, default=str))
            elif not show and not quiet:
                flag = " VIOLATION" if rec["violation"] else ""
                click.echo(f"{rec['trial_id']} {rec['cell_label']}: {rec['verdict']}{flag} "
                           f"(acked {rec['acked']}, lost {rec['lost_acked']}, "
                           f"{rec['duration_s']:.2f} s)", err=True)
            if rec.get("error"):
                err_console.print(f"[magenta]{rec['trial_id']}: harness error:[/] {rec['error']}",
                                  markup=True, highlight=False)

    opts = runner.Options(keep=keep, trials=trials, progress=on_progress,
                          log=lambda s: err_console.print(s, markup=False) if not quiet else None)
    started = time.monotonic()
    interrupted = False
    records: list[dict] = []
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        with progress:
            records = runner.run(scenarios, store, opts)
    except KeyboardInterrupt:
        interrupted = True
        store.close()
        records = read_trials(store.dir)
    except CrashlabError as exc:
        store.close()
        summary = summarize(read_trials(store.dir))
        summary.update({"run_id": store.run_id, "aborted": str(exc)})
        store.write_json("summary.json", summary)
        click.echo(f"results so far: {store.dir}", err=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.close()
    elapsed = time.monotonic() - started
    summary = summarize(records)
    summary.update({"run_id": store.run_id, "elapsed_s": round(elapsed, 1),
                    "interrupted": interrupted, "planned_trials": total,
                    "trials_per_minute": round(len(records) / elapsed * 60, 1) if elapsed else 0})
    store.write_json("summary.json", summary)
    store.write_text("summary.md", markdown(summary, f"crashlab run {store.run_id}", {
        k: v for k, v in env.items() if k in ("host_arch", "sqlite_version", "engine_version")}))
    if not quiet and not jsonl:
        print_table(summary, out_console, title=f"{name}: {len(records)} trial(s) in "
                                                f"{elapsed:.1f} s")
    click.echo(f"results: {store.dir}", err=jsonl)
    if interrupted:
        click.echo(f"Error: interrupted after {len(records)} of {total} trial(s); "
                   f"the records written so far are kept", err=True)
        sys.exit(130)
    if summary["violations"]:
        click.echo(f"{summary['violations']} trial(s) broke what their cell allows", err=True)
        sys.exit(EXIT_VIOLATION)
    if summary["errors"]:
        click.echo(f"{summary['errors']} trial(s) ended in a harness error", err=True)
        sys.exit(EXIT_HARNESS_ERROR)
    sys.exit(EXIT_OK)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def environment(scenarios) -> dict:
    import platform
    import sqlite3
    env = {"host": platform.node(), "host_os": platform.platform(),
           "host_arch": platform.machine(), "python": platform.python_version(),
           "sqlite_version": sqlite3.sqlite_version, "crashlab": __version__,
           "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from .targets import target_class
    for sc in scenarios:
        for cell in sc.cells:
            target_class(cell.platform).preflight(cell)
    kinds = {c.platform for sc in scenarios for c in sc.cells}
    if "container" in kinds:
        from . import engine
        client = engine.connect()
        env["docker"] = engine.fingerprint(client)
        env["engine_version"] = env["docker"]["engine_version"]
        client.close()
    return env


@main.command()
@click.option("--db", required=True, type=click.Path(dir_okay=False),
              help="The database to judge (it is opened and recovered in place).")
@click.option("--events", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The writer's event log (JSON lines).")
@click.option("--journal-mode", required=True, type=click.Choice(JOURNAL_MODES,
                                                                 case_sensitive=False))
@click.option("--synchronous", required=True, type=click.Choice(SYNCHRONOUS,
                                                                case_sensitive=False))
@click.option("--fault-class", required=True, type=click.Choice(FAULT_CLASSES))
@click.option("--workload", type=click.Choice(["inserts", "transfers"]), default="transfers",
              show_default=True)
@click.option("--rows-per-txn", type=int, default=4, show_default=True)
@click.option("--accounts", type=int, default=64, show_default=True)
def verify(db, events, journal_mode, synchronous, fault_class, workload, rows_per_txn, accounts):
    """Judge an existing database and event log: one JSON object on stdout."""
    import argparse

    from . import oracle, workload as wl
    from .guarantees import guarantee
    from .runner import parse_event

    evs = []
    with open(events, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            ev = parse_event(line)
            if ev is None:
                raise UsageError(f"{events}:{n}: not a writer event: {line.strip()[:80]!r}")
            evs.append(ev)
    census = wl.census(argparse.Namespace(db=db, workload=workload, rows_per_txn=rows_per_txn,
                                          accounts=accounts))
    promise = guarantee(journal_mode, synchronous, fault_class)
    j = oracle.judge(evs, census, promise)
    out = j.to_dict()
    out["census"] = census
    click.echo(json.dumps(out, sort_keys=True))
    sys.exit(EXIT_VIOLATION if j.violation else EXIT_OK)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json):
    """What this machine offers: engine, emulation, QEMU, SQLite versions."""
    from .doctor import checks
    cs = checks()
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in cs], indent=2))
        return
    for c in cs:
        mark = "[green]ok[/]  " if c.ok else "[red]no[/]  "
        need = f"  [dim](for {c.needed_for})[/]" if c.needed_for else ""
        out_console.print(f"{mark}{c.name}: {c.detail}{need}", highlight=False)


@main.command()
@click.option("--run", "run_id", help="Only this run's resources.")
def clean(run_id):
    """Remove containers, volumes, images and VMs crashlab left behind."""
    from . import engine
    from .errors import EnvironmentProblem
    from .targets.vm import sweep_vms
    n = sweep_vms()  # QEMU guests whose harness is gone, and their scratch folders
    click.echo(f"{n} stale VM(s) stopped")
    try:
        client = engine.connect(timeout=20)
    except EnvironmentProblem as exc:
        click.echo(f"containers: skipped, {exc}", err=True)
        return
    removed = engine.sweep(client, run_id)
    client.close()
    click.echo(", ".join(f"{n} {k}" for k, n in removed.items()) + " removed")


@main.command()
@click.option("--fault-class", type=click.Choice(FAULT_CLASSES), help="Only this class.")
@click.option("--json", "as_json", is_flag=True)
def guarantees(fault_class, as_json):
    """Print what SQLite promises per journal_mode, synchronous and fault class."""
    from rich.table import Table

    from .guarantees import table
    rows = [r for r in table() if not fault_class or r["fault_class"] == fault_class]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(header_style="bold")
    for col in ("fault class", "journal_mode", "synchronous", "durable", "atomic", "intact",
                "source"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["fault_class"], r["journal_mode"], r["synchronous"],
                  *("yes" if r[k] else "no" for k in ("durable", "atomic", "intact")),
                  r["source"].replace("https://www.sqlite.org/", ""))
    out_console.print(t)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("trial_id")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--keep", type=click.Choice(["failures", "all", "none"]), default="all",
              show_default=True)
def replay(run_dir, trial_id, out, keep):
    """Run one trial of an earlier run again: same scenario copy, cell, seed and fault point."""
    from . import runner
    from .results import RunStore, new_run_id, read_trials
    from .scenario import load
    from .targets import target_class

    run_dir = Path(run_dir)
    if not (run_dir / "trials.jsonl").exists():
        raise UsageError(f"{run_dir}: no trials.jsonl here (not a run folder)")
    rec = next((r for r in read_trials(run_dir) if r["trial_id"] == trial_id), None)
    if rec is None:
        raise UsageError(f"{run_dir}: no trial {trial_id!r} in trials.jsonl")
    meta = json.loads((run_dir / "scenarios.json").read_text())
    entry = next((m for m in meta if m["name"] == rec["scenario"]), None)
    if entry is None:
        raise UsageError(f"{run_dir}: scenario {rec['scenario']!r} is not in scenarios.json")
    sc = load(run_dir / entry["copy"], seed=rec["scenario_seed"])
    cell = next((c for c in sc.cells if c.index == rec["cell_index"]), None)
    if cell is None or cell.label != rec["cell_label"]:
        raise UsageError(f"{run_dir}: cell {rec['cell_label']!r} not found in the scenario copy")
    n = int(trial_id.rsplit("-t", 1)[1])
    if sc.trial_seed(cell, n) != rec["seed"]:
        raise UsageError(f"{trial_id}: the seed does not match the scenario copy")
    store = RunStore(Path(out), new_run_id(f"replay-{sc.name}"))
    store.write_text("scenario-0.yaml", (run_dir / entry["copy"]).read_text())
    store.write_json("scenarios.json", [dict(entry, copy="scenario-0.yaml")])
    try:
        with runner.session(store, lambda s: err_console.print(s, markup=False)) as ctx, \
                target_class(cell.platform)(cell, ctx) as target:
            new = runner.run_trial(target, sc, cell, n, store, keep)
    finally:
        store.close()
    click.echo(f"{trial_id} {cell.label}: was {rec['verdict']} (acked {rec['acked']}, "
               f"lost {rec['lost_acked']}); now {new['verdict']} (acked {new['acked']}, "
               f"lost {new['lost_acked']}); fault {new['trigger']}")
    click.echo(f"results: {store.dir}")
    sys.exit(EXIT_VIOLATION if new["violation"] else
             EXIT_HARNESS_ERROR if new["verdict"] == "error" else EXIT_OK)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir):
    """Print the matrix table of an earlier run."""
    from .report import print_table, summarize
    from .results import read_trials
    if not (Path(run_dir) / "trials.jsonl").exists():
        raise UsageError(f"{run_dir}: no trials.jsonl here (not a run folder)")
    s = summarize(read_trials(Path(run_dir)))
    print_table(s, out_console, title=os.path.basename(os.path.normpath(run_dir)))


if __name__ == "__main__":  # pragma: no cover
    main()
