"""The control protocol between a controller and its gateway process, over a real Unix socket.

A :class:`~controller.gateway.control.ControlServer` applies what a
:class:`~controller.gateway.control.RemoteRoutes` (the controller's
``Routes``) sends to a real router and gateway: whole tables, leased holds
released when the controller goes away or stops renewing, draining counts,
resync after a reconnect, versions, metrics, and calls held until the
first table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from blackhole_sdk.proto import plugin_pb2
from prometheus_client import generate_latest

from controller.gateway import control, router, server
from controller.metrics import telemetry
from controller.protocol import client
from controller.spec import models


def spec(**gateway: object) -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {"image": "blackhole/x:1", "version": "1.0.0", "gateway": gateway}
    )


KV = router.Declared.of(spec())


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are short: pytest's tmp_path may be too long for them.
    with tempfile.TemporaryDirectory(prefix="bh-ctl-") as name:
        yield Path(name)


async def _wait(condition: Any, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def gateway_side(
    path: Path, versions: tuple[int, ...] = control.PROTOCOL_VERSIONS
) -> AsyncIterator[control.ControlServer]:
    controls = control.ControlServer(router.Router(), about={"pid": 1}, versions=versions)
    await controls.start(path)
    try:
        yield controls
    finally:
        await controls.stop()


@contextlib.asynccontextmanager
async def controller_side(
    path: Path,
    declared: dict[str, router.Declared] | None = None,
    lease: float = 3.0,
    versions: tuple[int, ...] = control.PROTOCOL_VERSIONS,
) -> AsyncIterator[tuple[control.RemoteRoutes, asyncio.Task[None]]]:
    plugins = {"kv": KV} if declared is None else declared
    remote = control.RemoteRoutes(path, lambda: dict(plugins), lease=lease, versions=versions)
    stop = asyncio.Event()
    task = asyncio.create_task(remote.run(stop))
    try:
        yield remote, task
    finally:
        stop.set()
        await remote.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, control.GatewayProtocolError):
            await task


async def test_nothing_is_sent_before_syncing_then_the_whole_table(socket_dir: Path) -> None:
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway, controller_side(path) as (remote, _):
        assert path.stat().st_mode & 0o777 == 0o600
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        await asyncio.wait_for(remote.connected.wait(), 10)
        await remote.request({"type": "status"}, 5)
        assert not gateway.ready.is_set()  # a controller that has not read its store sends nothing
        remote.start_syncing()
        await _wait(gateway.ready.is_set, "the first table")
        assert gateway.router.route("kv") == "unix:/blue.sock"
        assert gateway.lookup("kv") == KV
        assert gateway.lookup("other") is None


async def test_a_flip_then_a_release_lets_held_calls_through_to_the_new_route(
    socket_dir: Path,
) -> None:
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway, controller_side(path) as (remote, _):
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        remote.start_syncing()
        await asyncio.wait_for(remote.connected.wait(), 10)
        await _wait(lambda: gateway.router.route("kv") == "unix:/blue.sock", "the route")
        remote.hold("kv")
        assert await remote.wait_idle("unix:/blue.sock", 1) == 0  # applied after the hold
        assert gateway.router.gates["kv"].holds == 1

        async def call() -> str:
            async with gateway.router.admit("kv", KV.gateway, 10) as endpoint:
                return endpoint

        held = asyncio.create_task(call())
        await _wait(lambda: gateway.router.gates["kv"].held == 1, "the call to be held")
        remote.set_route("kv", "unix:/green.sock", "bh-kv-green", spec())
        remote.release("kv")  # sent right after the table: the call goes to green
        assert await asyncio.wait_for(held, 10) == "unix:/green.sock"


async def test_a_controller_that_goes_away_mid_hold_releases_to_the_last_route(
    socket_dir: Path,
) -> None:
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway:
        async with controller_side(path) as (remote, _):
            remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
            remote.start_syncing()
            await asyncio.wait_for(remote.connected.wait(), 10)
            remote.hold("kv")
            await remote.wait_idle("unix:/blue.sock", 1)

            async def call() -> str:
                async with gateway.router.admit("kv", KV.gateway, 30) as endpoint:
                    return endpoint

            held = asyncio.create_task(call())
            await _wait(lambda: gateway.router.gates["kv"].held == 1, "the call to be held")
        # The controller's connection is gone (as when it is SIGKILLed): released at once.
        assert await asyncio.wait_for(held, 10) == "unix:/blue.sock"
        assert gateway.router.gates["kv"].holds == 0
        assert gateway.router.route("kv") == "unix:/blue.sock"  # the table stays


async def test_a_hold_not_renewed_within_its_lease_is_released(socket_dir: Path) -> None:
    """A controller that is alive but stuck (SIGSTOP, a blocked loop) keeps its connection."""
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway:
        _reader, writer = await asyncio.open_unix_connection(str(path))
        table = {"kv": control.entry(KV, "unix:/blue.sock", "bh-kv-blue")}
        for message in (
            {"type": "hello", "versions": [1], "role": "controller"},
            {"id": 1, "type": "routes", "routes": table},
            {"id": 2, "type": "holds", "holds": {"kv": 1}, "lease": 0.2},
        ):
            writer.write(json.dumps(message).encode() + b"\n")
        await _wait(lambda: gateway.router.gates["kv"].holds == 1, "the hold")
        async with gateway.router.admit("kv", KV.gateway, 30) as endpoint:
            assert endpoint == "unix:/blue.sock"  # got through once the lease lapsed
        assert gateway.router.gates["kv"].holds == 0
        assert not writer.is_closing()  # the connection itself was left alone
        writer.close()


async def test_a_new_gateway_gets_the_whole_table_and_the_holds_again(socket_dir: Path) -> None:
    path = socket_dir / "gateway.sock"
    async with controller_side(path) as (remote, _):
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        remote.start_syncing()
        async with gateway_side(path) as first:
            await asyncio.wait_for(remote.connected.wait(), 10)
            await _wait(lambda: first.router.route("kv") == "unix:/blue.sock", "the table")
        # Gone; while it is, the controller flips and holds. A new gateway gets all of it.
        await _wait(lambda: not remote.connected.is_set(), "the connection to drop")
        remote.set_route("kv", "unix:/green.sock", "bh-kv-green", spec())
        remote.hold("kv")
        with pytest.raises(control.GatewayUnavailableError):
            await remote.wait_idle("unix:/blue.sock", 1)
        async with gateway_side(path) as second:
            await _wait(lambda: second.router.route("kv") == "unix:/green.sock", "the resync")
            await _wait(lambda: second.router.gates["kv"].holds == 1, "the hold again")
            remote.release("kv")
            await _wait(lambda: second.router.gates["kv"].holds == 0, "the release")


async def test_a_plugin_no_longer_declared_leaves_the_table(socket_dir: Path) -> None:
    path = socket_dir / "gateway.sock"
    declared = {"kv": KV, "cache": KV}
    async with gateway_side(path) as gateway, controller_side(path, declared) as (remote, _):
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        remote.start_syncing()
        await _wait(lambda: gateway.lookup("cache") is not None, "the table")
        assert gateway.router.route("cache") is None  # declared, not Ready: 503, not 404
        del declared["kv"]
        remote.changed()
        await _wait(lambda: gateway.lookup("kv") is None, "kv to go")
        assert gateway.router.route("kv") is None


async def test_versions_are_agreed_or_refused_clearly(socket_dir: Path) -> None:
    path = socket_dir / "gateway.sock"
    for gateway_speaks, controller_speaks in (((1,), (1, 2)), ((1, 2), (1,))):
        # An old gateway and a new controller, then the reverse: they agree on 1.
        speaking = controller_side(path, versions=controller_speaks)
        async with gateway_side(path, gateway_speaks) as gateway, speaking as (remote, _):
            remote.start_syncing()
            await asyncio.wait_for(remote.connected.wait(), 10)
            assert remote.gateway["version"] == 1
            await _wait(gateway.ready.is_set, "the table")
    async with gateway_side(path, versions=(2,)), controller_side(path, versions=(1,)) as (_, task):
        with pytest.raises(control.GatewayProtocolError) as refused:
            await asyncio.wait_for(task, 10)
        assert "control protocol versions [2]" in str(refused.value)


async def test_the_gateway_answers_unknown_messages_and_observers_change_nothing(
    socket_dir: Path,
) -> None:
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway:
        unknown = await asyncio.to_thread(control.ask, path, {"type": "teleport"})
        assert unknown["reason"] == "UnknownMessage"
        table = {"routes": {"kv": control.entry(KV, "unix:/a.sock", "bh-kv-blue")}}
        refused = await asyncio.to_thread(control.ask, path, {"type": "routes", **table})
        assert refused["reason"] == "NotController"
        assert not gateway.ready.is_set()


async def test_the_gateways_series_reach_the_controllers_metrics(socket_dir: Path) -> None:
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway:
        gateway.router.metrics.answered("kv", "get", 200, 0.0)
        text = (await asyncio.to_thread(control.fetch_metrics, path)).decode()
    assert 'blackhole_gateway_requests_total{code="200",method="get",plugin="kv"} 1.0' in text
    assert "blackhole_reconcile" not in text  # the controller's own families stay its own
    assert telemetry.HOLD_RELEASES not in text  # the controller's to count, not the gateway's
    controller_metrics = telemetry.Metrics()
    controller_metrics.relay_gateway()
    own = generate_latest(controller_metrics.registry).decode()
    families = {line.split()[2] for line in own.splitlines() if line.startswith("# TYPE")}
    assert {f for f in families if f.startswith("blackhole_gateway_")} == {
        f"{telemetry.HOLD_RELEASES}_total"
    }  # the one gateway family the controller keeps: no family is exported twice
    assert await asyncio.to_thread(control.fetch_metrics, path) == b""  # gone: nothing, no error


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    decoded = plugin_pb2.HandleRequest.FromString(request)
    return plugin_pb2.HandleResponse(payload=decoded.payload).SerializeToString()


def _post(url: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=b'{"a": 1}', method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_calls_before_the_first_table_wait_for_it_instead_of_404(socket_dir: Path) -> None:
    plugin = grpc.aio.server()
    plugin.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blackhole.plugin.v1.Plugin", {"Handle": grpc.unary_unary_rpc_method_handler(_echo)}
            ),
        )
    )
    endpoint = f"unix:{socket_dir / 'plugin.sock'}"
    plugin.add_insecure_port(endpoint)
    await plugin.start()
    path = socket_dir / "gateway.sock"
    plugins = client.Clients()
    try:
        async with gateway_side(path) as controls:
            gateway = server.Gateway(
                controls.lookup, controls.router, plugins, ready=controls.ready
            )
            bound = await gateway.start("127.0.0.1:0", None)
            try:
                url = f"http://{bound['http']}/v1/plugins/kv/call/echo"
                early = asyncio.create_task(asyncio.to_thread(_post, url))
                await _wait(lambda: gateway.early == 1, "the call to wait for the routes")
                async with controller_side(path) as (remote, _):
                    remote.set_route("kv", endpoint, "bh-kv-blue", spec())
                    remote.start_syncing()
                    assert await asyncio.wait_for(early, 30) == (200, {"a": 1})
            finally:
                await gateway.stop()
        impatient = server.Gateway(
            lambda _key: None, router.Router(), plugins, ready=asyncio.Event(), ready_timeout=0.05
        )
        bound = await impatient.start("127.0.0.1:0", None)
        try:
            status, answer = await asyncio.to_thread(
                _post, f"http://{bound['http']}/v1/plugins/kv/call/echo"
            )
            assert (status, answer["reason"]) == (503, "GatewayNotReady")
        finally:
            await impatient.stop()
    finally:
        await plugins.close()
        await plugin.stop(0)


async def test_a_call_a_draining_instance_refused_unrun_is_tried_again(socket_dir: Path) -> None:
    """A hold released to an instance the swap already drained: the call waits, never fails."""
    refusals = 3

    async def draining_then_echo(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        nonlocal refusals
        if refusals:
            refusals -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, server.DRAINING)
        return await _echo(request, context)

    plugin = grpc.aio.server()
    plugin.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blackhole.plugin.v1.Plugin",
                {"Handle": grpc.unary_unary_rpc_method_handler(draining_then_echo)},
            ),
        )
    )
    endpoint = f"unix:{socket_dir / 'plugin.sock'}"
    plugin.add_insecure_port(endpoint)
    await plugin.start()
    routes = router.Router()
    routes.set_route("kv", endpoint, "bh-kv-blue", spec())
    plugins = client.Clients()
    gateway = server.Gateway(lambda key: KV if key == "kv" else None, routes, plugins)
    bound = await gateway.start("127.0.0.1:0", None)
    try:
        url = f"http://{bound['http']}/v1/plugins/kv/call/echo"
        assert await asyncio.to_thread(_post, url) == (200, {"a": 1})
        assert refusals == 0
    finally:
        await gateway.stop()
        await plugins.close()
        await plugin.stop(0)


async def test_an_instance_replaced_on_the_same_socket_gets_a_new_channel(
    socket_dir: Path,
) -> None:
    """A restarted instance reuses its socket's path: the gateway's channel to it is stale."""
    path = socket_dir / "gateway.sock"
    replaced: list[str] = []
    controls = control.ControlServer(router.Router(), replaced=replaced.append)
    await controls.start(path)
    try:
        async with controller_side(path) as (remote, _):
            remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
            remote.start_syncing()
            await _wait(controls.ready.is_set, "the table")
            remote.clear_route("kv")
            remote.dropped("unix:/blue.sock")  # the controller removed the crashed instance
            remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
            await _wait(lambda: replaced == ["unix:/blue.sock"], "the stale channel to go")
            remote.changed()
            await remote.request({"type": "status"}, 5)
            assert replaced == ["unix:/blue.sock"]  # once per replacement
    finally:
        await controls.stop()


@contextlib.asynccontextmanager
async def _plugin(socket_dir: Path, handle: Any = _echo) -> AsyncIterator[str]:
    """A plugin's gRPC server on a Unix socket in ``socket_dir``; its endpoint."""
    plugin = grpc.aio.server()
    plugin.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blackhole.plugin.v1.Plugin",
                {"Handle": grpc.unary_unary_rpc_method_handler(handle)},
            ),
        )
    )
    endpoint = f"unix:{socket_dir / 'plugin.sock'}"
    plugin.add_insecure_port(endpoint)
    await plugin.start()
    try:
        yield endpoint
    finally:
        await plugin.stop(0)


