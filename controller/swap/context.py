"""The context of one reconcile pass, and what a pass may do through it.

The reconciler makes one :class:`PassContext` at the start of each pass,
every field set then, and hands it to the steps of the pass (the swap
coordinator's among them). The steps fill in the record part of the status
(instances, active color, swap progress) and say what they found as one
:class:`~controller.spec.conditions.Finding`; the conditions and the phase
are computed from that once, when the status is written
(:mod:`controller.reconcile.status`). What survives from one pass to the
next lives in :class:`Memory`, kept per plugin by the reconciler.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.gateway import counts
from controller.metrics import telemetry
from controller.protocol import client
from controller.runtimes import base
from controller.sources import store
from controller.spec import conditions, models
from controller.spec.keys import PluginKey
from controller.state import snapshots as snapshots_module
from controller.swap import analysis, transfer, webhooks

FIRST_PROBE = 0.05
"""Seconds before the first readiness probe of a new instance; it grows by half each time.

The runtime's events usually say sooner when the instance's socket appears."""
LONGEST_PROBE = 1.0
SOCKET_FALLBACK_PROBE = 1.0
"""Seconds between the probes of a starting instance whose socket does not accept yet, where
the runtime announces the socket's appearance (the pass it brings then probes at once)."""


class Plugins(transfer.Plugins, Protocol):
    """The plugin protocol calls a pass makes (:class:`~controller.protocol.client.Clients`)."""

    async def handshake(
        self, endpoint: str, want: base.InstanceSpec, timeout: float
    ) -> client.Handshake: ...

    async def healthy(self, endpoint: str, timeout: float) -> bool: ...

    async def call(self, endpoint: str, method: str, payload: bytes, timeout: float) -> bytes: ...

    async def drain(self, endpoint: str, timeout: float, *, resume: bool = False) -> int: ...

    async def drop(self, endpoint: str) -> None: ...


class Routes(Protocol):
    """The gateway's routes (:class:`~controller.gateway.router.Router`, or
    :class:`~controller.gateway.control.RemoteRoutes` for a gateway in its own process)."""

    def set_route(
        self,
        key: str,
        endpoint: str,
        instance: str,
        spec: models.PluginSpec,
        endpoints: Sequence[str] = (),
    ) -> None:
        """Send ``key``'s calls to ``endpoint`` (its color), balanced over ``endpoints`` (the
        color's Ready replicas) when given."""

    def clear_route(self, key: str) -> None: ...

    async def acknowledged(self) -> None:
        """Every gateway applied the holds and routes set so far (raises ControllerError,
        naming those that did not in time)."""

    def set_preview(self, key: str, endpoint: str | None) -> None:
        """Let preview calls reach ``endpoint`` (a swap's new color); None: no preview."""

    def set_canary(
        self,
        key: str,
        endpoint: str | None,
        weight: float,
        header: str | None = None,
        endpoints: Sequence[str] = (),
    ) -> None:
        """Send ``weight`` percent of the calls to ``endpoint`` (a canary's new color; None:
        none), sticky by the value of ``header``, balanced over ``endpoints``."""

    async def stats(self, endpoint: str) -> counts.Stats | None:
        """What the gateways counted of ``endpoint``'s calls (None: they do not count)."""

    def hold(self, key: str) -> None: ...

    def release(self, key: str) -> None: ...

    async def wait_idle(self, endpoint: str, timeout: float) -> int: ...


class NoRoutes:
    """Routes for a controller without a gateway."""

    def set_route(
        self,
        key: str,
        endpoint: str,
        instance: str,
        spec: models.PluginSpec,
        endpoints: Sequence[str] = (),
    ) -> None:
        pass

    def clear_route(self, key: str) -> None:
        pass

    async def acknowledged(self) -> None:
        pass

    def set_preview(self, key: str, endpoint: str | None) -> None:
        pass

    def set_canary(
        self,
        key: str,
        endpoint: str | None,
        weight: float,
        header: str | None = None,
        endpoints: Sequence[str] = (),
    ) -> None:
        pass

    async def stats(self, endpoint: str) -> counts.Stats | None:
        return None

    def hold(self, key: str) -> None:
        pass

    def release(self, key: str) -> None:
        pass

    async def wait_idle(self, endpoint: str, timeout: float) -> int:
        return 0


