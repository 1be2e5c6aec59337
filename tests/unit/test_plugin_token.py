"""Plugins reached over TCP: protocol calls need the instance's token; health checks do not."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from blackhole_sdk import Plugin, server
from grpc_health.v1 import health_pb2

from controller.errors import PluginCallError
from controller.protocol import client

TOKEN = "s3cret-token"


class Echo(Plugin):
    provides = ("test.echo",)
    state_version = 1

    def initialize(self, config: dict[str, Any]) -> None:
        self.state = b"kept"

    def handle(self, method: str, payload: Any) -> Any:
        return {"method": method, "payload": payload}

    def export_state(self) -> bytes:
        return self.state

    def import_state(self, state: bytes) -> None:
        self.state = state


@pytest.fixture
async def endpoint() -> AsyncIterator[str]:
    grpc_server, _ = server.server_for(Echo(), TOKEN)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    yield f"127.0.0.1:{port}"
    await grpc_server.stop(0)


async def test_calls_with_the_token_are_answered(endpoint: str):
    plugins = client.Clients(tokens=lambda e: TOKEN if e == endpoint else None)
    try:
        answer = await plugins.get(endpoint).initialize(
            plugin="echo", version="1.0.0", color="blue", config={}, timeout=5
        )
        assert answer.provides == ("test.echo",)
        assert await plugins.healthy(endpoint, 5)
        raw = await plugins.call(endpoint, "say", json.dumps("hi").encode(), 5)
        assert json.loads(raw) == {"method": "say", "payload": "hi"}
        # Every kind of call carries it: unary, server-streaming, client-streaming.
        exported = await plugins.export_state(endpoint, 5)
        assert exported.data == b"kept"
        new = client.State(1, b"new", hashlib.sha256(b"new").hexdigest())
        await plugins.import_state(endpoint, new, 5)
        assert (await plugins.export_state(endpoint, 5)).data == b"new"
    finally:
        await plugins.close()


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_calls_without_the_right_token_are_refused(endpoint: str, token: str | None):
    plugins = client.Clients(tokens=lambda _: token)
    try:
        with pytest.raises(PluginCallError, match="token"):
            await plugins.get(endpoint).initialize(
                plugin="echo", version="1.0.0", color="blue", config={}, timeout=5
            )
        with pytest.raises(PluginCallError, match="token"):
            await plugins.call(endpoint, "say", b'"hi"', 5)
    finally:
        await plugins.close()


async def test_health_and_liveness_need_no_token(endpoint: str):
    async with grpc.aio.insecure_channel(endpoint) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        ready = await check(health_pb2.HealthCheckRequest(), timeout=5)
        live = await check(health_pb2.HealthCheckRequest(service=server.LIVENESS), timeout=5)
    # Not initialized: not ready, but alive, so a liveness probe does not restart it.
    assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert live.status == health_pb2.HealthCheckResponse.SERVING
