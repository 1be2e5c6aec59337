"""The control protocol between the controller and gateways in processes of their own.

On one host, one Unix socket (``DATA_DIR/gateway.sock``, mode 0600, its
peers checked to be the gateway's own user) carries newline-delimited JSON.
On Kubernetes each gateway replica listens on TCP on the pod network too
(``bhctl gateway --control-addr``), and there it speaks first:
``{"type": "challenge", "nonce": ...}``; the controller's hello carries
``proof``, HMAC-SHA256 of the nonce under a secret both hold
(:class:`SharedSecret`, from a Secret), which the gateway compares in
constant time, else it answers ``refused`` with reason ``Unauthenticated``
and closes. The Unix socket asks for no proof. Then, on either transport,
the controller speaks, ``{"type": "hello", "versions": [1], "role":
"controller"}``; the gateway answers with the highest version both speak,
its pid and the addresses it listens on, or ``{"type": "refused", "reason":
"ProtocolUnsupported", "message": ...}`` and closes: an old gateway and a
new controller (or the reverse) work together while they share a version,
and say so clearly when they do not. Then each message carries an ``id``
and is answered ``{"id": N, "ok": true, ...}`` or ``{"id": N, "error": ...,
"reason": ...}``; messages are applied in the order sent, so an answer to
message N says that every message before it was applied too:

- ``routes``: the **whole** route table: every declared plugin with its
  limits, whom it may call, its endpoint (``null``: declared, not Ready,
  503) and, on Kubernetes, the protocol ``token`` its instance asks for; for
  an endpoint reached over mutual TLS (a remote plugin), ``tls``: the server
  name and CA its certificate is checked against, for each of the entry's
  endpoints (the active one, a preview's, a canary's).
  Level-triggered: the controller sends it on every change and on every
  (re)connect, never a delta that could be lost; the gateway replaces what
  it had. A gateway answers calls only once it has a table (until then it
  holds them, at most :data:`~controller.gateway.server.READY_TIMEOUT`),
  and keeps its last table for as long as no controller sends another.
- ``holds``: the whole set of plugins this controller holds (key to count)
  and a lease in seconds. The controller sends it on each hold and release
  and renews it every third of the lease while it holds anything. A hold
  whose lease lapses, or whose controller's connection closes, is
  released at once to the route of the last table: a controller killed
  mid-hold never freezes traffic. The gateway then tells the controller
  ``{"type": "released", "plugins": [...], "cause": "LeaseLapsed" |
  "ControllerGone", "lease": s}`` (no ``id``): at once if it is still
  connected, else the next controller that connects, which records an
  event on each plugin and counts ``blackhole_gateway_hold_releases_total``.
- ``wait_idle``: wait until no call is in flight to an endpoint (a swap's
  drain), at most ``timeout`` seconds; answers ``left``.
- ``stats``: what the gateway counted of an ``endpoint``'s calls since it
  started (``calls``, ``failures``: the 5xx, ``buckets``: latencies in
  :data:`~controller.gateway.counts.LATENCY_BOUNDS`), which a swap's builtin
  analysis measures the new color by; summed over the replicas.
- ``status``: each plugin's endpoint (and ``endpoints``, its Ready replicas,
  for a color of several), calls in flight and held, holds, a canary's
  endpoint and weight.
- ``metrics``: the gateway's ``blackhole_gateway_*`` series in Prometheus'
  text format (the controller serves them on its own ``/metrics``).

Version 1 is this text. A new message type, or a new field that the other
side may ignore (``token``, ``tls``, ``released``, ``challenge`` on the new TCP
transport), keeps the version (a gateway answers an unknown type with
reason ``UnknownMessage``, a controller ignores what it does not know;
``canary`` in a table entry, ``{"endpoint", "weight", "header"}``: the
share of calls in percent that go to a canary's new color, sticky by a
header's value; ``endpoints`` in a table entry and in its ``canary``, a list of
``{"endpoint", "incarnation"}``: the Ready replicas of a color of several
(``spec.replicas``), which the gateway balances that color's calls over,
while ``endpoint`` still names the color (an older gateway sends all of them
to that one replica); and ``stats``: an older gateway routes every call to the
active color and answers ``stats`` UnknownMessage, which fails a builtin
analysis saying so); any
other change (a field of ``models.Gateway`` included: the gateway validates
entries strictly) adds a version.

Commit rule: the controller records a flip in its store before it sends the
table with the new route, and a controller that starts again sends the
table it rebuilds from its store, so the store and not a gateway is the
truth about which color is active.

Several replicas (Kubernetes): the controller keeps a connection to each
replica it finds (:class:`RemoteRoutes`, :meth:`RemoteRoutes.set_gateways`)
and sends each the same table and holds. A swap holds on every replica and
waits until each acknowledges the hold (:meth:`RemoteRoutes.acknowledged`),
records the flip in its store, sends the new table and waits until each
acknowledges it, and only then releases: flipped on every replica or on
none. If any replica does not acknowledge the hold or the flip within
``ack_timeout``, the swap rolls back: the old route goes to every replica
before the release does, so the replicas that answered never route to the
new color, and one that was frozen applies hold, flip and rollback in the
order sent when it thaws (or its lease lapses first, releasing to its last
table). A replica that joins mid-swap (a new pod, or one reconnecting) is
brought in line on connecting: before anything else it gets the whole table
as committed and the current hold set, so it holds the swapping plugin's
calls with the others, takes the flip when it is sent to all, and is
released with them; it is counted in the swap's acknowledgements from then
on. A replica not yet ready (no table, so no calls) is not waited for
until it connects; a ready one that is not connected fails the swap, as it
could not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from controller.errors import ControllerError
from controller.gateway import counts, router
from controller.metrics import exposition, telemetry
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
ACK_TIMEOUT = 2.0
"""Seconds every gateway has to acknowledge a swap's hold and its flip before it rolls back."""
METRICS_PREFIX = "blackhole_gateway_"
SECRET_MIN_BYTES = 16


