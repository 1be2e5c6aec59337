"""The gateway's connections: bounded in number and in time, and quiet about malformed requests.

Nobody needs a token to open a connection, so what a connection may hold is
bounded before any request is read:

- a new connection sends its first request's line and headers within
  :attr:`Limits.header_timeout`, or is closed;
- a connection with no call in progress is closed after
  :attr:`Limits.idle_timeout` (that covers the head of each next keep-alive
  request too);
- at most :attr:`Limits.max_connections` are open per listener: past it the
  oldest connection with no call in progress is closed to make room (the
  new one is refused only when every open connection is in a call), so idle
  connections cannot lock callers out;
- request lines and header fields are bounded in length
  (:data:`MAX_LINE_BYTES`, :data:`MAX_FIELD_BYTES`, :data:`MAX_HEADERS`);
- on a TLS listener (:class:`Site`), the handshake is done within
  :attr:`Limits.header_timeout` too, or the connection is closed (a
  connection counts against the cap once its handshake is done).

The same limits become channel arguments of the gRPC listener
(:func:`grpc_options`), where gRPC's core enforces them: a handshake deadline,
an idle deadline, a connection cap (past which new connections are closed).
Malformed HTTP requests get a JSON 400 and a debug log line, at most one a
second (:class:`Quiet`). :mod:`controller.gateway.server` serves its HTTP
listeners through :class:`Server`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import http_exceptions, web

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 8190
"""The longest request line (method, path and version) read, in bytes."""
MAX_FIELD_BYTES = 8190
"""The longest header line read, in bytes."""
MAX_HEADERS = 64
"""The most header fields in one request."""
MAX_METADATA_BYTES = 16 << 10
"""The most metadata (headers) a gRPC call may carry, in bytes."""


@dataclass(frozen=True)
class Limits:
    """What one connection may hold, and how many may be open (per listener)."""

    header_timeout: float = 10.0
    """Seconds a new connection has to send its first request's head."""
    idle_timeout: float = 60.0
    """Seconds a connection with no call in progress stays open."""
    max_connections: int = 4096
    """Connections open at once on each listener."""

    def __post_init__(self) -> None:
        for name in ("header_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not a positive number")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: {self.max_connections} is not 1 or more")


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC channel arguments that enforce ``limits`` on a server."""
    return [
        ("grpc.server_handshake_timeout_ms", round(limits.header_timeout * 1000)),
        ("grpc.max_connection_idle_ms", round(limits.idle_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    ]


class Quiet:
    """Logs malformed requests at debug, at most one line per ``interval`` seconds."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.seen = 0
        """Malformed requests seen, logged or not."""
        self._last = -interval
        self._skipped = 0

    def note(self, remote: str | None, problem: object) -> None:
        self.seen += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self._skipped += 1
            return
        log.debug(
            "malformed HTTP request or broken connection from %s: %s (%d more not logged since)",
            remote,
            problem,
            self._skipped,
        )
        self._last, self._skipped = now, 0


@dataclass
class _State:
    """What the server knows of one open connection."""

    busy: int = 0
    """Calls in progress on it."""
    served: bool = False
    """Whether a request's head has arrived yet."""
    closing: bool = False
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


_CLIENT_FAULTS = (http_exceptions.HttpProcessingError, web.RequestPayloadError, ConnectionError)
"""What a client's bytes can make aiohttp raise: the client's fault, not the gateway's."""


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, answering and logging malformed requests quietly."""

    def __init__(self, manager: Server, **options: Any) -> None:
        super().__init__(manager, **options)
        self.quiet = manager.quiet

    def log_exception(self, *args: Any, **kw: Any) -> None:
        problem = kw.get("exc_info")
        if isinstance(problem, _CLIENT_FAULTS):
            self.quiet.note(self._peer(), problem)
        else:
            super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # the gateway's own failure: aiohttp logs it and answers 500
            return super().handle_error(request, status, exc, message)
        self.quiet.note(request.remote, exc or message)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started; nothing more can be sent")
        answer = web.Response(
            status=status,
            text=json.dumps({"error": "malformed HTTP request", "reason": "BadRequest"}),
            content_type="application/json",
        )
        answer.force_close()
        return answer

    def _peer(self) -> str | None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer) if peer else None


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Server(web.Server):
    """aiohttp's low-level server, with :class:`Limits` on its connections."""

    def __init__(self, handler: Handler, limits: Limits, quiet: Quiet | None = None) -> None:
        self.limits = limits
        self.quiet = quiet or Quiet()
        self.open: dict[web.RequestHandler, _State] = {}
        """Open connections, oldest first."""
        self.evicted = 0
        """Connections closed to make room under the cap."""
        self._closing = 0
        """Connections in :attr:`open` closed by the server, not gone yet."""
        self._handler_options: dict[str, Any] = {
            "keepalive_timeout": limits.idle_timeout,
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_FIELD_BYTES,
            "max_headers": MAX_HEADERS,
            "access_log": None,
        }
        super().__init__(self._guarded(handler), **self._handler_options)

    def __call__(self) -> web.RequestHandler:
        return _Connection(self, loop=asyncio.get_running_loop(), **self._handler_options)

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            state = self.open.get(request.protocol)
            if state is None:  # closed meanwhile: answer anyway, nothing to track
                return await handler(request)
            if not state.served:
                state.served = True
                if state.timer is not None:
                    state.timer.cancel()
            state.busy += 1
            try:
                return await handler(request)
            finally:
                state.busy -= 1

        return guarded

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.open) - self._closing >= self.limits.max_connections and not self._evict():
            handler.force_close()  # every connection is in a call: no room
            return
        state = self.open[handler] = _State()
        state.timer = asyncio.get_running_loop().call_later(
            self.limits.header_timeout, self._header_deadline, handler
        )

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        state = self.open.pop(handler, None)
        if state is not None:
            self._closing -= state.closing
            if state.timer is not None:
                state.timer.cancel()
        super().connection_lost(handler, exc)

    def _header_deadline(self, handler: web.RequestHandler) -> None:
        state = self.open.get(handler)
        if state is not None and not state.served:
            self._close(handler, state)

    def _evict(self) -> bool:
        """Close the oldest connection with no call in progress; whether there was one."""
        for handler, state in self.open.items():
            if not state.busy and not state.closing:
                self.evicted += 1
                self._close(handler, state)
                return True
        return False

    def _close(self, handler: web.RequestHandler, state: _State) -> None:
        if not state.closing:
            state.closing = True
            self._closing += 1
        handler.force_close()


class Site(web.SockSite):
    """A listening socket for :class:`Server`; with ``ssl_context``, its TLS handshakes are
    bounded by ``handshake_timeout`` seconds (aiohttp's own sites leave asyncio's 60)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: Any,
        *,
        handshake_timeout: float,
        ssl_context: Any = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=backlog)
        self.handshake_timeout = handshake_timeout

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self.handshake_timeout,
        )
