"""Analytics: ingests numeric events and answers count, mean and p95 over time windows."""

import bisect
import time
from typing import Any

from blackhole_sdk import Plugin, PluginError, serve


class Analytics(Plugin):
    def initialize(self, config: dict[str, Any]) -> None:
        self.windows = [int(w) for w in config.get("windows", [60])]
        self.events: list[tuple[float, float]] = []

    def handle(self, method: str, payload: Any) -> Any:
        payload = payload or {}
        now = time.time()
        if method == "ingest":
            self.events.append((now, float(payload["value"])))
            horizon = now - max(self.windows)
            self.events = self.events[bisect.bisect(self.events, (horizon,)) :]
            return {"events": len(self.events)}
        if method == "query":
            window = int(payload.get("window", self.windows[0]))
            if window not in self.windows:
                raise PluginError(f"window {window} is not one of {self.windows}")
            values = sorted(v for t, v in self.events if t >= now - window)
            if not values:
                return {"window": window, "count": 0}
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            return {
                "window": window,
                "count": len(values),
                "mean": sum(values) / len(values),
                "p95": p95,
            }
        raise PluginError(f"unknown method {method!r}; use ingest or query")


if __name__ == "__main__":
    serve(Analytics())
