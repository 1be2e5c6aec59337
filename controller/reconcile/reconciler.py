"""One reconcile pass: make what runs for a plugin equal what its spec declares.

``reconcile(key)`` reads the whole desired state (the source) and the whole
observed state (the runtime's instances), makes one
:class:`~controller.swap.context.PassContext`, runs a flat list of
idempotent steps over it, and writes the status computed once from what the
steps found (:mod:`controller.reconcile.status`), only when it changed. It
never asks which event brought the key, so running it twice changes nothing
the first run did not. Its neighbours: the workers
(:mod:`controller.reconcile.workers`) call it; sources give desired state
and keep status; runtimes run instances; :mod:`~controller.reconcile.lifecycle`
starts, probes and restarts the active instance;
:mod:`~controller.swap.coordinator` runs blue/green swaps.

Every error a pass meets reaches the status: a condition with the error's
reason and message and one event (not one per pass), then the workers'
backoff.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from controller.errors import (
    ControllerError,
    EngineUnavailableError,
    InstanceNotFoundError,
    PermanentError,
    PluginCallError,
    RuntimeBackendError,
    SpecError,
    StoreUnavailableError,
    TemporaryError,
)
from controller.metrics import telemetry
from controller.metrics import violations as violations_module
from controller.reconcile import checkpoints, gates, lifecycle, standby, status
from controller.reconcile import requests as requests_module
from controller.reconcile.workers import Result
from controller.runtimes import base, remote
from controller.sources import base as sources_base
from controller.sources import store
from controller.spec import conditions, models
from controller.spec.keys import PluginKey, split_key
from controller.state import snapshots as snapshots_module
from controller.swap import analysis, context, coordinator, transfer
from controller.swap import webhooks as webhooks_module

log = logging.getLogger(__name__)

LOG_LINES = 10
"""Log lines of a crashed instance kept in its event and condition message."""

Plugins = context.Plugins
Routes = context.Routes
NoRoutes = context.NoRoutes


class Source(Protocol):
    """Where desired state comes from and where status goes back to."""

    def get(self, key: str) -> sources_base.Desired | None: ...

    def declares(self, key: str) -> bool: ...

    async def read_status(self, key: str) -> models.PluginStatus | None: ...

    async def write_status(self, key: str, status: models.PluginStatus) -> None: ...

    async def record_event(
        self, key: str, type: conditions.EventType, reason: str, message: str
    ) -> None: ...

    async def forget(self, key: str) -> None: ...


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
        requests: requests_module.Requests | None = None,
        webhooks: webhooks_module.Sender | None = None,
        prometheus: analysis.Prometheus | None = None,
    ) -> None:
        self.source = source
        self.webhooks = webhooks or webhooks_module.Sender()
        """Sends the swaps' webhooks (unsigned unless given a secret)."""
        self.prometheus = prometheus or analysis.Prometheus(None)
        """Where the swaps' Prometheus analyses query."""
        self.requests: requests_module.Requests = requests or requests_module.MemoryRequests()
        """Operators' requests, each carried out and answered by a pass of its plugin."""
        self._answered: dict[int, asyncio.Event] = {}
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
        self.clock = clock
        self._memory: dict[str, context.Memory] = collections.defaultdict(context.Memory)
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
        stored = await self.source.read_status(key)  # once a pass: only passes write it
        observed = await self._observe(name, namespace, self._replicas(stored, desired))
        for instance in observed:
            self._track(instance)
        if desired is None and self.source.declares(key):
            return Result()  # declared, but never validly: what runs is left as it is
        if desired is None:
            return await self._delete(key, name, namespace, observed)
        self.metrics.plugin_seen(key)
        return await _Pass(
            self, await self._context(PluginKey(key), desired, observed, stored)
        ).run()

    async def _context(
        self,
        key: PluginKey,
        desired: sources_base.Desired,
        observed: list[base.Instance],
        stored: models.PluginStatus | None,
    ) -> context.PassContext:
        """The context of a pass over ``key``, every field set (``stored``: its status as
        read at the start of the pass)."""
        stored = stored or models.PluginStatus()
        pinned = await self._pinned(key, desired)
        color = stored.active_color or models.Color.BLUE
        spec = pinned or desired.plugin.spec
        return context.PassContext(
            count=spec.replicas,
            key=key,
            plugin=desired.plugin,
            spec=spec,
            generation=desired.generation,
            declared_hash=desired.spec_hash,
            observed=observed,
            old=stored,
            status=stored.model_copy(deep=True),
            memory=self._memory[key],
            now=self.clock(),
            controller_id=self.runtime.controller_id,
            color=color,
            request=await asyncio.to_thread(self.requests.pending_request, key),
            pinned=pinned is not None,
            finding=conditions.finding_of(stored.conditions),
            log={
                "plugin": key,
                "reconcile_id": next(self._ids),
                "generation": desired.generation,
                "color": color.value,
            },
        )

    @property
    def services(self) -> context.Services:
        """What every pass works with."""
        return context.Services(
            self.runtime,
            self.plugins,
            self.routes,
            self.snapshots,
            self.metrics,
            self.webhooks,
            self.prometheus,
        )

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
        if instance.oom_killed:  # as the engine tells it: once per run
            self.metrics.oom_killed(instance.key, instance.name, str(instance.started_at))
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

    def _replicas(
        self, stored: models.PluginStatus | None, desired: sources_base.Desired | None
    ) -> int:
        """How many replicas of each color to look for: as many as the spec asks for, or
        as the status last recorded (those left over from a scale-down are removed)."""
        recorded = max((i.replica + 1 for i in stored.instances), default=1) if stored else 1
        return max(recorded, desired.plugin.spec.replicas if desired is not None else 1)

    async def _observe(
        self, name: str, namespace: str | None, replicas: int = 1
    ) -> list[base.Instance]:
        """The plugin's instances that this controller owns, found by their deterministic names.

        Two inspections by name cost the engine far less than a filtered
        list, which walks every container it has: with hundreds of plugins
        starting, the lists of the readiness passes would crowd out the
        creates. An instance with a plugin's name but not our labels is
        not ours, and is left alone.
        """
        found = []
        for color, replica in itertools.product(models.Color, range(replicas)):
            instance_name = base.instance_name(
                name, color, namespace, self.runtime.controller_id, replica
            )
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
    ) -> Result:
        self.routes.clear_route(key)
        self.violations.forget(key)
        self.phases.pop(key, None)
        self.metrics.plugin_forgotten(key)
        for instance in observed:
            self.metrics.track(instance.name, None)
            await self.runtime.remove(instance.name)
            await self.plugins.drop(self.runtime.endpoint(instance))
            log.info("removed %s: its plugin is deleted", instance.name, extra={"plugin": key})
        await standby.remove_all(self.runtime, name, namespace, self.runtime.controller_id)
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

    def request(self, key: str, action: str, argument: str = "") -> store.Request:
        """Record a request for ``key``'s passes: promote, abort, undo or retry its swap, or
        import the state kept as snapshot ``argument``. The caller enqueues the key."""
        return self.requests.put_request(key, action, argument)

    async def wait_answer(self, id: int, timeout: float) -> store.Request | None:
        """Request ``id`` once a pass answered it, or as it is after ``timeout`` seconds."""
        event = self._answered.setdefault(id, asyncio.Event())
        try:
            found = await asyncio.to_thread(self.requests.request, id)
            if found is not None and found.outcome is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout)
                found = await asyncio.to_thread(self.requests.request, id)
            return found
        finally:
            self._answered.pop(id, None)

    def _notify(self, id: int) -> None:
        event = self._answered.get(id)
        if event is not None:
            event.set()


