"""Conditions in the manner of apimachinery's ``SetStatusCondition``.

A condition's ``lastTransitionTime`` moves only when its status flips, so
that a status recomputed by every pass compares equal to the stored one
unless something really changed; the reconciler writes status only then.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from controller.spec import models

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"

ConditionStatus = Literal["True", "False", "Unknown"]


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
