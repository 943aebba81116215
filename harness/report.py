"""Summaries of a run: per cell, trials, verdict counts, lost acknowledged commits, violations."""

from __future__ import annotations

import statistics
from collections import OrderedDict

from rich.console import Console
from rich.table import Table

from .guarantees import VERDICTS

COLOURS = {"intact": "green", "lost-allowed": "yellow", "lost": "bold red", "torn": "bold red",
           "corrupt": "bold red", "error": "magenta"}


def summarize(records: list[dict]) -> dict:
    """Per-cell rows and totals from trial records."""
    cells: "OrderedDict[str, dict]" = OrderedDict()
    for r in records:
        key = f"{r.get('scenario', '')}::{r['cell_label']}"
        row = cells.setdefault(key, {
            "scenario": r.get("scenario", ""), "cell": r["cell_label"], "axes": r["cell"],
            "trials": 0, "verdicts": {v: 0 for v in VERDICTS}, "violations": 0,
            "expected": r.get("expected", []), "lost": [], "acked": [],
            "machines": set(), "fault_class": r["cell"].get("fault_class"),
        })
        row["trials"] += 1
        row["verdicts"][r["verdict"]] = row["verdicts"].get(r["verdict"], 0) + 1
        row["violations"] += bool(r.get("violation"))
        if r["verdict"] != "error":
            row["lost"].append(r.get("lost_acked", 0))
            row["acked"].append(r.get("acked", 0))
        if r.get("machine"):
            row["machines"].add(r["machine"])
    rows = []
    for row in cells.values():
        lost = row.pop("lost")
        acked = row.pop("acked")
        row["lost_acked"] = ({"min": min(lost), "median": statistics.median(lost),
                              "max": max(lost), "total": sum(lost)} if lost else None)
        row["acked_total"] = sum(acked)
        row["machines"] = sorted(row["machines"])
        rows.append(row)
    totals = {v: sum(r["verdicts"][v] for r in rows) for v in VERDICTS}
    return {"cells": rows, "totals": totals, "trials": len(records),
            "violations": sum(r["violations"] for r in rows),
            "errors": totals.get("error", 0)}


def _verdict_text(row: dict) -> str:
    parts = []
    for v in VERDICTS:
        n = row["verdicts"].get(v, 0)
        if n:
            parts.append(f"[{COLOURS[v]}]{v} {n}[/]")
    return " · ".join(parts)


def table(summary: dict, title: str = "") -> Table:
    t = Table(title=title or None, show_lines=False, header_style="bold")
    t.add_column("cell")
    t.add_column("class")
    t.add_column("machine")
    t.add_column("trials", justify="right")
    t.add_column("acked", justify="right")
    t.add_column("lost min/med/max", justify="right")
    t.add_column("verdicts")
    t.add_column("ok?", justify="center")
    for row in summary["cells"]:
        la = row["lost_acked"]
        lost = f"{la['min']}/{la['median']:g}/{la['max']}" if la else "-"
        ok = ("[bold red]VIOLATION[/]" if row["violations"] else
              "[magenta]error[/]" if row["verdicts"].get("error") else "[green]ok[/]")
        t.add_row(row["cell"], (row["fault_class"] or "").replace("-crash", ""), ",".join(row["machines"]),
                  str(row["trials"]), str(row["acked_total"]), lost, _verdict_text(row), ok)
    return t


def print_table(summary: dict, console: Console, title: str = "") -> None:
    console.print(table(summary, title))


def markdown(summary: dict, title: str, env: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    if env:
        lines.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()
                                                 if not isinstance(v, (dict, list))))
        lines.append("")
    lines += ["| cell | class | machine | trials | acked | lost acked min/med/max | verdicts | ok |",
              "|---|---|---|---:|---:|---:|---|---|"]
    for row in summary["cells"]:
        la = row["lost_acked"]
        lost = f"{la['min']}/{la['median']:g}/{la['max']}" if la else "-"
        verdicts = ", ".join(f"{v} {n}" for v, n in row["verdicts"].items() if n)
        ok = "VIOLATION" if row["violations"] else ("error" if row["verdicts"].get("error")
                                                     else "ok")
        lines.append(f"| {row['cell']} | {row['fault_class']} | {','.join(row['machines'])} | "
                     f"{row['trials']} | {row['acked_total']} | {lost} | {verdicts} | {ok} |")
    t = summary["totals"]
    lines += ["", "Totals: " + ", ".join(f"{v} {n}" for v, n in t.items() if n)
              + f"; violations {summary['violations']}", ""]
    return "\n".join(lines)
