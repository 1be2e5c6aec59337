"""Listeners try a port that is in use again for a few seconds before giving up."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from prometheus_client import CollectorRegistry

from controller.gateway import router, server
from controller.metrics import exposition, telemetry
from controller.protocol import client


def taken() -> socket.socket:
    """A port held by a listening socket (as a previous server, or a client, would hold it)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    async with asyncio.timeout(30):
        while not any(text in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)


async def test_metrics_listen_on_a_port_once_it_is_given_back(caplog):
    caplog.set_level(logging.WARNING)
    holder = taken()
    port = holder.getsockname()[1]
    metrics = exposition.MetricsServer(CollectorRegistry())
    starting = asyncio.create_task(metrics.start(f"127.0.0.1:{port}"))
    await logged(caplog, "is in use; trying again")
    holder.close()
    try:
        assert await starting == f"127.0.0.1:{port}"
    finally:
        await metrics.stop()


async def test_the_gateway_listens_on_a_port_once_it_is_given_back(caplog):
    caplog.set_level(logging.WARNING)
    holder = taken()
    port = holder.getsockname()[1]
    gateway = server.Gateway(
        lambda key: None, router.Router(telemetry.Metrics(CollectorRegistry())), client.Clients()
    )
    starting = asyncio.create_task(gateway.start(f"127.0.0.1:{port}", None))
    await logged(caplog, "is in use; trying again")
    holder.close()
    try:
        assert (await starting)["http"] == f"127.0.0.1:{port}"
    finally:
        await gateway.stop()


async def test_a_port_that_stays_taken_is_given_up(monkeypatch):
    monkeypatch.setattr(exposition, "BIND_SECONDS", 0.2)
    holder = taken()
    try:
        metrics = exposition.MetricsServer(CollectorRegistry())
        with pytest.raises(exposition.MetricsServerError, match="in use"):
            await metrics.start(f"127.0.0.1:{holder.getsockname()[1]}")
    finally:
        holder.close()