class GatewayUnavailableError(ControllerError):
    """The gateway process cannot be reached over its control socket."""


class GatewayProtocolError(ControllerError):
    """The gateway and the controller speak no common control protocol version."""


class ControlSecretError(ControllerError):
    """The control listener's shared secret cannot be read, or is too short."""


class SharedSecret:
    """How a gateway listening on TCP knows its controller, and the reverse: a secret both hold.

    The gateway sends a fresh nonce; the controller answers with
    HMAC-SHA256(secret, nonce), which the gateway compares in constant time.
    The secret itself never crosses the network, and an answer overheard is
    worth nothing for the next nonce. (Mutual TLS would take this class's
    place: it is the one thing the TCP listener and its client ask of their
    peer.)
    """

    CONTEXT = b"blackhole-control-v1:"

    def __init__(self, secret: bytes) -> None:
        secret = secret.strip()
        if len(secret) < SECRET_MIN_BYTES:
            raise ControlSecretError(
                f"the control secret has {len(secret)} bytes, fewer than {SECRET_MIN_BYTES}: "
                "make one with e.g. `head -c 32 /dev/urandom | base64`"
            )
        self._secret = secret

    @classmethod
    def load(cls, path: Path) -> SharedSecret:
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise ControlSecretError(f"cannot read the control secret {path}: {e.strerror}") from e

    @staticmethod
    def challenge() -> str:
        return secrets.token_hex(32)

    def proof(self, nonce: str) -> str:
        return hmac.new(self._secret, self.CONTEXT + nonce.encode(), hashlib.sha256).hexdigest()

    def verify(self, nonce: str, proof: object) -> bool:
        given = proof.encode() if isinstance(proof, str) else b""
        return hmac.compare_digest(self.proof(nonce).encode(), given)


@dataclass(frozen=True)
class Address:
    """Where a gateway's control listener is: a Unix socket (one host) or TCP (a pod network)."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def tcp(self) -> bool:
        return self.path is None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.path is not None:
            return await asyncio.open_unix_connection(str(self.path), limit=MAX_MESSAGE_BYTES)
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=MAX_MESSAGE_BYTES), HELLO_TIMEOUT
        )


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) as its parts."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


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
    token: NotRequired[str]
    """The protocol token the plugin's instances ask for (Kubernetes: the gateway is another
    pod), the same for each of its endpoints: every color's, replica's, preview's, canary's."""
    canary: NotRequired[Canary | None]
    """A canary's new color and the share of calls it takes."""
    tls: NotRequired[dict[str, EndpointTLS]]
    """How each of its endpoints reached over mutual TLS (a remote plugin, a pod: the active
    one, a preview's, a canary's, each of their replicas) is checked; the gateway presents its
    own client certificate."""
    endpoints: NotRequired[list[ReplicaEntry]]
    """The Ready replicas of the color ``endpoint`` names, when it has several."""


