"""A key-value store: put, get, delete and list over string keys; its state is the map.

The map lives in the SDK's ``Store`` (:class:`~blackhole_sdk.StatefulPlugin`),
so a swap copies it while this instance still serves and holds calls only
for the last changes, and the controller's checkpoints are deltas.

State version 2 (this release) keeps a revision per key:
``{"entries": {key: {"value": ..., "revision": n}}}``. Version 1 (release
1.0) kept the plain map ``{key: value}``; the migration below turns one into
the other when a 1.x instance hands its state over. ``KV_STATE_VERSION=1``
builds the 1.0 behaviour, so the upgrade from 1.0 can be tried for real.
"""

import json
import os
from typing import Any

import grpc
from blackhole_sdk import Plugin, PluginError, StatefulPlugin, migration, serve
from blackhole_sdk.state import whole


class KeyValueStore(StatefulPlugin):
    provides = ("storage.kv",)
    state_version = 2

    def initialize(self, config: dict[str, Any]) -> None:
        self.max_keys = int(config.get("maxKeys", 1_000_000))

    def handle(self, method: str, payload: Any) -> Any:
        payload = payload or {}
        entries = self.state
        if method == "put":
            key = _key(payload)
            found = entries.get(key)
            if found is None and len(entries) >= self.max_keys:
                raise PluginError(f"full: {self.max_keys} keys", grpc.StatusCode.RESOURCE_EXHAUSTED)
            revision = (found or {}).get("revision", 0) + 1
            entries[key] = {"value": payload.get("value"), "revision": revision}
            return {"key": key, "revision": revision}
        if method == "get":
            key = _key(payload)
            if key not in entries:
                raise PluginError(f"no key {key!r}", grpc.StatusCode.NOT_FOUND)
            return {"key": key, **entries[key]}
        if method == "delete":
            key = _key(payload)
            found = key in entries
            if found:
                del entries[key]
            return {"deleted": found}
        if method == "list":
            prefix = str(payload.get("prefix", ""))
            return {"keys": sorted(k for k in entries if k.startswith(prefix))}
        raise PluginError(
            f"unknown method {method!r}; use put, get, delete or list",
            grpc.StatusCode.UNIMPLEMENTED,
        )

    @migration(1, 2)
    def add_revisions(self, state: bytes) -> bytes:
        plain = json.loads(state) if state else {}
        return whole({k: {"value": v, "revision": 1} for k, v in plain.items()})


class KeyValueStoreV1(Plugin):
    """Release 1.0: the same calls, state kept as the plain map (state version 1), whole
    copies only (it predates revisions)."""

    provides = ("storage.kv",)
    state_version = 1

    def __init__(self) -> None:
        self.inner = KeyValueStore()

    def initialize(self, config: dict[str, Any]) -> None:
        self.inner.initialize(config)

    def handle(self, method: str, payload: Any) -> Any:
        return self.inner.handle(method, payload)

    def export_state(self) -> bytes:
        plain = {k: self.inner.state[k]["value"] for k in self.inner.state}
        return json.dumps(plain, sort_keys=True).encode()

    def import_state(self, state: bytes) -> None:
        plain = json.loads(state) if state else {}
        self.inner.state.load(self.inner.add_revisions(json.dumps(plain).encode()))


def _key(payload: dict[str, Any]) -> str:
    if "key" not in payload:
        raise PluginError('the payload needs a "key"')
    return str(payload["key"])


if __name__ == "__main__":
    serve(KeyValueStoreV1() if os.environ.get("KV_STATE_VERSION") == "1" else KeyValueStore())
