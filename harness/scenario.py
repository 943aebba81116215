"""Scenario files: YAML in, validated, expanded into the matrix of cells.

A value written as a list makes that key an axis; the cells are the cross product of all axes,
less the combinations an ``exclude:`` entry names and those a platform cannot run. A section
(``sqlite``, ``platform``, ``workload``, ``fault``) may also be a list of mappings: each is a
variant with axes of its own (e.g. the host as a control group beside containers).

Every problem of a file is collected and reported as ``FILE:LINE: key.path: message``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, ScenarioError
from .faults import FAULTS
from .guarantees import JOURNAL_MODES, SYNCHRONOUS

PLATFORM_KINDS = ("host", "container", "vm")
ARCHES = ("native", "emulated", "amd64", "arm64")
STORAGES = {"host": ("local",), "container": ("bind", "volume", "layer", "tmpfs"),
            "vm": ("disk",)}
ALL_STORAGES = ("local", "bind", "volume", "layer", "tmpfs", "disk")
CACHE_MODES = ("writeback", "none", "directsync", "unsafe")
WORKLOADS = ("inserts", "transfers")
CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
FAULT_KINDS = tuple(FAULTS)
# Faults that end the container, which a tmpfs does not outlive.
CONTAINER_ENDING = ("kill-container", "stop-container", "pause-kill")


@dataclass(frozen=True)
class Key:
    """One key of the schema."""

    type: str                      # str | int | float | bool | enum | range
    default: Any = None
    choices: tuple = ()
    axis: bool = True              # may a list of values make it an axis?
    minimum: float | None = None
    required: bool = False
    upper: bool = False            # enum values are matched case-insensitively, stored upper
    doc: str = ""


TOP: dict[str, Key] = {
    "name": Key("str", required=True, axis=False, doc="the scenario's name"),
    "description": Key("str", "", axis=False, doc="free text"),
    "trials": Key("int", 3, axis=False, minimum=1, doc="trials per cell"),
    "seed": Key("int", 0, axis=False, minimum=0, doc="every random choice derives from it"),
    "timeout_s": Key("float", 120.0, axis=False, minimum=1,
                     doc="how long one trial may take before it is an error"),
}

SECTIONS: dict[str, dict[str, Key]] = {
    "sqlite": {
        "journal_mode": Key("enum", "WAL", JOURNAL_MODES, upper=True),
        "synchronous": Key("enum", "FULL", SYNCHRONOUS, upper=True),
        "wal_autocheckpoint": Key("int", 1000, minimum=0,
                                  doc="pages; 0 turns automatic checkpoints off"),
    },
    "platform": {
        "kind": Key("enum", "host", PLATFORM_KINDS),
        "arch": Key("enum", "native", ARCHES,
                    doc="native | emulated (the other of amd64/arm64) | amd64 | arm64"),
        "storage": Key("enum", None, ALL_STORAGES,
                       doc="host: local; container: bind | volume | layer | tmpfs; vm: disk"),
        "cache": Key("enum", "writeback", CACHE_MODES, doc="vm only: the data disk's cache mode"),
        "image": Key("str", "debian:bookworm-slim", axis=False,
                     doc="base image for containers and VMs"),
        "memory_mb": Key("int", 512, axis=False, minimum=128, doc="vm only"),
    },
    "workload": {
        "kind": Key("enum", "transfers", WORKLOADS),
        "rows_per_txn": Key("int", 4, minimum=1),
        "accounts": Key("int", 64, minimum=2, doc="transfers: number of accounts"),
        "payload_bytes": Key("int", 64, minimum=0),
        "checkpoint_every": Key("int", 0, minimum=0,
                                doc="run PRAGMA wal_checkpoint every N commits (0: never)"),
        "checkpoint_mode": Key("enum", "PASSIVE", CHECKPOINT_MODES, upper=True),
        "max_txns": Key("int", 0, axis=False, minimum=0,
                        doc="stop writing after N transactions (0: until the fault)"),
    },
    "fault": {
        "kind": Key("enum", "kill-writer", FAULT_KINDS),
        "after_commits": Key("range", None, minimum=0,
                             doc="strike after a seeded number of commits in [min, max]"),
        "after_ms": Key("range", None, minimum=0,
                        doc="strike a seeded number of ms in [min, max] after the first event"),
        "grace_s": Key("float", 1.0, minimum=0, doc="stop-container: SIGTERM to SIGKILL"),
        "pause_ms": Key("float", 50.0, minimum=0, doc="pause-kill: how long frozen"),
    },
}

CELL_KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]


# --------------------------------------------------------------------------- loading with lines

@dataclass
class _Doc:
    data: Any
    lines: dict[tuple, int]       # path -> 1-based line of the value
    key_lines: dict[tuple, int]   # path -> 1-based line of the key
    texts: dict = field(default_factory=dict)  # path -> a plain scalar's text as written


def _to_python(node: yaml.Node, path: tuple, doc: _Doc, problems: list[Problem], file: str):
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                problems.append(Problem(file, knode.start_mark.line + 1, _dotted(path),
                                        "mapping keys must be plain names"))
                continue
            key = knode.value
            if key in out:
                problems.append(Problem(file, knode.start_mark.line + 1,
                                        _dotted(path + (key,)), "duplicate key"))
                continue
            doc.key_lines[path + (key,)] = knode.start_mark.line + 1
            out[key] = _to_python(vnode, path + (key,), doc, problems, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, path + (i,), doc, problems, file) for i, v in enumerate(node.value)]
    if node.style is None:
        doc.texts[path] = node.value
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(str(word).lower(), [str(c).lower() for c in choices],
                                          n=1, cutoff=0.6)
        if close:
            close = [c for c in choices if str(c).lower() == close[0]]
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class Cell:
    """One point of the matrix: every key's value fixed."""

    index: int
    values: tuple[tuple[str, Any], ...]

    def __getitem__(self, dotted: str) -> Any:
        return dict(self.values)[dotted]

    def get(self, dotted: str, default=None):
        return dict(self.values).get(dotted, default)

    @property
    def journal_mode(self) -> str:
        return self["sqlite.journal_mode"]

    @property
    def synchronous(self) -> str:
        return self["sqlite.synchronous"]

    @property
    def platform(self) -> str:
        return self["platform.kind"]

    @property
    def fault(self) -> str:
        return self["fault.kind"]

    @property
    def fault_class(self) -> str:
        return FAULTS[self.fault].fault_class

    @property
    def label(self) -> str:
        """A short human name, unique within the scenario for the axes that vary."""
        v = dict(self.values)
        plat = v["platform.kind"]
        if plat != "host":
            plat += f"/{v['platform.arch']}/{v['platform.storage']}"
            if v["platform.kind"] == "vm":
                plat += f"/{v['platform.cache']}"
        return (f"{v['sqlite.journal_mode']}+{v['sqlite.synchronous']} {plat} "
                f"{v['fault.kind']} {v['workload.kind']}")

    def axes(self) -> dict:
        """The record's `cell` object: the axis values a reader filters on."""
        v = dict(self.values)
        return {
            "journal_mode": v["sqlite.journal_mode"], "synchronous": v["sqlite.synchronous"],
            "platform": v["platform.kind"], "arch": v["platform.arch"],
            "storage": v["platform.storage"], "cache": v["platform.cache"],
            "fault": v["fault.kind"], "fault_class": self.fault_class,
            "workload": v["workload.kind"], "rows_per_txn": v["workload.rows_per_txn"],
            "checkpoint_every": v["workload.checkpoint_every"],
            "after_commits": v["fault.after_commits"], "after_ms": v["fault.after_ms"],
        }


