"""The oracle: from the writer's events and the verifier's census, one verdict.

It knows nothing of platforms: only what was begun, what was acknowledged, what the database
holds after the fault, and what the configuration promises (:mod:`harness.guarantees`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from .guarantees import Guarantee


@dataclass
class Judgement:
    verdict: str
    expected: list[str]
    violation: bool
    acked: int
    begun: int
    in_flight: int
    present: int
    lost_acked: int
    lost_acked_txns: list[int] = field(default_factory=list)
    in_flight_applied: int = 0
    partial_txns: dict[str, int] = field(default_factory=dict)
    phantom_txns: list[int] = field(default_factory=list)
    integrity: list[str] | None = None
    invariant_ok: bool | None = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def expand(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for a, b in ranges:
        out.update(range(int(a), int(b) + 1))
    return out


def summarize_events(events: Iterable[dict]) -> tuple[set[int], set[int]]:
    """(begun, acknowledged) transaction ids from a writer's event stream."""
    begun: set[int] = set()
    acked: set[int] = set()
    for ev in events:
        kind = ev.get("ev")
        if kind == "begin":
            begun.add(int(ev["txn"]))
        elif kind == "ack":
            acked.add(int(ev["txn"]))
    return begun, acked


def judge(events: Iterable[dict], census: dict | None, promise: Guarantee,
          harness_error: str | None = None) -> Judgement:
    """Judge one trial.

    Args:
        events: every event the writer printed (ready, begin, ack, ...).
        census: what the verifier printed after the fault, or None if it could not run.
        promise: the guarantee of the trial's configuration under its fault class.
        harness_error: set when the harness itself failed; the verdict is then ``error``.
    """
    begun, acked = summarize_events(events)
    # An ack without its begin still counts as begun (an event lost on the way).
    begun |= acked
    expected = sorted(promise.allowed)
    base = dict(expected=expected, acked=len(acked), begun=len(begun),
                in_flight=len(begun - acked))
    if harness_error or census is None:
        return Judgement(verdict="error", violation=False, present=0, lost_acked=0,
                         reasons=[harness_error or "no census from the verifier"], **base)

    present = expand(census.get("present") or [])
    partial = {str(k): int(v) for k, v in (census.get("partial") or {}).items()}
    integrity = census.get("integrity")
    invariant = census.get("invariant") or {}
    lost = sorted(acked - present)
    phantom = sorted(present - begun)
    reasons: list[str] = []

    if not census.get("opened"):
        verdict = "corrupt"
        reasons.append(f"database does not open: {census.get('error')}")
    elif census.get("error"):
        verdict = "corrupt"
        reasons.append(f"database unreadable: {census['error']}")
    elif integrity != ["ok"]:
        verdict = "corrupt"
        reasons.append("integrity_check: " + "; ".join((integrity or ["no result"])[:3]))
    elif phantom:
        verdict = "corrupt"
        reasons.append(f"{len(phantom)} transaction(s) present that were never begun, "
                       f"first {phantom[:5]}")
    elif partial or invariant.get("ok") is False:
        verdict = "torn"
        if partial:
            reasons.append(f"half-applied transaction(s): {dict(list(partial.items())[:5])} rows")
        if invariant.get("ok") is False:
            reasons.append(f"invariant broken: {invariant}")
    elif lost:
        verdict = "lost" if promise.durable else "lost-allowed"
        reasons.append(f"{len(lost)} acknowledged commit(s) missing, txn {lost[0]}..{lost[-1]}")
    else:
        verdict = "intact"

    return Judgement(
        verdict=verdict, violation=verdict not in promise.allowed, present=len(present),
        lost_acked=len(lost), lost_acked_txns=lost[:50],
        in_flight_applied=len((begun - acked) & present),
        partial_txns=partial, phantom_txns=phantom[:50], integrity=integrity,
        invariant_ok=invariant.get("ok") if invariant else None, reasons=reasons, **base)
