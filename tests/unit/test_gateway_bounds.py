"""The gateway against hostile clients: a real gateway on loopback in front of a fake plugin.

What a caller needs no token for (opening connections, sending bytes) and
what it sends (method names, bodies) is bounded in memory and in time, and
every input, however malformed, ends in a well-formed answer.
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import selectors
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import pytest
from blackhole_sdk.proto import plugin_pb2
from hypothesis import HealthCheck, given, settings

from controller.cli import run
from controller.gateway import connections
from tests import gateway_harness as harness

MIB = 1 << 20


def http_call(
    address: str, path: str, body: bytes = b"{}", token: str | None = harness.OPS
) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


@pytest.fixture
def channels() -> Iterator[list[grpc.Channel]]:
    """gRPC channels a test opens, closed after it."""
    opened: list[grpc.Channel] = []
    yield opened
    for channel in opened:
        channel.close()


def handle_on(
    address: str, channels: list[grpc.Channel]
) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)])
    channels.append(channel)
    return harness.raw_handle(channel)


def metadata(plugin: str, token: str = harness.OPS) -> tuple[tuple[str, str], ...]:
    return (("x-blackhole-plugin", plugin), ("authorization", f"Bearer {token}"))


def request(method: str, payload: bytes = b"{}") -> bytes:
    return plugin_pb2.HandleRequest(method=method, payload=payload).SerializeToString()


def test_unknown_and_forbidden_plugins_get_the_same_answer(channels) -> None:
    with harness.GatewayThread() as gateway:
        forbidden = http_call(gateway.http, "/v1/plugins/secret/call/get", token=harness.NARROW)
        unknown = http_call(gateway.http, "/v1/plugins/nosuch/call/get", token=harness.NARROW)
        assert forbidden[0] == unknown[0] == 404
        assert forbidden[1].replace(b"secret", b"X") == unknown[1].replace(b"nosuch", b"X")
        assert http_call(gateway.http, "/v1/plugins/kv/call/echo", token=harness.NARROW) == (
            200,
            b"{}",
        )

        handle = handle_on(gateway.grpc, channels)
        answers = []
        for plugin in ("secret", "nosuch"):
            with pytest.raises(grpc.RpcError) as refused:
                handle(request("get"), metadata=metadata(plugin, harness.NARROW), timeout=30)
            said = str(refused.value.details()).replace(plugin, "X")
            answers.append((refused.value.code(), said))
        assert answers[0] == answers[1]
        assert answers[0][0] is grpc.StatusCode.NOT_FOUND


def test_undecodable_grpc_bodies_are_invalid_arguments_and_plugin_failures_say_nothing(
    channels,
) -> None:
    with harness.GatewayThread() as gateway:
        handle = handle_on(gateway.grpc, channels)
        for garbage in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"):
            with pytest.raises(grpc.RpcError) as refused:
                handle(garbage, metadata=metadata("kv"), timeout=30)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, garbage
            assert "DecodeError" not in str(refused.value.details())
            assert "Error parsing" not in str(refused.value.details())

        with pytest.raises(grpc.RpcError) as failed:
            handle(request("fail"), metadata=metadata("kv"), timeout=30)
        assert failed.value.details() == "kv failed the call"
        status, body = http_call(gateway.http, "/v1/plugins/kv/call/fail")
        assert status == 500
        assert harness.LEAK not in body.decode()
        assert json.loads(body) == {"error": "kv failed the call", "reason": "PluginError"}


def test_unique_long_method_names_leave_the_gateway_memory_flat(channels) -> None:
    """10,000 calls, each with a method name nobody used before: nothing of them is kept."""
    with harness.GatewayThread() as gateway:
        handle = handle_on(gateway.grpc, channels)
        host, port = gateway.http.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)

        def one(i: int) -> None:
            name = f"{i:06d}"
            if i % 4 == 0:  # gRPC, 64 KiB names, allowed and forbidden
                plugin, token = ("kv", harness.OPS) if i % 8 else ("secret", harness.NARROW)
                with pytest.raises(grpc.RpcError) as refused:
                    handle(request(name * 10_923), metadata=metadata(plugin, token), timeout=30)
                assert refused.value.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                )
            elif i % 4 == 1:  # a short unique name the plugin does not know
                with pytest.raises(grpc.RpcError) as unknown:
                    handle(request(f"m{name}" * 30), metadata=metadata("kv"), timeout=30)
                assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED
            else:  # HTTP, 8,000-byte names in the path, allowed and forbidden
                plugin, token = ("kv", harness.OPS) if i % 4 == 2 else ("secret", harness.NARROW)
                connection.request(
                    "POST",
                    f"/v1/plugins/{plugin}/call/{name * 1333}",
                    body=b"{}",
                    headers={"Authorization": f"Bearer {token}"},
                )
                answer = connection.getresponse()
                answer.read()
                assert answer.status in (400, 404)

        tracemalloc.start()
        try:
            for i in range(200):  # warm up every path and cache
                one(i)
            gc.collect()
            baseline = tracemalloc.get_traced_memory()[0]
            for i in range(200, 10_000):
                one(i)
                if i % 1000 == 999:
                    gc.collect()
                    grown = tracemalloc.get_traced_memory()[0] - baseline
                    assert grown < 20 * MIB, f"{grown / MIB:.1f} MiB kept after {i} calls"
        finally:
            tracemalloc.stop()
            connection.close()
        assert gateway.gateway is not None
        labels = {
            sample.labels["method"]
            for metric in gateway.gateway.router.metrics.requests.collect()
            for sample in metric.samples
        }
        assert labels == {"other"}, "no made-up method name became a label"


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting until {what}")
        time.sleep(0.01)


def wait_all_closed(sockets: list[socket.socket], deadline_seconds: float) -> list[socket.socket]:
    """Wait until the far end closed every socket, or the deadline; the ones still open."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
    still = set(sockets)
    deadline = time.monotonic() + deadline_seconds
    try:
        while still and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                sock = key.data
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    still.discard(sock)
    finally:
        selector.close()
    return list(still)


