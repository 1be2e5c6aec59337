"""The control protocol between the controller and a gateway in its own process.

One Unix socket (``DATA_DIR/gateway.sock``, mode 0600, its peers checked to
be the gateway's own user) carries newline-delimited JSON. The controller
speaks first, ``{"type": "hello", "versions": [1], "role": "controller"}``;
the gateway answers with the highest version both speak, its pid and the
addresses it listens on, or ``{"type": "refused", "reason":
"ProtocolUnsupported", "message": ...}`` and closes: an old gateway and a
new controller (or the reverse) work together while they share a version,
and say so clearly when they do not. Then each message carries an ``id``
and is answered ``{"id": N, "ok": true, ...}`` or ``{"id": N, "error": ...,
"reason": ...}``; messages are applied in the order sent:

- ``routes``: the **whole** route table: every declared plugin with its
  limits, whom it may call, and its endpoint (``null``: declared, not Ready,
  503). Level-triggered: the controller sends it on every change and on
  every (re)connect, never a delta that could be lost; the gateway replaces
  what it had. A gateway answers calls only once it has a table (until then
  it holds them, at most :data:`~controller.gateway.server.READY_TIMEOUT`),
  and keeps its last table for as long as no controller sends another.
- ``holds``: the whole set of plugins this controller holds (key to count)
  and a lease in seconds. The controller sends it on each hold and release
  and renews it every third of the lease while it holds anything. A hold
  whose lease lapses, or whose controller's connection closes, is
  released at once to the route of the last table: a controller killed
  mid-hold never freezes traffic.
- ``wait_idle``: wait until no call is in flight to an endpoint (a swap's
  drain), at most ``timeout`` seconds; answers ``left``.
- ``status``: each plugin's endpoint, calls in flight and held, holds.
- ``metrics``: the gateway's ``blackhole_gateway_*`` series in Prometheus'
  text format (the controller serves them on its own ``/metrics``).

Version 1 is this text. A new message type, or a new field that a gateway
may ignore, keeps the version (a gateway answers an unknown type with
reason ``UnknownMessage``); any other change (a field of ``models.Gateway``
included: the gateway validates entries strictly) adds a version.

Commit rule: the controller records a flip in its store before it sends the
table with the new route, and a controller that starts again sends the
table it rebuilds from its store, so the store and not the gateway is the
truth about which color is active.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from controller.errors import ControllerError
from controller.gateway import router
from controller.spec import models

log = logging.getLogger(__name__)

PROTOCOL_VERSIONS = (1,)
"""The control protocol versions this side speaks, oldest first."""
MAX_MESSAGE_BYTES = 64 << 20
"""The longest message either side reads (a table of thousands of plugins is a few MB)."""
HELLO_TIMEOUT = 5.0
DEFAULT_LEASE = 3.0
"""Seconds a controller's holds last without a renewal."""
MAX_LEASE = 60.0
METRICS_PREFIX = "blackhole_gateway_"


class GatewayUnavailableError(ControllerError):
    """The gateway process cannot be reached over its control socket."""


class GatewayProtocolError(ControllerError):
    """The gateway and the controller speak no common control protocol version."""


class RouteEntry(TypedDict):
    """One plugin in the table, as it crosses the socket."""

    endpoint: str | None
    instance: str | None
    incarnation: int
    """Bumped each time the instance behind the endpoint was replaced (a restart reuses
    its socket's path): the gateway then opens a new channel to it."""
    gateway: dict[str, Any]
    callPlugins: list[str]
    preview: NotRequired[str | None]
    """The endpoint of a swap's new color, while preview calls may reach it."""


def entry(
    declared: router.Declared,
    endpoint: str | None,
    instance: str | None,
    incarnation: int = 0,
    preview: str | None = None,
) -> RouteEntry:
    return {
        "endpoint": endpoint,
        "instance": instance if endpoint else None,
        "incarnation": incarnation if endpoint else 0,
        "gateway": declared.gateway.model_dump(mode="json", by_alias=True, exclude_none=True),
        "callPlugins": sorted(declared.calls),
        "preview": preview,
    }


