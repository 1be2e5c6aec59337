"""Analytics: ingests numeric events and answers count, mean and p95 over time windows.

Its state is what the windows cover: per-second buckets of the values seen
in the longest window, kept in the SDK's ``Store`` (a swap moves only the
buckets that changed): ``{"entries": {"<second>": [values...], ...}}``
(state version 2; version 1 was ``{"buckets": [[second, [values...]], ...]}``,
migrated below). Buckets older than the longest window are dropped as time
goes.
"""

import bisect
import json
import time
from typing import Any

import grpc
from blackhole_sdk import PluginError, StatefulPlugin, migration, serve
from blackhole_sdk.state import whole


class Analytics(StatefulPlugin):
    provides = ("analytics.events",)
    state_version = 2

    def __init__(self, clock: Any = time.time) -> None:
        super().__init__()
        self.clock = clock
        self.seconds: list[int] = []
        """Bucket keys (whole seconds), ascending: an index of the state's keys."""

    def initialize(self, config: dict[str, Any]) -> None:
        self.windows = sorted(int(w) for w in config.get("windows", [60]))
        if not self.windows or self.windows[0] < 1:
            raise PluginError("config.windows must list windows of at least 1 second")

    def _trim(self, now: float) -> None:
        horizon = int(now) - self.windows[-1]
        cut = bisect.bisect_right(self.seconds, horizon)
        for second in self.seconds[:cut]:
            del self.state[str(second)]
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
            bucket = self.state.get(str(second))
            if bucket is None:
                bisect.insort(self.seconds, second)
                bucket = []
            self.state[str(second)] = bucket + numbers
            return {"events": sum(len(self.state[str(s)]) for s in self.seconds)}
        if method == "query":
            window = int(payload.get("window", self.windows[0]))
            if window not in self.windows:
                raise PluginError(f"window {window} is not one of {self.windows}")
            start = bisect.bisect_right(self.seconds, int(now) - window)
            values = sorted(v for s in self.seconds[start:] for v in self.state[str(s)])
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

    def _index(self) -> None:
        self.seconds = sorted(int(s) for s in self.state)

    def import_snapshot(self, state: bytes, revision: str) -> None:
        super().import_snapshot(state, revision)
        self._index()

    def import_changes(self, changes: bytes, base: str, revision: str) -> None:
        super().import_changes(changes, base, revision)
        self._index()

    def import_state(self, state: bytes) -> None:
        super().import_state(state)
        self._index()

    @migration(1, 2)
    def buckets_to_entries(self, state: bytes) -> bytes:
        buckets = json.loads(state)["buckets"] if state else []
        return whole({str(s): values for s, values in buckets})


if __name__ == "__main__":
    serve(Analytics())
