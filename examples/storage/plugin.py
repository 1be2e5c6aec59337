"""A key-value store: put, get, delete and list over string keys."""

from typing import Any

from blackhole_sdk import Plugin, PluginError, serve


class KeyValueStore(Plugin):
    def initialize(self, config: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {}
        self.shards = int(config.get("shards", 1))

    def handle(self, method: str, payload: Any) -> Any:
        payload = payload or {}
        if method == "put":
            self.data[str(payload["key"])] = payload.get("value")
            return {"stored": payload["key"]}
        if method == "get":
            key = str(payload["key"])
            if key not in self.data:
                raise PluginError(f"no key {key!r}")
            return {"key": key, "value": self.data[key]}
        if method == "delete":
            return {"deleted": self.data.pop(str(payload["key"]), None) is not None}
        if method == "list":
            prefix = str(payload.get("prefix", ""))
            return {"keys": sorted(k for k in self.data if k.startswith(prefix))}
        raise PluginError(f"unknown method {method!r}; use put, get, delete or list")


if __name__ == "__main__":
    serve(KeyValueStore())