class _Pass:
    """One pass over one plugin that has a spec: a flat list of idempotent steps over its
    context; each may end the pass with a :class:`Result`. It is also the steps' effects
    (:class:`~controller.swap.context.Effects`)."""

    def __init__(self, reconciler: Reconciler, ctx: context.PassContext) -> None:
        self.r = reconciler
        self.c = ctx
        self.s = reconciler.services
        self.waiting: gates.Blocked | None = None
        self.retry = False
        """Whether bhctl swap retry asked to try a rolled-back swap again."""
        self.life = lifecycle.Lifecycle(ctx, self.s, self, reconciler.violations)
        self.swaps = coordinator.Coordinator(ctx, self.s, self)

    async def run(self) -> Result:
        steps: tuple[Callable[[], Awaitable[Result | None]], ...] = (
            self._resolve_bundle,
            self._validate,
            self._skip_refused,
            self._advance_swap,
            self._answer_request,
            self._remove_other_colors,
            self._dependencies,
            self._keep_old_spec,
            self._begin_swap,
            self._hold_back,
            self._wait_for_dependencies,
            self._converge,
        )
        try:
            for step in steps:
                result = await step()
                if result is not None:
                    break
            else:
                raise AssertionError("the last step always ends the pass")
        except (TemporaryError, StoreUnavailableError, asyncio.CancelledError):
            raise  # not acting (the Lease), or nowhere to write: the next pass says it
        except PermanentError:
            await self._write()  # its step said why
            self.c.answered("Refused", self.c.finding.message)
            await self._answer()
            raise
        except Exception as e:
            await self._failed(e)
            raise
        self.c.memory.error = ""
        if self.waiting is not None:
            retry = self.waiting.retry
            result = Result(requeue_after=min(result.requeue_after or retry, retry))
        await self._write()
        await self._answer()
        return result

    # The steps.

    async def _resolve_bundle(self) -> Result | None:
        c = self.c
        if c.pinned:  # a pinned spec was resolved when it ran
            return None
        c.spec, refused = await gates.resolve_bundle(self.r.bundles, c.spec)
        if refused is not None:  # nothing starts; what runs is left as it is
            return await self._blocked(refused)
        return None

    async def _validate(self) -> Result | None:
        c = self.c
        want = c.want_for(c.color)
        issues = self.s.runtime.validate(want)
        if not self.s.runtime.capabilities().replicas:
            issues = issues + base.replicas_refused(
                want, f"the {self.s.runtime.name} runtime runs one instance of each color"
            )
        if issues:
            error = SpecError(issues)
            await self.event("Warning", "InvalidSpec", str(error))
            c.found(
                "False", "InvalidSpec", str(error), degraded=("InvalidSpec", str(error)),
                stalled=True,
            )  # fmt: skip
            raise PermanentError(f"{c.key}: {error}")
        return None

    async def _skip_refused(self) -> Result | None:
        """A spec whose plugin failed its handshake for good is not started again."""
        c = self.c
        refused = c.memory.refused
        if refused is None or refused[0] != c.want_for(c.color).spec_hash:
            c.memory.refused = None
            return None
        for instance in c.observed:  # e.g. adopted after a restart of ours
            await self.remove(instance)
        _, reason, message = refused
        c.status.instances = []
        c.found("False", reason, message, degraded=(reason, message), stalled=True)
        return Result()

    async def _advance_swap(self) -> Result | None:
        if self.c.status.swap is None:
            return None
        return Result(requeue_after=await self.swaps.advance())

    async def _answer_request(self) -> Result | None:
        """What an operator asked, when no swap is in progress: undo, retry, a state import."""
        c = self.c
        asked = c.asked
        self.retry = asked == "retry"
        if asked == "undo":
            await self._undo()
        elif asked == "import":
            await self._import_state()
        elif self.retry:
            if not self._swap_refused(c.instance(c.color)):
                await self.event("Normal", "NoSwap", "no rolled-back swap to retry")
                c.answered("Refused", "no rolled-back swap to retry")
            else:
                await self.event("Normal", "SwapRetry", "trying the rolled-back swap again")
                c.answered("Done", "trying the rolled-back swap again")
        elif asked is not None:
            await self.event("Normal", "NoSwap", f"no swap in progress to {asked}")
            c.answered("Refused", f"no swap in progress to {asked}")
        return None

    async def _import_state(self) -> None:
        """Replace the active instance's state with a stored snapshot; what it had is kept
        as a snapshot first. Calls are held meanwhile: none sees half of each."""
        c = self.c
        assert c.request is not None
        current = c.instance(c.color)
        snapshots = self.s.snapshots
        if snapshots is None:
            c.answered("Refused", "this controller keeps no state snapshots")
            return
        if current is None or not c.instance_status(c.color).ready:
            c.answered("Refused", f"{c.key} has no Ready instance to import the state into")
            return
        endpoint = self.s.runtime.endpoint(current)
        timeout = checkpoints.STATE_TIMEOUT
        routes = self.s.routes
        routes.hold(c.key)
        try:
            snapshot = await asyncio.to_thread(snapshots.get, c.key, int(c.request.argument))
            await routes.wait_idle(endpoint, float(c.spec.hot_swap.drain_timeout_seconds))
            saved = await transfer.record(
                self.s.plugins, snapshots, c.key, endpoint, current.version, "before-import",
                timeout=timeout, limit=c.spec.resources.memory.as_int(),
            )  # fmt: skip
            after = await transfer.load(
                self.s.plugins, snapshots, snapshot, endpoint, timeout=timeout
            )
        except (ControllerError, ValueError) as e:
            await self.event("Warning", "StateImportFailed", f"{current.name}: {e}")
            c.answered("Failed", str(e))
            return
        finally:
            routes.release(c.key)
        c.memory.checkpointed = 0.0  # a new lineage: checkpoint it soon
        await self.event(
            "Normal",
            "StateImported",
            f"imported {snapshot.size} bytes of state version {after.state_version} into "
            f"{current.name}; what it had is snapshot {saved.id if saved else 'none'}",
        )
        c.answered(
            "Done",
            json.dumps(
                {
                    "stateVersion": after.state_version,
                    "sha256": after.sha256,
                    "previous": saved.to_document() if saved is not None else None,
                }
            ),
        )

    async def _remove_other_colors(self) -> Result | None:
        c = self.c
        for instance in c.observed:
            if instance.color is not c.color:
                await self.remove(instance)
                await self.event(
                    "Normal", "Removed", f"removed {instance.name}: not the active color"
                )
            elif instance.replica >= c.count and c.status.swap is None:
                await self.remove(instance)
                await self.event(
                    "Normal", "Removed", f"removed {instance.name}: spec.replicas is {c.count}"
                )
        c.observed = [i for i in c.observed if i.replica < c.count or i.color is not c.color]
        c.status.instances = [
            i
            for i in c.status.instances
            if i.color is c.color and (i.replica < c.count or c.status.swap is not None)
        ]
        return None

    async def _dependencies(self) -> Result | None:
        self.waiting = await gates.waiting_for(self.r.source, self.c.key, self.c.spec)
        return None

    async def _keep_old_spec(self) -> Result | None:
        """After a rolled-back swap the old version goes on as it was, restarts included."""
        c = self.c
        current = c.instance(c.color)
        if self._swap_refused(current):
            assert current is not None
            kept = await self._spec_of(current)
            if kept is not None:
                c.spec, c.held_back = kept, True
        return None

    async def _begin_swap(self) -> Result | None:
        c = self.c
        current = c.instance(c.color)
        if not self._swap_wanted(current):
            return None
        assert current is not None
        delay, _ = await self.swaps.begin(current)
        return Result(requeue_after=delay)

    async def _hold_back(self) -> Result | None:
        c = self.c
        current = c.instance(c.color)
        if current is None or not self._swap_refused(current):
            return None
        c.held_back = True
        return await self.life.hold_back(current)

    async def _wait_for_dependencies(self) -> Result | None:
        if self.waiting is None or self.c.instance(self.c.color) is not None:
            return None
        return await self._blocked(self.waiting)  # dependencies start first

    async def _converge(self) -> Result | None:
        c = self.c
        if c.count == 1:
            return await self.life.converge(c.instance(c.color))
        return await self._converge_replicas()

    async def _converge_replicas(self) -> Result:
        """Each replica's lifecycle on its own (a crash of one touches no other), then one
        route to the Ready ones and one finding for them all."""
        c = self.c
        ready: dict[int, str] = {}
        views = [c.of_replica(replica) for replica in range(c.count)]
        results = []
        for view in views:
            services = dataclasses.replace(self.s, routes=_ReadyReplica(view.replica, ready))
            life = lifecycle.Lifecycle(view, services, self, self.r.violations)
            results.append(await life.converge(view.instance(c.color)))
        first = c.instance(c.color)
        endpoints = [ready[r] for r in sorted(ready)]
        if endpoints:
            color = self.s.runtime.endpoint(first) if first is not None else endpoints[0]
            name = base.instance_name(c.name, c.color, c.namespace, c.controller_id)
            self.s.routes.set_route(c.key, color, name, c.spec, endpoints)
        else:
            self.s.routes.clear_route(c.key)
        self._find_replicas(views, len(endpoints))
        waits = [r.requeue_after for r in results if r.requeue_after is not None]
        return Result(requeue_after=min(waits) if waits else None)

    def _find_replicas(self, views: list[context.PassContext], ready: int) -> None:
        """What the pass found of a color of replicas: Ready while one of them is, and
        progressing or degraded as the first that is not Ready says."""
        c = self.c
        behind = next((v.finding for v in views if v.finding.ready != "True"), None)
        if behind is None:
            c.found("True", "InstanceReady", f"{ready}/{c.count} replicas Ready")
            return
        if not ready:
            c.finding = behind
            return
        said = f"{ready}/{c.count} replicas Ready; {behind.message}"
        c.found(
            "True",
            "InstanceReady",
            said,
            progressing=(behind.progressing[0], said) if behind.progressing else None,
            degraded=(behind.degraded[0], said) if behind.degraded else None,
        )

    # What the steps decide with.

    async def _blocked(self, blocked: gates.Blocked) -> Result:
        """Not started: its bundle is refused, or its dependencies are not there yet."""
        c = self.c
        before = conditions.find(c.old.conditions, conditions.READY)
        if before is None or (before.reason, before.message) != (blocked.reason, blocked.message):
            await self.event(
                "Warning" if blocked.broken else "Normal", blocked.reason, blocked.message
            )
        c.found(
            "False",
            blocked.reason,
            blocked.message,
            progressing=None if blocked.broken else ("WaitingForDependencies", blocked.message),
            degraded=(blocked.reason, blocked.message) if blocked.broken else None,
            stalled=blocked.broken,
        )
        return Result(requeue_after=blocked.retry)

    async def _undo(self) -> None:
        """Pin the spec the last swap came from (or the revision asked for); the pass then
        swaps back to it."""
        c = self.c
        assert c.request is not None
        if c.request.argument:
            await self._undo_to(int(c.request.argument))
            return
        last = c.status.last_swap
        specs = self.r.specs
        text = None
        if specs is not None and last is not None and last.from_hash:
            text = await asyncio.to_thread(specs.get, c.key, last.from_hash)
        if text is None or last is None:
            await self.event(
                "Warning", "UndoImpossible", "no finished swap whose previous spec is known"
            )
            c.answered("Refused", "no finished swap whose previous spec is known")
            return
        assert specs is not None
        await asyncio.to_thread(specs.pin, c.key, c.declared_hash, text)
        c.spec = models.PluginSpec.model_validate_json(text)
        c.pinned = True
        await self.event(
            "Normal",
            "Undo",
            f"going back to {last.from_version} (bhctl swap undo); it stays until the spec changes",
        )
        c.answered("Done", f"going back to {last.from_version}")

    async def _undo_to(self, number: int) -> None:
        """Pin revision ``number``'s spec (``bhctl swap undo --to-revision``)."""
        c = self.c
        specs = self.r.specs
        revision = None
        if specs is not None:
            revision = await asyncio.to_thread(specs.revision, c.key, number)
        if specs is None or revision is None:
            message = f"no revision {number} of {c.key} is kept (see bhctl swap history)"
            await self.event("Warning", "UndoImpossible", message)
            c.answered("Refused", message)
            return
        current = c.instance(c.color)
        if current is not None and current.spec_hash == revision.instance_hash:
            c.answered("Refused", f"revision {number} ({revision.version}) runs already")
            return
        await asyncio.to_thread(specs.pin, c.key, c.declared_hash, revision.spec)
        c.spec = models.PluginSpec.model_validate_json(revision.spec)
        c.pinned = True
        await self.event(
            "Normal",
            "Undo",
            f"going back to revision {number} ({revision.version}) (bhctl swap undo "
            "--to-revision); it stays until the spec changes",
        )
        c.answered("Done", f"going back to revision {number} ({revision.version})")

    def _swap_wanted(self, current: base.Instance | None) -> bool:
        """Whether a change should be made blue/green: a Ready instance of another spec."""
        c = self.c
        return (
            current is not None
            and current.spec_hash != c.want_for(c.color).spec_hash
            and current.state is base.InstanceState.RUNNING
            and c.spec.hot_swap.strategy != "Recreate"
            and c.instance_status(current.color).ready
            and not self._swap_refused(current)
        )

    async def _spec_of(self, instance: base.Instance) -> models.PluginSpec | None:
        specs = self.r.specs
        if specs is None:
            return None
        text = await asyncio.to_thread(specs.get, self.c.key, instance.spec_hash)
        return models.PluginSpec.model_validate_json(text) if text is not None else None

    def _swap_refused(self, current: base.Instance | None) -> bool:
        """Whether a swap to this very spec rolled back: not tried again until the spec is
        edited (its generation changes) or bhctl swap retry asks for it."""
        c = self.c
        last = c.status.last_swap
        want = c.want_for(c.color).spec_hash
        return (
            current is not None
            and not self.retry
            and current.spec_hash != want
            and last is not None
            and last.result in ("RolledBack", "Aborted")
            and last.to_hash == want
            and last.generation in (None, c.generation)
        )

    # Status.

    def _computed(self) -> models.PluginStatus:
        c = self.c
        for instance in c.observed:  # a remote plugin's: where it is, what does not apply
            for record in c.status.instances:
                if record.color is instance.color:
                    record.remote = remote.status_of(instance)
        beside = status.Beside(
            waiting=self.waiting,
            held_back=c.held_back,
            pinned=(str(c.spec.version), str(c.plugin.spec.version)) if c.pinned else None,
            violations=self.r.violations.current(c.key),
            unenforced=self.s.runtime.capabilities().not_enforced,
        )
        return status.compute(c.old, c.status, c.finding, beside, c.generation, datetime.now(UTC))

    async def _write(self) -> None:
        """Write the status computed from the pass, when it changed; move the stable address."""
        c = self.c
        new = self._computed()
        for kind, on, message in status.flips(c.old.conditions, new.conditions, status.VIOLATIONS):
            if on:
                await self.event("Warning", kind, message)
            else:
                await self.event("Normal", f"{kind}Resolved", f"{kind} no longer holds")
        self.r.phases[c.key] = (
            new.phase.value,
            conditions.is_true(new.conditions, conditions.READY),
        )
        if new != c.old:
            try:
                await self.r.source.write_status(c.key, new)
            except StoreUnavailableError as e:  # kept by the source, written when it works again
                log.debug("%s: status not written: %s", c.key, e, extra=c.log)
            c.old = new
        await self._route()

    async def _answer(self) -> None:
        """Record how this pass answered its request (a promote before the new color is
        Ready waits for a later pass)."""
        c = self.c
        request = c.request
        if request is None:
            return
        swap = c.status.swap
        if c.answer is None:
            if swap is not None and request.action == "promote" and swap.step in (
                models.SwapStep.STARTING, models.SwapStep.AWAITING_PROMOTION,
            ):  # fmt: skip
                return
            if swap is not None:
                c.answered(
                    "Refused",
                    f"a swap to {swap.to_version} is in progress ({swap.step.value}): "
                    f"{request.action} after it ends, or abort it",
                )
            else:
                c.answered("Refused", f"no swap in progress to {request.action}")
        assert c.answer is not None
        await asyncio.to_thread(self.r.requests.answer_request, request.id, *c.answer)
        self.r._notify(request.id)

    async def _failed(self, error: Exception) -> None:
        """An error the pass met: a condition and, once per distinct error, an event."""
        c = self.c
        reason = _reason(error)
        message = str(error) or type(error).__name__
        c.found("False", reason, message, degraded=(reason, message))
        if c.memory.error != message:
            c.memory.error = message
            await self.event("Warning", reason, message)
        try:
            await self._write()
        except (ControllerError, OSError) as e:  # the error itself is what the caller sees
            log.debug("%s: status not written: %s", c.key, e, extra=c.log)

    async def _route(self) -> None:
        """The runtime's stable address (a Service, on Kubernetes) follows the active color."""
        c = self.c
        if c.status.active_color is not None:
            await self.s.runtime.route(c.name, c.namespace, c.status.active_color)

    # The effects (context.Effects).

    async def persist(self) -> None:
        """Write the status now, not at the end of the pass; then move the stable address."""
        c = self.c
        self.r.check_may_act()
        new = self._computed()
        await self.r.source.write_status(c.key, new)
        c.old = new
        try:
            await self._route()
        except ControllerError as e:
            # The gateway already follows the written status; the pass's end tries again.
            log.warning("%s: moving the stable address failed: %s", c.key, e)

    async def start(self, want: base.InstanceSpec) -> None:
        started = await self.s.runtime.start(want)
        self.c.memory.crashes_counted[started.id] = 0  # each of its exits is a new one
        specs = self.r.specs
        if specs is not None:  # kept so that a swap away from it can be undone
            text = want.spec.model_dump_json(by_alias=True, exclude_none=True)
            try:
                await asyncio.to_thread(specs.save, self.c.key, want.spec_hash, text)
            except StoreUnavailableError as e:  # only bhctl swap undo needs it: go on without
                log.warning("%s: the spec of %s is not kept: %s", self.c.key, want.name, e)

    async def revision_result(self, instance_hash: str, result: str, reason: str = "") -> None:
        specs = self.r.specs
        if specs is None:
            return
        try:
            await asyncio.to_thread(specs.settle, self.c.key, instance_hash, result, reason)
        except StoreUnavailableError as e:  # only bhctl swap history reads it: go on without
            log.warning("%s: the revision's result is not kept: %s", self.c.key, e)

    async def remove(self, instance: base.Instance) -> None:
        c = self.c
        active = instance.color is c.status.active_color and c.status.swap is None
        if active and c.count == 1 and instance.replica == 0:
            # Of replicas (or one past a lowered count): the pass routes to the others.
            self.s.routes.clear_route(c.key)
        memory = c.memory.of_replica(instance.replica)
        memory.handshaken.discard(instance.id)
        memory.crashes_counted.pop(instance.id, None)
        memory.waiting_said.pop(instance.name, None)
        memory.probe_delay.pop(instance.name, None)
        self.s.metrics.track(instance.name, None)
        await self.s.runtime.remove(instance.name)
        await self.s.plugins.drop(self.s.runtime.endpoint(instance))

    async def event(self, type: conditions.EventType, reason: str, message: str) -> None:
        level = logging.INFO if type == "Normal" else logging.WARNING
        log.log(level, "%s: %s", reason, message, extra=self.c.log)
        await self.r.source.record_event(self.c.key, type, reason, message)

    async def last_logs(self, name: str) -> str:
        try:
            lines = await self.s.runtime.logs(name, LOG_LINES)
        except ControllerError as e:  # logs are a courtesy: never fail a pass for them
            return f"(logs unavailable: {e})"
        return "\n".join(lines) if lines else "(no output)"


class _ReadyReplica(context.NoRoutes):
    """The route one replica's lifecycle sets, taken as that replica being Ready (into
    ``ready``, replica to endpoint): the pass then routes the color once, to those."""

    def __init__(self, replica: int, ready: dict[int, str]) -> None:
        self.replica = replica
        self.ready = ready

    def set_route(
        self,
        key: str,
        endpoint: str,
        instance: str,
        spec: models.PluginSpec,
        endpoints: Sequence[str] = (),
    ) -> None:
        self.ready[self.replica] = endpoint

    def clear_route(self, key: str) -> None:
        self.ready.pop(self.replica, None)


def _reason(error: Exception) -> str:
    """The CamelCase reason of a condition for ``error``."""
    if isinstance(error, EngineUnavailableError):
        return "EngineUnavailable"
    if isinstance(error, InstanceNotFoundError):
        return "InstanceGone"
    if isinstance(error, RuntimeBackendError):
        return "RuntimeError"
    if isinstance(error, PluginCallError):
        return "PluginCallFailed"
    if isinstance(error, ControllerError):
        return "ReconcileError"
    return "InternalError"
