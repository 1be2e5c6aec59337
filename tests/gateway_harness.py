"""A real gateway on loopback, in a thread of its own, in front of a fake plugin; and its fuzzing.

:class:`GatewayThread` runs :class:`controller.gateway.server.Gateway` on
ports the kernel picks, with two declared plugins (``kv`` and ``secret``)
routed to one in-process gRPC plugin (``echo`` answers the payload, ``fail``
fails with internal-looking text, anything else is UNIMPLEMENTED), and two
tokens (:data:`OPS` may call every plugin, :data:`NARROW` only ``kv``).

:func:`http_requests` and :func:`grpc_calls` are hypothesis strategies of
hostile inputs; :func:`http_outcome` and :func:`grpc_outcome` send one and
say whether it ended as it must: a well-formed answer (or, for a request
that never completed, a close by the gateway), within a time bound. Used by
``tests/unit/test_gateway_bounds.py`` and ``bench/fuzz_gateway.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from blackhole_sdk.proto import plugin_pb2
from hypothesis import strategies as st

from controller.gateway import auth, connections, router, server, tls
from controller.protocol import client
from controller.spec import models

OPS = "ops-token-0123456789"
NARROW = "narrow-token-0123456789"
PLUGINS = ("kv", "secret")
HANDLE = "/blackhole.plugin.v1.Plugin/Handle"
LEAK = "Traceback KeyError /srv/plugin/secret.py"
"""What the fake plugin says when it fails: no caller may see it."""

T = TypeVar("T")


def _plugin(name: str, call_timeout: float, max_request_bytes: int) -> models.Plugin:
    return models.Plugin.model_validate(
        {
            "apiVersion": "blackhole.dev/v1alpha1",
            "kind": "Plugin",
            "metadata": {"name": name},
            "spec": {
                "image": "blackhole/x:1",
                "version": "1.0.0",
                "gateway": {"timeoutSeconds": call_timeout, "maxRequestBytes": max_request_bytes},
            },
        }
    )


async def _fake_handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    decoded = plugin_pb2.HandleRequest.FromString(request)
    if decoded.method == "echo":
        return plugin_pb2.HandleResponse(payload=decoded.payload).SerializeToString()
    if decoded.method == "fail":
        await context.abort(grpc.StatusCode.UNKNOWN, LEAK)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown method")
    raise AssertionError("abort returns no answer")


class GatewayThread:
    """The gateway and its fake plugin on an event loop in a thread; a context manager."""

    def __init__(
        self,
        limits: connections.Limits | None = None,
        *,
        tokens: bool = True,
        call_timeout: float = 5.0,
        max_request_bytes: int = 1 << 20,
        listener_tls: tls.ListenerTLS | None = None,
        more_tokens: tuple[auth.Token, ...] = (),
    ) -> None:
        self.limits = limits or connections.Limits()
        self.listener_tls = listener_tls
        self.more_tokens = more_tokens
        """Entries after :data:`OPS` and :data:`NARROW` (e.g. known by certificates)."""
        self.tokens = tokens
        self.call_timeout = call_timeout
        self.max_request_bytes = max_request_bytes
        self.http = ""
        self.grpc = ""
        self.gateway: server.Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._dir = tempfile.TemporaryDirectory(prefix="bh-gw-")

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the gateway did not start within 60s")
        if not self.http:
            raise RuntimeError("the gateway did not start: see its thread's traceback")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        self._dir.cleanup()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``work`` on the gateway's loop; its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        socket_path = f"{self._dir.name}/plugin.sock"
        plugin_server = grpc.aio.server()
        plugin_server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "blackhole.plugin.v1.Plugin",
                    {"Handle": grpc.unary_unary_rpc_method_handler(_fake_handle)},
                ),
            )
        )
        plugin_server.add_insecure_port(f"unix:{socket_path}")
        await plugin_server.start()
        declared = {
            name: _plugin(name, self.call_timeout, self.max_request_bytes) for name in PLUGINS
        }
        routes = router.Router()
        for name, plugin in declared.items():
            routes.set_route(name, f"unix:{socket_path}", f"bh-{name}-blue", plugin.spec)
        tokens = None
        if self.tokens:
            tokens = auth.Tokens(
                [
                    auth.Token("ops", hashlib.sha256(OPS.encode()).hexdigest(), frozenset("*")),
                    auth.Token(
                        "narrow", hashlib.sha256(NARROW.encode()).hexdigest(), frozenset({"kv"})
                    ),
                    *self.more_tokens,
                ]
            )
        plugins = client.Clients()
        self.gateway = server.Gateway(
            lambda key: router.Declared.of(declared[key].spec) if key in declared else None,
            routes,
            plugins,
            tokens=tokens,
            limits=self.limits,
            tls=self.listener_tls,
        )
        try:
            bound = await self.gateway.start("127.0.0.1:0", "127.0.0.1:0")
            self.http, self.grpc = bound["http"], bound["grpc"]
            self._ready.set()
            await self._stop.wait()
        finally:
            await self.gateway.stop()
            await plugins.close()
            await plugin_server.stop(0)


# HTTP.

EXPECTED_HTTP = frozenset({200, 400, 401, 404, 405, 408, 413, 429, 501, 502, 503, 504})
"""Every status the gateway may answer a request with; a 500 is its own fault."""
_STATUS = re.compile(rb"^HTTP/\d\.\d (\d{3})[^\r\n]*$")
"""aiohttp answers in the version asked for (1.0, 1.1, or any other it parses)."""


@dataclass(frozen=True)
class Outcome:
    """How one input ended: ``ok`` when as it must, with what was seen and how long it took."""

    ok: bool
    what: str
    seconds: float


def http_outcome(address: str, raw: bytes, bound: float = 10.0) -> Outcome:
    """Send ``raw`` on a new connection; a well-formed answer, or a close, within ``bound``."""
    host, port = address.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=bound) as sock:
        with contextlib.suppress(OSError):  # the gateway may answer and close before all is sent
            sock.sendall(raw)
        received = bytearray()
        deadline = started + bound
        while True:
            verdict = _parse_answer(bytes(received), bodiless=raw.startswith(b"HEAD "))
            if verdict is not None:
                return Outcome(verdict[0], verdict[1], time.monotonic() - started)
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome(False, "no answer and no close within the bound", bound)
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                seconds = time.monotonic() - started
                if received:
                    return Outcome(False, f"closed mid-answer: {bytes(received[:200])!r}", seconds)
                return Outcome(True, "closed", seconds)
            received += chunk


def _parse_answer(data: bytes, bodiless: bool) -> tuple[bool, str] | None:
    """``(ok, what)`` once ``data`` holds a whole answer, None while it may still come.

    The answer to a HEAD request has headers only.
    """
    while True:
        head, found, rest = data.partition(b"\r\n\r\n")
        if not found:
            return None
        lines = head.split(b"\r\n")
        status = _STATUS.match(lines[0])
        if status is None:
            return False, f"not an HTTP status line: {lines[0][:200]!r}"
        code = int(status[1])
        if code == 100:  # an interim answer: the real one follows
            data = rest
            continue
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return False, f"a malformed header: {line[:200]!r}"
            headers[name.strip().lower()] = value.strip()
        if b"content-length" not in headers:
            return False, f"{code} without Content-Length"
        length = 0 if bodiless else int(headers[b"content-length"])
        if len(rest) < length:
            return None
        body = rest[:length]
        if code == 500 and body.endswith(b' failed the call", "reason": "PluginError"}'):
            return True, "500"  # the plugin's own failure, told in no words of its own
        if code not in EXPECTED_HTTP:
            return False, f"status {code}: {body[:200]!r}"
        if code != 200 and not bodiless:
            return _check_refusal(code, body)
        return True, str(code)


def _check_refusal(code: int, body: bytes) -> tuple[bool, str]:
    """A refusal's body: JSON ``{"error", "reason"}``, nothing internal in it."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False, f"{code} with a body that is not JSON: {body[:200]!r}"
    if not isinstance(answer, dict) or set(answer) != {"error", "reason"}:
        return False, f"{code} with an unexpected body: {body[:200]!r}"
    if LEAK in answer["error"] or "Traceback" in answer["error"]:
        return False, f"{code} leaks internal text: {body[:200]!r}"
    return True, str(code)


