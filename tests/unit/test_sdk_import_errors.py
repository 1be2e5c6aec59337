"""A plugin that cannot read the bytes it is given refuses them as INVALID_ARGUMENT, with what
went wrong, and keeps the state it had (not UNKNOWN: Unexpected <class ...>)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from blackhole_sdk import Plugin, testing


class Counter(Plugin):
    state_version = 1

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def handle(self, method: str, payload: Any) -> Any:
        return dict(self.counts)

    def export_state(self) -> bytes:
        return json.dumps(self.counts).encode()

    def import_state(self, state: bytes) -> None:
        self.counts = json.loads(state)  # raises on bytes that are not JSON


def test_bytes_a_plain_plugin_cannot_read_are_refused_and_its_state_kept() -> None:
    plugin = Counter()
    plugin.counts = {"a": 1}
    with testing.in_process(plugin) as running:
        with pytest.raises(testing.CallError) as refused:
            running.import_state(1, b"\x00 not json")
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot read these 10 bytes as state version 1" in str(refused.value)
        assert "JSONDecodeError" in str(refused.value)
        assert running.call("get") == {"a": 1}
