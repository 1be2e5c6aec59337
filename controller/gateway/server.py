"""The gateway's front ends: HTTP/JSON and gRPC ``Handle`` passthrough, one name per plugin.

- ``POST /v1/plugins/{name}/call/{method}``: the body is the call's payload
  (JSON by convention, passed through as bytes); the answer is the plugin's.
  ``X-Timeout-Seconds`` asks for a shorter timeout than the spec's. Plugins
  on Kubernetes are ``/v1/namespaces/{namespace}/plugins/{name}/call/{method}``.
- gRPC ``blackhole.plugin.v1.Plugin/Handle`` with metadata
  ``x-blackhole-plugin: NAME`` (``NAMESPACE/NAME`` on Kubernetes): the request
  and answer pass through as bytes.

A call with ``X-Blackhole-Preview: true`` (gRPC metadata
``x-blackhole-preview: true``) is a preview call: it reaches the new color
of the plugin's swap while it waits for promotion (409 ``NoPreview`` when
there is none), and never the active color. Only tokens with ``preview:
true`` may make one (403 ``PreviewForbidden``); without a tokens file
anyone on loopback may.

Callers from outside present ``Authorization: Bearer TOKEN`` when a tokens
file is configured (401 without a known token), or, on listeners that
require client certificates, a certificate a tokens file entry lists
(:mod:`controller.gateway.tls`: HTTPS and gRPC over TLS). A plugin calls others over
``gateway.sock`` beside its own socket, and only those its spec's
``permissions.callPlugins`` lists. A plugin the caller may not call gets the
same answer as one that does not exist (404 ``PluginNotFound``), so a caller
learns nothing of plugins beyond its own.

Errors are JSON ``{"error": message, "reason": CamelCase}``: 400 a malformed
request (a method name over :data:`MAX_METHOD_BYTES`, a gRPC body that is
not a ``HandleRequest``), 404 unknown plugin, 408 a body slower than the
call's timeout, 413 too large, 429 rate or concurrency limit (with
Retry-After), 503 no Ready instance (at once), 504 timeout, 502 the instance
failed the call (it crashed or dropped the connection); a plugin's own
errors map from their gRPC status (400, 404, 409, 501), and what a plugin
says of its own failures (500) stays in the gateway's debug log. What a
connection may hold before and between calls is bounded by
:mod:`controller.gateway.connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from controller.errors import ControllerError, PluginCallError
from controller.gateway import auth, connections, router, tls
from controller.metrics import exposition
from controller.protocol import client
from controller.runtimes import base
from controller.spec import models
from controller.spec.keys import plugin_key

log = logging.getLogger(__name__)

MAX_BODY = 64 << 20
"""No plugin's limit may take the gateway past this, in bytes."""
MAX_METHOD_BYTES = 256
"""The longest method name forwarded, in UTF-8 bytes; longer ones are refused with 400."""
DRAINING = "draining: not taking calls"
"""What an instance a swap drained answers (UNAVAILABLE) a call it did not run."""
UNANSWERED = frozenset({"UNAVAILABLE", "CANCELLED"})
"""The gRPC codes of a call that a replica dropped unanswered (it died under the call)."""
NOT_INITIALIZED = "not initialized yet"
"""What an instance answers (FAILED_PRECONDITION) a call before the controller's handshake,
unrun: one the platform restarted in place (a pod's container, at the address the call was
already on its way to) until the controller takes it out of the route."""
DRAINING_RETRY = 0.01
DRAINING_RETRY_MAX = 0.2
"""Seconds between tries of a call a draining instance refused, doubling up to this."""
LISTEN_BACKLOG = 1024
"""Connections the kernel queues for the HTTP listener before the gateway takes them."""
PLUGIN_HEADER = "x-blackhole-plugin"
PREVIEW_HEADER = "X-Blackhole-Preview"
"""``true`` on an HTTP call (``x-blackhole-preview`` in gRPC metadata): the call goes to the
new color of the plugin's swap before promotion, never the active one."""
GATEWAY_SOCKET = base.GATEWAY_SOCKET_NAME
_CALL_PATH = re.compile(r"^/v1/plugins/(?P<name>[^/]+)/call/(?P<method>[^/]+)$")
_PUBLIC_PATH = re.compile(
    r"^/v1/(?:namespaces/(?P<namespace>[^/]+)/)?plugins/(?P<name>[^/]+)/call/(?P<method>[^/]+)$"
)