_TOKEN_CHARS = st.characters(codec="ascii", exclude_characters="\r\n")
_URL_SAFE = st.characters(
    codec="ascii", categories=["L", "N"], include_characters="-._~%!$&'()*+,;=:@"
)
_WORD = st.one_of(st.text(_URL_SAFE, min_size=1, max_size=40), st.text(_TOKEN_CHARS, max_size=40))
_NAME = st.one_of(st.sampled_from([*PLUGINS, "kv", "kv", "nosuch", "", "..", "%2F"]), _WORD)
_METHOD = st.one_of(
    st.sampled_from(["echo", "echo", "echo", "fail", "get", "", "%00", "a%2Fb"]),
    st.text(max_size=40).map(lambda s: "".join(f"%{b:02X}" for b in s.encode())),
    st.integers(0, 12_000).map(lambda n: "m" * n),
)


@st.composite
def _target(draw: st.DrawFn, hostile: bool) -> bytes:
    kinds = ["valid", "valid", "valid", "call", "call", "namespaced", "healthz"]
    kind = draw(st.sampled_from([*kinds, "other", "bytes"] if hostile else kinds))
    if kind == "valid":
        name, method = draw(st.sampled_from(PLUGINS)), draw(st.sampled_from(["echo", "fail", "x"]))
        return f"/v1/plugins/{name}/call/{method}".encode()
    if kind == "call":
        return f"/v1/plugins/{draw(_NAME)}/call/{draw(_METHOD)}".encode(errors="replace")
    if kind == "namespaced":
        path = f"/v1/namespaces/{draw(_WORD)}/plugins/{draw(_NAME)}/call/{draw(_METHOD)}"
        return path.encode(errors="replace")
    if kind == "healthz":
        return b"/healthz" + draw(st.sampled_from([b"", b"?x=1", b"/", b"#"]))
    if kind == "other":
        return draw(_WORD).encode()
    return draw(st.binary(max_size=200))