def _table(endpoint: str, incarnation: int) -> dict[str, control.RouteEntry]:
    return {"kv": control.entry(KV, endpoint, "bh-kv-blue", incarnation)}


async def test_a_call_in_the_same_turn_as_a_replacing_table_keeps_its_channel(
    socket_dir: Path,
) -> None:
    """The table of a flip names a new instance on a reused socket path: the stale channel
    is let go of while the table is applied, so no call that takes the new route between
    the table and the next turn of the loop gets the channel about to be closed (and is
    cancelled with it: its caller's connection would be cut with no answer)."""
    async with _plugin(socket_dir) as endpoint:
        routes, plugins = router.Router(), client.Clients()
        controls = control.ControlServer(routes, replaced=plugins.forget)  # as bhctl gateway
        try:
            controls.apply_table(_table(endpoint, 1))
            request = plugin_pb2.HandleRequest(method="echo", payload=b"{}").SerializeToString()
            assert await plugins.get(endpoint).handle_raw(request, 10)  # the channel is open
            controls.apply_table(_table(endpoint, 2))  # the instance there was replaced
            async with routes.admit("kv", KV.gateway, 10) as routed:  # a call, this same turn
                answer = await plugins.get(routed).handle_raw(request, 10)
            assert plugin_pb2.HandleResponse.FromString(answer).payload == b"{}"
        finally:
            await plugins.close()


