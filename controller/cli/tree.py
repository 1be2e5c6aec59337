"""``bhctl get NAME -w``: one plugin's rollout as a tree, as ``kubectl argo rollouts get
rollout --watch`` draws one: its revisions with their color, version and instance, the
share of calls each takes, the analyses and their measurements, and which color is
active and which is previewed."""

from __future__ import annotations

from typing import Any

from controller.spec import rollout as rollout_model


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
    nodes: list[Node] = []
    for branch in rollout_model.branches(status, revisions):
        revision = branch.revision if branch.revision is not None else "-"
        label = f"revision {revision}  {branch.color}  {branch.version}  weight {branch.weight}%"
        label += "".join(f"  [{m}]" for m in branch.marks)
        children: list[Any] = [_instance(record) for record in branch.instances]
        children += [_analysis(run) for run in branch.analyses]
        nodes.append((label, children))
    return nodes


def _instance(record: dict[str, Any]) -> Node:
    state = [record.get("state", "?"), "ready" if record.get("ready") else "not ready"]
    if record.get("restarts"):
        state.append(f"{int(record['restarts'])} restart(s)")
    name = record["color"] + (f"-{record['replica']}" if record.get("replica") else "")
    return (f"instance {name}: {', '.join(state)}", [])


def _analysis(run: dict[str, Any]) -> Node:
    measurements: list[Node] = [
        (rollout_model.measurement(m), []) for m in run.get("measurements", [])
    ]
    return (f"analysis {run['at']}: {run['phase']}", measurements)


def _draw(node: Node, prefix: str, last: bool) -> list[str]:
    label, children = node
    lines = [f"{prefix}{'└── ' if last else '├── '}{label}"]
    inner = prefix + ("    " if last else "│   ")
    for index, child in enumerate(children):
        lines += _draw(child, inner, index == len(children) - 1)
    return lines
