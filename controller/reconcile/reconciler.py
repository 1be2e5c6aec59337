"""One reconcile pass: make what runs for a plugin equal what its spec declares.

``reconcile(key)`` reads the whole desired state (the source) and the whole
observed state (the runtime's ``list_owned``), acts on the difference and
writes status; it never asks which event brought the key, so running it
twice changes nothing the first run did not. Its neighbours: the workers
(:mod:`controller.reconcile.workers`) call it; sources give desired state and
keep status; runtimes run instances.

Crashes are handled here, not by the engine's restart policy, so that they
are seen and counted: a dead instance is restarted after an exponential
backoff; past ``restart.maxRestarts`` within ``restart.windowSeconds`` the
plugin is Degraded with reason CrashLoop, its exit code and last log lines,
and is left stopped until its oldest restart leaves the window or its spec
changes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

from controller.errors import (
    ControllerError,
    IncompatiblePluginError,
    InstanceNotFoundError,
    PermanentError,
    SpecError,
    StoreUnavailableError,
    TemporaryError,
)
from controller.metrics import telemetry
from controller.metrics import violations as violations_module
from controller.reconcile import conditions, gates
from controller.reconcile.workers import Result
from controller.runtimes import base
from controller.sources import base as sources_base
from controller.sources import store
from controller.spec import models
from controller.spec.keys import split_key
from controller.state import snapshots as snapshots_module
from controller.swap import coordinator, transfer

log = logging.getLogger(__name__)

LOG_LINES = 10
"""Log lines of a crashed instance kept in its event and condition message."""
FIRST_PROBE = 0.05
"""Seconds before the first readiness probe of a new instance; it grows by half each time.

The runtime's events usually say sooner when the instance's socket appears."""
LONGEST_PROBE = 1.0
STOP_TIMEOUT = 10.0
"""Seconds an instance being replaced gets to exit after SIGTERM."""
STATE_TIMEOUT = 60.0
"""Longest a checkpoint or a restore may take, in seconds."""


class Plugins(coordinator.Plugins, Protocol):
    """The plugin protocol, as used here (:class:`~controller.protocol.client.Clients`)."""

    async def drop(self, endpoint: str) -> None: ...


class Routes(coordinator.Routes, Protocol):
    """Where calls go (:class:`~controller.gateway.router.Router`): set when Ready, else cleared."""


class NoRoutes:
    """Routes for a controller without a gateway."""

    def set_route(self, key: str, endpoint: str, instance: str, spec: models.PluginSpec) -> None:
        pass

    def clear_route(self, key: str) -> None:
        pass

    def hold(self, key: str) -> None:
        pass

    def release(self, key: str) -> None:
        pass

    async def acknowledged(self) -> None:
        pass

    async def wait_idle(self, endpoint: str, timeout: float) -> int:
        return 0


class Source(Protocol):
    """Where desired state comes from and where status goes back to."""

    def get(self, key: str) -> sources_base.Desired | None: ...

    def declares(self, key: str) -> bool: ...

    async def read_status(self, key: str) -> models.PluginStatus | None: ...

    async def write_status(self, key: str, status: models.PluginStatus) -> None: ...

    async def record_event(
        self, key: str, type: store.EventType, reason: str, message: str
    ) -> None: ...

    async def forget(self, key: str) -> None: ...


@dataclass
class _Memory:
    """What the reconciler remembers of a plugin between passes (not persisted)."""

    restarts: collections.deque[float] = field(default_factory=collections.deque)
    """When it restarted crashed instances, within the restart window."""
    probe_delay: float = FIRST_PROBE
    health_failures: int = 0
    handshaken: set[str] = field(default_factory=set)
    """The ids of the instances whose handshake succeeded."""
    refused: str = ""
    """The spec hash whose plugin failed its handshake for good: not started again."""
    checkpointed: float = 0.0
    """When the active instance's state was last checkpointed (0: not by this process)."""
    checkpoint_failing: bool = False