async def _http_call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, dict[str, str], bytes]:
    """One POST on an open keep-alive connection; status, headers, body."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode().rstrip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


async def test_a_channel_closed_under_a_call_answers_502_on_a_connection_that_stays_open(
    socket_dir: Path,
) -> None:
    """gRPC cancels the calls of a channel it closes: the gateway answers that call as a
    failed one, and the caller's keep-alive connection serves its next call."""
    entered, hang = asyncio.Event(), asyncio.Event()

    async def hanging_once(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        if not entered.is_set():
            entered.set()
            await hang.wait()
        return await _echo(request, context)

    async with _plugin(socket_dir, hanging_once) as endpoint:
        routes, plugins = router.Router(), client.Clients()
        routes.set_route("kv", endpoint, "bh-kv-blue", spec())
        gateway = server.Gateway(lambda key: KV if key == "kv" else None, routes, plugins)
        bound = await gateway.start("127.0.0.1:0", None)
        host, port = bound["http"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            first = asyncio.create_task(_http_call(reader, writer, "/v1/plugins/kv/call/echo"))
            await asyncio.wait_for(entered.wait(), 30)
            await plugins.drop(endpoint)  # its instance is gone: the channel closes
            status, headers, body = await asyncio.wait_for(first, 30)
            assert (status, json.loads(body)["reason"]) == (502, "PluginFailed")
            assert headers.get("connection", "").lower() != "close"
            status, _, body = await asyncio.wait_for(
                _http_call(reader, writer, "/v1/plugins/kv/call/echo"), 30
            )
            assert (status, body) == (200, b"{}")
        finally:
            hang.set()
            writer.close()
            await gateway.stop()
            await plugins.close()


async def test_a_call_whose_own_task_is_cancelled_is_still_cancelled(socket_dir: Path) -> None:
    """Only a channel closed under a call becomes a failed call: a timeout or a
    cancellation of the caller's task goes through as it is."""
    entered, hang = asyncio.Event(), asyncio.Event()

    async def hanging(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        entered.set()
        await hang.wait()
        return await _echo(request, context)

    async with _plugin(socket_dir, hanging) as endpoint:
        plugins = client.Clients()
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await plugins.get(endpoint).handle("echo", b"{}", timeout=30)
            entered.clear()
            call = asyncio.create_task(plugins.get(endpoint).handle("echo", b"{}", timeout=30))
            await asyncio.wait_for(entered.wait(), 30)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            hang.set()
            await plugins.close()


async def test_a_color_of_replicas_crosses_the_socket_beside_its_single_endpoint(
    socket_dir: Path,
) -> None:
    path = socket_dir / "gateway.sock"
    blue = ["unix:/b0.sock", "unix:/b1.sock", "unix:/b2.sock"]
    green = ["unix:/g0.sock", "unix:/g1.sock"]
    async with gateway_side(path) as gateway, controller_side(path) as (remote, _):
        remote.set_route("kv", blue[0], "bh-kv-blue", spec(), blue)
        remote.set_canary("kv", green[0], 50, None, green)
        remote.start_syncing()
        await asyncio.wait_for(remote.connected.wait(), 10)
        gates = gateway.router.gates
        await _wait(lambda: "kv" in gates and len(gates["kv"].pools) == 2, "the pools")
        assert gates["kv"].endpoint == blue[0]
        assert gates["kv"].pools[blue[0]].endpoints == tuple(blue)
        assert gates["kv"].pools[green[0]].endpoints == tuple(green)
        entry = remote.table()["kv"]
        assert entry["endpoint"] == blue[0]  # what an older gateway routes every call to
        assert [one["endpoint"] for one in entry.get("endpoints", [])] == blue
        remote.dropped(blue[1])  # that replica was restarted on its socket path
        assert remote.table()["kv"].get("endpoints", [])[1]["incarnation"] == 1
        remote.set_route("kv", blue[0], "bh-kv-blue", spec(), blue[1:])  # b0 is down
        await _wait(lambda: gates["kv"].pools[blue[0]].endpoints == tuple(blue[1:]), "b0 out")
        status = (await remote.request({"type": "status"}, 5))["plugins"]["kv"]
        assert status["endpoints"] == blue[1:]
        remote.set_route("kv", blue[0], "bh-kv-blue", spec())  # one replica again
        remote.set_canary("kv", None, 0)
        await _wait(lambda: not gates["kv"].pools, "no pools")
        assert "endpoints" not in remote.table()["kv"]


async def test_every_replica_and_canary_pod_gets_its_token_and_tls_on_a_remote_gateway() -> None:
    """Pods (Kubernetes) are reached over mutual TLS with the plugin's token: the table says
    how for each endpoint a call may go to, not only the color's first replica."""
    blue = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
    green = ["10.0.1.1:7000", "10.0.1.2:7000"]
    every = [*blue, *green]
    routes = control.RemoteRoutes(None, lambda: {"kv": KV})
    routes.carry_tokens(lambda e: "kv-token" if e in every else None)
    checked: dict[str, control.EndpointTLS] = {
        e: {"serverName": "kv.plugins.c1.plugin.blackhole", "ca": "PEM"} for e in every
    }
    routes.carry_tls(checked.get)
    routes.set_route("kv", blue[0], "bh-kv-blue", spec(), blue)
    routes.set_canary("kv", green[0], 10, None, green)
    table = routes.table()
    assert table["kv"]["tls"] == checked
    gateway = control.ControlServer(router.Router())
    gateway.apply_table(table)
    assert gateway.tokens == dict.fromkeys(every, "kv-token")
    assert gateway.tls == checked


def test_an_older_entry_without_endpoints_routes_as_before() -> None:
    controls = control.ControlServer(router.Router())
    controls.apply_table({"kv": control.entry(KV, "unix:/a.sock", "bh-kv-blue")})
    assert controls.router.gates["kv"].endpoint == "unix:/a.sock"
    assert not controls.router.gates["kv"].pools


async def _not_initialized(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, server.NOT_INITIALIZED)
    raise AssertionError("abort raises")


async def test_a_call_a_replica_restarted_in_place_refuses_unrun_goes_to_another(
    socket_dir: Path,
) -> None:
    """A replica the platform restarted at the same address (a pod's container) refuses
    calls until the controller shook hands with it: those go to another replica; any other
    refusal is the caller's answer."""
    (socket_dir / "fresh").mkdir()
    async with (
        _plugin(socket_dir / "fresh", _not_initialized) as fresh,
        _plugin(socket_dir) as alive,
    ):
        routes, plugins = router.Router(), client.Clients()
        routes.set_route("kv", fresh, "bh-kv-blue", spec(), [fresh, alive])
        gateway = server.Gateway(lambda key: KV if key == "kv" else None, routes, plugins)
        bound = await gateway.start("127.0.0.1:0", None)
        url = f"http://{bound['http']}/v1/plugins/kv/call/echo"
        try:
            for _ in range(6):
                assert await asyncio.to_thread(_post, url) == (200, {"a": 1})
            assert routes.counts[fresh].calls == 6 + 3, "each tried once on the fresh one"
            routes.set_route("kv", fresh, "bh-kv-blue", spec())  # the fresh one alone
            status, answer = await asyncio.to_thread(_post, url)
            assert status == 409, answer
        finally:
            await gateway.stop()
            await plugins.close()


async def test_a_call_a_dead_replica_drops_goes_to_another_replica(socket_dir: Path) -> None:
    """A replica whose socket is gone (it died) fails no caller: each call it would have
    taken goes to another replica of its color at once; with no other left, it fails."""
    dead = f"unix:{socket_dir / 'gone.sock'}"
    async with _plugin(socket_dir) as alive:
        routes, plugins = router.Router(), client.Clients()
        routes.set_route("kv", dead, "bh-kv-blue", spec(), [dead, alive])
        gateway = server.Gateway(lambda key: KV if key == "kv" else None, routes, plugins)
        bound = await gateway.start("127.0.0.1:0", None)
        url = f"http://{bound['http']}/v1/plugins/kv/call/echo"
        try:
            for _ in range(6):  # half of them are first sent to the dead one
                assert await asyncio.to_thread(_post, url) == (200, {"a": 1})
            assert routes.counts[dead].calls == 6 + 3, "each tried once on the dead one"
            routes.set_route("kv", dead, "bh-kv-blue", spec())  # the dead one alone
            status, _ = await asyncio.to_thread(_post, url)
            assert status == 502
        finally:
            await gateway.stop()
            await plugins.close()
