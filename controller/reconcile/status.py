"""A plugin's status, computed once per write from what the pass found.

:func:`compute` is a pure function: the status as stored before the pass,
the record fields the pass's steps set (instances, active color, swaps,
restores) and the pass's :class:`~controller.spec.conditions.Finding`, plus
what holds beside it (a dependency that is not Ready, a swap that rolled
back, a pinned spec, resource violations). Every condition is set against
the stored one, so its ``lastTransitionTime`` moves only when its status
flips; the phase is read from the conditions
(:func:`~controller.spec.conditions.phase_of`). The reconciler writes the
result only when it differs from what is stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from controller.metrics import violations
from controller.reconcile import gates
from controller.spec import conditions, models
from controller.spec.conditions import Finding

RECONCILED = ("Reconciled", "observed state matches the spec")
VIOLATIONS = frozenset(violations.KINDS)


@dataclass(frozen=True)
class Beside:
    """What holds beside the pass's finding."""

    waiting: gates.Blocked | None = None
    """A dependency keeps a running plugin from being Ready."""
    held_back: bool = False
    """The old version serves because the swap to the declared one rolled back."""
    pinned: tuple[str, str] | None = None
    """(the version that runs, the declared one) while ``bhctl swap undo`` pins a spec."""
    violations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Resource violations that hold now (kind to message)."""
    unenforced: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Spec fields the runtime cannot enforce (field to why)."""


def compute(
    stored: models.PluginStatus,
    record: models.PluginStatus,
    finding: Finding,
    beside: Beside,
    generation: int,
    now: datetime,
) -> models.PluginStatus:
    """The status to write: ``record``'s fields, and conditions and phase from the rest."""
    ready, reason, message = finding.ready, finding.reason, finding.message
    progressing, degraded = finding.progressing, finding.degraded
    if finding.stalled:  # it serves nothing it should, and needs a change of spec
        ready = "False"
        degraded = degraded or (reason, message)
    waiting = beside.waiting
    if waiting is not None and ready == "True":
        ready, reason, message = "False", waiting.reason, waiting.message
    last = record.last_swap
    if beside.held_back and last is not None and record.swap is None:
        why = last.reason or "SwapRolledBack"
        said = (
            last.message
            or f"the swap to {last.to_version} rolled back ({why}); {last.from_version} serves "
            "until the spec changes"
        )
        degraded = degraded or (why, said)
        progressing_false = (
            why,
            f"{last.from_version} serves, not the declared {last.to_version}, until the spec "
            "changes or bhctl swap retry",
        )
    elif beside.pinned is not None:
        running, declared = beside.pinned
        progressing_false = (
            "SwapUndone",
            f"runs {running} (bhctl swap undo), not the declared {declared}, until the spec "
            "changes",
        )
    else:
        progressing_false = RECONCILED

    found = list(stored.conditions)

    def put(type: str, status: conditions.ConditionStatus, why: str, text: str) -> None:
        nonlocal found
        found = conditions.set_condition(found, type, status, why, text, generation, now)

    put(conditions.READY, ready, reason, message)
    if progressing is not None:
        put(conditions.PROGRESSING, "True", *progressing)
    else:
        put(conditions.PROGRESSING, "False", *progressing_false)
    if degraded is not None:
        put(conditions.DEGRADED, "True", *degraded)
    else:
        put(conditions.DEGRADED, "False", "AsExpected", "")
    if finding.stalled:
        put(conditions.STALLED, "True", reason, message)
    elif conditions.find(found, conditions.STALLED) is not None:
        put(conditions.STALLED, "False", "Progressing", "")
    if beside.pinned is not None:
        running, declared = beside.pinned
        put(conditions.PINNED, "True", "SwapUndone",
            f"runs {running} (bhctl swap undo), not the declared {declared}, until the spec "
            "changes")  # fmt: skip
    elif conditions.is_true(found, conditions.PINNED):
        put(conditions.PINNED, "False", "SpecChanged", "")
    if beside.unenforced:
        said = "; ".join(f"{name}: {why}" for name, why in sorted(beside.unenforced.items()))
        put(conditions.UNENFORCED, "True", "NotEnforced", said)
    elif conditions.is_true(found, conditions.UNENFORCED):
        put(conditions.UNENFORCED, "False", "Enforced", "")
    for kind, text in beside.violations.items():
        put(kind, "True", kind, text)
    for condition in list(found):
        if (
            condition.type not in beside.violations
            and condition.type in VIOLATIONS
            and condition.status == "True"
        ):
            put(condition.type, "False", "Resolved", "")
    status = record.model_copy(deep=True)
    status.conditions = found
    status.phase = conditions.phase_of(found)
    status.observed_generation = generation
    return status


def flips(
    before: list[models.Condition], after: list[models.Condition], types: frozenset[str]
) -> list[tuple[str, bool, str]]:
    """The conditions of ``types`` whose status flipped: (type, now True, message)."""
    changed = []
    for condition in after:
        if condition.type not in types:
            continue
        old = conditions.find(before, condition.type)
        was = old is not None and old.status == "True"
        now = condition.status == "True"
        if was != now:
            changed.append((condition.type, now, condition.message))
    return changed