class ReplicaEntry(TypedDict):
    """One replica of a color of several, as it crosses the socket."""

    endpoint: str
    incarnation: int
    """As :attr:`RouteEntry.incarnation`, for this replica's endpoint."""


class Canary(TypedDict):
    """A canary's split, as it crosses the socket."""

    endpoint: str
    weight: float
    """Percent of the calls, 0 to 100."""
    header: str | None
    """The header whose value picks a call's color (None: a random draw per call)."""
    endpoints: NotRequired[list[ReplicaEntry]]
    """The canary color's Ready replicas, when it has several."""


class EndpointTLS(TypedDict):
    """What a gateway checks of the certificate an endpoint presents."""

    serverName: str
    """The name the certificate must carry."""
    ca: str
    """The CA certificate(s), PEM, it must chain to."""


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


def _endpoints_of(item: RouteEntry) -> list[str]:
    """Every endpoint a table entry routes to: its color's, its replicas', a preview's, a
    canary's and its replicas'."""
    canary = item.get("canary")
    found = [
        item.get("endpoint"),
        *(one["endpoint"] for one in item.get("endpoints", ())),
        item.get("preview"),
        *([canary["endpoint"], *(one["endpoint"] for one in canary.get("endpoints", ()))]
          if canary else []),
    ]  # fmt: skip
    return [str(e) for e in dict.fromkeys(found) if e]


