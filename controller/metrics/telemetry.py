"""The controller's Prometheus metrics, all under ``blackhole_``, on one injected registry.

- what the controller does: reconciles by result and their duration, queue
  depth, busy workers, plugins by phase, restarts, swaps by result and their
  pauses, rollbacks, resource violations, build info; the faults of its
  own stores (a full or read-only disk, I/O errors, damaged files) from the
  :class:`~controller.database.Health` it holds (:attr:`Metrics.stores`);
- what the gateway does: calls by plugin, method and code, their duration,
  calls in flight and held, calls refused by a rate limit;
- what each instance uses, read from its cgroup at each scrape by
  :class:`InstanceCollector` (named after cAdvisor's ``container_*``
  metrics, with labels ``plugin``, ``version``, ``color``, ``namespace``), so a
  removed instance's series vanish by themselves.

Labels are bounded: plugins are declared, colors two, methods capped per
plugin (:data:`METHODS_PER_PLUGIN` that the plugin answered, then ``other``).

Every per-plugin series whose label values are known is made at 0 when the
plugin is first seen (:meth:`Metrics.plugin_seen`, and
:meth:`Metrics.gateway_plugins` in the gateway's process) and removed when it
is deleted (:meth:`Metrics.plugin_forgotten`): a series born at 1 would hide
its first event from ``increase()``, and so from the alerts.
"""

from __future__ import annotations

import collections
import math
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller import cgroups, database
from controller.metrics import oom

STORES = ("state", "snapshots")
"""The controller's stores whose health is exported."""

METHODS_PER_PLUGIN = 50
"""Distinct method labels kept per plugin; others count as "other"."""
_METHOD = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PAUSE = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

SWAP_RESULTS = ("Promoted", "RolledBack", "Aborted")
"""How a swap ends (``status.lastSwap.result``)."""
ROLLBACK_REASONS = (
    "SwapAborted",
    "SwapInterrupted",
    "SwapSuperseded",
    "SwapSourceLost",
    "SwapFailedCrashed",
    "SwapFailedNotReady",
    "SwapFailedHandshake",
    "SwapFailedChecks",
    "SwapFailedImport",
    "SwapFailedDrain",
    "SwapFailedPause",
    "SwapFailedAfterPromotion",
    "SwapFailedWebhook",
    "SwapFailedHold",
    "SwapFailedFlip",
    "SwapFailedAnalysis",
)
"""Why a swap rolls back: the reasons of the swap coordinator's failures."""
VIOLATION_KINDS = ("MemoryNearLimit", "CPUThrottled", "OOMKilled", "RestartBurst")
CHECKPOINT_KINDS = ("full", "delta")
RESTORE_RESULTS = ("Restored", "Skipped", "Empty")
WEBHOOK_TYPES = ("PrePromotion", "PostPromotion", "Rollback")
WEBHOOK_RESULTS = ("Passed", "Block", "RollBack", "Ignore")
ANALYSIS_RESULTS = ("Successful", "Failed", "Skipped")
MEASUREMENT_RESULTS = ("Successful", "Failed")
_KERNEL = "kernel"
"""The run of an instance whose OOM kill the kernel reported, not yet the engine."""


HOLD_RELEASES = "blackhole_gateway_hold_releases"
"""Counted by the controller (gateways report these releases to it), never by a gateway."""


@dataclass(frozen=True)
class Tracked:
    """An instance whose resources are exported: its process and its labels."""

    pid: int
    plugin: str
    version: str
    color: str
    namespace: str