class Reconciler:
    """Reconciles plugins on one runtime."""

    def __init__(
        self,
        source: Source,
        runtime: base.Runtime,
        plugins: Plugins,
        *,
        routes: Routes | None = None,
        snapshots: snapshots_module.Snapshots | None = None,
        metrics: telemetry.Metrics | None = None,
        violations: violations_module.Violations | None = None,
        bundles: gates.Bundles | None = None,
        clock: Callable[[], float] = time.time,
        may_act: Callable[[], bool] | None = None,
    ) -> None:
        self.source = source
        self.bundles = bundles
        self.may_act = may_act
        """Whether this controller may act now (it holds the Lease); None: always."""
        self.runtime = runtime
        self.plugins = plugins
        self.routes: Routes = routes or NoRoutes()
        self.snapshots = snapshots
        self.metrics = metrics or telemetry.Metrics()
        self.violations = violations or violations_module.Violations(self.metrics)
        self.phases: dict[str, tuple[str, bool]] = {}
        """Each plugin's phase and readiness as last written, for the metrics."""
        self.metrics.follow_plugins(lambda: dict(self.phases))
        self._requests: dict[str, str] = {}
        self.clock = clock
        self._memory: dict[str, _Memory] = collections.defaultdict(_Memory)
        self._ids = itertools.count(1)

    async def reconcile(self, key: str) -> Result:
        try:
            return await self._reconcile(key)
        except StoreUnavailableError as e:
            # Tried again as the store's backoff says (at most 30 s), not the queue's (minutes):
            # the passes of a plugin are also its health checks and restarts.
            raise TemporaryError(str(e), delay=self.metrics.stores.retry_delay(e.store)) from e

    async def _reconcile(self, key: str) -> Result:
        self.check_may_act()
        namespace, name = split_key(key)
        desired = self.source.get(key)
        observed = await self._observe(name, namespace)
        for instance in observed:
            self._track(instance)
        context = {"plugin": key, "reconcile_id": next(self._ids)}
        if desired is None and self.source.declares(key):
            return Result()  # declared, but never validly: what runs is left as it is
        if desired is None:
            return await self._delete(key, name, namespace, observed, context)
        context["generation"] = desired.generation
        pinned = await self._pinned(key, desired)
        return await _Pass(self, key, desired, observed, context, pinned).run()

    def check_may_act(self) -> None:
        """Raise :class:`TemporaryError` when another controller may be acting instead."""
        if self.may_act is not None and not self.may_act():
            raise TemporaryError("not acting: the Lease was not renewed in time", delay=1.0)

    async def _pinned(self, key: str, desired: sources_base.Desired) -> models.PluginSpec | None:
        """The spec ``bhctl swap undo`` pinned over the declared one, while that is unchanged."""
        if self.specs is None:
            return None
        pin = await asyncio.to_thread(self.specs.pinned, key)
        if pin is None:
            return None
        declared_hash, text = pin
        if declared_hash != desired.spec_hash:
            await asyncio.to_thread(self.specs.unpin, key)  # the spec changed: it rules again
            return None
        return models.PluginSpec.model_validate_json(text)

    def _track(self, instance: base.Instance) -> None:
        """Export the instance's resources while it runs on this host."""
        running = instance.state is base.InstanceState.RUNNING and instance.pid
        self.metrics.track(
            instance.name,
            telemetry.Tracked(
                pid=instance.pid or 0,
                plugin=instance.plugin,
                version=instance.version,
                color=instance.color.value,
                namespace=instance.namespace or "",
            )
            if running
            else None,
        )

    async def _observe(self, name: str, namespace: str | None) -> list[base.Instance]:
        """The plugin's instances that this controller owns, found by their deterministic names.

        Two inspections by name cost the engine far less than a filtered
        list, which walks every container it has: with hundreds of plugins
        starting, the lists of the readiness passes would crowd out the
        creates. An instance with a plugin's name but not our labels is
        not ours, and is left alone.
        """
        found = []
        for color in models.Color:
            instance_name = base.instance_name(name, color, namespace, self.runtime.controller_id)
            try:
                instance = await self.runtime.inspect(instance_name)
            except InstanceNotFoundError:
                continue
            if base.owned_by(instance, self.runtime.controller_id, name, namespace):
                found.append(instance)
        return found

    async def _delete(
        self,
        key: str,
        name: str,
        namespace: str | None,
        observed: list[base.Instance],
        context: dict[str, Any],
    ) -> Result:
        self.routes.clear_route(key)
        self.violations.forget(key)
        self.phases.pop(key, None)
        for instance in observed:
            self.metrics.track(instance.name, None)
            await self.runtime.remove(instance.name)
            await self.plugins.drop(self.runtime.endpoint(instance))
            log.info("removed %s: its plugin is deleted", instance.name, extra=context)
        await self.runtime.release(name, namespace)
        await self.source.forget(key)
        self._memory.pop(key, None)
        return Result()

    @property
    def specs(self) -> snapshots_module.Specs | None:
        """Instances' specs and pins, kept with the state snapshots (none without them)."""
        return snapshots_module.Specs(self.snapshots) if self.snapshots is not None else None

    def forget(self, key: str) -> None:
        self._memory.pop(key, None)

    def request(self, key: str, action: str) -> None:
        """Ask the next pass over ``key`` to ``promote`` or ``abort`` its swap."""
        self._requests[key] = action

    def take_request(self, key: str) -> str | None:
        return self._requests.pop(key, None)


