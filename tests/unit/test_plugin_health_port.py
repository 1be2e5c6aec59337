"""The plaintext health-only listener (``BLACKHOLE_HEALTH_ADDRESS``) that probes without TLS
ask: it says SERVING or not, and serves nothing of the plugin protocol."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from blackhole_sdk import Plugin, server
from blackhole_sdk.proto import plugin_pb2, plugin_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class Quiet(Plugin):
    provides = ("test.quiet",)

    async def handle(self, method: str, payload: Any) -> Any:
        return payload


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_health_listener_answers_health_only_in_plaintext():
    servicer = server.Servicer(Quiet())
    address = f"127.0.0.1:{_free_port()}"
    health = await server._health_only(servicer, address)
    assert health is not None
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            live = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            assert live.status == health_pb2.HealthCheckResponse.SERVING
            ready = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no handshake yet
            protocol: Any = plugin_pb2_grpc.PluginStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await protocol.Initialize(plugin_pb2.InitializeRequest(), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await health.stop(0)


async def test_no_health_listener_without_an_address():
    assert await server._health_only(server.Servicer(Quiet()), "") is None
