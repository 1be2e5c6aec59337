"""``serve()``: a :class:`~blackhole_sdk.plugin.Plugin` behind the plugin protocol over gRPC.

The controller starts each instance with ``BLACKHOLE_SOCKET`` (the Unix
socket to listen on; ``BLACKHOLE_ADDRESS``, a ``host:port``, where plugins
are reached over TCP), ``BLACKHOLE_PLUGIN``, ``BLACKHOLE_VERSION`` and
``BLACKHOLE_COLOR``. The server answers ``blackhole.plugin.v1.Plugin`` and
``grpc.health.v1.Health`` (NOT_SERVING until ``Initialize``; the service
``liveness`` is SERVING while the process answers at all, for probes that
must not restart a plugin waiting for its handshake), and on SIGTERM drains
(stops taking calls, lets those in flight finish) and exits 0. Logs go to
stderr.

Drained over TCP (the controller's ``Drain`` at a blue/green flip), the
server also lets every connection go as a graceful stop does: each gets an
HTTP/2 GOAWAY, its calls in flight finish, and its client opens a new
connection for the next call, through the plugin's Service, which by then
selects the new color. As a Service's endpoints reach every node a little
later, this is done again every :data:`GOAWAY_SECONDS` while the plugin
stays drained, so a client that reconnected before the move is let go again.

Reached over TCP, a plugin is started with ``BLACKHOLE_PLUGIN_TOKEN`` too:
every call of the plugin protocol must then carry ``authorization: Bearer
<token>``, and is refused with UNAUTHENTICATED otherwise (health checks
reveal nothing and need no token).

Given ``BLACKHOLE_TLS_CERT``, ``BLACKHOLE_TLS_KEY`` and ``BLACKHOLE_TLS_CA``
(PEM files), a TCP listener serves TLS only and requires a client certificate
from that CA (mutual TLS). The files are read again at each new connection's
handshake when they changed, so a renewed certificate is served from the next
connection on, and connections already open go on. Only the controller's own
clients are let in: a certificate whose SAN URI is a role of the controller
(``blackhole://<controller-id>/<role>``), not another plugin's
(``blackhole://<controller-id>/<namespace>/<plugin>``);
``BLACKHOLE_TLS_CLIENTS``, a comma-separated list of such URIs, narrows that
to the ones named. ``BLACKHOLE_HEALTH_ADDRESS`` adds a plaintext listener
with the health service only (``grpc.health.v1``, which says SERVING or not and
nothing else), for probes that speak no TLS, such as the kubelet's.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blackhole_sdk import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, __version__
from blackhole_sdk.plugin import Plugin, PluginError, encode, invoke, resolve
from blackhole_sdk.proto import plugin_pb2, plugin_pb2_grpc

log = logging.getLogger("blackhole_sdk")

CHUNK_BYTES = 1 << 20
"""Size of the stream chunks sent."""
STATE_CHUNK_BYTES = 256 << 10
"""Size of the state chunks sent: small enough that a relay holds little of a state at once
(the controller's memory during a 100 MB transfer grew 14 MiB with 1 MiB chunks, 4 with
these)."""
DRAIN_GRACE_SECONDS = 30.0
"""How long SIGTERM waits for calls in flight."""
GOAWAY_SECONDS = 2.0
"""While drained over TCP: how often every connection is let go (GOAWAY) again."""
MAX_MESSAGE_BYTES = 16 << 20
"""Largest single message accepted (state chunks and Handle payloads)."""


class Servicer(plugin_pb2_grpc.PluginServicer):
    """The protocol's calls, turned into calls of one plugin object."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.config: dict[str, Any] | None = None
        self.answer: plugin_pb2.InitializeResponse | None = None
        self.initializations = 0
        """Initialize calls answered: the controller tells a new process by the first."""
        self.in_flight = 0
        self.draining = False
        self.on_drain: Callable[[], None] | None = None
        """Called when a drain begins (the listener lets its connections go)."""
        self._idle = asyncio.Event()
        self._idle.set()

    # The handshake.

    async def Initialize(
        self, request: plugin_pb2.InitializeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> plugin_pb2.InitializeResponse:
        if request.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported; this plugin's "
                f"SDK ({__version__}) speaks {sorted(SUPPORTED_PROTOCOL_VERSIONS)}",
            )
        started_as = os.environ.get("BLACKHOLE_PLUGIN", "")
        if started_as and request.plugin and request.plugin != started_as:
            # Reached through another plugin's socket: answer nothing of this one.
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this instance is plugin {started_as!r}, not {request.plugin!r}",
            )
        try:
            config = json.loads(request.config_json) if request.config_json else {}
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config is not JSON: {e}")
        if self.answer is not None:
            if config != self.config:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "already initialized with another config; start a new instance to change it",
                )
            return self._answered()
        try:
            await invoke(self.plugin.initialize, config)
        except PluginError as e:
            await context.abort(e.status, f"initialize failed: {e}")
        self.config = config
        self.answer = plugin_pb2.InitializeResponse(
            protocol_version=PROTOCOL_VERSION,
            provides=list(self.plugin.provides),
            state_version=self.plugin.state_version,
            sdk=f"blackhole-plugin-sdk/{__version__}",
            features=list(self.plugin.features()),
            plugin=started_as,
        )
        log.info(
            "initialized %s %s (%s)",
            request.plugin or type(self.plugin).__name__,
            request.version,
            request.color or "no color",
        )
        return self._answered()

    def _answered(self) -> plugin_pb2.InitializeResponse:
        assert self.answer is not None
        self.initializations += 1
        answer = plugin_pb2.InitializeResponse()
        answer.CopyFrom(self.answer)
        answer.initializations = self.initializations
        return answer

    # Calls.

    async def _enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.answer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not initialized yet")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining: not taking calls")
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def Handle(
        self, request: plugin_pb2.HandleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> plugin_pb2.HandleResponse:
        await self._enter(context)
        try:
            result = await resolve(
                self.plugin.handle_bytes(request.method, dict(request.metadata), request.payload)
            )
            return plugin_pb2.HandleResponse(payload=encode(result))
        except PluginError as e:
            await context.abort(e.status, str(e))
        except Exception:  # a plugin's bug is the caller's INTERNAL, not the server's death
            log.exception("%s failed", request.method)
            # What went wrong is in the plugin's log; callers learn nothing of its insides.
            await context.abort(grpc.StatusCode.INTERNAL, f"{request.method} failed")
        finally:
            self._leave()

    async def HandleStream(
        self,
        request_iterator: AsyncIterator[plugin_pb2.HandleChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[plugin_pb2.HandleChunk]:
        await self._enter(context)
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or not first.method:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first chunk names no method"
                )
            assert first is not None

            async def chunks() -> AsyncIterator[bytes]:
                yield first.data
                async for chunk in request_iterator:
                    yield chunk.data

            try:
                async for data in self.plugin.handle_stream(
                    first.method, dict(first.metadata), chunks()
                ):
                    for start in range(0, max(len(data), 1), CHUNK_BYTES):
                        yield plugin_pb2.HandleChunk(data=data[start : start + CHUNK_BYTES])
            except PluginError as e:
                await context.abort(e.status, str(e))
            except Exception:
                log.exception("%s failed", first.method)
                await context.abort(grpc.StatusCode.INTERNAL, f"{first.method} failed")
        finally:
            self._leave()

    # State.

    async def ExportState(
        self, request: plugin_pb2.ExportStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[plugin_pb2.StateChunk]:
        since = request.since_revision
        try:
            changes = await resolve(self.plugin.export_changes(since)) if since else None
            if changes is not None:
                state, revision = changes
            else:
                state, revision = await resolve(self.plugin.export_snapshot())
        except PluginError as e:
            await context.abort(e.status, f"export failed: {e}")
        state = bytes(state)
        digest = await _sha256(state)
        header = {
            "state_version": self.plugin.state_version,
            "size": len(state),
            "sha256": digest,
            "revision": revision,
            "delta": changes is not None,
            "base_revision": since if changes is not None else "",
        }
        for start in range(0, max(len(state), 1), STATE_CHUNK_BYTES):
            yield plugin_pb2.StateChunk(**header, data=state[start : start + STATE_CHUNK_BYTES])

    async def ImportState(
        self,
        request_iterator: AsyncIterator[plugin_pb2.StateChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> plugin_pb2.ImportStateResponse:
        parts: list[bytes] = []
        header: tuple[int, int, str, str, bool, str] | None = None
        received = 0
        async for chunk in request_iterator:
            this = (
                chunk.state_version,
                chunk.size,
                chunk.sha256,
                chunk.revision,
                chunk.delta,
                chunk.base_revision,
            )
            if header is None:
                header = this
            elif this != header:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "state chunks disagree on version, size, sha256 or revision",
                )
            received += len(chunk.data)
            if received > this[1]:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"more state bytes than the {this[1]} announced",
                )
            parts.append(chunk.data)
        if header is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no state chunk was sent")
        assert header is not None
        version, size, digest, revision, delta, base = header
        state = b"".join(parts)
        del parts
        got = await _sha256(state)
        if len(state) != size or got != digest:
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"state damaged in transfer: {len(state)} bytes with sha256 {got[:12]}..., "
                f"expected {size} and {digest[:12]}...",
            )
        own = self.plugin.state_version
        try:
            if delta:
                if version != own:
                    raise PluginError(
                        f"a delta of state version {version} cannot be applied to version "
                        f"{own}; send the whole state",
                        grpc.StatusCode.UNIMPLEMENTED,
                    )
                await invoke(self.plugin.import_changes, state, base, revision)
                result = state
            else:
                result = self.plugin.migrate(state, version)
                adopted = revision if version == own else ""  # migrated: a state of its own
                await invoke(self.plugin.import_snapshot, result, adopted)
        except PluginError as e:
            await context.abort(e.status, f"import failed: {e}")
        except (ValueError, TypeError, KeyError) as e:  # bytes the plugin cannot read
            log.warning("refused an import of state version %d: %r", version, e)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"import failed: the plugin cannot read these {size} bytes as state version "
                f"{version} ({type(e).__name__}: {e}); the state it had is kept",
            )
        log.info(
            "imported %s%d bytes of state version %d as version %d (revision %s)",
            "a delta of " if delta else "",
            size,
            version,
            own,
            self.plugin.state_revision() or "none",
        )
        return plugin_pb2.ImportStateResponse(
            state_version=own,
            size=len(result),
            sha256=got if result is state else await _sha256(result),
            revision=self.plugin.state_revision(),
        )

    # Draining.

    async def Drain(
        self, request: plugin_pb2.DrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> plugin_pb2.DrainResponse:
        if request.resume:
            self.draining = False
            log.info("resumed: taking calls again")
            return plugin_pb2.DrainResponse(in_flight=self.in_flight)
        timeout = request.timeout_milliseconds / 1000 or None
        return plugin_pb2.DrainResponse(in_flight=await self.drain(timeout))

    async def drain(self, timeout: float | None) -> int:
        """Stop taking calls; wait up to ``timeout`` s for those in flight; the number left."""
        self.draining = True
        log.info("draining: %d call(s) in flight", self.in_flight)
        if self.on_drain is not None:
            self.on_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain deadline passed with %d call(s) in flight", self.in_flight)
        return self.in_flight


async def _sha256(data: bytes) -> str:
    """The hex sha256 of ``data``; large states are hashed off the event loop."""
    if len(data) < CHUNK_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1``: SERVING once initialized, unless draining, while ``health()`` says so."""

    def __init__(self, servicer: Servicer) -> None:
        self.servicer = servicer

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service == LIVENESS:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        if request.service not in ("", SERVICE_NAME):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        serving = (
            self.servicer.answer is not None
            and not self.servicer.draining
            and bool(await resolve(self.servicer.plugin.health()))
        )
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)


SERVICE_NAME = "blackhole.plugin.v1.Plugin"
LIVENESS = "liveness"
"""The health service that is SERVING as long as the server answers (for liveness probes)."""


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses protocol calls without ``authorization: Bearer <token>`` (health is open)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self.expected):
            return handler
        return _refuse(handler)


def _refuse(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid plugin token is required")

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid plugin token is required")
        yield  # abort raises: never reached; makes this a stream handler

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.stream_stream_rpc_method_handler(abort_stream)


class TLSFiles:
    """The certificate, key and CA a TLS listener serves with, read again when they change.

    The files may be replaced at any time (a renewal): they are read as
    certificate, key, certificate again, and taken only if both readings of
    the certificate agree, so a key is never paired with another
    certificate. Writers replace them by swapping a directory (as
    Kubernetes does for mounted Secrets) or by renaming each file.
    """

    def __init__(self, cert: str, key: str, ca: str) -> None:
        self.paths = (cert, key, ca)
        self.current: tuple[bytes, bytes, bytes] = self._read()

    def _read(self) -> tuple[bytes, bytes, bytes]:
        cert_path, key_path, ca_path = self.paths
        for _ in range(50):
            try:
                with open(cert_path, "rb") as f:
                    first = f.read()
                with open(key_path, "rb") as f:
                    key = f.read()
                with open(cert_path, "rb") as f:
                    cert = f.read()
                with open(ca_path, "rb") as f:
                    ca = f.read()
            except FileNotFoundError:  # a directory swapped between a lookup and an open
                time.sleep(0.001)
                continue
            if first == cert and cert and key and ca:
                return cert, key, ca
            time.sleep(0.001)
        raise OSError(f"{cert_path} and {key_path} kept changing or are empty")

    def configuration(self) -> Any:
        cert, key, ca = self.current
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        """gRPC's question at each handshake: a new configuration, or None for the same."""
        try:
            found = self._read()
        except OSError as e:
            log.warning("TLS files unreadable, serving the last ones: %s", e)
            return None
        if found == self.current:
            return None
        self.current = found
        log.info("TLS certificate renewed from %s", self.paths[0])
        return self.configuration()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(), self.fetch, require_client_authentication=True
        )


def tls_from_environment() -> TLSFiles | None:
    """The TLS files ``BLACKHOLE_TLS_CERT``/``_KEY``/``_CA`` name; None without them."""
    names = ("BLACKHOLE_TLS_CERT", "BLACKHOLE_TLS_KEY", "BLACKHOLE_TLS_CA")
    given = [os.environ.get(name, "") for name in names]
    if not any(given):
        return None
    if not all(given):
        missing = [name for name, value in zip(names, given, strict=True) if not value]
        sys.exit(f"TLS needs all of {', '.join(names)}; missing {', '.join(missing)}")
    try:
        return TLSFiles(*given)
    except OSError as e:
        sys.exit(f"cannot read the TLS files: {e}")


IDENTITY_SCHEME = "blackhole://"


def is_role(uri: str) -> bool:
    """Whether ``uri`` names one of the controller's clients (``blackhole://<id>/<role>``)."""
    if not uri.startswith(IDENTITY_SCHEME):
        return False
    parts = uri.removeprefix(IDENTITY_SCHEME).split("/")
    return len(parts) == 2 and all(parts)


class ClientCheck(grpc.aio.ServerInterceptor):
    """Refuses calls whose client certificate names no allowed client (PERMISSION_DENIED)."""

    def __init__(self, allowed: frozenset[str] = frozenset()) -> None:
        self.allowed = allowed
        """URIs let in; empty: any role of a controller."""

    def admits(self, uris: list[str]) -> bool:
        if self.allowed:
            return any(uri in self.allowed for uri in uris)
        return any(is_role(uri) for uri in uris)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        return _checked(handler, self)


def _peer_uris(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    found = context.auth_context().get("x509_subject_alternative_name", [])
    return [value.decode(errors="replace") for value in found]


def _checked(
    handler: grpc.RpcMethodHandler[Any, Any], check: ClientCheck
) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        uris = _peer_uris(context)
        if not check.admits(uris):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {', '.join(uris) or 'without an identity'} may not call this plugin",
            )

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        unary: Any = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await refuse(context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.stream_unary:
        stream_unary: Any = handler.stream_unary

        async def client_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await refuse(context)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(client_stream, **kwargs)
    if handler.unary_stream:
        unary_stream: Any = handler.unary_stream

        async def server_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await refuse(context)
            async for item in unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(server_stream, **kwargs)
    stream_stream: Any = handler.stream_stream

    async def both(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(context)
        async for item in stream_stream(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(both, **kwargs)


def clients_from_environment() -> frozenset[str]:
    given = os.environ.get("BLACKHOLE_TLS_CLIENTS", "")
    return frozenset(uri.strip() for uri in given.split(",") if uri.strip())


def server_for(
    plugin: Plugin, token: str | None = None, clients: ClientCheck | None = None
) -> tuple[grpc.aio.Server, Servicer]:
    """A gRPC server (not yet bound or started) answering for ``plugin``.

    With ``token``, protocol calls must carry it (see :class:`TokenCheck`);
    with ``clients``, every call must come from a client it admits (over TLS).
    """
    servicer = Servicer(plugin)
    return _server(servicer, token, clients), servicer


def _server(servicer: Servicer, token: str | None, clients: ClientCheck | None) -> grpc.aio.Server:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if clients is not None:
        interceptors.append(clients)
    if token:
        interceptors.append(TokenCheck(token))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A second server on the same port takes over the listening at each GOAWAY.
            ("grpc.so_reuseport", 1),
        ],
        interceptors=interceptors or None,
    )
    plugin_pb2_grpc.add_PluginServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(servicer), server)
    return server


class Listener:
    """The servicer's gRPC server on one address; over TCP, drains let connections go.

    A GOAWAY for every connection, and only that, is what a graceful stop
    does; so at each one a new server (same servicer, same port, bound with
    ``SO_REUSEPORT``) takes over the listening first, then the old one stops
    gracefully: its calls in flight finish (within :data:`DRAIN_GRACE_SECONDS`),
    its clients reconnect, to the new server or, through a Service, elsewhere.
    A Unix socket (reached by the controller and gateway only, which route by
    instance) is never let go.
    """

    def __init__(
        self,
        servicer: Servicer,
        address: str,
        *,
        token: str | None = None,
        clients: ClientCheck | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.servicer = servicer
        self.address = address
        self.token = token
        self.clients = clients
        self.tls = tls
        self.server = self._bound(address)
        self._stopping: set[asyncio.Task[None]] = set()
        self._letting_go: asyncio.Task[None] | None = None
        self.goaways = 0
        """How many times every connection was let go."""
        if not address.startswith("unix:"):
            servicer.on_drain = self._drained

    def _bound(self, address: str) -> grpc.aio.Server:
        server = _server(self.servicer, self.token, self.clients)
        if self.tls is not None:
            port = server.add_secure_port(address, self.tls.credentials())
        else:
            port = server.add_insecure_port(address)
        if not address.startswith("unix:"):
            host = address.rpartition(":")[0]
            self.address = f"{host}:{port}"  # port 0 asked for any: keep the one given
        return server

    async def start(self) -> None:
        await self.server.start()

    def _drained(self) -> None:
        if self._letting_go is None or self._letting_go.done():
            self._letting_go = asyncio.get_running_loop().create_task(self._let_go())

    async def _let_go(self) -> None:
        while self.servicer.draining:
            await self.goaway()
            await asyncio.sleep(GOAWAY_SECONDS)

    async def goaway(self) -> None:
        """Let every connection go (GOAWAY); a new server listens on from now."""
        old, self.server = self.server, self._bound(self.address)
        await self.server.start()
        task = asyncio.get_running_loop().create_task(old.stop(grace=DRAIN_GRACE_SECONDS))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        self.goaways += 1
        log.info("drained: every connection told to go away (GOAWAY %d)", self.goaways)

    async def stop(self, grace: float | None) -> None:
        if self._letting_go is not None:
            self._letting_go.cancel()
        await self.server.stop(grace)
        for task in list(self._stopping):
            await task


def address_from_environment() -> str:
    """Where to listen: ``unix:$BLACKHOLE_SOCKET``, else ``$BLACKHOLE_ADDRESS``."""
    if path := os.environ.get("BLACKHOLE_SOCKET"):
        return f"unix:{path}"
    if address := os.environ.get("BLACKHOLE_ADDRESS"):
        return address
    sys.exit("no address to listen on: set BLACKHOLE_SOCKET or BLACKHOLE_ADDRESS, or pass one")


STARTING_SUFFIX = ".starting"
"""The name a Unix socket is bound under until its server listens (then renamed)."""


async def serve_async(
    plugin: Plugin, address: str, stop: asyncio.Event, tls: TLSFiles | None = None
) -> None:
    """Serve ``plugin`` on ``address`` until ``stop`` is set, then drain and stop.

    With ``tls``, over mutual TLS only (see the module's docstring).
    """
    path = None
    bound = address
    if address.startswith("unix:"):
        # Bound under another name and renamed once it listens: the socket appears under its
        # name only when it accepts (a watch of the directory sees it ready, not just bound).
        path = address.removeprefix("unix:").removeprefix("//")
        for stale in (path, path + STARTING_SUFFIX):
            if os.path.lexists(stale):
                os.unlink(stale)
        bound = f"unix:{path}{STARTING_SUFFIX}"
    clients = ClientCheck(clients_from_environment()) if tls is not None else None
    servicer = Servicer(plugin)
    token = os.environ.get("BLACKHOLE_PLUGIN_TOKEN") or None
    listener = Listener(servicer, bound, token=token, clients=clients, tls=tls)
    started = time.monotonic()
    await listener.start()
    if path is not None:
        os.rename(path + STARTING_SUFFIX, path)
    health = await _health_only(servicer, os.environ.get("BLACKHOLE_HEALTH_ADDRESS", ""))
    log.info(
        "%s %s listening on %s%s (%.0f ms)",
        os.environ.get("BLACKHOLE_PLUGIN", type(plugin).__name__),
        os.environ.get("BLACKHOLE_VERSION", ""),
        address,
        " over mutual TLS" if tls is not None else "",
        (time.monotonic() - started) * 1000,
    )
    await stop.wait()
    servicer.on_drain = None  # stopping for good: no new server to hand over to
    left = await servicer.drain(DRAIN_GRACE_SECONDS)
    await listener.stop(grace=1.0 if left else 0)
    if health is not None:
        await health.stop(0)
    log.info("stopped")


async def _health_only(servicer: Servicer, address: str) -> grpc.aio.Server | None:
    """The plaintext health listener on ``address``; None without one."""
    if not address:
        return None
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(servicer), server)
    server.add_insecure_port(address)
    await server.start()
    log.info("health service (plaintext, health only) on %s", address)
    return server


def serve(plugin: Plugin, address: str | None = None) -> None:
    """Serve ``plugin`` on ``address`` (default: from the environment) until SIGTERM; exit 0."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    target = address or address_from_environment()
    tls = tls_from_environment()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve_async(plugin, target, stop, tls)

    # Everything is imported by now: the module objects of asyncio, grpc and protobuf are
    # kept out of the collector's passes, which would otherwise walk (and write) them all.
    gc.freeze()
    asyncio.run(main())