@dataclass(frozen=True)
class Services:
    """What every pass works with: made once, with the reconciler."""

    runtime: base.Runtime
    plugins: Plugins
    routes: Routes
    snapshots: snapshots_module.Snapshots | None
    metrics: telemetry.Metrics
    webhooks: webhooks.Sender
    prometheus: analysis.Prometheus = field(default_factory=lambda: analysis.Prometheus(None))


class Effects(Protocol):
    """What a step does beyond its context, through the reconciler."""

    async def event(self, type: conditions.EventType, reason: str, message: str) -> None: ...

    async def persist(self) -> None:
        """Write the status now, not at the end of the pass (a swap's commit points)."""

    async def start(self, want: base.InstanceSpec) -> None:
        """Start an instance and keep its spec (what ``bhctl swap undo`` goes back to)."""

    async def remove(self, instance: base.Instance) -> None: ...

    async def revision_result(self, instance_hash: str, result: str, reason: str = "") -> None:
        """Record how the swap to the revision made of ``instance_hash`` went."""

    async def last_logs(self, name: str) -> str: ...


@dataclass
class Memory:
    """What the reconciler remembers of a plugin between passes (not persisted)."""

    restarts: collections.deque[float] = field(default_factory=collections.deque)
    """When it restarted crashed instances, within the restart window."""
    crash_held: str | None = None
    """The id of the instance stopped for a crash loop of its platform's restarts."""
    waiting_said: dict[str, str] = field(default_factory=dict)
    """Instance name -> the reason it waits to run that its event told (said once)."""
    crashes_counted: dict[str, int] = field(default_factory=dict)
    """Instance id -> how many of the exits its platform restarted it from are counted
    (runtimes that restart crashed instances by themselves)."""
    probe_delay: dict[str, float] = field(default_factory=dict)
    """The next readiness probe's delay, per instance that is not Ready yet."""
    health_failures: int = 0
    handshaken: set[str] = field(default_factory=set)
    """The ids of the instances whose handshake succeeded."""
    refused: tuple[str, str, str] | None = None
    """(spec hash, reason, message) of a spec whose plugin failed its handshake for good:
    not started again until the spec changes."""
    checkpointed: float = 0.0
    """When the active instance's state was last checkpointed (0: not by this process)."""
    checkpoint_failing: bool = False
    error: str = ""
    """The last error a pass met, so that its event is not repeated every pass."""
    baselines: dict[str, tuple[float, counts.Stats]] = field(default_factory=dict)
    """Per builtin measurement of the running analysis: when its interval began and what
    the gateway had counted then."""
    replicas: dict[int, Memory] = field(default_factory=dict)
    """What is remembered of each replica after the first (spec.replicas), which is health
    checked and restarted on its own: its restarts, health failures, probe delays."""

    def of_replica(self, replica: int) -> Memory:
        """The memory of replica ``replica`` (this one for the first)."""
        return self if not replica else self.replicas.setdefault(replica, Memory())

    def next_probe(self, instance: str) -> float:
        """The delay before probing ``instance`` again; each call lengthens the next."""
        delay = self.probe_delay.get(instance, FIRST_PROBE)
        self.probe_delay[instance] = min(LONGEST_PROBE, delay * 1.5)
        return delay