def _pool_of(endpoint: str, endpoints: Sequence[str]) -> tuple[str, ...]:
    """The replicas a color's calls are balanced over (none: all go to ``endpoint``)."""
    pool = tuple(dict.fromkeys(endpoints))
    return pool if pool and pool != (endpoint,) else ()


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
        return [
            m
            for m in self.registry.collect()
            if m.name.startswith(METRICS_PREFIX) and m.name != telemetry.HOLD_RELEASES
        ]


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
        self.tokens: dict[str, str] = {}
        """Endpoint to the protocol token its instance asks for, as the table says."""
        self.tls: dict[str, EndpointTLS] = {}
        """Endpoint to how it is reached over mutual TLS, as the table says."""
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
        self._tcp: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._unreported: list[dict[str, Any]] = []
        """Holds this gateway released by itself that no controller was told of yet."""
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

    async def start_tcp(self, address: str, secret: SharedSecret) -> str:
        """Listen on ``HOST:PORT`` too (a pod network), for controllers that prove ``secret``.

        Returns the address listened on (port 0 picks a free one).
        """
        host, port = split_address(address)
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await exposition.bind(listener, (host, port), "gateway control")
        except OSError:
            listener.close()
            raise
        self._tcp = await asyncio.start_server(
            functools.partial(self._serve, secret=secret), sock=listener, limit=MAX_MESSAGE_BYTES
        )
        bound = listener.getsockname()[1]
        return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def stop(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
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
        self.tokens = {
            endpoint: str(item["token"])
            for item in routes.values()
            if item.get("token")
            for endpoint in _endpoints_of(item)
        }
        self.tls = {
            endpoint: checked
            for item in routes.values()
            for endpoint, checked in item.get("tls", {}).items()
        }
        for item in routes.values():
            pooled = list(item.get("endpoints", ()))
            if canary := item.get("canary"):
                pooled += canary.get("endpoints", ())
            for one in (item, *pooled):
                endpoint, incarnation = one["endpoint"], int(one.get("incarnation", 0))
                if endpoint and self.incarnations.setdefault(endpoint, incarnation) != incarnation:
                    self.incarnations[endpoint] = incarnation
                    if self.replaced is not None:
                        self.replaced(endpoint)
        for key, item in routes.items():
            if item["endpoint"]:
                self.router.route_to(
                    key,
                    item["endpoint"],
                    item["instance"] or "",
                    table[key],
                    [str(one["endpoint"]) for one in item.get("endpoints", ())],
                )
            else:
                self.router.clear_route(key)
            self.router.set_preview(key, item.get("preview"))
            canary = item.get("canary")
            if canary:
                self.router.set_canary(
                    key,
                    str(canary["endpoint"]),
                    float(canary["weight"]),
                    canary.get("header"),
                    [str(one["endpoint"]) for one in canary.get("endpoints", ())],
                )
            else:
                self.router.set_canary(key, None, 0)
        for key in list(self.router.gates):
            if key not in table:
                self.router.clear_route(key)
                self.router.set_preview(key, None)
                self.router.set_canary(key, None, 0)
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
        self._note_released(peer, "LeaseLapsed", lease)
        self._release_all(peer)

    def _note_released(self, peer: _Peer, cause: str, lease: float) -> None:
        """Tell the controller of holds released without it: at once if it is still
        connected (its lease lapsed), else the next controller that connects."""
        if not peer.holds:
            return
        record = {"plugins": sorted(peer.holds), "cause": cause, "lease": lease}
        self._unreported.append(record)
        del self._unreported[:-100]
        self._report()

    def _report(self) -> None:
        controllers = [p for p in self._peers if p.role == "controller"]
        if not self._unreported or not controllers:
            return
        for peer in controllers:
            if not peer.writer.is_closing():
                for record in self._unreported:
                    peer.writer.write(_line({"type": "released", **record}))
        self._unreported.clear()

    def _release_all(self, peer: _Peer) -> None:
        if peer.lapse is not None:
            peer.lapse.cancel()
            peer.lapse = None
        self.router.set_holds(peer.holds, {})

    def status(self) -> dict[str, Any]:
        plugins: dict[str, dict[str, Any]] = {}
        for key in sorted(self.table):
            gate = self.router.gates.get(key)
            plugins[key] = {
                "endpoint": gate.endpoint if gate else None,
                "instance": gate.instance if gate else None,
                "inFlight": gate.in_flight if gate else 0,
                "held": gate.held if gate else 0,
                "holds": gate.holds if gate else 0,
                "canary": gate.canary if gate else None,
                "weight": gate.weight if gate else 0.0,
            }
            if gate is not None and gate.endpoint in gate.pools:  # a color of replicas
                plugins[key]["endpoints"] = list(gate.pools[gate.endpoint].endpoints)
        return {"ready": self.ready.is_set(), "generation": self.generation, "plugins": plugins}

    # Serving.

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        secret: SharedSecret | None = None,
    ) -> None:
        sock = writer.get_extra_info("socket")
        if secret is None and sock is not None and _peer_uid(sock) not in (os.geteuid(), 0):
            writer.close()
            return
        if secret is not None and sock is not None:
            # Small messages each awaited by the other side: Nagle's algorithm with
            # delayed ACKs would add 40 ms to each (asyncio sets it only for sockets
            # it made itself).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer: _Peer | None = None
        lease = DEFAULT_LEASE
        try:
            nonce = ""
            if secret is not None:
                nonce = secret.challenge()
                writer.write(_line({"type": "challenge", "nonce": nonce}))
            hello = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT)
            if hello is None or hello.get("type") != "hello":
                return
            if secret is not None and not secret.verify(nonce, hello.get("proof")):
                log.warning(
                    "gateway: refused a control connection from %s: wrong or no proof of "
                    "the shared secret",
                    writer.get_extra_info("peername"),
                )
                writer.write(
                    _line(
                        {
                            "type": "refused",
                            "reason": "Unauthenticated",
                            "message": "this gateway's control listener asks for its shared "
                            "secret, and the proof given does not match it",
                        }
                    )
                )
                await writer.drain()
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
            if peer.role == "controller":
                self._report()
            while (message := await _read(reader)) is not None:
                if message.get("type") == "holds":
                    with contextlib.suppress(TypeError, ValueError):
                        lease = float(message.get("lease", DEFAULT_LEASE))
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
                    self._note_released(peer, "ControllerGone", lease)
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
            elif kind == "stats":
                found = self.router.counts.get(str(message["endpoint"]))
                answer(ok=True, **(found or counts.Stats()).to_json())
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
Released = Callable[[str, dict[str, Any]], None]
"""Told (gateway, record) of holds a gateway released by itself: ``plugins``, ``cause``
(``LeaseLapsed`` or ``ControllerGone``) and ``lease``."""
LOCAL = "local"
"""The name of the one gateway of a single host."""


