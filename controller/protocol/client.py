"""The controller's client of the plugin protocol: handshake, health, calls, state, drain.

One gRPC channel per instance endpoint (``unix:PATH`` locally, ``HOST:PORT``
across hosts), opened on first use and shared by the reconciler, the gateway
and the swap coordinator; :meth:`Clients.drop` closes it when its instance
goes (:meth:`Clients.forget` when a new instance took its endpoint). gRPC
errors, and calls cut by their channel's closing, become
:class:`~controller.errors.PluginCallError` here, so ``grpc`` never reaches
the callers. Where a runtime gives its instances a token (plugins reached
over TCP, on Kubernetes), every call on the channel carries it as
``authorization: Bearer <token>``. Where an endpoint is reached over mutual
TLS (:class:`ChannelTLS`), the channel presents the controller's client
certificate and accepts only a plugin certificate from the trusted CA that
names the identity expected there (its server name); a channel whose TLS
settings changed (a renewed client certificate) is replaced, the old one
closing once its calls are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from blackhole_sdk.proto import plugin_pb2, plugin_pb2_grpc
from grpc_health.v1 import health_pb2

from controller.errors import IncompatiblePluginError, PluginCallError
from controller.runtimes import base

T = TypeVar("T")

PROTOCOL_VERSION = 1
"""The plugin protocol version this controller speaks."""
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})
"""The plugin protocol versions whose plugins this controller runs."""
CHUNK_BYTES = 256 << 10
MAX_MESSAGE_BYTES = 16 << 20

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # One local peer per channel: no proxies, no DNS, no waiting for a
    # connection that a plugin's crash took away.
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.http2.bdp_probe", 0),
]


DELTA_FEATURE = "state.delta"
"""The handshake's feature of plugins that export and import deltas of their state."""


@dataclass(frozen=True)
class Handshake:
    """What a plugin said of itself in ``Initialize``."""

    protocol_version: int
    provides: tuple[str, ...]
    state_version: int
    sdk: str
    features: tuple[str, ...] = ()
    initializations: int = 0
    """Initialize calls the process answered, this one included: 1 from a new process,
    0 from an SDK that does not say."""

    @property
    def deltas(self) -> bool:
        """Whether it imports (and exports) deltas of its state."""
        return DELTA_FEATURE in self.features


@dataclass(frozen=True)
class Transfer:
    """The header of a state transfer: what the bytes are, not the bytes.

    ``size`` and ``sha256`` are of the bytes moved: the whole state, or a
    delta from ``base_revision`` to ``revision`` when ``delta`` is set.
    """

    state_version: int
    size: int
    sha256: str
    revision: str = ""
    delta: bool = False
    base_revision: str = ""

    def chunk(self, data: bytes) -> plugin_pb2.StateChunk:
        return plugin_pb2.StateChunk(
            state_version=self.state_version,
            size=self.size,
            sha256=self.sha256,
            revision=self.revision,
            delta=self.delta,
            base_revision=self.base_revision,
            data=data,
        )

    @classmethod
    def of(cls, chunk: plugin_pb2.StateChunk) -> Transfer:
        return cls(
            chunk.state_version,
            chunk.size,
            chunk.sha256,
            chunk.revision,
            chunk.delta,
            chunk.base_revision,
        )


@dataclass(frozen=True)
class State:
    """A plugin's exported state."""

    version: int
    data: bytes
    sha256: str


Sink = Callable[[AsyncIterator[tuple[Transfer, bytes]]], Awaitable[T]]
"""What takes an exported state's chunks as they come (an import, the store) and answers."""


class _WithToken:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per kind of call: grpc.aio files an interceptor under the first kind it is.