_HTTP_FROM_GRPC = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "DEADLINE_EXCEEDED": 504,
    "UNAVAILABLE": 502,
    "CANCELLED": 502,
}
_GRPC_FROM_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Lookup = Callable[[str], router.Declared | None]
"""The declared plugin of a key, or None."""
READY_TIMEOUT = 10.0
"""Longest a call waits for a gateway that has no routes yet, in seconds; then 503."""


@dataclass(frozen=True)
class _PluginSite:
    """A plugin's own gateway socket, served by a server that knows whose it is."""

    path: str
    runner: web.BaseRunner
    directory: int
    """The open descriptor of the socket's directory."""


class GatewayError(ControllerError):
    """The gateway cannot start."""


@dataclass(frozen=True)
class Caller:
    """Who makes a call: a token's holder, a plugin, or anyone (no tokens configured)."""

    name: str
    may_call: Callable[[str], bool]
    may_preview: bool = False
    """Whether its calls may ask for a swap's new color (:data:`PREVIEW_HEADER`)."""


class Gateway:
    """Admits, routes and answers calls for every declared plugin."""

    def __init__(
        self,
        lookup: Lookup,
        routes: router.Router,
        clients: client.Clients,
        *,
        tokens: auth.Tokens | None = None,
        limits: connections.Limits | None = None,
        ready: asyncio.Event | None = None,
        ready_timeout: float = READY_TIMEOUT,
        tls: tls.ListenerTLS | None = None,
    ) -> None:
        self.lookup = lookup
        self.tls = tls
        """HTTPS and gRPC over TLS on the listeners (None: plaintext)."""
        self.ready = ready
        """Set once the gateway has its routes; calls wait for it (None: it has them)."""
        self.ready_timeout = ready_timeout
        self.early = 0
        """Calls waiting for the first routes now."""
        self.router = routes
        self.clients = clients
        self.tokens = tokens
        self.limits = limits or connections.Limits()
        self.quiet = connections.Quiet()
        """Malformed requests, on every HTTP listener: counted, and logged at debug."""
        self.http = connections.Server(self._http, self.limits, self.quiet)
        self._runner = web.ServerRunner(self.http, handle_signals=False)
        self._grpc: grpc.aio.Server | None = None
        self._plugin_sites: dict[str, _PluginSite] = {}
        """Per plugin key: the gateway socket its active instance calls through."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync = asyncio.Lock()
        routes.listeners.append(self._routes_changed)

    # Life cycle.

    async def start(self, http_address: str, grpc_address: str | None) -> dict[str, str]:
        """Listen on ``http_address`` (and ``grpc_address``); port 0 picks a free one.

        Returns the addresses really listened on: ``{"http": ..., "grpc": ...}``.
        """
        await self._runner.setup()
        host, port = _split(http_address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await exposition.bind(listener, (host, port), "gateway")
        except OSError as e:
            listener.close()
            raise GatewayError(f"the gateway cannot listen on {http_address}: {e.strerror}") from e
        bound = {"http": _join(host, listener.getsockname()[1])}
        context = self.tls.ssl_context() if self.tls is not None else None
        await connections.Site(
            self._runner,
            listener,
            backlog=LISTEN_BACKLOG,
            ssl_context=context,
            handshake_timeout=self.limits.header_timeout,
        ).start()
        scheme = "https" if context is not None else "http"
        log.info("gateway: HTTP on %s://%s", scheme, bound["http"])
        if grpc_address:
            self._grpc = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", MAX_BODY),
                    *connections.grpc_options(self.limits),
                ]
            )
            handler = grpc.method_handlers_generic_handler(
                "blackhole.plugin.v1.Plugin",
                {"Handle": grpc.unary_unary_rpc_method_handler(self._grpc_handle)},
            )
            self._grpc.add_generic_rpc_handlers((handler,))
            grpc_host, _ = _split(grpc_address)
            grpc_port = await self._add_grpc_port(grpc_address)
            bound["grpc"] = _join(grpc_host, grpc_port)
            await self._grpc.start()
            log.info("gateway: gRPC%s on %s", " over TLS" if self.tls else "", bound["grpc"])
        return bound

    async def _add_grpc_port(self, address: str) -> int:
        """gRPC's own bind, tried again as :func:`exposition.bind` does (gRPC says only that it
        failed, not why: a port that is not free within the time is given up as well)."""
        assert self._grpc is not None
        deadline = time.monotonic() + exposition.BIND_SECONDS
        delay = 0.05
        while True:
            try:
                if self.tls is not None:
                    credentials = self.tls.grpc_credentials()
                    return int(self._grpc.add_secure_port(address, credentials))
                return int(self._grpc.add_insecure_port(address))
            except RuntimeError as e:
                if time.monotonic() >= deadline:
                    raise GatewayError(f"the gateway cannot listen on {address}: {e}") from e
                log.warning("gateway: cannot listen on %s yet: %s; trying again", address, e)
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        async with self._sync:
            for key in list(self._plugin_sites):
                await self._close_plugin_site(key)
        await self._runner.cleanup()

    # Plugins calling plugins.

    def _routes_changed(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self._sync_plugin_site(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync_plugin_site(self, key: str) -> None:
        """Give ``key``'s active instance a gateway socket when its spec lets it call others."""
        async with self._sync:
            endpoint = self.router.route(key)
            plugin = self.lookup(key)
            wanted = None
            calls = plugin is not None and bool(plugin.calls)
            if endpoint and endpoint.startswith("unix:") and calls:
                wanted = str(Path(endpoint.removeprefix("unix:")).parent / GATEWAY_SOCKET)
            current = self._plugin_sites.get(key)
            if current is not None and current.path == wanted:
                return
            if current is not None:
                await self._close_plugin_site(key)
            if wanted is None:
                return
            try:
                self._plugin_sites[key] = await self._listen_for(key, wanted)
            except OSError as e:
                log.warning("no gateway socket for %s: %s", key, e)

    async def _close_plugin_site(self, key: str) -> None:
        site = self._plugin_sites.pop(key)
        try:
            await site.runner.cleanup()  # closes its connections too: none outlives the site
            with contextlib.suppress(OSError):
                os.unlink(GATEWAY_SOCKET, dir_fd=site.directory)
        finally:
            os.close(site.directory)

    async def _listen_for(self, key: str, path: str) -> _PluginSite:
        """A server on ``path`` whose every call comes from plugin ``key``.

        The directory belongs to the plugin's user, who could swap names in
        it: the socket is made through the directory's descriptor, with its
        mode from the umask and its owner set without following links.
        """
        directory = Path(path).parent
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        runner: web.BaseRunner | None = None
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(GATEWAY_SOCKET, dir_fd=fd)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            previous = os.umask(0o177)
            try:
                sock.bind(f"/proc/self/fd/{fd}/{GATEWAY_SOCKET}")
            finally:
                os.umask(previous)
            owner = os.fstat(fd)
            os.chown(GATEWAY_SOCKET, owner.st_uid, owner.st_gid, dir_fd=fd, follow_symlinks=False)
            runner = web.ServerRunner(
                connections.Server(
                    functools.partial(self._plugin_call, key), self.limits, self.quiet
                ),
                handle_signals=False,
            )
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            if runner is not None:
                await runner.cleanup()
            os.close(fd)
            raise
        return _PluginSite(path, runner, fd)

    async def _plugin_call(self, key: str, request: web.BaseRequest) -> web.Response:
        match = _CALL_PATH.match(request.path)
        if request.method != "POST" or match is None:
            return _refusal(router.Refused(404, "NotFound", "POST /v1/plugins/NAME/call/METHOD"))
        plugin = self.lookup(key)
        allowed = plugin.calls if plugin else frozenset()
        caller = Caller(f"plugin {key}", allowed.__contains__)
        return await self._answer(request, match["name"], match["method"], caller)

    # Who calls.

    def _caller(
        self, authorization: str | None, certificate: Callable[[], frozenset[str]]
    ) -> Caller:
        """Who calls: by the bearer token it sends, else by its verified client certificate's
        ``certificate()`` names (a listener that requires client certificates)."""
        if self.tokens is None:
            return Caller("anonymous", lambda _plugin: True, may_preview=True)
        by_certificate = self.tls is not None and self.tls.client_ca is not None
        if not authorization and by_certificate:
            token = self.tokens.by_certificate(certificate())
            if token is None:
                raise router.Refused(
                    401, "Unauthenticated", "no tokens file entry lists this client certificate"
                )
            return Caller(f"certificate of {token.name}", token.allows, token.preview)
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise router.Refused(401, "Unauthenticated", "send Authorization: Bearer TOKEN")
        token = self.tokens.find(presented.strip())
        if token is None:
            raise router.Refused(401, "Unauthenticated", "unknown token")
        return Caller(f"token {token.name}", token.allows, token.preview)

    async def _routes(self, timeout: float) -> None:
        """Wait until the gateway has its routes (at most ``timeout``): early calls are held."""
        if self.ready is None or self.ready.is_set():
            return
        self.early += 1
        try:
            async with asyncio.timeout(min(timeout, self.ready_timeout)):
                await self.ready.wait()
        except TimeoutError:
            raise router.Refused(
                503, "GatewayNotReady", "the gateway has not received its routes yet"
            ) from None
        finally:
            self.early -= 1

    def _plugin(self, caller: Caller, name: str) -> router.Declared:
        """The plugin ``name`` if ``caller`` may call it; one answer for unknown and forbidden."""
        plugin = self.lookup(name) if caller.may_call(name) else None
        if plugin is None:
            raise router.Refused(
                404, "PluginNotFound", f'no plugin "{name}" that {caller.name} may call'
            )
        return plugin

    # HTTP.

    async def _http(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            if self.ready is not None and not self.ready.is_set():
                return web.json_response({"status": "waiting for its routes"}, status=503)
            return web.json_response({"status": "ok"})
        match = _PUBLIC_PATH.match(request.path)
        if match is None:
            return _refusal(router.Refused(404, "NotFound", "POST /v1/plugins/NAME/call/METHOD"))
        if request.method != "POST":
            return _refusal(router.Refused(405, "MethodNotAllowed", "use POST"))
        name = match["name"]
        if namespace := match["namespace"]:
            name = plugin_key(name, namespace)  # plugins on Kubernetes: namespace/name
        try:
            caller = self._caller(
                request.headers.get("Authorization"),
                lambda: tls.names_of_peercert(
                    request.transport.get_extra_info("peercert") if request.transport else None
                ),
            )
        except router.Refused as e:
            return _refusal(e)
        return await self._answer(request, name, match["method"], caller)

    async def _answer(
        self, request: web.BaseRequest, name: str, method: str, caller: Caller
    ) -> web.Response:
        started = time.perf_counter()
        plugin: router.Declared | None = None
        reached = False
        try:
            await self._routes(READY_TIMEOUT)
            plugin = self._plugin(caller, name)
            limits = plugin.gateway
            _check_method(method)
            limit = limits.max_request_bytes.as_int()
            if request.content_length is not None and request.content_length > limit:
                raise _too_large(name, request.content_length, limit)
            timeout = _timeout(request.headers.get("X-Timeout-Seconds"), limits.timeout_seconds)
            preview = _preview(caller, request.headers.get(PREVIEW_HEADER), name)
            body = await _read(request, name, limit, timeout)
            reached = True
            answer = await self._forward(
                name, limits, method, body, timeout, preview, request.headers
            )
        except router.Refused as e:
            if plugin is not None:  # names nobody declared stay out of the labels
                self.router.metrics.answered(name, method if reached else None, e.status, started)
            return _refusal(e)
        self.router.metrics.answered(name, method, 200, started)
        return web.Response(body=answer, content_type="application/json")

    async def _forward(
        self,
        name: str,
        limits: models.Gateway,
        method: str,
        body: bytes,
        timeout: float,
        preview: bool = False,
        headers: Mapping[str, Any] | None = None,
        *,
        raw: bool = False,
    ) -> bytes:
        """The plugin's answer; a call a draining instance refused unrun is tried again.

        ``raw``: ``body`` is a whole ``HandleRequest`` as its caller encoded it, sent on
        as it is, and the answer is the plugin's ``HandleResponse`` as it came.

        A call that a replica of a color of several drops unanswered (it died, or its
        socket is gone: UNAVAILABLE, or CANCELLED by the channel closed with it) goes to
        another replica of that color at once: replicas are for stateless plugins, and the
        call may have run on the one that died. So does one a replica refused unrun as
        not initialized yet (restarted in place, not yet shaken hands with).

        An instance is draining only between a swap's hold and its flip (or
        rollback); a call reaches one when the controller went away in
        between and its hold was released to the old route. The call waits
        for the route to move or the instance to take calls again (the next
        controller rolls the swap back or finishes it), within its timeout.
        """
        deadline = time.monotonic() + timeout
        pause = DRAINING_RETRY
        dropped: set[str] = set()
        while True:
            left = deadline - time.monotonic()
            async with self.router.admit(
                name, limits, left, preview=preview, headers=headers, avoid=dropped
            ) as endpoint:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise router.Refused(504, "Timeout", f"{name}: no time left after the hold")
                try:
                    plugin = self.clients.get(endpoint)
                    if raw:
                        return await plugin.handle_raw(body, left)
                    return await plugin.handle(method, body, timeout=left)
                except PluginCallError as e:
                    if (e.code, e.message) == ("UNAVAILABLE", DRAINING):
                        pass
                    elif _unanswered(e) and self.router.spare(name, endpoint, dropped):
                        dropped.add(endpoint)  # a replica that died: another one takes it
                        continue
                    else:
                        raise _from_plugin(name, e, timeout) from None
            if time.monotonic() + pause >= deadline:
                raise router.Refused(504, "Timeout", f"{name}: its instance is draining")
            await asyncio.sleep(pause)
            pause = min(DRAINING_RETRY_MAX, pause * 2)

    # gRPC passthrough.

    async def _grpc_handle(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        name = str(metadata.get(PLUGIN_HEADER, ""))
        started = time.perf_counter()
        plugin: router.Declared | None = None
        method: str | None = None
        try:
            try:
                caller = self._caller(
                    str(metadata.get("authorization", "")) or None,
                    lambda: tls.names_of_auth_context(context.auth_context()),
                )
                if not name:
                    raise router.Refused(400, "NoPlugin", f"set the {PLUGIN_HEADER} metadata")
                await self._routes(context.time_remaining() or READY_TIMEOUT)
                plugin = self._plugin(caller, name)
                limits = plugin.gateway
                limit = limits.max_request_bytes.as_int()
                if len(request) > limit:
                    raise _too_large(name, len(request), limit)
                timeout = limits.timeout_seconds
                if (left := context.time_remaining()) is not None:
                    timeout = min(timeout, left)
                method = _method_of(request)
                _check_method(method)
                preview = _preview(caller, metadata.get(PREVIEW_HEADER.lower()), name)
                answer = await self._forward(
                    name, limits, method, request, timeout, preview, metadata, raw=True
                )
            except router.Refused:
                raise
            except Exception:  # a fault of the gateway's own: logged, never told to the caller
                log.exception("gateway: a gRPC call to %r failed", name[:100])
                raise router.Refused(500, "GatewayError", "the gateway failed the call") from None
        except router.Refused as e:
            if plugin is not None:
                self.router.metrics.answered(name, method, e.status, started)
            code = _GRPC_FROM_HTTP.get(e.status, grpc.StatusCode.UNKNOWN)
            if e.grpc_code is not None and e.grpc_code in grpc.StatusCode.__members__:
                code = grpc.StatusCode[e.grpc_code]
            await context.abort(code, str(e))
        self.router.metrics.answered(name, method, 200, started)
        return answer


def _preview(caller: Caller, asked: str | bytes | None, name: str) -> bool:
    """Whether the call asks for the new color of ``name``'s swap, and may."""
    if asked is None or str(asked).lower() in ("", "false", "0"):
        return False
    if not caller.may_preview:
        raise router.Refused(
            403,
            "PreviewForbidden",
            f"{caller.name} may not preview {name}: its token lacks preview",
        )
    return True


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at ``at`` and where it ends; ValueError when it is cut short or too long."""
    value = shift = 0
    while True:
        byte = data[at]  # IndexError past the end
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


MAX_GROUP_DEPTH = 100
"""Groups nested deeper are refused, as protobuf's parser refuses them."""


def _fields(
    data: bytes, at: int = 0, group: int = 0, depth: int = 0
) -> Iterator[tuple[int, int, int, int]]:
    """The top-level fields of protobuf ``data`` from ``at``: (number, wire type, start, end)
    of each value, its bytes not looked into; ValueError on a malformed message. Within a
    ``group`` (its field number, ``depth`` deep), up to its end, yielded as number 0."""
    if depth > MAX_GROUP_DEPTH:
        raise ValueError("groups nested too deep")
    size = len(data)
    while at < size:
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        start = at
        if not 0 < number < 1 << 29 or tag >> 32:
            raise ValueError(f"field number {number}")
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 2:
            length, start = _varint(data, at)
            at = start + length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        elif wire == 3:  # a group (never in a HandleRequest, but parsed as unknown)
            for inner, *_, end in _fields(data, at, number, depth + 1):
                at = end
                if inner == 0:
                    break
            else:
                raise ValueError("a group with no end")
        elif wire == 4 and number == group:
            yield 0, wire, start, at
            return
        else:
            raise ValueError(f"wire type {wire}")
        if at > size:
            raise ValueError("cut short")
        yield number, wire, start, at
    if group:
        raise ValueError("a group with no end")


def _method_of(request: bytes) -> str:
    """The method of a ``HandleRequest`` as its caller encoded it, checked as the plugin will
    parse it (strings UTF-8, metadata entries of strings), its payload's bytes not copied.

    Raises :class:`router.Refused` (400) for what is not a ``HandleRequest``.
    """
    method = ""
    try:
        for number, wire, start, end in _fields(request):
            if number == 1 and wire == 2:
                method = request[start:end].decode()  # the last one counts, as in protobuf
            elif number == 2 and wire == 2:  # a map entry: key 1, value 2, both strings
                entry = request[start:end]
                for inner, inner_wire, begin, finish in _fields(entry):
                    if inner in (1, 2) and inner_wire == 2:
                        entry[begin:finish].decode()
    except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
        raise router.Refused(
            400, "BadRequest", "the request is not a blackhole.plugin.v1.HandleRequest"
        ) from None
    return method


def _check_method(method: str) -> None:
    """Refuse a method name too long to forward (or to keep anywhere)."""
    if len(method) > MAX_METHOD_BYTES or len(method.encode(errors="replace")) > MAX_METHOD_BYTES:
        raise router.Refused(
            400, "BadMethod", f"a method name is at most {MAX_METHOD_BYTES} bytes long"
        )


async def _read(request: web.BaseRequest, name: str, limit: int, timeout: float) -> bytes:
    """The body, at most ``limit`` bytes, arrived within ``timeout`` seconds (else 408)."""
    content = request.content
    body = bytearray()
    try:
        if content.is_eof() and content.total_bytes <= limit:
            return content.read_nowait()  # it came with the head: nothing to wait for
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    raise _too_large(name, len(body), limit)
    except TimeoutError:
        raise router.Refused(
            408, "RequestTimeout", f"{name}: the body did not arrive within {timeout:g}s"
        ) from None
    except web.RequestPayloadError:
        raise router.Refused(400, "BadRequest", f"{name}: the body is malformed") from None
    return bytes(body)


def _too_large(name: str, size: int, limit: int) -> router.Refused:
    return router.Refused(
        413,
        "RequestTooLarge",
        f"{name}: a request of {size} bytes is over its limit of {limit} "
        "(spec.gateway.maxRequestBytes)",
    )


def _timeout(asked: str | None, most: float) -> float:
    if asked is None:
        return most
    try:
        value = float(asked)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise router.Refused(
            400, "BadTimeout", f"X-Timeout-Seconds: {asked!r} is not a positive number"
        )
    return min(value, most)


def _unanswered(e: PluginCallError) -> bool:
    """Whether a replica left the call unanswered (or refused it unrun): another may take it."""
    return e.code in UNANSWERED or (e.code, e.message) == ("FAILED_PRECONDITION", NOT_INITIALIZED)


def _from_plugin(name: str, e: PluginCallError, timeout: float) -> router.Refused:
    if e.code == "DEADLINE_EXCEEDED":
        return router.Refused(504, "Timeout", f"{name} did not answer within {timeout:g}s")
    status = _HTTP_FROM_GRPC.get(e.code, 502)
    if status == 502:
        log.debug("gateway: %s failed a call: %s", name, e)
        return router.Refused(502, "PluginFailed", f"{name} failed the call")
    if status == 500:  # the plugin's own failure: what it says of it is for its operator
        log.debug("gateway: %s answered %s: %s", name, e.code, e.message)
        return router.Refused(500, "PluginError", f"{name} failed the call", grpc_code=e.code)
    return router.Refused(status, "PluginError", e.message, grpc_code=e.code)


def _refusal(e: router.Refused) -> web.Response:
    headers = {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
    if e.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="blackhole"'
    return web.Response(
        status=e.status,
        text=json.dumps({"error": str(e), "reason": e.reason}),
        content_type="application/json",
        headers=headers,
    )


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)
