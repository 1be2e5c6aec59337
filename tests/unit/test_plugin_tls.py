"""Plugins served over mutual TLS: the SDK checks its client, the controller checks the plugin."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from blackhole_sdk import Plugin, server
from grpc_health.v1 import health_pb2

from controller import pki
from controller.errors import PluginCallError
from controller.protocol import client

CONTROLLER_ID = "c1"
KV = pki.Identity.plugin(CONTROLLER_ID, "ns", "kv")


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


@dataclass
class Served:
    address: str
    authority: pki.Authority
    files: Path
    renewer: pki.Renewer

    def tls(self, role: str = pki.CONTROLLER, **changes: Any) -> client.ChannelTLS:
        issued = self.authority.issue(pki.Identity.role(CONTROLLER_ID, role))
        base = client.ChannelTLS(
            ca=self.authority.cert_pem,
            cert=issued.cert_pem,
            key=issued.key_pem,
            server_name=KV.server_name,
        )
        return replace(base, **changes)


async def _serve(
    tmp_path: Path,
    issue: Callable[[pki.Authority], pki.Issued] | None = None,
    clients: frozenset[str] = frozenset(),
) -> AsyncIterator[Served]:
    authority = pki.Authority.create(CONTROLLER_ID)
    directory = tmp_path / "kv-tls"
    renewer = pki.Renewer(authority, KV, directory)
    if issue is None:
        renewer.ensure()
    else:
        issue(authority).write(directory, authority.cert_pem)
    files = pki.Files.in_directory(directory)
    tls = server.TLSFiles(str(files.cert), str(files.key), str(files.ca))
    grpc_server, _ = server.server_for(Echo(), clients=server.ClientCheck(clients))
    port = grpc_server.add_secure_port("127.0.0.1:0", tls.credentials())
    await grpc_server.start()
    try:
        yield Served(f"127.0.0.1:{port}", authority, directory, renewer)
    finally:
        await grpc_server.stop(0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for found in _serve(tmp_path):
        yield found


def served_certificate(address: str, tls: client.ChannelTLS, directory: Path) -> bytes:
    """The certificate (PEM) the server presents to a new connection now."""
    (directory / "client.crt").write_bytes(tls.cert)
    (directory / "client.key").write_bytes(tls.key)
    context = ssl.create_default_context(cadata=tls.ca.decode())
    context.check_hostname = False
    context.load_cert_chain(directory / "client.crt", directory / "client.key")
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=tls.server_name) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def _always(tls: client.ChannelTLS, endpoint: str) -> client.ChannelTLS:
    return tls


async def _initialize(plugins: client.Clients, endpoint: str) -> client.Handshake:
    return await plugins.get(endpoint).initialize(
        plugin="kv", version="1.0.0", color="blue", config={}, timeout=10
    )


async def test_every_kind_of_call_is_answered_over_mutual_tls(served: Served):
    tls = served.tls()
    plugins = client.Clients(tls=lambda _: tls)
    try:
        answer = await _initialize(plugins, served.address)
        assert answer.provides == ("test.echo",)
        assert await plugins.healthy(served.address, 10)
        raw = await plugins.call(served.address, "say", json.dumps("hi").encode(), 10)
        assert json.loads(raw) == {"method": "say", "payload": "hi"}
        assert (await plugins.export_state(served.address, 10)).data == b"kept"
        new = client.State(1, b"new", hashlib.sha256(b"new").hexdigest())
        await plugins.import_state(served.address, new, 10)
        assert (await plugins.export_state(served.address, 10)).data == b"new"
    finally:
        await plugins.close()


async def _refused(endpoint: str, tls: client.ChannelTLS | None, code: str) -> str:
    plugins = client.Clients(tls=lambda _: tls)
    try:
        with pytest.raises(PluginCallError) as raised:
            await _initialize(plugins, endpoint)
        assert raised.value.code == code
        assert not await plugins.healthy(endpoint, 5)
        return str(raised.value)
    finally:
        await plugins.close()


async def test_a_plugin_certificate_from_another_ca_is_refused(served: Served):
    # The controller trusts a CA that did not sign the plugin's certificate.
    stranger = pki.Authority.create(CONTROLLER_ID)
    await _refused(served.address, served.tls(ca=stranger.cert_pem), "UNAVAILABLE")


async def test_a_plugin_certificate_naming_another_plugin_is_refused(served: Served):
    other = pki.Identity.plugin(CONTROLLER_ID, "ns", "other")
    await _refused(served.address, served.tls(server_name=other.server_name), "UNAVAILABLE")


async def test_an_expired_plugin_certificate_is_refused(tmp_path: Path):
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=3)

    def expired(authority: pki.Authority) -> pki.Issued:
        return authority.issue(KV, not_before=long_ago, lifetime=datetime.timedelta(hours=1))

    async for served in _serve(tmp_path, expired):
        # Right CA, right name: refused for its dates alone.
        await _refused(served.address, served.tls(), "UNAVAILABLE")


async def test_a_client_certificate_from_another_ca_or_expired_is_refused(served: Served):
    stranger = pki.Authority.create(CONTROLLER_ID)
    theirs = stranger.issue(pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER))
    await _refused(
        served.address, served.tls(cert=theirs.cert_pem, key=theirs.key_pem), "UNAVAILABLE"
    )
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=3)
    old = served.authority.issue(
        pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER),
        not_before=long_ago,
        lifetime=datetime.timedelta(hours=1),
    )
    await _refused(served.address, served.tls(cert=old.cert_pem, key=old.key_pem), "UNAVAILABLE")


async def test_another_plugin_is_no_client(served: Served):
    # Signed by the same CA, but a plugin's identity, not one of the controller's roles.
    neighbour = served.authority.issue(pki.Identity.plugin(CONTROLLER_ID, "ns", "other"))
    # A server certificate used as a client's: refused at the handshake (serverAuth only)
    # or, were it accepted there, by the SDK's identity check.
    message = await _refused(
        served.address,
        served.tls(cert=neighbour.cert_pem, key=neighbour.key_pem),
        "UNAVAILABLE",
    )
    assert message


async def test_a_narrowed_list_of_clients_keeps_the_others_out(tmp_path: Path):
    assert not server.ClientCheck().admits([KV.uri])
    assert server.ClientCheck().admits([f"blackhole://{CONTROLLER_ID}/controller"])
    only = frozenset({f"blackhole://{CONTROLLER_ID}/gateway"})
    async for served in _serve(tmp_path, clients=only):
        message = await _refused(served.address, served.tls(pki.CONTROLLER), "PERMISSION_DENIED")
        assert f"blackhole://{CONTROLLER_ID}/controller" in message
        gateway = served.tls(pki.GATEWAY)
        plugins = client.Clients(tls=functools.partial(_always, gateway))
        try:
            await _initialize(plugins, served.address)
        finally:
            await plugins.close()


async def test_a_plaintext_client_is_refused(served: Served):
    async with grpc.aio.insecure_channel(served.address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(health_pb2.HealthCheckRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


async def test_a_renewed_certificate_is_served_to_new_connections_with_no_failed_call(
    served: Served,
):
    current = [served.tls()]
    plugins = client.Clients(tls=lambda _: current[0])
    failures: list[BaseException] = []
    answered = 0
    stop = asyncio.Event()

    async def caller() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                await plugins.call(served.address, "say", b'"x"', 10)
                answered += 1
            except PluginCallError as e:
                failures.append(e)

    try:
        await _initialize(plugins, served.address)
        first = served.renewer.files.cert.read_bytes()
        callers = [asyncio.create_task(caller()) for _ in range(4)]
        for _ in range(3):
            # A renewal, then a new client certificate: a new channel, a new handshake.
            served.renewer.ensure(datetime.datetime.now(datetime.UTC) + pki.INSTANCE_LIFETIME)
            current[0] = served.tls()
            renewed = served.renewer.files.cert.read_bytes()
            shown = await asyncio.to_thread(
                served_certificate, served.address, current[0], served.files.parent
            )
            assert _der(shown) == _der(renewed)
            before = answered
            async with asyncio.timeout(30):
                while answered < before + 20:
                    await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*callers)
        assert served.renewer.files.cert.read_bytes() != first
        assert failures == []
        assert answered > 60
    finally:
        stop.set()
        await plugins.close()
