"""What the engine says of a container, as an :class:`Instance`, and the cache of what it said.

Like an informer's cache: while the engine's event stream runs, any event of
a container drops what is known of it, and so do the backend's own writes;
entries also expire after :data:`SEEN_SECONDS`. Passes that find nothing
changed then cost the engine nothing, which matters when hundreds of
instances are being started. One list of the engine's containers, when its
events begin to be followed, says which names are no container: a new
plugin's first pass inspects nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from controller.runtimes import base

SEEN_SECONDS = 30.0
"""Longest an inspection is reused while events are followed."""


class InspectionCache:
    """Inspections by container name, kept only while the engine's events are followed."""

    def __init__(self) -> None:
        self.following = False
        """Whether the engine's events are being followed (so inspections may be reused)."""
        self._seen: dict[str, tuple[float, base.Instance | None]] = {}
        self._changed: dict[str, float] = {}
        """When each container last changed, by an event or by this backend."""
        self._listed: tuple[float, frozenset[str]] | None = None
        """When the engine listed every container of ours, and their names: any other name
        is no container, unless it changed since."""

    def get(self, name: str) -> tuple[bool, base.Instance | None]:
        """(whether it is known, the instance or None for "no such container")."""
        seen = self._seen.get(name)
        if seen is not None and time.monotonic() - seen[0] < SEEN_SECONDS:
            return True, seen[1]
        listed = self._listed
        if (
            listed is not None
            and name not in listed[1]
            and self._changed.get(name, 0.0) < listed[0]
        ):
            return True, None
        return False, None

    def listed(self, stamp: float, names: Iterable[str]) -> None:
        """The engine's list, asked for at ``stamp``, of all the containers of ours: a new
        plugin's names then cost no inspection each, for as long as events are followed.

        This knowledge does not expire: were an event missed, the create of a container
        thought absent fails on its name, and that start forgets it."""
        if self.following:
            self._listed = (stamp, frozenset(names))

    def remember(self, name: str, stamp: float, instance: base.Instance | None) -> None:
        """What the engine said of ``name`` when asked at ``stamp``."""
        # Only while events are followed, and only if no event came while the engine answered.
        if self.following and self._changed.get(name, 0.0) < stamp:
            self._seen[name] = (stamp, instance)

    def forget(self, name: str) -> None:
        """``name`` changed: what was known of it is old."""
        self._seen.pop(name, None)
        self._changed[name] = time.monotonic()

    def stop_following(self) -> None:
        self.following = False
        self._seen.clear()
        self._listed = None


def row_name(row: Mapping[str, Any]) -> str:
    """The name of a container in the engine's list."""
    names = row.get("Names") or [""]
    return str(names[0]).lstrip("/")


def instance_from_row(row: Mapping[str, Any]) -> base.Instance:
    """A running container from the engine's list (which says all a running one needs)."""
    created = datetime.fromtimestamp(int(row.get("Created") or 0), UTC)
    labels = row.get("Labels") or {}
    return base.instance_from_labels(
        row_name(row), labels, row.get("Id", ""), base.InstanceState.RUNNING, started_at=created
    )


_STATES = {
    "running": base.InstanceState.RUNNING,
    "paused": base.InstanceState.PAUSED,
    "created": base.InstanceState.CREATED,
    "configured": base.InstanceState.CREATED,
    "initialized": base.InstanceState.CREATED,
    "exited": base.InstanceState.EXITED,
    "stopped": base.InstanceState.EXITED,
    "dead": base.InstanceState.EXITED,
}


def instance_from_inspect(attrs: Mapping[str, Any]) -> base.Instance:
    """The instance an engine's ``inspect`` of a container describes."""
    state = attrs.get("State") or {}
    status = _STATES.get(str(state.get("Status", "")).lower(), base.InstanceState.UNKNOWN)
    exit_code = state.get("ExitCode")
    return base.instance_from_labels(
        str(attrs.get("Name", "")).lstrip("/"),
        (attrs.get("Config") or {}).get("Labels") or {},
        str(attrs.get("Id", "")),
        status,
        exit_code=None if status is not base.InstanceState.EXITED else exit_code,
        oom_killed=bool(state.get("OOMKilled")),
        started_at=_timestamp(state.get("StartedAt")),
        finished_at=_timestamp(state.get("FinishedAt")),
        pid=int(state.get("Pid") or 0) or None,
    )


def _timestamp(text: object) -> datetime | None:
    """An engine's RFC 3339 time (nanoseconds, Z or offset); None for the zero time."""
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text)
    if match is None:
        return None
    fraction = (match[2] or ".0")[:7]
    zone = "+00:00" if match[3] in (None, "Z") else match[3]
    return datetime.fromisoformat(f"{match[1]}{fraction}{zone}")
