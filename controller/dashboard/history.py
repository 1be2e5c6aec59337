"""What the dashboard's charts show: each instance's resource use and each plugin's swap
pauses over time, sampled from the controller's own readings (the admin API's ``top``
and the plugins' status) while the controller runs.

Bounded: :data:`KEPT` samples per instance and per plugin, the oldest dropped first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

KEPT = 360
"""Samples kept per series: 30 minutes at the default interval."""
INTERVAL = 5.0
"""Seconds between two samples."""


@dataclass(frozen=True)
class Usage:
    """One reading of an instance's cgroup."""

    time: float
    """Wall-clock seconds."""
    cpu_cores: float
    memory_bytes: int
    memory_limit_bytes: int | None


@dataclass(frozen=True)
class Pause:
    """How long one swap held calls, and how it ended."""

    time: float
    milliseconds: float
    result: str
    to_version: str


@dataclass
class History:
    """The series of every instance and plugin seen, filled by :meth:`run`."""

    top: Callable[[], Awaitable[list[dict[str, Any]]]]
    """Every running instance's readings (the admin API's ``GET /v1/top``)."""
    listing: Callable[[], Awaitable[dict[str, Any]]]
    """Every plugin's document (the admin API's ``GET /v1/plugins``)."""
    interval: float = INTERVAL
    usage: dict[tuple[str, str], collections.deque[Usage]] = field(default_factory=dict)
    """By (plugin key, color)."""
    pauses: dict[str, collections.deque[Pause]] = field(default_factory=dict)
    """By plugin key."""

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed reading must not end the charts
                log.exception("dashboard sample failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def sample(self) -> None:
        now = time.time()
        for row in await self.top():
            key = _key(row["plugin"], row.get("namespace"))
            series = self.usage.setdefault((key, row["color"]), collections.deque(maxlen=KEPT))
            series.append(
                Usage(
                    now,
                    float(row["cpuCores"]),
                    int(row["memoryWorkingSetBytes"]),
                    row.get("memoryLimitBytes"),
                )
            )
        for item in (await self.listing())["items"]:
            self._note_swap(item)

    def _note_swap(self, item: dict[str, Any]) -> None:
        metadata = item["metadata"]
        last = (item.get("status") or {}).get("lastSwap") or {}
        if last.get("pauseMilliseconds") is None or not last.get("time"):
            return
        when = datetime.fromisoformat(last["time"]).timestamp()
        series = self.pauses.setdefault(
            _key(metadata["name"], metadata.get("namespace")), collections.deque(maxlen=KEPT)
        )
        if series and series[-1].time >= when:
            return
        series.append(
            Pause(when, float(last["pauseMilliseconds"]), last["result"], str(last.get("to")))
        )

    def usage_of(self, key: str) -> dict[str, list[Usage]]:
        """The readings of ``key``'s instances, by color."""
        return {color: list(s) for (k, color), s in sorted(self.usage.items()) if k == key}

    def version(self, key: str) -> tuple[int, ...]:
        """Changes whenever a sample of ``key`` is added (to know when to draw again)."""
        usage = [s[-1].time for (k, _), s in sorted(self.usage.items()) if k == key and s]
        pauses = self.pauses.get(key)
        return (*(int(t * 1000) for t in usage), len(pauses) if pauses else 0)

    def pauses_of(self, key: str) -> list[Pause]:
        return list(self.pauses.get(key, ()))


def _key(name: str, namespace: str | None) -> str:
    return f"{namespace}/{name}" if namespace else name