class Metrics:
    """Every metric the controller exports, and the instances it reads."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "blackhole_reconcile", "Reconcile passes, by result.", ["result"], registry=r
        )
        self.reconcile_seconds = Histogram(
            "blackhole_reconcile_duration_seconds",
            "Time of one reconcile pass.",
            buckets=_FAST,
            registry=r,
        )
        self.queue_depth = Gauge(
            "blackhole_workqueue_depth", "Keys waiting in the work queue.", registry=r
        )
        self.busy_workers = Gauge(
            "blackhole_workers_busy", "Workers reconciling a key right now.", registry=r
        )
        self.restarts = Counter(
            "blackhole_instance_restarts",
            "Crashed or unhealthy instances the controller restarted.",
            ["plugin"],
            registry=r,
        )
        self.swaps = Counter(
            "blackhole_swaps",
            "Blue/green swaps ended, by result.",
            ["plugin", "result"],
            registry=r,
        )
        self.swap_pause = Histogram(
            "blackhole_swap_pause_seconds",
            "How long calls were held at a swap's flip.",
            ["plugin"],
            buckets=_PAUSE,
            registry=r,
        )
        self.rollbacks = Counter(
            "blackhole_swap_rollbacks",
            "Swaps rolled back, by reason.",
            ["plugin", "reason"],
            registry=r,
        )
        self.webhooks = Counter(
            "blackhole_swap_webhooks",
            "Swap webhooks called, by type and result (Passed, or what the failure did: "
            "Block, RollBack, Ignore).",
            ["plugin", "type", "result"],
            registry=r,
        )
        self.canary_weight = Gauge(
            "blackhole_canary_weight",
            "The share of calls, in percent, a canary's new color takes (0: no canary).",
            ["plugin"],
            registry=r,
        )
        self.analysis_runs = Counter(
            "blackhole_swap_analysis_runs",
            "Swap analyses ended, by result (Successful, Failed, Skipped by a promote).",
            ["plugin", "result"],
            registry=r,
        )
        self.analysis_measurements = Counter(
            "blackhole_swap_analysis_measurements",
            "Measurements of swap analyses taken, by result (Successful, Failed).",
            ["plugin", "result"],
            registry=r,
        )
        self.checkpoints = Counter(
            "blackhole_state_checkpoints",
            "State checkpoints kept, by kind (full or delta).",
            ["plugin", "kind"],
            registry=r,
        )
        self.checkpoint_bytes = Counter(
            "blackhole_state_checkpoint_bytes",
            "Bytes of state written to checkpoints.",
            ["plugin"],
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "blackhole_state_checkpoint_failures",
            "Checkpoints that failed (the instance did not answer, the store could not write).",
            ["plugin"],
            registry=r,
        )
        self.store_errors = Counter(
            "blackhole_store_errors",
            "Operations on the controller's own stores that failed for the disk "
            "(full, read-only, I/O error, damaged file).",
            ["store", "operation"],
            registry=r,
        )
        self.stores = database.Health(
            on_error=lambda store, operation: self.store_errors.labels(store, operation).inc()
        )
        """How the controller's stores are doing, shared by every store of this process."""
        available = Gauge(
            "blackhole_store_available",
            "1 while the store can be read and written, 0 while it fails.",
            ["store"],
            registry=r,
        )
        for name in STORES:
            available.labels(name).set_function(
                lambda name=name: 0.0 if self.stores.failing(name) else 1.0  # type: ignore[misc]
            )
        self.restores = Counter(
            "blackhole_state_restores",
            "Checkpoints restored into restarted instances, by result (Restored, Skipped: a "
            "damaged one passed over, Empty: none to restore).",
            ["plugin", "result"],
            registry=r,
        )
        self.restored_age = Gauge(
            "blackhole_state_restored_checkpoint_age_seconds",
            "Age of the checkpoint last restored: the writes lost with the crash.",
            ["plugin"],
            registry=r,
        )
        self.violations = Counter(
            "blackhole_resource_violations",
            "Resource violations seen: MemoryNearLimit, CPUThrottled, OOMKilled, RestartBurst.",
            ["plugin", "kind"],
            registry=r,
        )
        self.oom_kills = Counter(
            "blackhole_instance_oom_kills",
            "Instances of the plugin killed for memory, counted across their restarts.",
            ["plugin"],
            registry=r,
        )
        self.requests = Counter(
            "blackhole_gateway_requests",
            "Calls answered by the gateway, by plugin, method and HTTP code.",
            ["plugin", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "blackhole_gateway_request_duration_seconds",
            "Time the gateway took to answer a call.",
            ["plugin"],
            buckets=_FAST,
            registry=r,
        )
        self.in_flight = Gauge(
            "blackhole_gateway_in_flight", "Calls in flight to a plugin.", ["plugin"], registry=r
        )
        self.held = Gauge(
            "blackhole_gateway_held", "Calls held while a plugin swaps.", ["plugin"], registry=r
        )
        self.rate_limited = Counter(
            "blackhole_gateway_rate_limited",
            "Calls refused with 429 by a rate or concurrency limit.",
            ["plugin"],
            registry=r,
        )
        self.hold_releases = Counter(
            HOLD_RELEASES,
            "Holds a gateway released by itself, as the controller learnt: LeaseLapsed (not "
            "renewed in time) or ControllerGone (its connection closed), by plugin and gateway.",
            ["plugin", "gateway", "cause"],
            registry=r,
        )
        Info("blackhole_build", "The controller's version.", registry=r).info(
            {"version": version, "python": platform.python_version()}
        )
        ProcessCollector(namespace="blackhole", registry=r)
        """``blackhole_process_start_time_seconds`` among them: the alerts count every event
        of a controller that started within their window, even one before the first scrape."""
        self._plugins: Callable[[], dict[str, tuple[str, bool]]] | None = None
        self.instances: dict[str, Tracked] = {}
        """Instance name to what is exported of it."""
        self.cgroups = cgroups.Cgroups()
        self.oom: oom.OomWatch | None = None
        """Told of every tracked instance, to see its OOM kills as they happen."""
        self._methods: dict[str, set[str]] = collections.defaultdict(set)
        self._answers: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}
        self._in_flight: dict[str, Any] = {}
        self._seen: set[str] = set()
        self._gateway_seen: set[str] = set()
        self._relayed = False
        self._oom_runs: dict[tuple[str, str], str] = {}
        """Plugin key and instance name to the run whose OOM kill was counted last."""
        self.collector = InstanceCollector(self)
        r.register(self.collector)

    # The controller.

    def track(self, name: str, tracked: Tracked | None) -> None:
        """Export ``name``'s resources (None: stop, it is gone)."""
        if tracked is None:
            self.instances.pop(name, None)
            if self.oom is not None:
                self.oom.unwatch(name)
        else:
            self.instances[name] = tracked
            if self.oom is not None:
                self.oom.watch(name, tracked.pid)

    def plugin_seen(self, key: str) -> None:
        """Make ``key``'s series whose label values are known, at 0 (a no-op once made).

        Cheap enough to call at every pass over the plugin. The gateway's
        series too, when the gateway runs in this process.
        """
        if key in self._seen:
            return
        self._seen.add(key)
        for family, values in self._series(key):
            family.labels(*values)
        self.restored_age.labels(key).set(math.nan)  # no restore yet: no age to tell
        if not self._relayed:
            self._gateway_seen_one(key)

    def plugin_forgotten(self, key: str) -> None:
        """Remove every series of ``key``, whatever its other labels: its plugin is deleted."""
        self._seen.discard(key)
        for family in (
            self.restarts,
            self.swaps,
            self.swap_pause,
            self.rollbacks,
            self.webhooks,
            self.canary_weight,
            self.analysis_runs,
            self.analysis_measurements,
            self.checkpoints,
            self.checkpoint_bytes,
            self.checkpoint_failures,
            self.restores,
            self.restored_age,
            self.violations,
            self.oom_kills,
        ):
            family.remove_by_labels({"plugin": key})
        for run in [r for r in self._oom_runs if r[0] == key]:
            del self._oom_runs[run]
        if not self._relayed:
            self._gateway_forget_one(key)

    def _series(self, key: str) -> Iterator[tuple[Any, tuple[str, ...]]]:
        """The controller's series of ``key`` with known label values."""
        for family in (self.restarts, self.swap_pause, self.checkpoint_bytes):
            yield family, (key,)
        yield self.checkpoint_failures, (key,)
        yield self.oom_kills, (key,)
        for result in SWAP_RESULTS:
            yield self.swaps, (key, result)
        for reason in ROLLBACK_REASONS:
            yield self.rollbacks, (key, reason)
        for type in WEBHOOK_TYPES:
            for outcome in WEBHOOK_RESULTS:
                yield self.webhooks, (key, type, outcome)
        yield self.canary_weight, (key,)
        for outcome in ANALYSIS_RESULTS:
            yield self.analysis_runs, (key, outcome)
        for outcome in MEASUREMENT_RESULTS:
            yield self.analysis_measurements, (key, outcome)
        for kind in VIOLATION_KINDS:
            yield self.violations, (key, kind)
        for kind in CHECKPOINT_KINDS:
            yield self.checkpoints, (key, kind)
        for result in RESTORE_RESULTS:
            yield self.restores, (key, result)

    def oom_killed(self, key: str, instance: str, run: str | None = None) -> None:
        """Count an OOM kill of ``instance`` of plugin ``key``.

        The kernel tells of a kill as it happens (``run`` None); the engine
        tells of the run that ended (``run``: what tells it from the
        instance's other runs, its start time), at every pass that sees it.
        So a run is counted once, and not again when the kernel counted it.
        """
        if run is None:
            self._oom_runs[key, instance] = _KERNEL
        else:
            last = self._oom_runs.get((key, instance))
            if last == run:
                return
            self._oom_runs[key, instance] = run
            if last == _KERNEL:
                return
        self.oom_kills.labels(key).inc()

    def follow_plugins(self, plugins: Callable[[], dict[str, tuple[str, bool]]]) -> None:
        """Read each plugin's phase and readiness from ``plugins`` at each scrape."""
        self._plugins = plugins

    # The gateway.

    def relay_gateway(self) -> None:
        """The gateway runs in a process of its own, whose series are served beside these:
        this registry keeps none of its own, so no family is exported twice."""
        for collector in (
            self.requests,
            self.request_seconds,
            self.in_flight,
            self.held,
            self.rate_limited,
        ):
            self.registry.unregister(collector)
        self._relayed = True

    def gateway_plugins(self, keys: Iterable[str]) -> None:
        """The gateway's declared plugins are ``keys`` (its route table): make the series of
        those new in it at 0, remove those of the plugins gone from it."""
        keys = set(keys)
        for key in self._gateway_seen - keys:
            self._gateway_forget_one(key)
        for key in keys - self._gateway_seen:
            self._gateway_seen_one(key)

    def _gateway_seen_one(self, key: str) -> None:
        self._gateway_seen.add(key)
        self.rate_limited.labels(key)
        self.held.labels(key)
        self.in_flight_of(key)
        self._durations[key] = self.request_seconds.labels(key)

    def _gateway_forget_one(self, key: str) -> None:
        self._gateway_seen.discard(key)
        for family in (
            self.requests,
            self.request_seconds,
            self.in_flight,
            self.held,
            self.rate_limited,
        ):
            family.remove_by_labels({"plugin": key})
        self._methods.pop(key, None)
        self._durations.pop(key, None)
        self._in_flight.pop(key, None)
        for answer in [a for a in self._answers if a[0] == key]:
            del self._answers[answer]

    def in_flight_of(self, key: str) -> Any:
        """``key``'s child of the in-flight gauge (cached: it is on the hot path)."""
        gauge = self._in_flight.get(key)
        if gauge is None:
            gauge = self._in_flight[key] = self.in_flight.labels(key)
        return gauge

    def method(self, plugin: str, method: str | None, code: int) -> str:
        """``method`` as a label value: bounded in number and in form.

        Only a method the plugin answered (code 200) earns a label of its
        own, up to :data:`METHODS_PER_PLUGIN` per plugin; every other one,
        and a call refused before it reached the plugin (``method`` None),
        is "other": a caller cannot fill the labels with names it makes up.
        """
        known = self._methods[plugin]
        if method is None:
            return "other"
        if method in known:
            return method
        if code == 200 and len(known) < METHODS_PER_PLUGIN and _METHOD.match(method):
            known.add(method)
            return method
        return "other"

    def answered(self, plugin: str, method: str | None, code: int, started: float) -> None:
        """Count one call to a declared plugin (on the hot path: label children are cached).

        The cache is keyed by label values, so it is bounded as they are.
        """
        label = self.method(plugin, method, code)
        key = (plugin, label, code)
        counter = self._answers.get(key)
        if counter is None:
            counter = self._answers[key] = self.requests.labels(plugin, label, str(code))
        counter.inc()
        duration = self._durations.get(plugin)
        if duration is None:
            duration = self._durations[plugin] = self.request_seconds.labels(plugin)
        duration.observe(time.perf_counter() - started)