@dataclass
class Scenario:
    path: str
    name: str
    description: str
    trials: int
    seed: int
    timeout_s: float
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def trial_seed(self, cell: Cell, trial: int) -> int:
        """A seed for one trial, stable for (scenario seed, cell values, trial index)."""
        material = repr((self.seed, cell.values, trial)).encode()
        return int.from_bytes(hashlib.sha256(material).digest()[:6], "big")


# --------------------------------------------------------------------------- validation

class _Checker:
    def __init__(self, file: str, doc: _Doc):
        self.file, self.doc = file, doc
        self.problems: list[Problem] = []

    def err(self, path: tuple, message: str, at_key: bool = False) -> None:
        line = (self.doc.key_lines.get(path) if at_key else None) or self.doc.lines.get(path) \
            or self.doc.key_lines.get(path)
        self.problems.append(Problem(self.file, line, _dotted(path), message))

    def scalar(self, key: Key, value: Any, path: tuple):
        """Check one value; return it normalized, or None after recording a problem."""
        t = key.type
        if t == "str":
            if not isinstance(value, str) or not value.strip():
                return self.err(path, f"expected a non-empty string; got {value!r}")
            return value
        if t == "bool":
            if not isinstance(value, bool):
                return self.err(path, f"expected true or false; got {value!r}")
            return value
        if t in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    t == "int" and not isinstance(value, int)):
                kind = "an integer" if t == "int" else "a number"
                return self.err(path, f"expected {kind}; got {value!r}")
            if key.minimum is not None and value < key.minimum:
                return self.err(path, f"must be at least {key.minimum:g}; got {value!r}")
            return value
        if t == "enum":
            if isinstance(value, bool) and path in self.doc.texts:
                # YAML 1.1 reads OFF/ON/YES/NO as booleans; here they are names.
                value = self.doc.texts[path]
            if not isinstance(value, str):
                return self.err(path, f"expected one of {', '.join(key.choices)}; got {value!r}")
            norm = value.upper() if key.upper else value
            if norm not in key.choices:
                return self.err(path, f"expected one of {', '.join(key.choices)}; "
                                      f"got {value!r}{_suggest(value, key.choices)}")
            return norm
        if t == "range":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value, value]
            if (not isinstance(value, list) or len(value) != 2 or any(
                    isinstance(x, bool) or not isinstance(x, (int, float)) for x in value)):
                return self.err(path, f"expected a number or a pair [min, max]; got {value!r}")
            lo, hi = value
            if lo > hi:
                return self.err(path, f"min {lo} is greater than max {hi}")
            if key.minimum is not None and lo < key.minimum:
                return self.err(path, f"must be at least {key.minimum:g}; got {lo!r}")
            return (lo, hi)
        raise AssertionError(t)

    def values(self, key: Key, raw: Any, path: tuple) -> list | None:
        """A key's value(s): one value, or a list of them when the key is an axis."""
        if key.type == "range":
            # [a, b] is one range; [[a, b], [c, d]] is an axis of ranges.
            if isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
                out = [self.scalar(key, x, path + (i,)) for i, x in enumerate(raw)]
                return out if None not in out else None
            v = self.scalar(key, raw, path)
            return None if v is None else [v]
        if isinstance(raw, list):
            if not key.axis:
                self.err(path, "takes a single value, not a list")
                return None
            if not raw:
                self.err(path, "an empty list leaves no value for this axis")
                return None
            out = [self.scalar(key, x, path + (i,)) for i, x in enumerate(raw)]
            if None in out:
                return None
            if len(set(map(repr, out))) != len(out):
                self.err(path, "lists the same value twice")
            return out
        v = self.scalar(key, raw, path)
        return None if v is None else [v]

    def mapping(self, schema: dict[str, Key], raw: Any, path: tuple) -> dict[str, list] | None:
        if not isinstance(raw, dict):
            self.err(path, f"expected a mapping of {', '.join(schema)}; got {type(raw).__name__}")
            return None
        out: dict[str, list] = {}
        for k, v in raw.items():
            if k not in schema:
                self.err(path + (k,), f"unknown key{_suggest(k, schema)}; "
                                      f"expected one of {', '.join(schema)}", at_key=True)
                continue
            vals = self.values(schema[k], v, path + (k,))
            if vals is not None:
                out[k] = vals
        for k, key in schema.items():
            if k not in out and key.required and k not in raw:
                self.err(path, f"missing required key {k!r}")
        return out


