"""The SDK counts the Initialize calls a process answered: a controller tells a new process
(one the platform replaced while no controller ran) by its first."""

from __future__ import annotations

from typing import Any

from blackhole_sdk import Plugin, server
from blackhole_sdk.proto import plugin_pb2


class Echo(Plugin):
    async def handle(self, method: str, payload: Any) -> Any:
        return payload


class Context:
    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def test_each_initialize_says_how_many_this_process_answered():
    servicer = server.Servicer(Echo())
    request = plugin_pb2.InitializeRequest(protocol_version=1, plugin="", version="1.0.0")
    context: Any = Context()
    first = await servicer.Initialize(request, context)
    again = await servicer.Initialize(request, context)
    assert (first.initializations, again.initializations) == (1, 2)
    assert first.state_version == again.state_version
    assert servicer.answer is not None
    assert servicer.answer.initializations == 0  # the answer kept is as it was made