class InstanceCollector(Collector):
    """Reads every tracked instance's cgroup at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families are dynamic; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        labels = ["plugin", "version", "color", "namespace"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "cpu": CounterMetricFamily(
                "blackhole_container_cpu_usage_seconds",
                "CPU time consumed by the instance.",
                labels=labels,
            ),
            "periods": CounterMetricFamily(
                "blackhole_container_cpu_cfs_periods",
                "CFS enforcement periods that elapsed.",
                labels=labels,
            ),
            "throttled_periods": CounterMetricFamily(
                "blackhole_container_cpu_cfs_throttled_periods",
                "CFS periods in which the instance was throttled.",
                labels=labels,
            ),
            "throttled": CounterMetricFamily(
                "blackhole_container_cpu_cfs_throttled_seconds",
                "Time the instance was throttled by its CPU limit.",
                labels=labels,
            ),
            "working_set": GaugeMetricFamily(
                "blackhole_container_memory_working_set_bytes",
                "Memory in use less inactive file pages, as the OOM killer sees it.",
                labels=labels,
            ),
            "usage": GaugeMetricFamily(
                "blackhole_container_memory_usage_bytes",
                "Memory in use, page cache included.",
                labels=labels,
            ),
            "limit": GaugeMetricFamily(
                "blackhole_container_spec_memory_limit_bytes",
                "The instance's memory limit.",
                labels=labels,
            ),
            "cpu_limit": GaugeMetricFamily(
                "blackhole_container_spec_cpu_limit_cores",
                "The instance's CPU limit now, in cores: above its spec's while a start-up "
                "boost lasts (resources.startCpu), until its socket accepts.",
                labels=labels,
            ),
            "oom": CounterMetricFamily(
                "blackhole_container_oom_events",
                "Processes of the instance killed for memory.",
                labels=labels,
            ),
            "pids": GaugeMetricFamily(
                "blackhole_container_processes", "Processes and threads running.", labels=labels
            ),
            "reads": CounterMetricFamily(
                "blackhole_container_fs_reads_bytes",
                "Bytes read from block devices.",
                labels=labels,
            ),
            "writes": CounterMetricFamily(
                "blackhole_container_fs_writes_bytes",
                "Bytes written to block devices.",
                labels=labels,
            ),
            "rx": CounterMetricFamily(
                "blackhole_container_network_receive_bytes",
                "Bytes received, loopback excluded.",
                labels=labels,
            ),
            "rx_packets": CounterMetricFamily(
                "blackhole_container_network_receive_packets",
                "Packets received, loopback excluded.",
                labels=labels,
            ),
            "tx": CounterMetricFamily(
                "blackhole_container_network_transmit_bytes",
                "Bytes sent, loopback excluded.",
                labels=labels,
            ),
            "tx_packets": CounterMetricFamily(
                "blackhole_container_network_transmit_packets",
                "Packets sent, loopback excluded.",
                labels=labels,
            ),
        }
        for tracked in list(self.metrics.instances.values()):
            reading = self.metrics.cgroups.read(tracked.pid)
            if reading is None:
                continue
            values = [tracked.plugin, tracked.version, tracked.color, tracked.namespace]
            families["cpu"].add_metric(values, reading.cpu_seconds)
            families["periods"].add_metric(values, reading.cpu_periods)
            families["throttled_periods"].add_metric(values, reading.cpu_throttled_periods)
            families["throttled"].add_metric(values, reading.cpu_throttled_seconds)
            families["working_set"].add_metric(values, reading.memory_working_set_bytes)
            families["usage"].add_metric(values, reading.memory_usage_bytes)
            families["limit"].add_metric(values, reading.memory_limit_bytes)
            families["cpu_limit"].add_metric(values, reading.cpu_limit_cores)
            families["oom"].add_metric(values, reading.oom_events)
            families["pids"].add_metric(values, reading.pids)
            families["reads"].add_metric(values, reading.fs_read_bytes)
            families["writes"].add_metric(values, reading.fs_write_bytes)
            families["rx"].add_metric(values, reading.network_receive_bytes)
            families["rx_packets"].add_metric(values, reading.network_receive_packets)
            families["tx"].add_metric(values, reading.network_transmit_bytes)
            families["tx_packets"].add_metric(values, reading.network_transmit_packets)
        yield from families.values()
        follow = self.metrics._plugins
        if follow is not None:
            plugins = follow()
            by_phase = GaugeMetricFamily(
                "blackhole_plugins", "Declared plugins, by phase.", labels=["phase"]
            )
            for phase, count in sorted(collections.Counter(p for p, _ in plugins.values()).items()):
                by_phase.add_metric([phase], count)
            yield by_phase
            ready = GaugeMetricFamily(
                "blackhole_plugin_ready",
                "1 when the plugin's active instance answers its health check, else 0.",
                labels=["plugin"],
            )
            for key, (_, is_ready) in sorted(plugins.items()):
                ready.add_metric([key], 1.0 if is_ready else 0.0)
            yield ready