def load(path: str | Path, *, trials: int | None = None, seed: int | None = None) -> Scenario:
    """Read, validate and expand one scenario file. Raises ScenarioError with every problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError([Problem(file, None, "", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(file, None, "", f"cannot read: {exc}")]) from None
    return loads(text, file, trials=trials, seed=seed)


def loads(text: str, file: str = "<scenario>", *, trials: int | None = None,
          seed: int | None = None) -> Scenario:
    problems: list[Problem] = []
    try:
        nodes = yaml.compose_all(text, Loader=yaml.SafeLoader)
        roots = list(nodes)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        msg = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError([Problem(file, mark.line + 1 if mark else None, "",
                                     f"not valid YAML: {msg}")]) from None
    if len(roots) != 1 or roots[0] is None:
        raise ScenarioError([Problem(file, 1, "", "expected one YAML document holding a mapping")])
    doc = _Doc(None, {}, {})
    doc.data = _to_python(roots[0], (), doc, problems, file)
    chk = _Checker(file, doc)
    chk.problems.extend(problems)
    data = doc.data
    if not isinstance(data, dict):
        chk.err((), "expected a mapping at the top of the file")
        raise ScenarioError(chk.problems)

    allowed = list(TOP) + list(SECTIONS) + ["exclude"]
    top: dict[str, Any] = {}
    for k, v in data.items():
        if k in TOP:
            vals = chk.values(TOP[k], v, (k,))
            if vals is not None:
                top[k] = vals[0]
        elif k not in SECTIONS and k != "exclude":
            chk.err((k,), f"unknown key{_suggest(k, allowed)}; expected one of "
                          f"{', '.join(allowed)}", at_key=True)
    if "name" not in data:
        chk.err((), "missing required key 'name'")

    # Each section: one mapping, or a list of mapping variants.
    variants: dict[str, list[dict[str, list]]] = {}
    for sec, schema in SECTIONS.items():
        raw = data.get(sec, {})
        if raw is None:
            raw = {}
        if isinstance(raw, list):
            if not raw:
                chk.err((sec,), "an empty list leaves no variant")
                continue
            got = [chk.mapping(schema, r, (sec, i)) for i, r in enumerate(raw)]
            variants[sec] = [g for g in got if g is not None]
        else:
            got1 = chk.mapping(schema, raw, (sec,))
            variants[sec] = [got1] if got1 is not None else []

    _check_section_rules(chk, data, variants)
    excludes = _check_excludes(chk, data.get("exclude"))
    if chk.problems:
        raise ScenarioError(chk.problems)

    cells, notes = _expand(variants, excludes)
    if not cells:
        chk.err(("fault", "kind") if "fault" in data else (),
                "no cell is left to run: " + ("; ".join(notes) or "every combination excluded"))
        raise ScenarioError(chk.problems)
    return Scenario(
        path=file, name=top.get("name", ""), description=top.get("description", ""),
        trials=trials if trials is not None else top.get("trials", TOP["trials"].default),
        seed=seed if seed is not None else top.get("seed", TOP["seed"].default),
        timeout_s=float(top.get("timeout_s", TOP["timeout_s"].default)),
        cells=cells, notes=notes, raw=data)


def _raw_at(data: Any, path: tuple):
    for p in path:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _check_section_rules(chk: _Checker, data: dict, variants: dict) -> None:
    """Rules that tie keys together within one variant; reported at the key's line."""
    for i, fv in enumerate(variants.get("fault", [])):
        path = ("fault", i) if isinstance(data.get("fault"), list) else ("fault",)
        if "after_commits" in fv and "after_ms" in fv:
            chk.err(path + ("after_ms",), "give after_commits or after_ms, not both",
                    at_key=True)
    for i, pv in enumerate(variants.get("platform", [])):
        path = ("platform", i) if isinstance(data.get("platform"), list) else ("platform",)
        kinds = pv.get("kind", ["host"])
        for key in ("storage", "arch", "cache"):
            if key not in pv:
                continue
            for value in pv[key]:
                fits = [k for k in kinds if _applies(k, key, value)]
                if not fits:
                    where = " or ".join(kinds)
                    chk.err(path + (key,), f"{value!r} does not apply to platform {where}"
                                           f"{_valid_hint(kinds, key)}")


