"""The columns of ``bhctl get``, computed from the admin API's plugin documents.

One definition for the command line (:mod:`controller.cli.control`) and the
dashboard (:mod:`controller.dashboard`), so that both show the same thing. It
imports the standard library only: ``bhctl get`` stays quick to start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def condition(document: dict[str, Any], type_: str) -> dict[str, Any]:
    for condition in (document.get("status") or {}).get("conditions", []):
        if condition["type"] == type_:
            return dict(condition)
    return {}


def age(since: str | None) -> str:
    if not since:
        return "-"
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


STEP_SHOWN = {
    "AwaitingPromotion": "awaiting promotion",
    "Promoting": "promoting",
    "Analyzing": "analyzing",
}


def declared_if_other(item: dict[str, Any]) -> str | None:
    """The declared version of a plugin when what runs is another one (None: the same)."""
    declared = item["spec"].get("version")
    running = (item.get("status") or {}).get("activeVersion")
    if declared is None or running is None or str(declared) == str(running):
        return None
    return str(declared)


def columns(items: list[dict[str, Any]], wide: bool, declared: bool) -> list[str]:
    columns = ["NAME", "VERSION", "PHASE", "READY", "RESTARTS", "ACTIVE", "AGE"]
    if declared:
        columns.insert(2, "DECLARED")
    if wide:
        columns += ["IMAGE", "REASON", "MESSAGE"]
    return columns


def row(item: dict[str, Any], columns: list[str]) -> list[str]:
    status = item.get("status") or {}
    ready = condition(item, "Ready")
    phase = status.get("phase", "Pending")
    swap = status.get("swap") or {}
    step = swap.get("step")
    shown = STEP_SHOWN.get(step or "")
    if step == "Canary":
        shown = f"canary {swap.get('weight') or 0}%"
    values = {
        "NAME": item["metadata"]["name"],
        "VERSION": str(status.get("activeVersion") or "-"),  # what runs, not what is declared
        "DECLARED": declared_if_other(item) or "",
        "PHASE": f"{phase} ({shown})" if shown else phase,
        "READY": ready.get("status", "Unknown"),
        "RESTARTS": str(sum(i.get("restarts", 0) for i in status.get("instances", []))),
        "ACTIVE": status.get("activeColor", "-"),
        "AGE": age(ready.get("lastTransitionTime")),
        "IMAGE": _image(item["spec"]),
        "REASON": ready.get("reason", "-"),
        "MESSAGE": (ready.get("message", "").splitlines() or [""])[0],
    }
    return [values[c] for c in columns]


def _image(spec: dict[str, Any]) -> str:
    """What runs: the image, ``remote ADDRESS`` for a plugin the controller does not run,
    else the bundle."""
    remote = spec.get("remote")
    if not spec.get("image") and isinstance(remote, dict):
        return f"remote {remote.get('address', '')}"
    return str(spec.get("image") or spec.get("bundle", "-"))
