"""Resource violations: near the memory limit, CPU-throttled, OOM-killed, restarting in bursts.

:meth:`Violations.evaluate` runs every few seconds over the cgroup readings
of the tracked instances; the reconciler reports OOM kills and restarts.
A violation that begins is counted in ``blackhole_resource_violations_total``
and its plugin is queued: the reconcile pass turns the active violations
into conditions (``MemoryNearLimit``, ``CPUThrottled``, ``OOMKilled``,
``RestartBurst``) and events. The thresholds are the controller's settings
(``bhctl run --memory-alert-share`` and the like).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controller import cgroups
from controller.metrics import telemetry
from controller.spec.keys import plugin_key

KINDS = telemetry.VIOLATION_KINDS


@dataclass(frozen=True)
class Thresholds:
    memory_share: float = 0.9
    """Memory working set above this share of the limit ..."""
    memory_seconds: float = 60.0
    """... for this long is MemoryNearLimit."""
    throttled_ratio: float = 0.25
    """A share of CFS periods throttled between two evaluations above this is CPUThrottled."""
    restart_burst: int = 3
    """This many restarts ..."""
    burst_seconds: float = 300.0
    """... within this window is RestartBurst; an OOM kill counts as OOMKilled this long."""


@dataclass
class _Active:
    message: str
    until: float | None = None
    """When it ends by itself (OOM kills and restart bursts); None: while the reading says so."""


@dataclass
class _Seen:
    above_since: float | None = None
    periods: int = 0
    throttled: int = 0


@dataclass
class Violations:
    metrics: telemetry.Metrics
    thresholds: Thresholds = field(default_factory=Thresholds)
    clock: Callable[[], float] = time.monotonic
    active: dict[str, dict[str, _Active]] = field(
        default_factory=lambda: collections.defaultdict(dict)
    )
    _seen: dict[str, _Seen] = field(default_factory=lambda: collections.defaultdict(_Seen))
    _restarts: dict[str, collections.deque[float]] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )

    def read(self) -> dict[str, tuple[telemetry.Tracked, cgroups.Reading]]:
        """Every tracked instance's reading: file reads only, safe to run in a thread."""
        readings = {}
        for name, tracked in list(self.metrics.instances.items()):
            reading = self.metrics.cgroups.read(tracked.pid)
            if reading is not None:
                readings[name] = (tracked, reading)
        return readings

    def evaluate(self) -> set[str]:
        """Read and apply at once (for callers that do not mind reading on the event loop)."""
        return self.apply(self.read())

    def apply(self, readings: dict[str, tuple[telemetry.Tracked, cgroups.Reading]]) -> set[str]:
        """Turn readings into violations, on the event loop; the keys that began or ended one."""
        now = self.clock()
        t = self.thresholds
        changed: set[str] = set()
        found: dict[str, dict[str, str]] = collections.defaultdict(dict)
        for name, (tracked, reading) in readings.items():
            key: str = plugin_key(tracked.plugin, tracked.namespace)
            seen = self._seen[name]
            limit = reading.memory_limit_bytes
            if limit and reading.memory_working_set_bytes > t.memory_share * limit:
                seen.above_since = seen.above_since if seen.above_since is not None else now
                if now - seen.above_since >= t.memory_seconds:
                    found[key]["MemoryNearLimit"] = (
                        f"{name} has used {reading.memory_working_set_bytes / limit:.0%} of its "
                        f"memory limit ({limit >> 20} MiB) for {now - seen.above_since:.0f}s"
                    )
            else:
                seen.above_since = None
            periods = reading.cpu_periods - seen.periods
            throttled = reading.cpu_throttled_periods - seen.throttled
            if seen.periods and periods > 0 and throttled / periods > t.throttled_ratio:
                found[key]["CPUThrottled"] = (
                    f"{name} was throttled in {throttled / periods:.0%} of its CPU periods "
                    "lately: its CPU limit is too low for its load"
                )
            seen.periods, seen.throttled = reading.cpu_periods, reading.cpu_throttled_periods
        for name in set(self._seen) - set(self.metrics.instances):
            del self._seen[name]
        for key in set(self.active) | set(found):
            current = self.active[key]
            for kind in ("MemoryNearLimit", "CPUThrottled"):
                message = found.get(key, {}).get(kind)
                if message is not None and kind not in current:
                    self._begin(key, kind, message)
                    changed.add(key)
                elif message is not None:
                    current[kind].message = message
                elif kind in current:
                    del current[kind]
                    changed.add(key)
            for kind, active in list(current.items()):
                if active.until is not None and active.until <= now:
                    del current[kind]
                    changed.add(key)
        return changed

    def oom_killed(self, key: str, message: str) -> None:
        self._begin(key, "OOMKilled", message, self.clock() + self.thresholds.burst_seconds)

    def restarted(self, key: str) -> None:
        now = self.clock()
        window = self._restarts[key]
        window.append(now)
        while window and window[0] <= now - self.thresholds.burst_seconds:
            window.popleft()
        if len(window) >= self.thresholds.restart_burst:
            self._begin(
                key,
                "RestartBurst",
                f"restarted {len(window)} times within {self.thresholds.burst_seconds:.0f}s",
                now + self.thresholds.burst_seconds,
            )

    def current(self, key: str) -> dict[str, str]:
        """The violations of ``key`` now: kind to message."""
        now = self.clock()
        active = self.active.get(key, {})
        return {k: a.message for k, a in active.items() if a.until is None or a.until > now}

    def forget(self, key: str) -> None:
        self.active.pop(key, None)
        self._restarts.pop(key, None)

    def _begin(self, key: str, kind: str, message: str, until: float | None = None) -> None:
        current = self.active[key]
        if kind not in current or (current[kind].until or 0) <= self.clock():
            self.metrics.violations.labels(key, kind).inc()
        current[kind] = _Active(message, until)