def _applies(kind: str, key: str, value: Any) -> bool:
    if key == "storage":
        return value in STORAGES[kind]
    if key == "arch":
        return kind != "host" or value == "native"
    if key == "cache":
        return kind == "vm" or value == "writeback"
    return True


def _valid_hint(kinds: list, key: str) -> str:
    if key == "storage":
        return "; storage for " + "; ".join(f"{k}: {', '.join(STORAGES[k])}" for k in kinds)
    if key == "arch":
        return "; the host runs only the native arch"
    return "; the cache mode is for vm only"


def _check_excludes(chk: _Checker, raw: Any) -> list[dict[str, list]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        chk.err(("exclude",), "expected a list of mappings, e.g. "
                              "- {platform.kind: host, fault.kind: kill-container}")
        return []
    out = []
    for i, entry in enumerate(raw):
        path = ("exclude", i)
        if not isinstance(entry, dict) or not entry:
            chk.err(path, "expected a mapping of key: value(s)")
            continue
        flat: dict[str, tuple[tuple, Any]] = {}
        for k, v in entry.items():
            if isinstance(v, dict) and k in SECTIONS:
                for k2, v2 in v.items():
                    flat[f"{k}.{k2}"] = (path + (k, k2), v2)
            else:
                flat[str(k)] = (path + (k,), v)
        rule: dict[str, list] = {}
        for dotted, (p, v) in flat.items():
            sec, _, name = dotted.partition(".")
            key = SECTIONS.get(sec, {}).get(name)
            if key is None:
                chk.err(p, f"unknown key{_suggest(dotted, CELL_KEYS)}", at_key=True)
                continue
            vals = v if isinstance(v, list) and key.type != "range" else [v]
            got = [chk.scalar(key, x, p) for x in vals]
            if None not in got:
                rule[dotted] = got
        out.append(rule)
    return out


def _expand(variants: dict[str, list[dict[str, list]]], excludes: list[dict[str, list]]):
    """Cross product of every section variant's axes; drops what cannot or should not run."""
    per_section: list[list[dict[str, Any]]] = []
    for sec, schema in SECTIONS.items():
        combos: list[dict[str, Any]] = []
        for var in variants.get(sec) or [{}]:
            keys = list(schema)
            lists = [var.get(k, [schema[k].default]) for k in keys]
            for combo in itertools.product(*lists):
                combos.append({f"{sec}.{k}": v for k, v in zip(keys, combo)})
        per_section.append(combos)

    cells: list[Cell] = []
    seen: set = set()
    notes: list[str] = []
    dropped: dict[str, int] = {}
    excluded = 0
    for parts in itertools.product(*per_section):
        values: dict[str, Any] = {}
        for p in parts:
            values.update(p)
        values = _normalize(values)
        if values is None:
            continue
        reason = _incompatible(values)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        if any(all(values[k] in vs for k, vs in rule.items()) for rule in excludes):
            excluded += 1
            continue
        frozen = tuple(sorted(values.items()))
        if frozen in seen:
            continue
        seen.add(frozen)
        cells.append(Cell(len(cells), frozen))
    for reason, n in dropped.items():
        notes.append(f"{n} combination(s) skipped: {reason}")
    if excluded:
        notes.append(f"{excluded} combination(s) excluded by exclude:")
    return cells, notes


def _normalize(values: dict[str, Any]) -> dict[str, Any] | None:
    """Fill per-platform defaults; collapse keys that do not apply to the platform."""
    kind = values["platform.kind"]
    storage = values["platform.storage"]
    if storage is None:
        values["platform.storage"] = STORAGES[kind][0]
    elif storage not in STORAGES[kind]:
        # Another platform of the same variant uses this value; this platform keeps its own.
        if STORAGES[kind][0] != storage and len(STORAGES[kind]) == 1:
            values["platform.storage"] = STORAGES[kind][0]
        else:
            return None
    if kind == "host":
        values["platform.arch"] = "native"
    if kind != "vm":
        values["platform.cache"] = None
        values["platform.memory_mb"] = None
    if kind == "host" or kind == "vm":
        values["platform.image"] = values["platform.image"] if kind == "vm" else None
    if values["fault.after_commits"] is None and values["fault.after_ms"] is None:
        values["fault.after_commits"] = (20, 400)
    if values["sqlite.journal_mode"] != "WAL":
        values["sqlite.wal_autocheckpoint"] = None
    return values


def _incompatible(values: dict[str, Any]) -> str | None:
    fault = FAULTS[values["fault.kind"]]
    kind = values["platform.kind"]
    if kind not in fault.platforms:
        return f"fault {fault.name} needs platform {' or '.join(fault.platforms)}, not {kind}"
    if values["platform.storage"] == "tmpfs" and fault.name in CONTAINER_ENDING:
        return f"a tmpfs does not outlive the container, so {fault.name} cannot be judged on it"
    return None