def choose_version(theirs: list[Any], ours: tuple[int, ...] = PROTOCOL_VERSIONS) -> int | None:
    common = {v for v in theirs if isinstance(v, int)} & set(ours)
    return max(common) if common else None


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def _read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream."""
    line = await reader.readline()
    if not line:
        return None
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# The gateway's side.


class _GatewayMetrics(Collector):
    """Only the gateway's families of a registry (the rest are the controller's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> list[Metric]:
        return [m for m in self.registry.collect() if m.name.startswith(METRICS_PREFIX)]


class _Peer:
    """One connected controller (or observer) and the holds it owns."""

    def __init__(self, writer: asyncio.StreamWriter, role: str) -> None:
        self.writer = writer
        self.role = role
        self.holds: dict[str, int] = {}
        self.lapse: asyncio.TimerHandle | None = None


class ControlServer:
    """Applies what controllers send to the gateway's :class:`~controller.gateway.router.Router`."""

    def __init__(
        self,
        routes: router.Router,
        *,
        about: dict[str, Any] | None = None,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        replaced: Callable[[str], None] | None = None,
    ) -> None:
        self.router = routes
        self.replaced = replaced
        """Told of an endpoint whose instance was replaced: its channel is stale."""
        self.incarnations: dict[str, int] = {}
        self.table: dict[str, router.Declared] = {}
        """The declared plugins of the last table: the gateway's lookup."""
        self.ready = asyncio.Event()
        """Set once a table arrived."""
        self.about = about or {}
        """What the gateway says of itself in its hello (pid, version, addresses)."""
        self.versions = versions
        self.generation = 0
        """Tables applied since the gateway started."""
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics = CollectorRegistry(auto_describe=False)
        self._metrics.register(_GatewayMetrics(routes.metrics.registry))

    def lookup(self, key: str) -> router.Declared | None:
        return self.table.get(key)

    async def start(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        previous = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=MAX_MESSAGE_BYTES
            )
        finally:
            os.umask(previous)
        path.chmod(0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.writer.close()
        for task in list(self._tasks):
            task.cancel()

    # Applying.

    def apply_table(self, routes: dict[str, RouteEntry]) -> None:
        """Replace the whole table: routes first, so a release right after goes where it says."""
        table = {
            key: router.Declared(
                models.Gateway.model_validate(item["gateway"]), frozenset(item["callPlugins"])
            )
            for key, item in routes.items()
        }
        self.table = table
        self.router.metrics.gateway_plugins(table)
        for item in routes.values():
            endpoint, incarnation = item["endpoint"], int(item.get("incarnation", 0))
            if endpoint and self.incarnations.setdefault(endpoint, incarnation) != incarnation:
                self.incarnations[endpoint] = incarnation
                if self.replaced is not None:
                    self.replaced(endpoint)
        for key, item in routes.items():
            if item["endpoint"]:
                self.router.route_to(key, item["endpoint"], item["instance"] or "", table[key])
            else:
                self.router.clear_route(key)
            self.router.set_preview(key, item.get("preview"))
        for key in list(self.router.gates):
            if key not in table:
                self.router.clear_route(key)
                self.router.set_preview(key, None)
        self.generation += 1
        self.ready.set()

    def _set_holds(self, peer: _Peer, holds: dict[str, int], lease: float) -> None:
        self.router.set_holds(peer.holds, holds)
        if peer.lapse is not None:
            peer.lapse.cancel()
            peer.lapse = None
        if peer.holds:
            lease = min(max(lease, 0.05), MAX_LEASE)
            peer.lapse = asyncio.get_running_loop().call_later(lease, self._lapsed, peer, lease)

    def _lapsed(self, peer: _Peer, lease: float) -> None:
        log.warning(
            "gateway: the controller did not renew its holds within %gs; released %s "
            "to their last routes",
            lease,
            ", ".join(sorted(peer.holds)),
        )
        self._release_all(peer)

    def _release_all(self, peer: _Peer) -> None:
        if peer.lapse is not None:
            peer.lapse.cancel()
            peer.lapse = None
        self.router.set_holds(peer.holds, {})

    def status(self) -> dict[str, Any]:
        plugins = {}
        for key in sorted(self.table):
            gate = self.router.gates.get(key)
            plugins[key] = {
                "endpoint": gate.endpoint if gate else None,
                "instance": gate.instance if gate else None,
                "inFlight": gate.in_flight if gate else 0,
                "held": gate.held if gate else 0,
                "holds": gate.holds if gate else 0,
            }
        return {"ready": self.ready.is_set(), "generation": self.generation, "plugins": plugins}

    # Serving.

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and _peer_uid(sock) not in (os.geteuid(), 0):
            writer.close()
            return
        peer: _Peer | None = None
        try:
            hello = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT)
            if hello is None or hello.get("type") != "hello":
                return
            version = choose_version(list(hello.get("versions") or []), self.versions)
            if version is None:
                writer.write(
                    _line(
                        {
                            "type": "refused",
                            "reason": "ProtocolUnsupported",
                            "message": f"this gateway speaks control protocol versions "
                            f"{list(self.versions)}, the controller {hello.get('versions')}",
                        }
                    )
                )
                await writer.drain()
                return
            peer = _Peer(writer, str(hello.get("role", "observer")))
            if peer.role == "controller":
                for other in [p for p in self._peers if p.role == "controller"]:
                    # The data directory's lock lets one controller run: an older connection
                    # is a controller that is gone. Its holds go with it.
                    self._release_all(other)
                    other.writer.close()
            self._peers.add(peer)
            writer.write(
                _line(
                    {
                        "type": "hello",
                        "version": version,
                        "ready": self.ready.is_set(),
                        **self.about,
                    }
                )
            )
            while (message := await _read(reader)) is not None:
                self._handle(peer, message)
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            log.debug("gateway: a control connection ended: %s", e)
        finally:
            if peer is not None:
                self._peers.discard(peer)
                if peer.holds:
                    log.info(
                        "gateway: the controller went away; released %s",
                        ", ".join(sorted(peer.holds)),
                    )
                self._release_all(peer)
            writer.close()

    def _handle(self, peer: _Peer, message: dict[str, Any]) -> None:
        ident = message.get("id")
        kind = message.get("type")
        writer = peer.writer

        def answer(**fields: Any) -> None:
            if not writer.is_closing():
                writer.write(_line({"id": ident, **fields}))

        try:
            if kind in ("routes", "holds") and peer.role != "controller":
                answer(error="only a controller may change routes", reason="NotController")
            elif kind == "routes":
                self.apply_table(message["routes"])
                answer(ok=True, generation=self.generation)
            elif kind == "holds":
                holds = {str(k): int(v) for k, v in dict(message["holds"]).items()}
                self._set_holds(peer, holds, float(message.get("lease", DEFAULT_LEASE)))
                answer(ok=True)
            elif kind == "wait_idle":
                endpoint, timeout = str(message["endpoint"]), float(message["timeout"])

                async def wait() -> None:
                    answer(ok=True, left=await self.router.wait_idle(endpoint, timeout))

                task = asyncio.get_running_loop().create_task(wait())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "status":
                answer(ok=True, **self.status())
            elif kind == "metrics":
                answer(ok=True, text=generate_latest(self._metrics).decode())
            else:
                answer(error=f"unknown message type {kind!r}", reason="UnknownMessage")
        except (KeyError, TypeError, ValueError) as e:
            answer(error=f"malformed {kind} message: {e}", reason="BadMessage")


