"""What the gateway counts of each endpoint's calls: what a swap's builtin analysis reads.

Counted on the hot path of every call (:meth:`Stats.record`: two
increments and a bisection), read by the controller in-process or with the
control protocol's ``stats`` message, summed over the gateway's replicas.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

LATENCY_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Upper bounds (seconds) of the gateway's latency buckets; a last one takes the rest."""


@dataclass
class Stats:
    """What a gateway counted of one endpoint's calls since it started."""

    calls: int = 0
    failures: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))

    def record(self, failed: bool, seconds: float) -> None:
        """Count one call (on the gateway's hot path)."""
        self.calls += 1
        if failed:
            self.failures += 1
        self.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def plus(self, other: Stats) -> Stats:
        return Stats(
            self.calls + other.calls,
            self.failures + other.failures,
            [a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
        )

    def since(self, before: Stats) -> Stats | None:
        """What was counted after ``before``; None when the counts went back (a gateway
        started again)."""
        delta = Stats(
            self.calls - before.calls,
            self.failures - before.failures,
            [a - b for a, b in zip(self.buckets, before.buckets, strict=True)],
        )
        if delta.calls < 0 or delta.failures < 0 or min(delta.buckets) < 0:
            return None
        return delta

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the latencies, interpolated within its bucket (as
        Prometheus' histogram_quantile)."""
        total = sum(self.buckets)
        if not total:
            return math.nan
        rank, seen = q * total, 0
        for index, count in enumerate(self.buckets):
            if count and seen + count >= rank:
                low = LATENCY_BOUNDS[index - 1] if index else 0.0
                if index == len(LATENCY_BOUNDS):
                    return low
                high = LATENCY_BOUNDS[index]
                return low + (high - low) * (rank - seen) / count
            seen += count
        return LATENCY_BOUNDS[-1]

    def value(self, builtin: str) -> float | None:
        """The builtin measurement's value over these calls (None: no calls to measure)."""
        if not self.calls:
            return None
        if builtin == "SuccessRate":
            return 1 - self.failures / self.calls
        if builtin == "ErrorCount":
            return float(self.failures)
        if builtin == "Calls":
            return float(self.calls)
        return self.quantile({"LatencyP50": 0.5, "LatencyP90": 0.9, "LatencyP99": 0.99}[builtin])

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.calls, "failures": self.failures, "buckets": self.buckets}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        buckets = [int(b) for b in data.get("buckets") or []]
        if len(buckets) != len(LATENCY_BOUNDS) + 1:
            raise ValueError(f"{len(buckets)} latency buckets, not {len(LATENCY_BOUNDS) + 1}")
        return cls(int(data["calls"]), int(data["failures"]), buckets)