_HEADER = st.one_of(
    st.sampled_from(
        [
            (b"Authorization", f"Bearer {OPS}".encode()),
            (b"Authorization", f"Bearer {NARROW}".encode()),
            (b"Authorization", b"Bearer nope"),
            (b"Authorization", b"Basic abc"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Transfer-Encoding", b"gzip, chunked"),
            (b"Content-Encoding", b"gzip"),
            (b"Connection", b"close"),
            (b"Connection", b"upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Expect", b"100-continue"),
            (b"Content-Length", b"-1"),
            (b"Content-Length", b"99999999999999999999"),
            (b"Content-Length", b"1, 2"),
        ]
    ),
    st.tuples(
        st.just(b"X-Timeout-Seconds"),
        st.one_of(
            st.floats(allow_nan=True).map(lambda f: repr(f).encode()), st.binary(max_size=20)
        ),
    ),
    st.tuples(st.just(b"Content-Length"), st.integers(0, 5000).map(lambda n: str(n).encode())),
    st.tuples(st.binary(max_size=30), st.binary(max_size=60)),
    st.tuples(st.just(b"X-Long"), st.integers(0, 10_000).map(lambda n: b"v" * n)),
)


_NEAR_VALID_HEADER = st.one_of(
    st.sampled_from(
        [
            (b"Authorization", f"Bearer {OPS}".encode()),
            (b"Authorization", f"Bearer {NARROW}".encode()),
            (b"Content-Type", b"application/json"),
            (b"Connection", b"keep-alive"),
            (b"Connection", b"close"),
            (b"Expect", b"100-continue"),
            (b"Transfer-Encoding", b"chunked"),
        ]
    ),
    st.tuples(
        st.just(b"X-Timeout-Seconds"),
        st.floats(0.01, 2).map(lambda f: repr(f).encode()),
    ),
)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """One request as sent on the wire: most nearly valid, one in four hostile throughout."""
    body = draw(st.binary(max_size=2000))
    hostile = draw(st.integers(0, 3)) == 3  # hypothesis favours 0: the near-valid case
    if hostile:
        method = draw(
            st.one_of(
                st.sampled_from([b"POST", b"GET", b"HEAD", b"PUT", b"OPTIONS", b"PRI"]),
                st.binary(max_size=12),
            )
        )
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]))
        eol = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
        headers = draw(st.lists(_HEADER, max_size=8))
    else:
        method = draw(st.sampled_from([b"POST", b"POST", b"POST", b"GET", b"HEAD", b"PUT"]))
        version, eol = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])), b"\r\n"
        headers = [(b"Host", b"127.0.0.1"), *draw(st.lists(_NEAR_VALID_HEADER, max_size=4))]
        if draw(st.booleans()):
            headers.insert(1, (b"Authorization", f"Bearer {OPS}".encode()))
        if draw(st.integers(0, 3)) == 3:
            headers.append(draw(_HEADER))
        if (b"Transfer-Encoding", b"chunked") in headers and draw(st.booleans()):
            cut = draw(st.integers(0, len(body)))
            body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                cut,
                body[:cut],
                len(body) - cut,
                body[cut:],
            )
    if draw(st.integers(0, 3)) != 3 or (b"Transfer-Encoding", b"chunked") in headers:
        length = len(body) + draw(st.sampled_from([0, 0, 0, 0, 0, 0, -1, 1, 100]))
        headers.append((b"Content-Length", str(max(0, length)).encode()))
    parts = [method, draw(_target(hostile)), version]
    line = b" ".join(part for part in parts if part or draw(st.booleans()))
    head = line + eol + b"".join(name + b": " + value + eol for name, value in headers)
    return head + eol + body


