"""A plugin drained over TCP lets its connections go (GOAWAY), so that clients reconnect.

A real gRPC client (the controller's) on a real server: after the drain its
call in flight still finishes, its channel is told to go away (it falls back
to IDLE, which a channel does on a GOAWAY), and its next call opens a new
connection, to the server that listens on in the old one's place.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from blackhole_sdk import Plugin, server

from controller.protocol import client


class Sleepy(Plugin):
    provides = ("test.sleepy",)

    async def handle(self, method: str, payload: Any) -> Any:
        await asyncio.sleep(float(payload))
        return {"slept": payload}


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def listener() -> AsyncIterator[server.Listener]:
    made = server.Listener(server.Servicer(Sleepy()), "127.0.0.1:0")
    await made.start()
    yield made
    await made.stop(0)


async def test_a_drain_lets_every_connection_go_and_calls_in_flight_finish(
    listener: server.Listener,
):
    endpoint = listener.address
    plugins = client.Clients()
    try:
        plugin = plugins.get(endpoint)
        await plugin.initialize(plugin="s", version="1.0.0", color="blue", config={}, timeout=5)
        assert plugin.channel.get_state() is grpc.ChannelConnectivity.READY
        in_flight = asyncio.create_task(plugins.call(endpoint, "sleep", b"0.5", 10))
        await _until(lambda: listener.servicer.in_flight == 1)
        assert await plugins.drain(endpoint, 0.001) == 1
        await _until(lambda: listener.goaways >= 1)
        # Told to go away, the channel drops to IDLE; the call it had in flight finishes.
        await _until(lambda: plugin.channel.get_state() is grpc.ChannelConnectivity.IDLE)
        assert json.loads(await in_flight) == {"slept": 0.5}
        # Resumed (a rollback), the next call reconnects, to the server listening now.
        await plugins.drain(endpoint, 1, resume=True)
        assert json.loads(await plugins.call(endpoint, "sleep", b"0", 5)) == {"slept": 0}
        assert plugin.channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await plugins.close()


async def test_while_drained_connections_are_let_go_again(
    listener: server.Listener, monkeypatch: pytest.MonkeyPatch
):
    """A client that reconnected before the Service moved is let go again later."""
    monkeypatch.setattr(server, "GOAWAY_SECONDS", 0.2)
    endpoint = listener.address
    plugins = client.Clients()
    try:
        plugin = plugins.get(endpoint)
        await plugin.initialize(plugin="s", version="1.0.0", color="blue", config={}, timeout=5)
        await plugins.drain(endpoint, 0.001)
        await _until(lambda: plugin.channel.get_state() is grpc.ChannelConnectivity.IDLE)
        assert await plugins.healthy(endpoint, 5) is False  # reconnected: drained, not serving
        assert plugin.channel.get_state() is grpc.ChannelConnectivity.READY
        await _until(lambda: plugin.channel.get_state() is grpc.ChannelConnectivity.IDLE)
        assert listener.goaways >= 2
        await plugins.drain(endpoint, 1, resume=True)
        count = listener.goaways
        await asyncio.sleep(0.6)
        assert listener.goaways == count  # resumed: no more
    finally:
        await plugins.close()


async def test_a_unix_socket_is_never_let_go(tmp_path: Path):
    made = server.Listener(server.Servicer(Sleepy()), f"unix:{tmp_path / 'p.sock'}")
    await made.start()
    plugins = client.Clients()
    try:
        endpoint = f"unix:{tmp_path / 'p.sock'}"
        plugin = plugins.get(endpoint)
        await plugin.initialize(plugin="s", version="1.0.0", color="blue", config={}, timeout=5)
        await plugins.drain(endpoint, 0.001)
        await asyncio.sleep(0.3)
        assert made.goaways == 0
        assert plugin.channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await plugins.close()
        await made.stop(0)
