"""A plugin's rollout as its views draw it (``bhctl get NAME -w`` and the dashboard): each
color that has instances, with the revision it runs, the share of calls it takes, its
marks (active, preview, canary), its instances and, for a swap's new color, the analyses
run on it. Computed from a plugin document's status and ``bhctl swap history``'s
revisions, so that both views say the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIVE = "active"
"""The color that serves calls."""
PREVIEW = "preview"
"""A swap's new color before promotion, reached only by preview calls."""
CANARY = "canary"
"""A canary's new color, taking its weight of the calls."""


@dataclass(frozen=True)
class Branch:
    """One color of a plugin's rollout."""

    color: str
    version: str
    revision: int | None
    weight: int
    """The percentage of calls it takes."""
    marks: tuple[str, ...]
    instances: list[dict[str, Any]] = field(default_factory=list)
    """Its status instance records (one per replica), in replica order."""
    analyses: list[dict[str, Any]] = field(default_factory=list)
    """The analysis runs of the swap to it (finished ones, then the running one)."""


def branches(status: dict[str, Any], revisions: list[dict[str, Any]]) -> list[Branch]:
    """The colors of ``status`` that have instances, the active one first."""
    swap = status.get("swap")
    active = status.get("activeColor")
    by_hash = {r.get("specHash"): r.get("revision") for r in revisions}
    replicas: dict[str, list[dict[str, Any]]] = {}
    for record in status.get("instances", []):
        replicas.setdefault(record["color"], []).append(record)
    weight = swap.get("weight") if swap else None
    found = []
    for color in sorted(replicas, key=lambda c: (c != active, c)):
        records = sorted(replicas[color], key=lambda r: int(r.get("replica") or 0))
        marks: list[str] = []
        revision, share = None, None
        new = swap is not None and color == swap.get("toColor")
        if swap is not None and new:
            revision = by_hash.get(swap.get("toHash"))
            if weight is not None and color != active:
                marks.append(CANARY)
                share = weight
            elif color != active:
                marks.append(PREVIEW)
        elif swap is not None and color == swap.get("fromColor"):
            revision = by_hash.get(swap.get("fromHash"))
            if weight is not None and color == active:
                share = 100 - weight
        elif color == active and revisions:
            revision = revisions[-1].get("revision")
        if color == active:
            marks.insert(0, ACTIVE)
            if share is None:
                share = 100
        elif share is None:
            share = 0
        analyses: list[dict[str, Any]] = []
        if new and swap is not None:
            analyses = [*swap.get("analyses", [])]
            if swap.get("analysis"):
                analyses.append(swap["analysis"])
        found.append(
            Branch(
                color=color,
                version=str(records[0].get("version", "?")),
                revision=revision,
                weight=int(share),
                marks=tuple(marks),
                instances=records,
                analyses=analyses,
            )
        )
    return found


def measurement(m: dict[str, Any]) -> str:
    """One analysis measurement in words: its phase, counts and last value."""
    said = f"{m['name']}: {m['phase']}, {m.get('measured', 0)} measured"
    if m.get("failures"):
        said += f", {m['failures']} failed"
    if m.get("inconclusive"):
        said += f", {m['inconclusive']} inconclusive"
    if m.get("value") is not None:
        said += f", last {m['value']:g}"
    return said
