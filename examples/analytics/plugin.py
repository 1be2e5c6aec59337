"""Analytics: ingests numeric events and answers count, mean and p95 over time windows.

Its state is what the windows cover: per-second buckets of the values seen
in the longest window, ``{"buckets": [[second, [values...]], ...]}`` (state
version 1). Buckets older than the longest window are dropped as time goes.
"""

import bisect
import json
import time
from typing import Any

import grpc
from blackhole_sdk import Plugin, PluginError, serve


class Analytics(Plugin):
    provides = ("analytics.events",)
    state_version = 1

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock

    def initialize(self, config: dict[str, Any]) -> None:
        self.windows = sorted(int(w) for w in config.get("windows", [60]))
        if not self.windows or self.windows[0] < 1:
            raise PluginError("config.windows must list windows of at least 1 second")
        self.seconds: list[int] = []
        """Bucket keys (whole seconds), ascending."""
        self.values: dict[int, list[float]] = {}

    def _trim(self, now: float) -> None:
        horizon = int(now) - self.windows[-1]
        cut = bisect.bisect_right(self.seconds, horizon)
        for second in self.seconds[:cut]:
            del self.values[second]
        del self.seconds[:cut]

    def handle(self, method: str, payload: Any) -> Any:
        payload = payload or {}
        now = self.clock()
        self._trim(now)
        if method == "ingest":
            values = payload.get("values", [payload.get("value")])
            try:
                numbers = [float(v) for v in values]
            except (TypeError, ValueError):
                raise PluginError(
                    'ingest takes {"value": number} or {"values": [numbers]}'
                ) from None
            second = int(now)
            if second not in self.values:
                bisect.insort(self.seconds, second)
                self.values[second] = []
            self.values[second].extend(numbers)
            return {"events": sum(len(v) for v in self.values.values())}
        if method == "query":
            window = int(payload.get("window", self.windows[0]))
            if window not in self.windows:
                raise PluginError(f"window {window} is not one of {self.windows}")
            start = bisect.bisect_right(self.seconds, int(now) - window)
            values = sorted(v for s in self.seconds[start:] for v in self.values[s])
            if not values:
                return {"window": window, "count": 0}
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            return {
                "window": window,
                "count": len(values),
                "mean": sum(values) / len(values),
                "p95": p95,
            }
        raise PluginError(
            f"unknown method {method!r}; use ingest or query", grpc.StatusCode.UNIMPLEMENTED
        )

    def export_state(self) -> bytes:
        return json.dumps({"buckets": [[s, self.values[s]] for s in self.seconds]}).encode()

    def import_state(self, state: bytes) -> None:
        buckets = json.loads(state)["buckets"] if state else []
        self.seconds = [int(s) for s, _ in buckets]
        self.values = {int(s): [float(v) for v in values] for s, values in buckets}


if __name__ == "__main__":
    serve(Analytics())
