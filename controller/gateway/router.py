"""Where each plugin's calls go, and the gates in front of it.

The reconciler sets a plugin's route when its active instance is Ready and
clears it when it is not (calls then get 503 at once). Each plugin has a
gate: a count of calls in flight (per instance, so that a swap can wait for
an instance to go idle), a token bucket, and a hold: while held, new calls
wait, and :meth:`Router.release` lets them through to whichever instance is
active by then. The HTTP and gRPC front ends
(:mod:`controller.gateway.server`) pass every call through here; in the
gateway's own process (:mod:`controller.gateway.process`) the control
protocol (:mod:`controller.gateway.control`) sets the routes and holds.

During a canary a gate also has the new color's endpoint and its weight:
each call goes to it with that probability (one random draw, or a hash of
the sticky header's value, so that a caller keeps its color at a weight).
A color of several replicas (``spec.replicas``) is one endpoint to the rest
of the controller (its first replica's: what routes, previews, canaries,
drains and analyses name it by, and what its calls are counted under) and a
pool of endpoints here, those of its Ready replicas: once a call's color is
picked, it goes to the replica of that pool with the fewest calls in flight,
ties taken in turn.
Every call is counted per endpoint (:class:`~controller.swap.counts.Stats`:
calls, 5xx, latency buckets), which is what a swap's builtin analysis
measures the new color by.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.gateway import counts
from controller.metrics import telemetry
from controller.spec import models


class Refused(Exception):
    """A call the gate does not let through: HTTP ``status``, a CamelCase ``reason``, a message."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        retry_after: float | None = None,
        grpc_code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.grpc_code = grpc_code
        """The plugin's own gRPC status, passed through as it was."""


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` kept."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(burst, math.ceil(rate), 1))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take a token: 0 if there was one, else the seconds until there is."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(frozen=True)
class Declared:
    """What the gateway knows of a declared plugin: its limits and whom it may call."""

    gateway: models.Gateway
    calls: frozenset[str] = frozenset()

    @classmethod
    def of(cls, spec: models.PluginSpec) -> Declared:
        return cls(spec.gateway, frozenset(spec.permissions.call_plugins))


@dataclass
class Pool:
    """The Ready replicas of one color (which need not include the endpoint it is named by)."""

    endpoints: tuple[str, ...]
    turn: int = 0
    """Where the next pick starts (ties are taken in turn)."""


@dataclass
class Gate:
    """One plugin's route and limits."""

    endpoint: str | None = None
    instance: str | None = None
    in_flight: int = 0
    bucket: TokenBucket | None = None
    bucket_spec: models.RateLimit | None = None
    open: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when calls may pass; cleared while held."""
    held: int = 0
    """Calls waiting at the hold."""
    holds: int = 0
    """Holders of the hold (a swap, a state import): calls pass when none is left."""
    calls: tuple[str, ...] = ()
    """The plugins it may call, as its route was last set: a change re-makes its socket."""
    preview: str | None = None
    """The endpoint of a swap's new color while it may be previewed (before promotion)."""
    canary: str | None = None
    """The endpoint of a canary's new color, which takes ``weight`` percent of the calls."""
    weight: float = 0.0
    sticky: str | None = None
    """The header whose value picks the color of a call (None: a random draw each)."""
    pools: dict[str, Pool] = field(default_factory=dict)
    """A color's endpoint to the pool of its Ready replicas, for each color balanced over
    several (the active color's, a canary's)."""

    def __post_init__(self) -> None:
        self.open.set()


class Router:
    """The routes of every plugin, keyed like the reconciler's keys."""

    def __init__(self, metrics: telemetry.Metrics | None = None) -> None:
        self.metrics = metrics or telemetry.Metrics()
        self.gates: dict[str, Gate] = collections.defaultdict(Gate)
        self.by_endpoint: collections.Counter[str] = collections.Counter()
        """Calls in flight to each endpoint (a color of several replicas: to all of them)."""
        self.by_replica: collections.Counter[str] = collections.Counter()
        """Calls in flight to each replica of a pool, which its balancing reads."""
        self._idle: dict[str, asyncio.Event] = {}
        self.listeners: list[Callable[[str], None]] = []
        """Called with a plugin's key when its route changes."""
        self.counts: dict[str, counts.Stats] = collections.defaultdict(counts.Stats)
        """Per endpoint: the calls answered, the 5xx among them, their latencies."""
        self.draw: Callable[[], float] = random.random

    # What the reconciler and the swap coordinator call.

    def set_route(
        self,
        key: str,
        endpoint: str,
        instance: str,
        spec: models.PluginSpec,
        endpoints: Sequence[str] = (),
    ) -> None:
        self.route_to(key, endpoint, instance, Declared.of(spec), endpoints)

    def route_to(
        self,
        key: str,
        endpoint: str,
        instance: str,
        declared: Declared,
        endpoints: Sequence[str] = (),
    ) -> None:
        """Send ``key``'s calls to ``endpoint`` with ``declared``'s limits, balanced over
        ``endpoints`` (the Ready replicas of its color) when there are several."""
        gate = self.gates[key]
        calls = tuple(sorted(declared.calls))
        changed = gate.endpoint != endpoint or gate.calls != calls
        if gate.endpoint is not None and gate.endpoint not in (endpoint, gate.canary):
            gate.pools.pop(gate.endpoint, None)
        _pool(gate, endpoint, endpoints)
        gate.endpoint, gate.instance, gate.calls = endpoint, instance, calls
        if changed:
            self._changed(key)
        limit = declared.gateway.rate_limit
        if limit != gate.bucket_spec:
            gate.bucket_spec = limit
            gate.bucket = TokenBucket(limit.calls_per_second, limit.burst) if limit else None

    def set_preview(self, key: str, endpoint: str | None) -> None:
        """Send ``key``'s preview calls to ``endpoint`` (a swap's new color); None: none."""
        if endpoint is not None or key in self.gates:
            self.gates[key].preview = endpoint

    def set_canary(
        self,
        key: str,
        endpoint: str | None,
        weight: float,
        header: str | None = None,
        endpoints: Sequence[str] = (),
    ) -> None:
        """Send ``weight`` percent of ``key``'s calls to ``endpoint`` (None: none), picked by
        the value of ``header`` when a call has it, balanced over ``endpoints`` when given."""
        if endpoint is None and key not in self.gates:
            return
        gate = self.gates[key]
        if gate.canary is not None and gate.canary not in (endpoint, gate.endpoint):
            gate.pools.pop(gate.canary, None)  # not once promoted: the active color's pool
        if endpoint is not None:
            _pool(gate, endpoint, endpoints)
        gate.canary = endpoint
        gate.weight = float(weight) if endpoint is not None else 0.0
        gate.sticky = header.lower() if endpoint is not None and header else None

    async def stats(self, endpoint: str) -> counts.Stats | None:
        """What was counted of ``endpoint``'s calls."""
        found = self.counts.get(endpoint) or counts.Stats()
        return counts.Stats(found.calls, found.failures, list(found.buckets))

    def clear_route(self, key: str) -> None:
        gate = self.gates.get(key)
        if gate is not None and gate.endpoint is not None:
            if gate.endpoint != gate.canary:
                gate.pools.pop(gate.endpoint, None)
            gate.endpoint = gate.instance = None
            self._changed(key)

    def _changed(self, key: str) -> None:
        for listener in self.listeners:
            listener(key)

    def route(self, key: str) -> str | None:
        gate = self.gates.get(key)
        return gate.endpoint if gate else None

    def hold(self, key: str) -> None:
        """Make new calls to ``key`` wait until every holder has called :meth:`release`."""
        gate = self.gates[key]
        gate.holds += 1
        gate.open.clear()

    def release(self, key: str) -> None:
        """Let held and new calls through, to the route as it is now, once no hold is left."""
        gate = self.gates[key]
        gate.holds = max(0, gate.holds - 1)
        if not gate.holds:
            gate.open.set()

    async def acknowledged(self) -> None:
        """Holds and routes take effect here as they are set: nothing to wait for."""

    def set_holds(self, owner: dict[str, int], holds: dict[str, int]) -> None:
        """Make ``owner``'s holds ``holds`` (key to count), holding and releasing the difference.

        ``owner`` is the holder's own record of what it holds, updated here:
        the control protocol keeps one per controller connection, so a
        controller that goes away releases exactly what it held.
        """
        for key in owner.keys() | holds.keys():
            want, have = max(0, holds.get(key, 0)), owner.get(key, 0)
            for _ in range(want - have):
                self.hold(key)
            for _ in range(have - want):
                self.release(key)
            if want:
                owner[key] = want
            else:
                owner.pop(key, None)

    def in_flight(self, endpoint: str) -> int:
        return self.by_endpoint[endpoint]

    async def wait_idle(self, endpoint: str, timeout: float) -> int:
        """Wait until no call is in flight to ``endpoint``, or ``timeout``; what is left."""
        if self.by_endpoint[endpoint]:
            idle = self._idle.setdefault(endpoint, asyncio.Event())
            idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout)
        return self.by_endpoint[endpoint]

    # What the front ends call.

    @contextlib.asynccontextmanager
    async def admit(
        self,
        key: str,
        limits: models.Gateway,
        timeout: float,
        *,
        preview: bool = False,
        headers: Mapping[str, Any] | None = None,
        avoid: Collection[str] = (),
    ) -> AsyncIterator[str]:
        """Let one call through to ``key``'s active endpoint (``preview``: to the new color of
        its swap, never the active one; during a canary, to its new color by weight, sticky
        by a header of ``headers``), or raise :class:`Refused`. Of a color of replicas, the
        one with the fewest calls in flight, other than those of ``avoid`` while there are."""
        gate = self.gates[key]
        if gate.bucket is not None:
            wait = gate.bucket.take()
            if wait:
                self.metrics.rate_limited.labels(key).inc()
                raise Refused(429, "RateLimited", f"{key}: over its rate limit", retry_after=wait)
        if gate.in_flight >= limits.max_concurrent_calls:
            self.metrics.rate_limited.labels(key).inc()
            raise Refused(
                429,
                "TooManyCalls",
                f"{key}: {gate.in_flight} calls in flight, its limit "
                f"(spec.gateway.maxConcurrentCalls)",
                retry_after=1,
            )
        gate.in_flight += 1
        in_flight = self.metrics.in_flight_of(key)
        in_flight.inc()
        try:
            if not gate.open.is_set():
                gate.held += 1
                held = self.metrics.held.labels(key)
                held.inc()
                try:
                    async with asyncio.timeout(timeout):
                        while not gate.open.is_set():  # held again before this call woke
                            await gate.open.wait()
                except TimeoutError:
                    raise Refused(
                        504, "HeldTooLong", f"{key}: held past the call's timeout"
                    ) from None
                finally:
                    gate.held -= 1
                    held.dec()
            endpoint = gate.preview if preview else gate.endpoint
            if endpoint is None and preview:
                raise Refused(409, "NoPreview", f"{key} has no new color to preview")
            if endpoint is None:
                raise Refused(503, "PluginNotReady", f"{key} has no Ready instance")
            if gate.canary is not None and not preview:
                endpoint = self._pick(gate, endpoint, headers)
            pool = gate.pools.get(endpoint) if gate.pools else None
            replica = self._least(pool, avoid) if pool is not None else endpoint
            self.by_endpoint[endpoint] += 1
            failed = True
            started = time.perf_counter()
            try:
                yield replica
                failed = False
            except Refused as e:
                failed = e.status >= 500
                raise
            except asyncio.CancelledError:
                failed = False  # the caller went away: nothing the plugin did
                raise
            finally:
                if pool is not None:
                    self.by_replica[replica] -= 1
                    if not self.by_replica[replica]:
                        del self.by_replica[replica]
                self.counts[endpoint].record(failed, time.perf_counter() - started)
                self.by_endpoint[endpoint] -= 1
                if not self.by_endpoint[endpoint]:
                    del self.by_endpoint[endpoint]
                    idle = self._idle.get(endpoint)
                    if idle is not None:
                        idle.set()
        finally:
            gate.in_flight -= 1
            in_flight.dec()

    def _least(self, pool: Pool, avoid: Collection[str] = ()) -> str:
        """The replica of ``pool`` with the fewest calls in flight; of those tied, the first
        from where the last pick left off, so that calls one at a time go round."""
        busy, endpoints = self.by_replica.get, pool.endpoints
        if avoid:
            endpoints = tuple(e for e in endpoints if e not in avoid) or endpoints
        count = len(endpoints)
        pool.turn = start = (pool.turn + 1) % count
        best = endpoints[start]
        fewest = busy(best, 0)
        if fewest:  # else no replica has fewer
            for offset in range(1, count):
                candidate = endpoints[(start + offset) % count]
                if (calls := busy(candidate, 0)) < fewest:
                    best, fewest = candidate, calls
                    if not calls:
                        break
        self.by_replica[best] = fewest + 1
        return best

    def spare(self, key: str, replica: str, avoid: Collection[str]) -> bool:
        """Whether a call that ``replica`` dropped unanswered has another replica to go to,
        none of ``avoid``: ``key`` is a plugin of replicas (its route has a pool, which
        may no longer hold ``replica``: the controller can take it out under the call)."""
        gate = self.gates.get(key)
        if gate is None:
            return False
        return any(
            e != replica and e not in avoid for pool in gate.pools.values() for e in pool.endpoints
        )

    def _pick(self, gate: Gate, stable: str, headers: Mapping[str, Any] | None) -> str:
        """The endpoint of one call during a canary: the new color's, ``gate.weight`` percent
        of the time."""
        value = headers.get(gate.sticky) if gate.sticky and headers is not None else None
        if value is not None:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            roll = zlib.crc32(raw) % 10_000 / 100
        else:
            roll = self.draw() * 100
        return gate.canary if roll < gate.weight and gate.canary else stable


def _pool(gate: Gate, endpoint: str, endpoints: Sequence[str]) -> None:
    """Balance the calls to ``endpoint``'s color over ``endpoints`` (none: no pool)."""
    pool = tuple(dict.fromkeys(endpoints))
    if pool and pool != (endpoint,):
        if endpoint not in gate.pools or gate.pools[endpoint].endpoints != pool:
            gate.pools[endpoint] = Pool(pool)
    else:
        gate.pools.pop(endpoint, None)