def connect(address: str, n: int, first: bytes = b"") -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    opened = []
    for _ in range(n):
        sock = socket.create_connection((host, int(port)), timeout=30)
        if first:
            sock.sendall(first)
        opened.append(sock)
    return opened


def test_idle_connections_are_closed_and_calls_keep_working_meanwhile(channels) -> None:
    """2,000 silent, half-sent or idle keep-alive connections on each listener are closed."""
    assert run.open_files_limit() >= 10_000, "the test holds 8,000 descriptors"
    limits = connections.Limits(header_timeout=8, idle_timeout=8)
    with harness.GatewayThread(limits) as gateway:
        keep_alive = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # answered, then idle
        idle = [
            *connect(gateway.http, 1800),
            *connect(gateway.http, 100, b"POST /v1/plugins/kv/call/echo HTTP/1.1\r\nHost:"),
            *connect(gateway.http, 100, keep_alive),
            *connect(gateway.grpc, 2000),
        ]
        try:
            handle = handle_on(gateway.grpc, channels)
            assert gateway.gateway is not None
            server = gateway.gateway.http
            wait_until(lambda: len(server.open) >= 1500, "the gateway took the connections")
            assert http_call(gateway.http, "/v1/plugins/kv/call/echo", b'{"a": 1}') == (
                200,
                b'{"a": 1}',
            )
            answer = handle(request("echo", b"[1]"), metadata=metadata("kv"), timeout=30)
            assert plugin_pb2.HandleResponse.FromString(answer).payload == b"[1]"
            assert len(server.open) >= 1000, "the calls were made while they were open"
            left = wait_all_closed(idle, deadline_seconds=120)
            assert left == [], f"{len(left)} of {len(idle)} idle connections still open"
            assert http_call(gateway.http, "/v1/plugins/kv/call/echo", b"2") == (200, b"2")
        finally:
            for sock in idle:
                sock.close()


def test_past_the_cap_idle_connections_make_room_for_callers() -> None:
    limits = connections.Limits(max_connections=50)
    with harness.GatewayThread(limits) as gateway:
        idle = connect(gateway.http, 200)
        try:
            for _ in range(5):
                assert http_call(gateway.http, "/v1/plugins/kv/call/echo", b"[]") == (200, b"[]")
            # The oldest ones were closed to make room: at most 50 stay open.
            left = wait_all_closed(idle[:150], deadline_seconds=60)
            assert left == []
            assert gateway.gateway is not None
            assert len(gateway.gateway.http.open) <= 50
        finally:
            for sock in idle:
                sock.close()
        grpc_idle = connect(gateway.grpc, 60)
        try:
            past_the_cap = grpc_idle[50:]
            assert wait_all_closed(past_the_cap, deadline_seconds=60) == [], "gRPC closes them"
        finally:
            for sock in grpc_idle:
                sock.close()


def test_malformed_requests_are_logged_at_debug_at_most_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with harness.GatewayThread() as gateway:
        for _ in range(50):
            outcome = harness.http_outcome(
                gateway.http, b"POST /v1/plugins/kv/call/echo HTTP/1.1\r\nBad Header\r\n\r\n"
            )
            assert (outcome.ok, outcome.what) == (True, "400")
        assert gateway.gateway is not None
        assert gateway.gateway.quiet.seen == 50
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    noted = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert 1 <= len(noted) < 50, "rate-limited"
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in noted)


def test_fuzzed_http_requests_end_in_well_formed_answers() -> None:
    limits = connections.Limits(header_timeout=0.5, idle_timeout=0.5)
    with harness.GatewayThread(limits, call_timeout=0.5) as gateway:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(harness.http_requests())
        def check(raw: bytes) -> None:
            outcome = harness.http_outcome(gateway.http, raw)
            assert outcome.ok, (outcome.what, raw[:300])

        check()
        assert http_call(gateway.http, "/v1/plugins/kv/call/echo", b"1") == (200, b"1")


def test_fuzzed_grpc_calls_end_in_expected_codes(channels) -> None:
    with harness.GatewayThread(call_timeout=2) as gateway:
        handle = handle_on(gateway.grpc, channels)

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(harness.grpc_calls())
        def check(call: tuple[bytes, tuple[tuple[str, str], ...]]) -> None:
            outcome = harness.grpc_outcome(handle, *call)
            assert outcome.ok, (outcome.what, call[0][:300], call[1])

        check()
        answer = handle(request("echo", b"2"), metadata=metadata("kv"), timeout=30)
        assert plugin_pb2.HandleResponse.FromString(answer).payload == b"2"
