"""A plugin's conditions, and its phase as a function of them.

Conditions follow apimachinery's ``SetStatusCondition``: a condition's
``lastTransitionTime`` moves only when its status flips, so a status
recomputed by every pass compares equal to the stored one unless something
really changed, and is written only then.

A pass says what it found as one :class:`Finding`; the conditions are made
from it, and the phase is read from the conditions by :func:`phase_of`, so
the two can never disagree:

========== =====================================================
Failed     ``Stalled`` is True: nothing changes until the spec does
Swapping   ``Progressing`` is True with a swap's reason
Degraded   ``Degraded`` is True
Running    ``Ready`` is True
Pending    otherwise
========== =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from controller.database import EventType
from controller.spec import models

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
STALLED = "Stalled"
"""True when the plugin cannot get anywhere until its spec changes (kstatus' Stalled)."""
PINNED = "Pinned"
UNENFORCED = "Unenforced"
"""True while the runtime cannot enforce part of the spec (``resources.pids`` on
Kubernetes, say): a warning, not a failure."""

SWAP_REASONS = frozenset(
    {"SwapStarting", "SwapAwaitingPromotion", "SwapPromoted", "CanaryPaused", "Analyzing"}
)
"""The reasons of ``Progressing`` while a swap is under way."""

ConditionStatus = Literal["True", "False", "Unknown"]

__all__ = [
    "DEGRADED",
    "PINNED",
    "PROGRESSING",
    "READY",
    "STALLED",
    "SWAP_REASONS",
    "UNENFORCED",
    "ConditionStatus",
    "EventType",
    "Finding",
    "find",
    "finding_of",
    "is_true",
    "phase_of",
    "set_condition",
]


@dataclass(frozen=True)
class Finding:
    """What one pass found of a plugin: all its Ready, Progressing, Degraded and Stalled say."""

    ready: ConditionStatus
    reason: str
    message: str
    progressing: tuple[str, str] | None = None
    """(reason, message) while the controller is still at work on it; None: it is done."""
    degraded: tuple[str, str] | None = None
    """(reason, message) while it runs worse than declared."""
    stalled: bool = False
    """Whether it cannot get anywhere until its spec changes (phase Failed)."""


UNKNOWN = Finding("Unknown", "NotObserved", "the controller has not looked at it yet")


def finding_of(conditions: list[models.Condition]) -> Finding:
    """What the stored ``conditions`` say, as a finding: a pass starts from it, so a step
    that has nothing new to say leaves the conditions as they were."""
    ready = find(conditions, READY)
    if ready is None:
        return UNKNOWN
    progressing = find(conditions, PROGRESSING)
    degraded = find(conditions, DEGRADED)
    return Finding(
        ready.status,
        ready.reason,
        ready.message,
        (progressing.reason, progressing.message)
        if progressing is not None and progressing.status == "True"
        else None,
        (degraded.reason, degraded.message)
        if degraded is not None and degraded.status == "True"
        else None,
        is_true(conditions, STALLED),
    )


def set_condition(
    conditions: list[models.Condition],
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime | None = None,
) -> list[models.Condition]:
    """``conditions`` with ``type`` set; the transition time kept unless the status flips."""
    previous = next((c for c in conditions if c.type == type), None)
    changed_at = (
        previous.last_transition_time
        if previous is not None and previous.status == status
        else (now or datetime.now(UTC))
    )
    condition = models.Condition(
        type=type,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=changed_at,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type] + [condition]


def find(conditions: list[models.Condition], type: str) -> models.Condition | None:
    return next((c for c in conditions if c.type == type), None)


def is_true(conditions: list[models.Condition], type: str) -> bool:
    condition = find(conditions, type)
    return condition is not None and condition.status == "True"


def phase_of(conditions: list[models.Condition]) -> models.Phase:
    """The phase the conditions say (the table above)."""
    if is_true(conditions, STALLED):
        return models.Phase.FAILED
    progressing = find(conditions, PROGRESSING)
    if (
        progressing is not None
        and progressing.status == "True"
        and (progressing.reason in SWAP_REASONS)
    ):
        return models.Phase.SWAPPING
    if is_true(conditions, DEGRADED):
        return models.Phase.DEGRADED
    if is_true(conditions, READY):
        return models.Phase.RUNNING
    return models.Phase.PENDING