class _UnaryUnaryToken(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStreamToken(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnaryToken(_WithToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class _StreamStreamToken(_WithToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def _token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    return [
        _UnaryUnaryToken(token),
        _UnaryStreamToken(token),
        _StreamUnaryToken(token),
        _StreamStreamToken(token),
    ]


@dataclass(frozen=True)
class ChannelTLS:
    """How a channel reaches its instance over mutual TLS."""

    ca: bytes
    """The CA (PEM) the instance's certificate must chain to."""
    cert: bytes
    key: bytes
    """The client certificate and key (PEM) presented."""
    server_name: str
    """The DNS name the instance's certificate must carry (its identity)."""


RENEWED_GRACE = 30.0
"""Seconds a channel replaced by a renewed certificate keeps its calls in flight."""


class PluginClient:
    """The protocol's calls to one instance."""

    def __init__(
        self, endpoint: str, token: str | None = None, tls: ChannelTLS | None = None
    ) -> None:
        self.endpoint = endpoint
        self.token = token
        self.tls = tls
        self._socket: int | None = None
        target = endpoint
        if endpoint.startswith("unix:"):
            # Never by its name, which the plugin controls: through the socket itself.
            path = Path(endpoint.removeprefix("unix:"))
            try:
                self._socket = base.open_socket(path)
            except OSError as e:
                raise PluginCallError("UNAVAILABLE", f"{path}: {e.strerror}") from e
            target = f"unix:{base.fd_address(self._socket)}"
        interceptors = _token_interceptors(token) if token else None
        if tls is None:
            self.channel = grpc.aio.insecure_channel(
                target, options=_OPTIONS, interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.secure_channel(
                target,
                grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert),
                options=[*_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)],
                interceptors=interceptors,
            )
        self.stub = plugin_pb2_grpc.PluginStub(self.channel)
        self._check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self._raw_handle: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            "/blackhole.plugin.v1.Plugin/Handle"
        )

    async def initialize(
        self,
        *,
        plugin: str,
        version: str,
        color: str,
        config: Mapping[str, Any],
        timeout: float,
    ) -> Handshake:
        """The handshake; raises :class:`IncompatiblePluginError` when the versions disagree."""
        request = plugin_pb2.InitializeRequest(
            protocol_version=PROTOCOL_VERSION,
            plugin=plugin,
            version=version,
            color=color,
            config_json=json.dumps(dict(config), sort_keys=True).encode(),
        )
        try:
            answer = await self.stub.Initialize(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.FAILED_PRECONDITION and "protocol version" in (
                e.details() or ""
            ):
                raise IncompatiblePluginError("ProtocolMismatch", e.details() or "") from e
            raise _error(e) from e
        if answer.plugin and answer.plugin != plugin:
            raise IncompatiblePluginError(
                "IdentityMismatch",
                f"the instance answering for {plugin} says it is plugin {answer.plugin}",
            )
        if answer.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise IncompatiblePluginError(
                "ProtocolMismatch",
                f"the plugin speaks protocol version {answer.protocol_version}; this controller "
                f"runs {sorted(SUPPORTED_PROTOCOL_VERSIONS)}",
            )
        return Handshake(
            protocol_version=answer.protocol_version,
            provides=tuple(answer.provides),
            state_version=answer.state_version,
            sdk=answer.sdk,
            features=tuple(answer.features),
            initializations=answer.initializations,
        )

    async def healthy(self, timeout: float) -> bool:
        """Whether ``grpc.health.v1`` says SERVING within ``timeout``; False on any failure."""
        try:
            answer = await self._check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def handle(
        self,
        method: str,
        payload: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        request = plugin_pb2.HandleRequest(method=method, metadata=metadata or {}, payload=payload)
        try:
            answer = await self.stub.Handle(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from e
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise _closed_under_the_call() from None
        return bytes(answer.payload)

    async def handle_raw(self, request: bytes, timeout: float | None) -> bytes:
        """``Handle`` with a request already encoded; the response as it came (for relays)."""
        try:
            return bytes(await self._raw_handle(request, timeout=timeout))
        except grpc.aio.AioRpcError as e:
            raise _error(e) from e
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise _closed_under_the_call() from None

    async def export_chunks(
        self, since: str, timeout: float
    ) -> AsyncIterator[tuple[Transfer, bytes]]:
        """The state (or the delta since ``since``), chunk by chunk, never held whole.

        Every chunk must carry the same header; the size and sha256 are
        checked as the bytes pass, and a mismatch raises after the last
        chunk, so a consumer that forwards them (an import) fails too.
        """
        header: Transfer | None = None
        digest = hashlib.sha256()
        size = 0
        stream = self.stub.ExportState(plugin_pb2.ExportStateRequest(since_revision=since))
        try:
            async with asyncio.timeout(timeout):
                async for chunk in stream:
                    this = Transfer.of(chunk)
                    if header is None:
                        header = this
                    elif this != header:
                        raise PluginCallError(
                            "DATA_LOSS", "exported chunks disagree on version, size or sha256"
                        )
                    size += len(chunk.data)
                    if size > header.size:
                        raise PluginCallError(
                            "DATA_LOSS", f"more state bytes than the {header.size} announced"
                        )
                    digest.update(chunk.data)
                    yield header, bytes(chunk.data)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from e
        except TimeoutError:
            raise PluginCallError("DEADLINE_EXCEEDED", f"export took over {timeout}s") from None
        finally:
            stream.cancel()  # a consumer that stopped early ends the call now, not at GC
        if header is None:
            raise PluginCallError("DATA_LOSS", "the plugin exported no chunk")
        if size != header.size or digest.hexdigest() != header.sha256:
            raise PluginCallError(
                "DATA_LOSS",
                f"exported state damaged: {size} bytes with sha256 {digest.hexdigest()[:12]}..., "
                f"announced {header.size} bytes and {header.sha256[:12]}...",
            )

    async def import_chunks(
        self, chunks: AsyncIterator[tuple[Transfer, bytes]], timeout: float
    ) -> Transfer:
        """Stream ``chunks`` into ``ImportState``; the header of what the plugin holds after.

        The returned header's ``revision`` is the plugin's own after the
        import; ``state_version``, ``size`` and ``sha256`` are of its state
        once migrated (of the delta, for a delta).
        """
        sent: list[Transfer] = []

        async def requests() -> AsyncIterator[plugin_pb2.StateChunk]:
            async for header, data in chunks:
                if not sent:
                    sent.append(header)
                yield header.chunk(data)

        try:
            answer = await self.stub.ImportState(requests(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from e
        if not sent:
            raise PluginCallError("DATA_LOSS", "no state chunk to import")
        return Transfer(
            answer.state_version,
            answer.size,
            answer.sha256,
            answer.revision,
            sent[0].delta,
            sent[0].base_revision,
        )

    async def export_state(self, timeout: float) -> State:
        """The plugin's whole state in memory (for ``bhctl state export``, not for swaps)."""
        parts: list[bytes] = []
        headers: list[Transfer] = []
        async for header, data in self.export_chunks("", timeout):
            headers[:] = [header]
            parts.append(data)
        return State(headers[0].state_version, b"".join(parts), headers[0].sha256)

    async def import_state(self, state: State, timeout: float) -> State:
        """Hand ``state`` over whole; the plugin's state version, size and digest after."""
        header = Transfer(state.version, len(state.data), state.sha256)
        after = await self.import_chunks(_chunks_of(header, state.data), timeout)
        return State(version=after.state_version, data=b"", sha256=after.sha256)

    async def drain(self, timeout: float, *, resume: bool = False) -> int:
        """Stop the instance taking calls (or resume); the calls it still had in flight."""
        request = plugin_pb2.DrainRequest(timeout_milliseconds=round(timeout * 1000), resume=resume)
        try:
            answer = await self.stub.Drain(request, timeout=timeout + 5)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from e
        return int(answer.in_flight)

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)
        if self._socket is not None:
            with contextlib.suppress(OSError):
                os.close(self._socket)
            self._socket = None


async def _chunks_of(header: Transfer, data: bytes) -> AsyncIterator[tuple[Transfer, bytes]]:
    for start in range(0, max(len(data), 1), CHUNK_BYTES):
        yield header, data[start : start + CHUNK_BYTES]


def _error(e: grpc.aio.AioRpcError) -> PluginCallError:
    return PluginCallError(e.code().name, e.details() or "")


def _being_cancelled() -> bool:
    """Whether this task is being cancelled. A ``CancelledError`` from a call when it is
    not means the call's channel was closed under it (gRPC cancels the calls of a
    channel it closes): a failed call, not a cancellation of the caller's task (which,
    at a front end, would cut the caller's connection without an answer)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _closed_under_the_call() -> PluginCallError:
    return PluginCallError("CANCELLED", "the channel to the instance was closed during the call")


class Clients:
    """One :class:`PluginClient` per endpoint, shared by everyone who calls plugins.

    ``tokens`` gives the token an endpoint's instance expects, if any (the
    runtime that made the instance knows it); ``tls`` how an endpoint is
    reached over mutual TLS, if it is.
    """

    def __init__(
        self,
        tokens: Callable[[str], str | None] | None = None,
        tls: Callable[[str], ChannelTLS | None] | None = None,
    ) -> None:
        self._clients: dict[str, PluginClient] = {}
        self._tokens = tokens
        self._tls = tls
        self._closing: set[asyncio.Future[None]] = set()

    def get(self, endpoint: str) -> PluginClient:
        token = self._tokens(endpoint) if self._tokens else None
        tls = self._tls(endpoint) if self._tls else None
        client = self._clients.get(endpoint)
        if client is not None and client.token != token:
            # The address now belongs to another plugin's instance (pod IPs are
            # reused): its token, not the old one, on a channel of its own.
            self._close_later(client)
            client = None
        elif client is not None and client.tls != tls:
            # A renewed certificate (or another identity expected there): new calls
            # take a new channel, those in flight finish on the old one.
            self._close_later(client, RENEWED_GRACE)
            client = None
        if client is None:
            client = self._clients[endpoint] = PluginClient(endpoint, token, tls)
        return client

    async def handshake(self, endpoint: str, want: base.InstanceSpec, timeout: float) -> Handshake:
        """``Initialize`` the instance of ``want`` at ``endpoint`` with its spec's config."""
        return await self.get(endpoint).initialize(
            plugin=want.plugin,
            version=str(want.spec.version),
            color=want.color.value,
            config=want.spec.config,
            timeout=timeout,
        )

    async def healthy(self, endpoint: str, timeout: float) -> bool:
        return await self.get(endpoint).healthy(timeout)

    async def call(self, endpoint: str, method: str, payload: bytes, timeout: float) -> bytes:
        return await self.get(endpoint).handle(method, payload, timeout=timeout)

    async def export_state(self, endpoint: str, timeout: float) -> State:
        return await self.get(endpoint).export_state(timeout)

    async def import_state(self, endpoint: str, state: State, timeout: float) -> State:
        return await self.get(endpoint).import_state(state, timeout)

    async def export_state_to(
        self,
        endpoint: str,
        sink: Sink[T],
        *,
        since: str = "",
        timeout: float,
    ) -> T:
        """Hand the state's chunks (or the delta's since ``since``) to ``sink`` as they come."""
        return await sink(self.get(endpoint).export_chunks(since, timeout))

    async def import_state_from(
        self, endpoint: str, chunks: AsyncIterator[tuple[Transfer, bytes]], *, timeout: float
    ) -> Transfer:
        """Stream stored chunks into the instance at ``endpoint``; what it holds after."""
        return await self.get(endpoint).import_chunks(chunks, timeout)

    async def drain(self, endpoint: str, timeout: float, *, resume: bool = False) -> int:
        return await self.get(endpoint).drain(timeout, resume=resume)

    async def drop(self, endpoint: str) -> None:
        """Close the channel to ``endpoint`` (its instance is gone or replaced)."""
        client = self._clients.pop(endpoint, None)
        if client is not None:
            await client.close()

    def forget(self, endpoint: str) -> None:
        """The instance behind ``endpoint`` was replaced: the next call, even one made
        before this returns to the event loop, opens a new channel; the old one closes
        in the background. (Closing it later, in a task, would let a call that came
        in between take the channel about to be closed, and be cancelled with it.)"""
        client = self._clients.pop(endpoint, None)
        if client is not None:
            self._close_later(client)

    def _close_later(self, client: PluginClient, grace: float | None = None) -> None:
        closing = asyncio.ensure_future(client.close(grace))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for endpoint in list(self._clients):
            await self.drop(endpoint)
        if self._closing:
            await asyncio.gather(*self._closing)