# The controller's side.


DeclaredPlugins = Callable[[], dict[str, router.Declared]]
"""Every plugin the controller declares now, with its limits."""


class RemoteRoutes:
    """The swap coordinator's and the reconciler's ``Routes``, kept in a gateway process.

    ``set_route``, ``clear_route``, ``hold`` and ``release`` change what this
    controller wants and send it at once (the whole table, the whole hold
    set); a connection that breaks and comes back gets both again. Nothing
    is sent before :meth:`start_syncing`: a controller that has not yet read
    its specs and store would send an empty table.
    """

    def __init__(
        self,
        path: Path,
        declared: DeclaredPlugins,
        *,
        lease: float = DEFAULT_LEASE,
        about: dict[str, Any] | None = None,
        on_down: Callable[[], Awaitable[None]] | None = None,
        on_up: Callable[[dict[str, Any]], None] | None = None,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
    ) -> None:
        self.path = path
        self.declared = declared
        self.lease = lease
        self.about = about or {}
        self.on_down = on_down
        """Awaited each time the gateway cannot be reached (a supervisor starts it again)."""
        self.on_up = on_up
        """Called with the gateway's hello at each connection."""
        self.versions = versions
        self.gateway: dict[str, Any] = {}
        """What the gateway said in its last hello."""
        self.connected = asyncio.Event()
        self._routes: dict[str, tuple[str, str]] = {}
        self._holds: Counter[str] = Counter()
        self._incarnations: Counter[str] = Counter()
        self._writer: asyncio.StreamWriter | None = None
        self._syncing = False
        self._sent: dict[str, RouteEntry] | None = None
        self._flush_scheduled = False
        self._previews: dict[str, str] = {}
        """Per plugin: the endpoint preview calls reach (a swap's new color)."""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    # Routes, as the coordinator and the reconciler call them.

    def set_route(self, key: str, endpoint: str, instance: str, spec: models.PluginSpec) -> None:
        if self._routes.get(key) != (endpoint, instance):
            self._routes[key] = (endpoint, instance)
            self.changed()

    def clear_route(self, key: str) -> None:
        if self._routes.pop(key, None) is not None:
            self.changed()

    def set_preview(self, key: str, endpoint: str | None) -> None:
        if self._previews.get(key) != endpoint:
            if endpoint is None:
                del self._previews[key]
            else:
                self._previews[key] = endpoint
            self.changed()

    def route(self, key: str) -> str | None:
        found = self._routes.get(key)
        return found[0] if found else None

    def dropped(self, endpoint: str) -> None:
        """The instance behind ``endpoint`` is gone or replaced (the controller dropped its
        channel): the gateway drops its own when the endpoint is routed again."""
        self._incarnations[endpoint] += 1
        self.changed()

    def hold(self, key: str) -> None:
        self._holds[key] += 1
        self._send_holds()

    def release(self, key: str) -> None:
        self._holds[key] -= 1
        if self._holds[key] <= 0:
            del self._holds[key]
        self._send_holds()

    async def wait_idle(self, endpoint: str, timeout: float) -> int:
        answer = await self.request(
            {"type": "wait_idle", "endpoint": endpoint, "timeout": timeout}, timeout + 5
        )
        return int(answer["left"])

    # Sending.

    def changed(self) -> None:
        """The table may differ (a route, or the declared plugins): send it soon, once."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def start_syncing(self) -> None:
        """The routes from the store are set: from now on, send the table."""
        self._syncing = True
        self._flush()

    def table(self) -> dict[str, RouteEntry]:
        table = {}
        for key, declared in self.declared().items():
            endpoint, instance = self._routes.get(key, (None, None))
            incarnation = self._incarnations[endpoint] if endpoint else 0
            table[key] = entry(declared, endpoint, instance, incarnation, self._previews.get(key))
        return table

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._syncing or self._writer is None:
            return
        table = self.table()
        if table == self._sent:
            return
        self._send({"type": "routes", "routes": table})
        self._sent = table

    def _send_holds(self) -> None:
        self._flush()  # a release after a flip must reach the gateway after the new route
        if self._syncing and self._writer is not None:
            self._send({"type": "holds", "holds": dict(self._holds), "lease": self.lease})

    def _send(self, message: dict[str, Any]) -> int:
        assert self._writer is not None
        ident = next(self._ids)
        self._writer.write(_line({"id": ident, **message}))
        return ident

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``message`` after what is pending; its answer (raises when unreachable)."""
        self._flush()
        if self._writer is None:
            raise GatewayUnavailableError(f"the gateway at {self.path} is not connected")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        ident = self._send(message)
        self._pending[ident] = future
        try:
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            raise GatewayUnavailableError(
                f"the gateway did not answer {message['type']} within {timeout:g}s"
            ) from None
        finally:
            self._pending.pop(ident, None)
        if "error" in answer:
            raise GatewayUnavailableError(f"the gateway refused {message['type']}: {answer}")
        return answer

    # The connection.

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop``.

        Raises :class:`GatewayProtocolError` when the gateway speaks no common version.
        """
        delay = 0.02
        while not stop.is_set():
            try:
                await self._connect_and_serve(stop)
                delay = 0.02
            except (OSError, ValueError, TimeoutError, GatewayUnavailableError) as e:
                log.debug("gateway control connection: %s", e)
            if stop.is_set():
                break
            if self.on_down is not None:
                await self.on_down()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(1.0, delay * 2)

    async def _connect_and_serve(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_MESSAGE_BYTES)
        try:
            writer.write(
                _line(
                    {
                        "type": "hello",
                        "versions": list(self.versions),
                        "role": "controller",
                        **self.about,
                    }
                )
            )
            hello = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT)
            if hello is None:
                raise GatewayUnavailableError("the gateway closed the connection at hello")
            if hello.get("type") == "refused":
                raise GatewayProtocolError(
                    f"the gateway at {self.path} (pid {self.gateway.get('pid', '?')}) refused "
                    f"this controller: {hello.get('message')}; run a gateway of this version "
                    "(stop it with bhctl gateway --stop, and bhctl run starts one)"
                )
            self.gateway = hello
            log.info(
                "gateway: connected to pid %s (control protocol %s, %s)",
                hello.get("pid"),
                hello.get("version"),
                "has routes" if hello.get("ready") else "waiting for its routes",
            )
            self._writer = writer
            self._sent = None
            self._flush()
            if self._holds:
                self._send_holds()
            self.connected.set()
            if self.on_up is not None:
                self.on_up(hello)
            renew = asyncio.create_task(self._renew())
            try:
                while (message := await _read(reader)) is not None:
                    future = self._pending.get(message.get("id", -1))
                    if future is not None and not future.done():
                        future.set_result(message)
                    elif "error" in message:
                        log.error("gateway: %s", message)
            finally:
                renew.cancel()
        finally:
            self.connected.clear()
            self._writer = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(GatewayUnavailableError("the gateway went away"))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            if self._holds:
                self._send_holds()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def ask(path: Path, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """One request to the gateway as an observer, without an event loop; its answer.

    Raises :class:`GatewayUnavailableError` when the gateway cannot be reached.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            hello = {"type": "hello", "versions": list(PROTOCOL_VERSIONS), "role": "observer"}
            sock.sendall(_line(hello) + _line({"id": 1, **message}))
            with sock.makefile("rb") as stream:
                for line in stream:
                    answer = json.loads(line)
                    if answer.get("type") == "refused":
                        raise GatewayProtocolError(str(answer.get("message")))
                    if answer.get("id") == 1:
                        return dict(answer)
    except (OSError, ValueError) as e:
        raise GatewayUnavailableError(f"the gateway at {path} does not answer: {e}") from e
    raise GatewayUnavailableError(f"the gateway at {path} closed the connection")


def fetch_metrics(path: Path, timeout: float = 2.0) -> bytes:
    """The gateway's series in Prometheus' text format (b"" when it cannot be reached).

    Called in the thread that serves a scrape of the controller's ``/metrics``.
    """
    try:
        return str(ask(path, {"type": "metrics"}, timeout).get("text", "")).encode()
    except ControllerError as e:
        log.debug("gateway metrics: %s", e)
        return b""