# gRPC.

EXPECTED_GRPC = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
"""The codes a call may end with; the plugin's own failure is UNKNOWN, with no text of its own."""

_METADATA_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@st.composite
def grpc_calls(draw: st.DrawFn) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """A ``Handle`` body (a real request or bytes) and the metadata it is sent with."""
    if draw(st.booleans()):
        method = draw(
            st.one_of(
                st.sampled_from(["echo", "fail", "get", ""]),
                st.text(max_size=40),
                st.integers(0, 70_000).map(lambda n: "m" * n),
            )
        )
        payload = draw(st.binary(max_size=6000))
        body = plugin_pb2.HandleRequest(method=method, payload=payload).SerializeToString()
        if draw(st.booleans()):  # damaged: cut short, or bytes flipped
            cut = draw(st.integers(0, len(body)))
            body = body[:cut] + draw(st.binary(max_size=8))
    else:
        body = draw(st.binary(max_size=3000))
    metadata = []
    plugin: str | None = "kv"
    authorization: str | None = f"Bearer {OPS}"
    if draw(st.integers(0, 3)) == 3:  # hypothesis favours 0: mostly a caller who may call kv
        names = [*PLUGINS, "nosuch", None]
        plugin = draw(st.one_of(st.sampled_from(names), _METADATA_VALUE))
    if draw(st.integers(0, 3)) == 3:
        tokens = [f"Bearer {NARROW}", "Bearer no", None]
        authorization = draw(st.one_of(st.sampled_from(tokens), _METADATA_VALUE))
    if plugin is not None:
        metadata.append(("x-blackhole-plugin", plugin))
    if authorization is not None:
        metadata.append(("authorization", authorization))
    return body, tuple(metadata)


def grpc_outcome(
    handle: grpc.UnaryUnaryMultiCallable[bytes, bytes],
    body: bytes,
    metadata: tuple[tuple[str, str], ...],
    bound: float = 10.0,
) -> Outcome:
    """Call ``Handle`` with ``body``; one of the expected codes, no internal text, in ``bound``."""
    started = time.monotonic()
    try:
        handle(body, metadata=metadata, timeout=bound)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        seconds = time.monotonic() - started
        if LEAK in details or "Traceback" in details or "Exception" in details:
            return Outcome(False, f"{code.name} leaks internal text: {details[:200]!r}", seconds)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and seconds >= bound:
            return Outcome(False, "no answer within the bound", seconds)
        if code is grpc.StatusCode.UNKNOWN and details.endswith("failed the call"):
            return Outcome(True, code.name, seconds)
        return Outcome(code in EXPECTED_GRPC, f"{code.name}: {details[:200]}", seconds)
    return Outcome(True, "OK", time.monotonic() - started)


def raw_handle(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """``Handle`` on ``channel``, its request and answer as bytes."""
    return channel.unary_unary(HANDLE)