@dataclass(frozen=True)
class Replica:
    """A gateway the controller found: where its control listener is, and whether it serves."""

    address: Address
    ready: bool = True
    """A ready replica takes calls: a swap needs its acknowledgements, connected or not.
    One that is not ready (it has no table yet) is waited for only once connected."""


class _Link:
    """One gateway's control connection, and what was sent on it."""

    def __init__(self, name: str, replica: Replica) -> None:
        self.name = name
        self.replica = replica
        self.writer: asyncio.StreamWriter | None = None
        self.hello: dict[str, Any] = {}
        self.sent: dict[str, RouteEntry] | None = None
        """The table last sent on this connection."""
        self.last_change = 0
        """The id of the last routes or holds message sent."""
        self.applied = 0
        """The highest id the gateway answered: it applied everything up to it, in order."""
        self.progress = asyncio.Event()
        """Set at each answer and at each disconnection."""
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.task: asyncio.Task[None] | None = None


class RemoteRoutes:
    """The swap coordinator's and the reconciler's ``Routes``, kept in gateway processes.

    ``set_route``, ``clear_route``, ``hold`` and ``release`` change what this
    controller wants and send it at once (the whole table, the whole hold
    set) to every gateway; a connection that breaks and comes back gets both
    again. Nothing is sent before :meth:`start_syncing`: a controller that
    has not yet read its specs and store would send an empty table.

    On one host there is one gateway, at ``path``. With ``path`` None the
    gateways are the replicas :meth:`set_gateways` names (on Kubernetes, the
    endpoints of the gateways' headless Service), each with a connection of
    its own; :meth:`acknowledged` is how a swap learns that every one of them
    holds, or has flipped, before it goes on: any that does not within
    ``ack_timeout`` makes the swap roll back. A replica that connects
    mid-swap gets the table (which carries only committed routes: a flip is
    set here after the store records it) and the current holds before
    anything else, so it holds the swapping plugin's calls like the others
    until the release reaches every replica.
    """

    def __init__(
        self,
        path: Path | None,
        declared: DeclaredPlugins,
        *,
        lease: float = DEFAULT_LEASE,
        about: dict[str, Any] | None = None,
        on_down: Callable[[], Awaitable[None]] | None = None,
        on_up: Callable[[dict[str, Any]], None] | None = None,
        on_released: Released | None = None,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        secret: SharedSecret | None = None,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        self.path = path
        self.declared = declared
        self.lease = lease
        self.about = about or {}
        self.on_down = on_down
        """Awaited each time the gateway cannot be reached (a supervisor starts it again)."""
        self.on_up = on_up
        """Called with a gateway's hello at each connection."""
        self.on_released = on_released
        self.versions = versions
        self.secret = secret
        """Proves this controller to gateways that listen on TCP."""
        self.ack_timeout = ack_timeout
        self.gateway: dict[str, Any] = {}
        """What a gateway said in its last hello."""
        self.connected = asyncio.Event()
        """Set while at least one gateway is connected."""
        self._routes: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self._tokens: Callable[[str], str | None] | None = None
        self._tls: Callable[[str], EndpointTLS | None] | None = None
        self._holds: Counter[str] = Counter()
        self._incarnations: Counter[str] = Counter()
        self._links: dict[str, _Link] = {}
        if path is not None:
            self._links[LOCAL] = _Link(LOCAL, Replica(Address(path=path)))
        self._stop: asyncio.Event | None = None
        self._syncing = False
        self._flush_scheduled = False
        self._previews: dict[str, str] = {}
        """Per plugin: the endpoint preview calls reach (a swap's new color)."""
        self._canaries: dict[str, Canary] = {}
        """Per plugin: a canary's new color and its weight."""
        self._ids = itertools.count(1)

    def carry_tokens(self, tokens: Callable[[str], str | None]) -> None:
        """Send each endpoint's protocol token in its entry (``token``: a gateway of another
        pod calls plugins that ask for one). A field an older gateway ignores."""
        self._tokens = tokens

    def carry_tls(self, tls: Callable[[str], EndpointTLS | None]) -> None:
        """Send how each endpoint reached over mutual TLS is checked in its entry (``tls``).
        A field an older gateway ignores (and then cannot reach remote plugins)."""
        self._tls = tls

    # Routes, as the coordinator and the reconciler call them.

    def set_route(
        self,
        key: str,
        endpoint: str,
        instance: str,
        spec: models.PluginSpec,
        endpoints: Sequence[str] = (),
    ) -> None:
        want = (endpoint, instance, _pool_of(endpoint, endpoints))
        if self._routes.get(key) != want:
            self._routes[key] = want
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

    def set_canary(
        self,
        key: str,
        endpoint: str | None,
        weight: float,
        header: str | None = None,
        endpoints: Sequence[str] = (),
    ) -> None:
        want: Canary | None = None
        if endpoint is not None:
            want = {"endpoint": endpoint, "weight": float(weight), "header": header}
            if pool := _pool_of(endpoint, endpoints):
                want["endpoints"] = [{"endpoint": e, "incarnation": 0} for e in pool]
        if self._canaries.get(key) != want:
            if want is None:
                del self._canaries[key]
            else:
                self._canaries[key] = want
            self.changed()

    async def stats(self, endpoint: str) -> counts.Stats | None:
        """What the gateways counted of ``endpoint``'s calls, summed (None: one of them does
        not count them: an older gateway)."""
        links = [link for link in self._needed() if link.writer is not None]
        total = counts.Stats()
        message = {"type": "stats", "endpoint": endpoint}
        for answer in await asyncio.gather(
            *(self._request(link, message, self.ack_timeout) for link in links),
            return_exceptions=True,
        ):
            if isinstance(answer, GatewayUnavailableError) and "UnknownMessage" in str(answer):
                return None
            if isinstance(answer, BaseException):
                raise GatewayUnavailableError(f"the gateway's counts: {answer}")
            try:
                total = total.plus(counts.Stats.from_json(answer))
            except (KeyError, TypeError, ValueError) as e:
                raise GatewayUnavailableError(f"the gateway's counts: {e}") from None
        return total

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

    async def acknowledged(self) -> None:
        """Every gateway that serves has applied all that was sent to it (routes, holds).

        Raises :class:`GatewayUnavailableError`, naming them, when some did
        not within ``ack_timeout`` (or a ready one is not connected at all).
        """
        self._flush()
        waiting = {link.name: (link, link.last_change) for link in self._needed()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        late = []
        for name, (link, target) in waiting.items():
            while link.writer is not None and link.applied < target:
                link.progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.progress.wait(), max(0.0, deadline - loop.time()))
                if loop.time() >= deadline:
                    break
            if link.writer is None or link.applied < target:
                late.append(name)
        if late:
            raise GatewayUnavailableError(
                f"gateway {', '.join(sorted(late))} did not acknowledge within "
                f"{self.ack_timeout:g}s"
            )

    async def wait_idle(self, endpoint: str, timeout: float) -> int:
        """Calls still in flight to ``endpoint`` after ``timeout``, summed over the gateways."""
        links = self._needed()
        if not links:
            return 0  # no gateway replica at all (none found yet): no call goes through one
        missing = sorted(link.name for link in links if link.writer is None)
        if missing:
            raise GatewayUnavailableError(f"gateway {', '.join(missing)} not connected")
        message = {"type": "wait_idle", "endpoint": endpoint, "timeout": timeout}
        answers = await asyncio.gather(
            *(self._request(link, message, timeout + self.ack_timeout) for link in links)
        )
        return sum(int(answer["left"]) for answer in answers)

    def _needed(self) -> list[_Link]:
        """The gateways a swap waits for: the ready ones, and any that is connected."""
        return [
            link for link in self._links.values() if link.replica.ready or link.writer is not None
        ]

    # The gateways.

    def set_gateways(self, found: dict[str, Replica]) -> None:
        """The gateway replicas now (name to replica): connect to new ones, drop gone ones."""
        for name in list(self._links):
            if name not in found or found[name].address != self._links[name].replica.address:
                link = self._links.pop(name)
                if link.task is not None:
                    link.task.cancel()
                if link.writer is not None:
                    link.writer.close()
                log.info("gateway %s: gone (%s)", name, link.replica.address)
        for name, replica in found.items():
            if name in self._links:
                self._links[name].replica = replica
                continue
            new = self._links[name] = _Link(name, replica)
            log.info("gateway %s: found at %s", name, replica.address)
            if self._stop is not None:
                self._start(new)
        self._refresh_connected()

    def gateways(self) -> dict[str, dict[str, Any]]:
        """Each gateway's address, readiness and connection."""
        return {
            name: {
                "address": str(link.replica.address),
                "ready": link.replica.ready,
                "connected": link.writer is not None,
                "pid": link.hello.get("pid"),
            }
            for name, link in sorted(self._links.items())
        }

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
            endpoint, instance, pool = self._routes.get(key, (None, None, ()))
            incarnation = self._incarnations[endpoint] if endpoint else 0
            table[key] = entry(declared, endpoint, instance, incarnation, self._previews.get(key))
            if pool:
                table[key]["endpoints"] = [
                    {"endpoint": e, "incarnation": self._incarnations[e]} for e in pool
                ]
            if key in self._canaries:
                canary = self._canaries[key]
                if "endpoints" in canary:
                    canary = {
                        **canary,
                        "endpoints": [
                            {"endpoint": e, "incarnation": self._incarnations[e]}
                            for e in (one["endpoint"] for one in canary["endpoints"])
                        ],
                    }
                table[key]["canary"] = canary
            if endpoint and self._tokens is not None and (token := self._tokens(endpoint)):
                table[key]["token"] = token
            if self._tls is not None:
                reached = _endpoints_of(table[key])
                checked = {e: tls for e in reached if (tls := self._tls(e)) is not None}
                if checked:
                    table[key]["tls"] = checked
        return table

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._syncing:
            return
        table: dict[str, RouteEntry] | None = None
        for link in self._links.values():
            if link.writer is None:
                continue
            if table is None:
                table = self.table()
            if table != link.sent:
                self._send(link, {"type": "routes", "routes": table}, change=True)
                link.sent = table

    def _send_holds(self) -> None:
        self._flush()  # a release after a flip must reach the gateway after the new route
        if self._syncing:
            for link in self._links.values():
                self._send_holds_to(link)

    def _send_holds_to(self, link: _Link) -> None:
        if link.writer is not None:
            message = {"type": "holds", "holds": dict(self._holds), "lease": self.lease}
            self._send(link, message, change=True)

    def _send(self, link: _Link, message: dict[str, Any], *, change: bool = False) -> int:
        assert link.writer is not None
        ident = next(self._ids)
        link.writer.write(_line({"id": ident, **message}))
        if change:
            link.last_change = ident
        return ident

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``message`` to the one gateway after what is pending; its answer (raises
        when unreachable)."""
        if len(self._links) != 1:
            raise GatewayUnavailableError(f"{len(self._links)} gateways, not one, to ask")
        return await self._request(next(iter(self._links.values())), message, timeout)

    async def _request(
        self, link: _Link, message: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        self._flush()
        if link.writer is None:
            raise GatewayUnavailableError(f"the gateway at {link.replica.address} is not connected")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        ident = self._send(link, message)
        link.pending[ident] = future
        try:
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            raise GatewayUnavailableError(
                f"gateway {link.name} did not answer {message['type']} within {timeout:g}s"
            ) from None
        finally:
            link.pending.pop(ident, None)
        if "error" in answer:
            raise GatewayUnavailableError(
                f"gateway {link.name} refused {message['type']}: {answer}"
            )
        return answer

    # The connections.

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected to every gateway until ``stop``.

        Raises :class:`GatewayProtocolError` when the one gateway of a single
        host speaks no common version (replicas that do are retried: an
        upgrade replaces them).
        """
        self._stop = stop
        if self.path is not None:
            await self._keep(self._links[LOCAL], stop)
            return
        for link in self._links.values():
            self._start(link)
        try:
            await stop.wait()
        finally:
            for link in self._links.values():
                if link.task is not None:
                    link.task.cancel()

    def _start(self, link: _Link) -> None:
        assert self._stop is not None
        link.task = asyncio.get_running_loop().create_task(
            self._keep(link, self._stop), name=f"gateway-control-{link.name}"
        )

    async def _keep(self, link: _Link, stop: asyncio.Event) -> None:
        delay = 0.02
        while not stop.is_set():
            try:
                await self._connect_and_serve(link, stop)
                delay = 0.02
            except (OSError, ValueError, TimeoutError, GatewayUnavailableError) as e:
                log.debug("gateway %s control connection: %s", link.name, e)
            except GatewayProtocolError as e:
                if self.path is not None:
                    raise
                log.error("gateway %s: %s", link.name, e)
                delay = 5.0
            if stop.is_set():
                break
            if self.on_down is not None:
                await self.on_down()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(1.0 if self.path is not None else 5.0, delay * 2)

    async def _connect_and_serve(self, link: _Link, stop: asyncio.Event) -> None:
        address = link.replica.address
        reader, writer = await address.open()
        try:
            proof: dict[str, str] = {}
            if address.tcp:
                challenge = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT)
                if challenge is None or challenge.get("type") != "challenge":
                    raise GatewayUnavailableError(f"the gateway at {address} sent no challenge")
                if self.secret is None:
                    raise GatewayProtocolError(
                        f"the gateway at {address} asks for the control secret, and this "
                        "controller has none (--gateway-control-secret)"
                    )
                proof = {"proof": self.secret.proof(str(challenge.get("nonce", "")))}
            writer.write(
                _line(
                    {
                        "type": "hello",
                        "versions": list(self.versions),
                        "role": "controller",
                        **self.about,
                        **proof,
                    }
                )
            )
            hello = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT)
            if hello is None:
                raise GatewayUnavailableError("the gateway closed the connection at hello")
            if hello.get("type") == "refused":
                if hello.get("reason") == "Unauthenticated":
                    raise GatewayProtocolError(
                        f"the gateway at {address} refused this controller's control secret"
                    )
                raise GatewayProtocolError(
                    f"the gateway at {address} (pid {link.hello.get('pid', '?')}) refused "
                    f"this controller: {hello.get('message')}; run a gateway of this version "
                    "(stop it with bhctl gateway --stop, and bhctl run starts one)"
                )
            link.hello = self.gateway = hello
            log.info(
                "gateway %s: connected to pid %s at %s (control protocol %s, %s)",
                link.name,
                hello.get("pid"),
                address,
                hello.get("version"),
                "has routes" if hello.get("ready") else "waiting for its routes",
            )
            link.writer = writer
            link.sent = None
            self._flush()
            if self._holds and self._syncing:
                self._send_holds_to(link)
            self._refresh_connected()
            if self.on_up is not None:
                self.on_up(hello)
            renew = asyncio.create_task(self._renew(link))
            try:
                while (message := await _read(reader)) is not None:
                    self._answered(link, message)
            finally:
                renew.cancel()
        finally:
            if link.writer is writer:
                link.writer = None
            link.progress.set()
            self._refresh_connected()
            for future in link.pending.values():
                if not future.done():
                    future.set_exception(GatewayUnavailableError("the gateway went away"))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answered(self, link: _Link, message: dict[str, Any]) -> None:
        if message.get("type") == "released":
            log.warning(
                "gateway %s released %s by itself (%s, lease %ss): their calls went to "
                "their last routes",
                link.name,
                ", ".join(message.get("plugins") or []),
                message.get("cause"),
                message.get("lease"),
            )
            if self.on_released is not None:
                self.on_released(link.name, message)
            return
        ident = message.get("id", -1)
        if isinstance(ident, int) and ident > link.applied:
            link.applied = ident  # messages are applied in order: all before it are too
        link.progress.set()
        future = link.pending.get(ident)
        if future is not None and not future.done():
            future.set_result(message)
        elif "error" in message:
            log.error("gateway %s: %s", link.name, message)

    def _refresh_connected(self) -> None:
        if any(link.writer is not None for link in self._links.values()):
            self.connected.set()
        else:
            self.connected.clear()

    async def _renew(self, link: _Link) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            if self._holds and self._syncing:
                self._send_holds_to(link)

    async def close(self) -> None:
        for link in self._links.values():
            if link.writer is not None:
                link.writer.close()


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