class _Pass:
    """The state of one pass over one plugin that still has a spec."""

    def __init__(
        self,
        reconciler: Reconciler,
        key: str,
        desired: sources_base.Desired,
        observed: list[base.Instance],
        context: dict[str, Any],
        pinned: models.PluginSpec | None = None,
    ) -> None:
        self.r = reconciler
        self.runtime = reconciler.runtime
        self.source = reconciler.source
        self.key = key
        self.desired = desired
        self.plugin = desired.plugin
        self.spec = pinned or desired.plugin.spec
        self.pinned = pinned is not None
        self.held_back = False
        """Whether the old version runs on because the swap to this spec rolled back."""
        self.retry = False
        """Whether bhctl swap retry asked to try a rolled-back swap again."""
        self.generation = desired.generation
        self.observed = observed
        self.context = context
        self.memory = reconciler._memory[key]
        self.now = reconciler.clock()
        self.plugins = reconciler.plugins
        self.routes = reconciler.routes
        self.snapshots = reconciler.snapshots
        self.metrics = reconciler.metrics

    async def run(self) -> Result:
        old = await self.source.read_status(self.key) or models.PluginStatus()
        self.old = old
        self.status = old.model_copy(deep=True)
        color = self.status.active_color or models.Color.BLUE
        self.context["color"] = color.value
        if not self.pinned:  # a pinned spec was resolved when it ran
            self.spec, refused = await gates.resolve_bundle(self.r.bundles, self.spec)
            if refused is not None:  # nothing starts; what runs is left as it is
                return await self._blocked(refused)
        self.want = self.want_for(color)
        issues = self.runtime.validate(self.want)
        if issues:
            error = SpecError(issues)
            await self.event("Warning", "InvalidSpec", str(error))
            self.set_conditions(
                models.Phase.FAILED, ready=("False", "InvalidSpec", str(error)), degraded=True
            )
            await self._write(self.old)
            raise PermanentError(f"{self.key}: {error}")
        if self.memory.refused == self.want.spec_hash:
            for instance in self.observed:  # e.g. adopted after a restart of ours
                await self.remove(instance)
            return Result()  # Failed until the spec changes: its status says why
        self.memory.refused = ""
        request = self.r.take_request(self.key)
        swaps = coordinator.Coordinator(self)
        if self.status.swap is not None:
            delay = await swaps.advance(request)
            await self._write(self.old)
            return Result(requeue_after=delay)
        self.retry = request == "retry"
        if request == "undo":
            await self._undo()
        elif self.retry:
            if not self._swap_refused(next((i for i in self.observed if i.color is color), None)):
                await self.event("Normal", "NoSwap", "no rolled-back swap to retry")
            else:
                await self.event("Normal", "SwapRetry", "trying the rolled-back swap again")
        elif request is not None:
            await self.event("Normal", "NoSwap", f"no swap in progress to {request}")
        for instance in self.observed:
            if instance.color is not color:
                await self.remove(instance)
                await self.event(
                    "Normal", "Removed", f"removed {instance.name}: not the active color"
                )
        self.status.instances = [i for i in self.status.instances if i.color is color]
        current = next((i for i in self.observed if i.color is color), None)
        waiting = await gates.waiting_for(self.source, self.key, self.spec)
        if self._swap_refused(current):
            assert current is not None
            kept = await self._spec_of(current)
            if kept is not None:  # the old version goes on as it was, restarts included
                self.spec, self.held_back = kept, True
                self.want = self.want_for(color)
        if self._swap_wanted(current):
            assert current is not None
            delay, _ = await swaps.begin(current)
            result = Result(requeue_after=delay)
        elif self._swap_refused(current) and current is not None:
            result = await self._hold_back(current)
        elif waiting is not None and current is None:  # dependencies first
            return await self._blocked(waiting)
        else:
            result = await self._converge(current)
        if waiting is not None:
            gates.hold_not_ready(self.status, self.old.conditions, waiting, self.generation)
            result = Result(requeue_after=min(result.requeue_after or waiting.retry, waiting.retry))
        await self._write(self.old)
        return result

    async def _blocked(self, blocked: gates.Blocked) -> Result:
        """Not started: its bundle is refused, or its dependencies are not there yet."""
        before = conditions.find(self.old.conditions, conditions.READY)
        if before is None or (before.reason, before.message) != (blocked.reason, blocked.message):
            kind: store.EventType = "Warning" if blocked.broken else "Normal"
            await self.event(kind, blocked.reason, blocked.message)
        self.set_conditions(
            blocked.phase,
            ready=("False", blocked.reason, blocked.message),
            progressing=None if blocked.broken else ("WaitingForDependencies", blocked.message),
            degraded=blocked.broken,
        )
        await self._write(self.old)
        return Result(requeue_after=blocked.retry)

    async def _undo(self) -> None:
        """Pin the spec the last swap came from; the pass then swaps back to it."""
        last = self.status.last_swap
        specs = self.r.specs
        text = None
        if specs is not None and last is not None and last.from_hash:
            text = await asyncio.to_thread(specs.get, self.key, last.from_hash)
        if text is None or last is None:
            await self.event(
                "Warning", "UndoImpossible", "no finished swap whose previous spec is known"
            )
            return
        assert specs is not None
        await asyncio.to_thread(specs.pin, self.key, self.desired.spec_hash, text)
        self.spec = models.PluginSpec.model_validate_json(text)
        self.pinned = True
        self.want = self.want_for(self.want.color)
        await self.event(
            "Normal",
            "Undo",
            f"going back to {last.from_version} (bhctl swap undo); it stays until the spec changes",
        )

    def _swap_wanted(self, current: base.Instance | None) -> bool:
        """Whether a change should be made blue/green: a Ready instance of another spec."""
        return (
            current is not None
            and current.spec_hash != self.want.spec_hash
            and current.state is base.InstanceState.RUNNING
            and self.spec.hot_swap.strategy == "BlueGreen"
            and self.instance_status(current.color).ready
            and not self._swap_refused(current)
        )

    async def _spec_of(self, instance: base.Instance) -> models.PluginSpec | None:
        specs = self.r.specs
        if specs is None:
            return None
        text = await asyncio.to_thread(specs.get, self.key, instance.spec_hash)
        return models.PluginSpec.model_validate_json(text) if text is not None else None

    def _swap_refused(self, current: base.Instance | None) -> bool:
        """Whether a swap to this very spec rolled back: not tried again until the spec is
        edited (its generation changes) or bhctl swap retry asks for it."""
        last = self.status.last_swap
        return (
            current is not None
            and not self.retry
            and current.spec_hash != self.want.spec_hash
            and last is not None
            and last.result in ("RolledBack", "Aborted")
            and last.to_hash == self.want.spec_hash
            and last.generation in (None, self.generation)
        )

    async def _hold_back(self, current: base.Instance) -> Result:
        """Keep an old instance whose spec is not known serving: health checks, no handshake.

        Its handshake would be checked against the refused spec; and a crash
        of it has nothing to restart but that spec, which _converge then does.
        """
        record = self.instance_status(current.color)
        if current.state is not base.InstanceState.RUNNING:
            return await self._converge(current)
        health = self.spec.health
        endpoint = self.runtime.endpoint(current)
        record.state = current.state.value
        record.ready = await self.r.plugins.healthy(endpoint, float(health.timeout_seconds))
        if record.ready:
            self.r.routes.set_route(self.key, endpoint, current.name, self.spec)
        else:
            self.r.routes.clear_route(self.key)
        self.held_back = True
        return Result(requeue_after=float(health.period_seconds))

    async def _converge(self, current: base.Instance | None) -> Result:
        record = self.instance_status()
        if current is None:
            return await self._start("Created", f"started {self.want.name} ({self.spec.version})")
        if current.spec_hash != self.want.spec_hash:
            self.r.routes.clear_route(self.key)
            if current.state is base.InstanceState.RUNNING and record.ready:
                await self._last_checkpoint(current)  # its replacement gets the state back
            await self.runtime.stop(current.name, STOP_TIMEOUT)
            await self.remove(current)
            record.restarts = 0
            record.last_exit_code = None
            record.oom_killed = False
            change = (
                f"version {current.version} -> {self.spec.version}"
                if current.version != str(self.spec.version)
                else "spec changed"
            )
            return await self._start(
                "Replaced", f"replaced {self.want.name} (stop, then start): {change}"
            )
        if current.state is base.InstanceState.CREATED:
            await self.remove(current)  # a start cut short, e.g. by a crash of ours
            return await self._start("Created", f"started {self.want.name} ({self.spec.version})")
        if current.state not in (base.InstanceState.RUNNING, base.InstanceState.PAUSED):
            self.r.routes.clear_route(self.key)
            return await self._crashed(current, record)
        return await self._probe(current, record)  # a paused one fails its health checks

    async def _start(self, reason: str, message: str, type: store.EventType = "Normal") -> Result:
        await self.runtime.start(self.want)
        await self.remember(self.want)
        self.memory.probe_delay = FIRST_PROBE
        self.memory.health_failures = 0
        self.status.active_color = self.want.color
        self.status.active_version = str(self.spec.version)
        record = self.instance_status()
        record.state = base.InstanceState.RUNNING.value
        record.ready = False
        record.version = str(self.spec.version)
        await self.event(type, reason, message)
        self.set_conditions(
            models.Phase.PENDING,
            ready=("False", "InstanceStarting", f"{self.want.name} is starting"),
            progressing=(reason if reason != "Created" else "InstanceStarting", message),
        )
        return Result(requeue_after=self.memory.probe_delay)

    def _backoff_left(self, current: base.Instance, restarts: int) -> float:
        """Seconds until a crashed instance may be restarted (exponential backoff)."""
        restart = self.spec.restart
        delay = min(restart.max_backoff_seconds, restart.backoff_seconds * 2.0**restarts)
        finished = current.finished_at.timestamp() if current.finished_at else self.now
        return finished + delay - self.now

    def _backing_off(self, current: base.Instance, restarts: int) -> bool:
        return self._backoff_left(current, restarts) > 0

    async def _crashed(self, current: base.Instance, record: models.InstanceStatus) -> Result:
        if (
            not current.oom_killed
            and current.exit_code == 137
            and "OOMKilled" in self.r.violations.current(self.key)
        ):  # the kernel said so, though the engine did not (Podman on cgroup v1)
            current = dataclasses.replace(current, oom_killed=True)
        restart = self.spec.restart
        how = f"exit code {current.exit_code}" + (" (OOM killed)" if current.oom_killed else "")
        record.state = current.state.value
        record.ready = False
        record.last_exit_code = current.exit_code
        record.oom_killed = current.oom_killed
        if current.oom_killed:
            self.r.violations.oom_killed(
                self.key,
                f"{current.name} was killed for memory (limit {self.spec.resources.memory}); "
                "raise spec.resources.memory or find what grows",
            )
        history = self.memory.restarts
        while history and history[0] <= self.now - restart.window_seconds:
            history.popleft()
        held = len(history) >= restart.max_restarts or self._backing_off(current, len(history))
        if held and self.runtime.capabilities().restarts_crashed:
            # Held down: where the platform would restart it by itself, stop it.
            await self.runtime.stop(current.name, STOP_TIMEOUT)
        if len(history) >= restart.max_restarts:
            lines = await self.last_logs(current.name)
            message = (
                f"{current.name} crashed {len(history) + 1} times within "
                f"{restart.window_seconds}s (maxRestarts {restart.max_restarts}); last "
                f"{how}; not restarting until the spec changes or the window passes. "
                f"Last log lines:\n{lines}"
            )
            if not conditions.is_true(self.status.conditions, conditions.DEGRADED):
                await self.event("Warning", "CrashLoop", message)
            self.set_conditions(
                models.Phase.DEGRADED,
                ready=("False", "CrashLoop", message),
                degraded=True,
                reason="CrashLoop",
            )
            retry = history[0] + restart.window_seconds - self.now if history else None
            return Result(requeue_after=retry)
        wait = self._backoff_left(current, len(history))
        if wait > 0:
            self.set_conditions(
                models.Phase.DEGRADED if history else models.Phase.PENDING,
                ready=("False", "BackOff", f"{current.name} {how}; restarting in {wait:.1f}s"),
                progressing=("BackOff", f"restarting {current.name} in {wait:.1f}s"),
            )
            return Result(requeue_after=wait)
        lines = await self.last_logs(current.name)
        await self.remove(current)
        history.append(self.now)
        self.r.metrics.restarts.labels(self.key).inc()
        self.r.violations.restarted(self.key)
        restarts = record.restarts + 1
        result = await self._start(
            "Restarted",
            f"restarted {current.name} after {how} (restart {restarts}); last log lines:\n{lines}",
        )
        self.instance_status().restarts = restarts
        self.instance_status().last_exit_code = current.exit_code
        self.instance_status().oom_killed = current.oom_killed
        return result

    async def _probe(self, current: base.Instance, record: models.InstanceStatus) -> Result:
        health = self.spec.health
        timeout = float(health.timeout_seconds)
        endpoint = self.runtime.endpoint(current)
        if record.ready and current.id in self.memory.handshaken:
            ready = await self.r.plugins.healthy(endpoint, timeout)
            if not ready:  # left draining by a swap that could not resume it? Resume it.
                with contextlib.suppress(ControllerError):
                    await self.r.plugins.drain(endpoint, timeout, resume=True)
                    ready = await self.r.plugins.healthy(endpoint, timeout)
        else:
            ready = await self.runtime.ready(current, timeout) and await self._handshake(
                current, endpoint, timeout
            )
        record.state = current.state.value
        if ready and not record.ready and not await self._restore(current, endpoint):
            ready = False  # its state is not back yet: not Ready, no calls
        if ready:
            self.r.routes.set_route(self.key, endpoint, current.name, self.spec)
            self.status.active_color = current.color
            self.status.active_version = current.version
            self.memory.health_failures = 0
            if not record.ready:
                started = current.started_at.timestamp() if current.started_at else self.now
                await self.event(
                    "Normal",
                    "Ready",
                    f"{current.name} is Ready ({self.now - started:.2f}s after start)",
                )
            record.ready = True
            self.set_conditions(
                models.Phase.RUNNING,
                ready=("True", "InstanceReady", f"{current.name} answers its health check"),
            )
            return Result(requeue_after=await self._checkpoint(current, endpoint))
        if not record.ready:  # still starting
            started = current.started_at.timestamp() if current.started_at else self.now
            if self.now - started < health.startup_deadline_seconds:
                delay = self.memory.probe_delay
                self.memory.probe_delay = min(LONGEST_PROBE, delay * 1.5)
                self.set_conditions(
                    models.Phase.PENDING,
                    ready=("False", "InstanceStarting", f"{current.name} is starting"),
                    progressing=("InstanceStarting", f"waiting for {current.name} to be Ready"),
                )
                return Result(requeue_after=delay)
            return await self._unhealthy(
                current,
                record,
                f"{current.name} was not Ready within startupDeadlineSeconds "
                f"({health.startup_deadline_seconds}s)",
            )
        self.r.routes.clear_route(self.key)
        self.memory.health_failures += 1
        if self.memory.health_failures < health.failure_threshold:
            return Result(requeue_after=float(health.period_seconds))
        paused = current.state is base.InstanceState.PAUSED
        return await self._unhealthy(
            current,
            record,
            f"{current.name} failed {self.memory.health_failures} health checks in a row"
            + (" (the engine says it is paused)" if paused else ""),
        )

    # State: checkpoints, and restores into restarted instances.

    def _checkpoints(self) -> snapshots_module.Snapshots | None:
        """The store, when this plugin's state is checkpointed (and restored)."""
        state = self.spec.state
        if state is None or not state.checkpoint_seconds or self.snapshots is None:
            return None
        for result in ("Restored", "Skipped", "Empty"):  # series from 0: the first one counts
            self.metrics.restores.labels(self.key, result)
        self.metrics.checkpoint_failures.labels(self.key)
        return self.snapshots

    async def _restore(self, current: base.Instance, endpoint: str) -> bool:
        """Give a new instance the newest good checkpoint before it is Ready; False: try later.

        Runs once per instance: when it first answers its handshake and
        health check, before any route leads to it.
        """
        store = self._checkpoints()
        if store is None:
            return True
        try:
            restored = await transfer.restore(
                self.plugins, store, self.key, endpoint, timeout=STATE_TIMEOUT
            )
        except (ControllerError, OSError, sqlite3.Error) as e:
            log.warning("restoring %s failed: %s", current.name, e, extra=self.context)
            self.set_conditions(
                models.Phase.PENDING,
                ready=("False", "RestoringState", f"restoring the state failed: {e}"),
                progressing=("RestoringState", f"restoring the state of {current.name}"),
            )
            return False
        for skipped, why in restored.skipped:
            self.metrics.restores.labels(self.key, "Skipped").inc()
            await self.event(
                "Warning",
                "CheckpointSkipped",
                f"checkpoint {skipped.id} (taken {skipped.taken_at:%Y-%m-%d %H:%M:%S}Z) was "
                f"not restored: {why}",
            )
        snapshot = restored.snapshot
        if snapshot is None:
            if restored.skipped:
                self.metrics.restores.labels(self.key, "Empty").inc()
                await self.event(
                    "Warning", "NoCheckpoint", f"{current.name} starts empty: no good checkpoint"
                )
            self.memory.checkpointed = 0.0
            return True
        now = datetime.now(UTC)
        age = max(0.0, (now - snapshot.taken_at).total_seconds())
        self.metrics.restores.labels(self.key, "Restored").inc()
        self.metrics.restored_age.labels(self.key).set(age)
        self.status.last_restore = models.RestoreStatus(
            checkpoint=snapshot.id,
            revision=snapshot.revision,
            taken=snapshot.taken_at,
            age_seconds=round(age, 3),
            time=now,
            instance=current.name,
        )
        self.memory.checkpointed = 0.0  # a new lineage: checkpoint it soon
        await self.event(
            "Normal",
            "StateRestored",
            f"restored checkpoint {snapshot.id} (revision {snapshot.revision or 'none'}, "
            f"taken {snapshot.taken_at:%Y-%m-%d %H:%M:%S}Z, {age:.1f}s old) into "
            f"{current.name} before it was Ready; writes after it were lost",
        )
        return True

    async def _checkpoint(self, current: base.Instance, endpoint: str, full: bool = False) -> float:
        """Checkpoint the Ready instance's state when it is due; the delay to the next pass."""
        period = float(self.spec.health.period_seconds)
        store = self._checkpoints()
        if store is None:
            return period
        assert self.spec.state is not None
        every = float(self.spec.state.checkpoint_seconds)
        due = self.memory.checkpointed + every - self.now
        if due > 0:
            return min(period, due)
        try:
            taken = await transfer.checkpoint(
                self.plugins,
                store,
                self.key,
                endpoint,
                current.version,
                timeout=STATE_TIMEOUT,
                full=full,
                limit=self.spec.resources.memory.as_int(),
            )
        except (ControllerError, OSError, sqlite3.Error) as e:
            self.metrics.checkpoint_failures.labels(self.key).inc()
            if not self.memory.checkpoint_failing:
                await self.event("Warning", "CheckpointFailed", f"{current.name}: {e}")
            self.memory.checkpoint_failing = True
            return min(period, every)
        if self.memory.checkpoint_failing:
            await self.event("Normal", "CheckpointResumed", f"{current.name}: checkpointed again")
        self.memory.checkpoint_failing = False
        self.memory.checkpointed = self.now
        if taken.snapshot is not None:
            kind = "delta" if taken.snapshot.delta else "full"
            self.metrics.checkpoints.labels(self.key, kind).inc()
            self.metrics.checkpoint_bytes.labels(self.key).inc(taken.snapshot.size)
        return min(period, every)

    async def _last_checkpoint(self, current: base.Instance) -> None:
        """Checkpoint an instance about to be replaced (stop, then start), whatever is due."""
        if self._checkpoints() is None:
            return
        endpoint = self.runtime.endpoint(current)
        with contextlib.suppress(ControllerError):
            # No new calls reach it (its route is cleared); let those in flight land.
            await self.r.routes.wait_idle(endpoint, float(self.spec.hot_swap.drain_timeout_seconds))
        self.memory.checkpointed = 0.0
        await self._checkpoint(current, endpoint, full=True)  # the next may be another version

    async def _handshake(self, current: base.Instance, endpoint: str, timeout: float) -> bool:
        """Initialize the instance (idempotent) and check what it says; True when it is healthy.

        A plugin that speaks another protocol version, or whose state
        version is not the spec's, can never work: it is removed and the
        plugin is Failed until its spec changes.
        """
        try:
            handshake = await self.r.plugins.handshake(endpoint, self.want, timeout)
        except IncompatiblePluginError as e:
            await self._refuse(current, e.reason, str(e))
        except ControllerError as e:
            log.debug("handshake with %s failed: %s", current.name, e, extra=self.context)
            return False
        expected = self.spec.state.version if self.spec.state else 0
        if handshake.state_version != expected:
            await self._refuse(
                current,
                "StateVersionMismatch",
                f"{current.name} reads and writes state version {handshake.state_version}, "
                f"but spec.state.version is {expected or 'not set (no state)'}",
            )
        self.memory.handshaken.add(current.id)
        return await self.r.plugins.healthy(endpoint, timeout)

    async def _refuse(self, current: base.Instance, reason: str, message: str) -> NoReturn:
        self.memory.refused = self.want.spec_hash
        await self.remove(current)
        await self.event("Warning", reason, message)
        self.set_conditions(models.Phase.FAILED, ready=("False", reason, message), degraded=True)
        self.status.instances = []
        await self._write(self.old)
        raise PermanentError(f"{self.key}: {message}")

    async def remove(self, instance: base.Instance) -> None:
        if instance.color is self.status.active_color and self.status.swap is None:
            self.r.routes.clear_route(self.key)
        self.memory.handshaken.discard(instance.id)
        self.r.metrics.track(instance.name, None)
        await self.runtime.remove(instance.name)
        await self.r.plugins.drop(self.runtime.endpoint(instance))

    async def _unhealthy(
        self, current: base.Instance, record: models.InstanceStatus, why: str
    ) -> Result:
        await self.event("Warning", "Unhealthy", why)
        await self.runtime.stop(current.name, STOP_TIMEOUT)
        record.ready = False
        stopped = await self.runtime.inspect(current.name)
        return await self._crashed(stopped, record)

    # Status.

    # What the swap coordinator uses (coordinator.Context).

    def want_for(self, color: models.Color) -> base.InstanceSpec:
        return base.InstanceSpec(
            plugin=self.plugin.name,
            color=color,
            spec=self.spec,
            labels=self._labels(color),
            namespace=self.plugin.metadata.namespace,
            controller_id=self.runtime.controller_id,
            owner_uid=self.plugin.metadata.uid,
        )

    async def persist(self) -> None:
        """Write the status now, not at the end of the pass; then move the stable address."""
        self.r.check_may_act()
        await self.source.write_status(self.key, self.status)
        self.old = self.status.model_copy(deep=True)
        try:
            await self._route()
        except ControllerError as e:
            # The gateway already follows the written status; the pass's end tries again.
            log.warning("%s: moving the stable address failed: %s", self.key, e)

    async def _route(self) -> None:
        """The runtime's stable address (a Service, on Kubernetes) follows the active color."""
        if self.status.active_color is not None:
            await self.runtime.route(
                self.plugin.name, self.plugin.metadata.namespace, self.status.active_color
            )

    async def remember(self, want: base.InstanceSpec) -> None:
        """Keep what ``want`` is made from, so that a swap away from it can be undone."""
        if self.r.specs is not None:
            text = want.spec.model_dump_json(by_alias=True, exclude_none=True)
            try:
                await asyncio.to_thread(self.r.specs.save, self.key, want.spec_hash, text)
            except StoreUnavailableError as e:  # only bhctl swap undo needs it: go on without
                log.warning("%s: the spec of %s is not kept: %s", self.key, want.name, e)

    def _labels(self, color: models.Color) -> dict[str, str]:
        labels = {
            **self.plugin.metadata.labels,
            base.LABEL_PLUGIN: self.plugin.name,
            base.LABEL_COLOR: color.value,
            base.LABEL_VERSION: str(self.spec.version),
            base.LABEL_SPEC_HASH: base.instance_hash(self.spec),
        }
        if self.plugin.metadata.namespace:
            labels[base.LABEL_NAMESPACE] = self.plugin.metadata.namespace
        return labels

    def instance_status(self, color: models.Color | None = None) -> models.InstanceStatus:
        color = color or self.want.color
        for record in self.status.instances:
            if record.color is color:
                return record
        record = models.InstanceStatus(
            color=color, version=str(self.spec.version), state=base.InstanceState.UNKNOWN.value
        )
        self.status.instances = [i for i in self.status.instances if i.color is not color] + [
            record
        ]
        return record

    def set_conditions(
        self,
        phase: models.Phase,
        *,
        ready: tuple[conditions.ConditionStatus, str, str],
        progressing: tuple[str, str] | None = None,
        degraded: bool = False,
        reason: str | None = None,
    ) -> None:
        status = self.status
        status.phase = phase
        status.observed_generation = self.generation
        found = status.conditions
        found = conditions.set_condition(found, conditions.READY, *ready, self.generation)
        if progressing is None:
            found = conditions.set_condition(
                found,
                conditions.PROGRESSING,
                "False",
                "Reconciled",
                "observed state matches the spec",
                self.generation,
            )
        else:
            found = conditions.set_condition(
                found, conditions.PROGRESSING, "True", *progressing, self.generation
            )
        if degraded:
            found = conditions.set_condition(
                found, conditions.DEGRADED, "True", reason or ready[1], ready[2], self.generation
            )
        else:
            found = conditions.set_condition(
                found, conditions.DEGRADED, "False", "AsExpected", "", self.generation
            )
        status.conditions = found

    async def _write(self, old: models.PluginStatus) -> None:
        await self._violations()
        last = self.status.last_swap
        if self.held_back and last is not None and self.status.swap is None:
            degraded = conditions.find(self.old.conditions, conditions.DEGRADED)  # before the pass
            keep = degraded is not None and degraded.reason == last.reason and degraded.message
            self.status.phase = models.Phase.DEGRADED
            self.status.conditions = conditions.set_condition(
                self.status.conditions,
                conditions.DEGRADED,
                "True",
                last.reason or "SwapRolledBack",
                (degraded.message if keep and degraded else "")
                or f"the swap to {last.to_version} rolled back ({last.reason}); "
                f"{last.from_version} serves until the spec changes",
                self.generation,
            )
        found = conditions.find(self.status.conditions, "Pinned")
        if self.pinned:
            self.status.conditions = conditions.set_condition(
                self.status.conditions,
                "Pinned",
                "True",
                "SwapUndone",
                f"runs {self.spec.version} (bhctl swap undo), not the declared "
                f"{self.plugin.spec.version}, until the spec changes",
                self.generation,
            )
        elif found is not None and found.status == "True":
            self.status.conditions = conditions.set_condition(
                self.status.conditions, "Pinned", "False", "SpecChanged", "", self.generation
            )
        self.r.phases[self.key] = (
            self.status.phase.value,
            conditions.is_true(self.status.conditions, conditions.READY),
        )
        if self.status != old:
            try:
                await self.source.write_status(self.key, self.status)
            except StoreUnavailableError as e:  # kept by the source, written when it works again
                log.debug("%s: status not written: %s", self.key, e, extra=self.context)
        await self._route()

    async def _violations(self) -> None:
        """Resource violations as conditions: True while they last, an event when they flip."""
        active = self.r.violations.current(self.key)
        for kind in violations_module.KINDS:
            message = active.get(kind)
            found = conditions.find(self.status.conditions, kind)
            if message is not None:
                if found is None or found.status != "True":
                    await self.event("Warning", kind, message)
                self.status.conditions = conditions.set_condition(
                    self.status.conditions, kind, "True", kind, message, self.generation
                )
            elif found is not None and found.status == "True":
                await self.event("Normal", f"{kind}Resolved", f"{kind} no longer holds")
                self.status.conditions = conditions.set_condition(
                    self.status.conditions, kind, "False", "Resolved", "", self.generation
                )

    async def event(self, type: store.EventType, reason: str, message: str) -> None:
        level = logging.INFO if type == "Normal" else logging.WARNING
        log.log(level, "%s: %s", reason, message, extra=self.context)
        await self.source.record_event(self.key, type, reason, message)

    async def last_logs(self, name: str) -> str:
        try:
            lines = await self.runtime.logs(name, LOG_LINES)
        except ControllerError as e:  # logs are a courtesy: never fail a pass for them
            return f"(logs unavailable: {e})"
        return "\n".join(lines) if lines else "(no output)"