@dataclass
class PassContext:
    """One pass over one plugin that has a spec: made at its start, every field set then."""

    key: PluginKey
    plugin: models.Plugin
    spec: models.PluginSpec
    """What the pass makes run: the declared spec, or the one ``swap undo`` pinned, or the
    old one that goes on after its swap rolled back."""
    generation: int
    declared_hash: str
    """The hash of the declared plugin (what a pin is kept against)."""
    observed: list[base.Instance]
    old: models.PluginStatus
    """The status as stored before the pass (as last written, once the pass persisted)."""
    status: models.PluginStatus
    """The status being made: the steps set its record fields; conditions and phase are
    computed from :attr:`finding` when it is written."""
    memory: Memory
    now: float
    controller_id: str
    color: models.Color
    """The active color when the pass began (blue for a plugin that never ran)."""
    request: store.Request | None = None
    """The oldest request not answered yet (``bhctl swap ...``, a state import)."""
    answer: tuple[str, str] | None = None
    """How this pass answered :attr:`request`: (Done, Refused or Failed; a message)."""
    pinned: bool = False
    held_back: bool = False
    """Whether the old version runs on because the swap to this spec rolled back."""
    finding: conditions.Finding = conditions.UNKNOWN
    log: dict[str, Any] = field(default_factory=dict)
    count: int = 1
    """How many instances each color runs (spec.replicas)."""
    replica: int = 0
    """The replica that :meth:`instance`, :meth:`want_for` and :meth:`instance_status` are
    of (see :meth:`of_replica`)."""
    _hashed: tuple[models.PluginSpec, str] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """:attr:`spec` and its instance hash, made once a pass (the steps ask for it often)."""

    def of_replica(self, replica: int) -> PassContext:
        """This pass as one replica's lifecycle sees it: its instance, its memory and a
        finding of its own, the status shared."""
        return dataclasses.replace(
            self,
            replica=replica,
            memory=self.memory.of_replica(replica),
            finding=conditions.UNKNOWN,
        )

    def replicas(self, color: models.Color) -> list[base.Instance]:
        """The observed instances of ``color``, by replica."""
        return sorted((i for i in self.observed if i.color is color), key=lambda i: i.replica)

    @property
    def asked(self) -> str | None:
        """The action of the request this pass answers, if any."""
        return self.request.action if self.request is not None and self.answer is None else None

    def answered(self, outcome: str, message: str) -> None:
        if self.request is not None and self.answer is None:
            self.answer = (outcome, message)

    @property
    def name(self) -> str:
        return self.plugin.name

    @property
    def namespace(self) -> str | None:
        return self.plugin.metadata.namespace

    def found(
        self,
        ready: conditions.ConditionStatus,
        reason: str,
        message: str,
        *,
        progressing: tuple[str, str] | None = None,
        degraded: tuple[str, str] | None = None,
        stalled: bool = False,
    ) -> None:
        """Say what the pass found (the last word counts)."""
        self.finding = conditions.Finding(ready, reason, message, progressing, degraded, stalled)

    def instance(self, color: models.Color) -> base.Instance | None:
        return next(
            (i for i in self.observed if i.color is color and i.replica == self.replica), None
        )

    def want_for(self, color: models.Color) -> base.InstanceSpec:
        return base.InstanceSpec(
            plugin=self.plugin.name,
            color=color,
            spec=self.spec,
            labels=self._labels(color),
            namespace=self.plugin.metadata.namespace,
            controller_id=self.controller_id,
            owner_uid=self.plugin.metadata.uid,
            replica=self.replica,
        )

    def _labels(self, color: models.Color) -> dict[str, str]:
        labels = {
            **self.plugin.metadata.labels,
            base.LABEL_PLUGIN: self.plugin.name,
            base.LABEL_COLOR: color.value,
            base.LABEL_VERSION: str(self.spec.version),
            base.LABEL_SPEC_HASH: self._spec_hash(),
        }
        if self.plugin.metadata.namespace:
            labels[base.LABEL_NAMESPACE] = self.plugin.metadata.namespace
        if self.replica:
            labels[base.LABEL_REPLICA] = str(self.replica)
        return labels

    def _spec_hash(self) -> str:
        """The instance hash of :attr:`spec`, made again only when the pass changed it."""
        if self._hashed is None or self._hashed[0] is not self.spec:
            self._hashed = (self.spec, base.instance_hash(self.spec))
        return self._hashed[1]

    def instance_status(self, color: models.Color) -> models.InstanceStatus:
        """The status record of ``color``'s instance (of :attr:`replica`), made when there is
        none."""
        for record in self.status.instances:
            if record.color is color and record.replica == self.replica:
                return record
        record = models.InstanceStatus(
            color=color,
            version=str(self.spec.version),
            state=base.InstanceState.UNKNOWN.value,
            replica=self.replica,
        )
        records = [
            i for i in self.status.instances if (i.color, i.replica) != (color, self.replica)
        ]
        records.append(record)
        colors = list(dict.fromkeys(i.color for i in records))  # in the order they came
        self.status.instances = sorted(records, key=lambda i: (colors.index(i.color), i.replica))
        return record
