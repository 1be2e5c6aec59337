"""``bhctl get NAME -w``: one plugin's rollout as a tree, as ``kubectl argo rollouts get
rollout --watch`` draws one: its revisions with their color, version and instance, the
share of calls each takes, the analyses and their measurements, and which color is
active and which is previewed."""

from __future__ import annotations

from typing import Any

SERVING = "active"
PREVIEW = "preview"
CANARY = "canary"


def rollout(document: dict[str, Any], revisions: list[dict[str, Any]]) -> list[str]:
    """The lines of ``document``'s tree (``revisions``: ``bhctl swap history``'s entries)."""
    metadata, spec = document["metadata"], document.get("spec") or {}
    status = document.get("status") or {}
    swap = status.get("swap")
    hot_swap = spec.get("hotSwap") or {}
    steps = (hot_swap.get("canary") or {}).get("steps") or []
    lines = [
        f"Name:        {metadata['name']}",
        f"Phase:       {status.get('phase', 'Pending')}" + _why(status),
        f"Strategy:    {hot_swap.get('strategy', 'BlueGreen')}",
    ]
    if swap is not None:
        lines.append(
            f"Swap:        {swap.get('fromVersion')} -> {swap.get('toVersion')}: {swap['step']}"
        )
        if swap["step"] == "Canary" and steps:
            at = min(int(swap.get("canaryStep") or 0), len(steps) - 1)
            lines.append(f"  Step:      {at + 1}/{len(steps)} ({_step(steps[at])})")
        if swap.get("weight") is not None:
            lines.append(f"  Weight:    {swap['weight']}%")
    last = status.get("lastSwap")
    if last and swap is None:
        reason = f" ({last['reason']})" if last.get("reason") else ""
        ended = f"{last.get('from')} -> {last.get('to')}: {last['result']}{reason}"
        lines.append(f"Last swap:   {ended}")
    lines += ["", f"plugin {metadata['name']}"]
    branches = _branches(status, revisions)
    for index, branch in enumerate(branches):
        lines += _draw(branch, "", index == len(branches) - 1)
    if not branches:
        lines.append("└── no instance runs")
    return lines


def _why(status: dict[str, Any]) -> str:
    progressing = next(
        (c for c in status.get("conditions", []) if c.get("type") == "Progressing"), None
    )
    if progressing and progressing.get("status") == "True" and progressing.get("message"):
        return f" ({progressing.get('reason')}: {progressing['message']})"
    return ""


def _step(step: dict[str, Any]) -> str:
    if "setWeight" in step and step["setWeight"] is not None:
        return f"setWeight {step['setWeight']}"
    if step.get("pause") is not None:
        duration = step["pause"].get("durationSeconds")
        return "pause " + (f"{duration}s" if duration is not None else "until promoted")
    metrics = (step.get("analysis") or {}).get("metrics") or []
    return "analysis " + (", ".join(metrics) or "(all)")


Node = tuple[str, list[Any]]
"""A line and the nodes under it."""


def _branches(status: dict[str, Any], revisions: list[dict[str, Any]]) -> list[Node]:
    swap = status.get("swap")
    active = status.get("activeColor")
    by_hash = {r.get("specHash"): r.get("revision") for r in revisions}
    instances = {i["color"]: i for i in status.get("instances", [])}
    weight = swap.get("weight") if swap else None
    branches = []
    for color in sorted(instances, key=lambda c: (c != active, c)):
        instance = instances[color]
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
            marks.insert(0, SERVING)
            if share is None:
                share = 100
        elif share is None:
            share = 0
        label = f"revision {revision if revision is not None else '-'}  {color}  "
        label += f"{instance.get('version', '?')}  weight {share}%"
        label += "".join(f"  [{m}]" for m in marks)
        state = [instance.get("state", "?"), "ready" if instance.get("ready") else "not ready"]
        if instance.get("restarts"):
            state.append(f"{int(instance['restarts'])} restart(s)")
        children: list[Any] = [(f"instance {color}: {', '.join(state)}", [])]
        if new and swap is not None:
            runs = [*swap.get("analyses", [])]
            if swap.get("analysis"):
                runs.append(swap["analysis"])
            children += [_analysis(run) for run in runs]
        branches.append((label, children))
    return branches


def _analysis(run: dict[str, Any]) -> Node:
    measurements: list[Node] = []
    for m in run.get("measurements", []):
        said = f"{m['name']}: {m['phase']}, {m.get('measured', 0)} measured"
        if m.get("failures"):
            said += f", {m['failures']} failed"
        if m.get("inconclusive"):
            said += f", {m['inconclusive']} inconclusive"
        if m.get("value") is not None:
            said += f", last {m['value']:g}"
        measurements.append((said, []))
    return (f"analysis {run['at']}: {run['phase']}", measurements)


def _draw(node: Node, prefix: str, last: bool) -> list[str]:
    label, children = node
    lines = [f"{prefix}{'└── ' if last else '├── '}{label}"]
    inner = prefix + ("    " if last else "│   ")
    for index, child in enumerate(children):
        lines += _draw(child, inner, index == len(children) - 1)
    return lines
