"""The running controller: source, queue, workers, runtime events and the orphan sweep.

Wires a spec source and a runtime to the work queue and the worker pool,
follows the runtime's events (a dead instance is reconciled at once, not at
the next resync), and sweeps for orphans: keys the runtime still runs or the
store still remembers but no spec declares, which the reconciler then
removes. On stop it finishes the passes in flight and leaves every instance
running; a controller started again adopts them by listing. Taken down
(``bhctl down``), it removes them once the passes have ended
(:meth:`Manager.remove_all`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from controller.errors import ControllerError
from controller.metrics import oom, telemetry, violations
from controller.reconcile import gates, reconciler, workers
from controller.reconcile import queue as queue_module
from controller.reconcile import requests as requests_module
from controller.runtimes import base
from controller.sources import base as sources_base
from controller.spec.keys import plugin_key
from controller.state import snapshots as snapshots_module
from controller.swap import analysis
from controller.swap import webhooks as webhooks_module

log = logging.getLogger(__name__)

EVENTS_RETRY_SECONDS = 2.0
VIOLATIONS_SECONDS = 5.0
"""How often resource use is checked against the violation thresholds."""


@dataclasses.dataclass(frozen=True)
class Removed:
    """What :meth:`Manager.remove_all` removed, by name."""

    instances: list[str]
    volumes: list[str]


class Manager:
    """Runs the reconcile loop for one source on one runtime until stopped."""

    def __init__(
        self,
        source: sources_base.Source,
        runtime: base.Runtime,
        queue: queue_module.WorkQueue,
        plugins: reconciler.Plugins,
        *,
        routes: reconciler.Routes | None = None,
        snapshots: snapshots_module.Snapshots | None = None,
        metrics: telemetry.Metrics | None = None,
        thresholds: violations.Thresholds | None = None,
        bundles: gates.Bundles | None = None,
        may_act: Callable[[], bool] | None = None,
        requests: requests_module.Requests | None = None,
        webhooks: webhooks_module.Sender | None = None,
        prometheus: analysis.Prometheus | None = None,
        workers: int = 8,
        sweep_seconds: float | None = None,
    ) -> None:
        self.source = source
        self.runtime = runtime
        self.queue = queue
        self.metrics = metrics or telemetry.Metrics()
        self.violations = violations.Violations(self.metrics, thresholds or violations.Thresholds())
        self.reconciler = reconciler.Reconciler(
            source,
            runtime,
            plugins,
            routes=routes,
            snapshots=snapshots,
            metrics=self.metrics,
            violations=self.violations,
            bundles=bundles,
            may_act=may_act,
            requests=requests,
            webhooks=webhooks,
            prometheus=prometheus,
        )
        self.pool = _pool(queue, self.reconciler, workers)
        self.metrics.queue_depth.set_function(lambda: len(queue))
        self.metrics.busy_workers.set_function(lambda: self.pool.busy)
        self.pool.observe = self._observe
        self.metrics.oom = oom.OomWatch(self._oom_killed)
        self.sweep_seconds = sweep_seconds or source.resync_seconds
        self.started = asyncio.Event()
        """Set once the first listing is queued."""

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until ``stop`` is set, then drain the passes in flight."""
        async with asyncio.TaskGroup() as group:
            pool = group.create_task(self.pool.run(), name="workers")
            source = group.create_task(self.source.run(stop), name="source")
            helpers = [
                group.create_task(self._follow_events(), name="runtime-events"),
                group.create_task(self._sweep(stop), name="orphan-sweep"),
                group.create_task(self._watch_resources(stop), name="resource-violations"),
            ]
            await stop.wait()
            log.info("stopping: finishing the passes in flight; instances keep running")
            await source
            await self.queue.drain()
            await pool
            for task in helpers:
                task.cancel()
            await self.reconciler.webhooks.close()
            if self.metrics.oom is not None:
                self.metrics.oom.close()

    async def remove_all(self, volumes: bool) -> Removed:
        """Remove every instance this controller owns, what they shared, and (``volumes``)
        its named volumes: ``bhctl down``, once :meth:`run` has returned (no pass runs)."""
        owned = await self.runtime.list_owned()
        recon = self.reconciler
        for instance in sorted(owned, key=lambda i: i.name):
            recon.routes.clear_route(instance.key)
            recon.metrics.track(instance.name, None)
            await self.runtime.remove(instance.name)
            await recon.plugins.drop(self.runtime.endpoint(instance))
            log.info("removed %s: the controller is taken down", instance.name)
        for plugin, namespace in sorted({(i.plugin, i.namespace or "") for i in owned}):
            await self.runtime.release(plugin, namespace or None)
        removed_volumes = await self.runtime.remove_volumes() if volumes else []
        for name in removed_volumes:
            log.info("removed volume %s", name)
        return Removed(sorted(i.name for i in owned), removed_volumes)

    async def sweep(self) -> set[str]:
        """Queue every key that runs or has a status but has no spec; return them."""
        owned = {i.key for i in await self.runtime.list_owned()}
        known = set(await self.source.known())
        orphans = (owned | known) - set(self.source.declared_keys())
        for key in sorted(orphans):
            self.queue.add(key)
        return orphans

    async def _sweep(self, stop: asyncio.Event) -> None:
        first = True
        while not stop.is_set():
            try:
                orphans = await self.sweep()
                if orphans:
                    log.info("queued %d plugin(s) without a spec for removal", len(orphans))
            except ControllerError as e:
                log.warning("orphan sweep failed: %s", e)
            if first:
                self.started.set()
                first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.sweep_seconds)

    def _oom_killed(self, name: str) -> None:
        tracked = self.metrics.instances.get(name)
        if tracked is None:
            return
        key = plugin_key(tracked.plugin, tracked.namespace)
        self.metrics.oom_killed(key, name)
        self.violations.oom_killed(key, f"{name} was killed for memory (the kernel's OOM killer)")
        self.queue.add(key)

    def _observe(self, result: str, seconds: float) -> None:
        self.metrics.reconciles.labels(result).inc()
        self.metrics.reconcile_seconds.observe(seconds)

    async def _watch_resources(self, stop: asyncio.Event) -> None:
        """Evaluate resource violations every few seconds; queue the plugins they change."""
        while not stop.is_set():
            readings = await asyncio.to_thread(self.violations.read)
            for key in self.violations.apply(readings):
                self.queue.add(key)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=VIOLATIONS_SECONDS)

    async def _follow_events(self) -> None:
        while True:
            try:
                async for key in self.runtime.events():
                    self.queue.add(key)
            except ControllerError as e:
                log.warning("runtime events interrupted: %s", e)
            await asyncio.sleep(EVENTS_RETRY_SECONDS)


def _pool(
    queue: queue_module.WorkQueue, reconciler: reconciler.Reconciler, size: int
) -> workers.WorkerPool:
    return workers.WorkerPool(queue, reconciler.reconcile, size)
