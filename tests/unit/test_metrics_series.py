"""Per-plugin series made at 0 when a plugin is first seen, removed when it is deleted.

A counter whose series is born at 1 hides its first event from
``increase()``: these tests read the exposition as Prometheus would.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.gateway import control, router
from controller.metrics import telemetry
from controller.protocol import memory as memory_protocol
from controller.reconcile.reconciler import Reconciler
from controller.runtimes.memory import MemoryRuntime
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.spec import models

TOP = Path(__file__).resolve().parents[2]
SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
spec:
  image: blackhole/example-echo:0.1.0
  version: 1.0.0
  restart: {{maxRestarts: 5, backoffSeconds: 1, maxBackoffSeconds: 1}}
"""


def samples(
    metrics: telemetry.Metrics, plugin: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``plugin`` in the exposition: (name, other labels) to value."""
    found = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.labels.get("plugin") == plugin:
                others = frozenset((k, v) for k, v in sample.labels.items() if k != "plugin")
                found[sample.name, others] = sample.value
    return found


def value(metrics: telemetry.Metrics, name: str, plugin: str, **labels: str) -> float | None:
    return samples(metrics, plugin).get((name, frozenset(labels.items())))


def test_a_plugin_first_seen_has_every_series_with_known_labels_at_0() -> None:
    metrics = telemetry.Metrics()
    metrics.plugin_seen("kv")
    for result in telemetry.SWAP_RESULTS:
        assert value(metrics, "blackhole_swaps_total", "kv", result=result) == 0
    for reason in telemetry.ROLLBACK_REASONS:
        assert value(metrics, "blackhole_swap_rollbacks_total", "kv", reason=reason) == 0
    for kind in telemetry.VIOLATION_KINDS:
        assert value(metrics, "blackhole_resource_violations_total", "kv", kind=kind) == 0
    for type in telemetry.WEBHOOK_TYPES:
        for result in telemetry.WEBHOOK_RESULTS:
            assert (
                value(metrics, "blackhole_swap_webhooks_total", "kv", type=type, result=result) == 0
            )
    for result in telemetry.ANALYSIS_RESULTS:
        assert value(metrics, "blackhole_swap_analysis_runs_total", "kv", result=result) == 0
    for result in telemetry.MEASUREMENT_RESULTS:
        assert (
            value(metrics, "blackhole_swap_analysis_measurements_total", "kv", result=result) == 0
        )
    assert value(metrics, "blackhole_canary_weight", "kv") == 0
    for name in (
        "blackhole_instance_restarts_total",
        "blackhole_instance_oom_kills_total",
        "blackhole_swap_pause_seconds_count",
        "blackhole_state_checkpoint_failures_total",
        "blackhole_gateway_rate_limited_total",
        "blackhole_gateway_held",
        "blackhole_gateway_in_flight",
        "blackhole_gateway_request_duration_seconds_count",
    ):
        assert value(metrics, name, "kv") == 0, name
    assert value(metrics, "blackhole_swap_pause_seconds_bucket", "kv", le="+Inf") == 0
    age = value(metrics, "blackhole_state_restored_checkpoint_age_seconds", "kv")
    assert age is not None
    assert math.isnan(age), "no restore yet: NaN, not an age of 0"


def test_seen_again_changes_nothing_and_the_gateway_series_stay_with_the_gateway() -> None:
    metrics = telemetry.Metrics()
    metrics.relay_gateway()  # the gateway runs in a process of its own
    metrics.plugin_seen("kv")
    metrics.restarts.labels("kv").inc()
    metrics.plugin_seen("kv")
    assert value(metrics, "blackhole_instance_restarts_total", "kv") == 1
    assert not [n for n, _ in samples(metrics, "kv") if n.startswith("blackhole_gateway_")]


def test_a_forgotten_plugin_leaves_no_series_even_with_labels_made_by_events() -> None:
    metrics = telemetry.Metrics()
    for key in ("kv", "echo"):
        metrics.plugin_seen(key)
    metrics.rollbacks.labels("kv", "SwapSomethingNew").inc()
    metrics.answered("kv", "get", 200, 0.0)
    metrics.oom_killed("kv", "bh-kv-blue")
    metrics.plugin_forgotten("kv")
    assert samples(metrics, "kv") == {}
    assert value(metrics, "blackhole_instance_restarts_total", "echo") == 0
    metrics.plugin_seen("kv")  # declared again: from 0 again
    assert value(metrics, "blackhole_swap_rollbacks_total", "kv", reason="SwapAborted") == 0
    assert value(metrics, "blackhole_instance_oom_kills_total", "kv") == 0


def test_an_oom_kill_counts_once_whoever_tells_it() -> None:
    metrics = telemetry.Metrics()
    metrics.plugin_seen("kv")
    for _ in range(3):  # the engine tells of the run at every pass that sees it
        metrics.oom_killed("kv", "bh-kv-blue", "run-1")
    assert value(metrics, "blackhole_instance_oom_kills_total", "kv") == 1
    metrics.oom_killed("kv", "bh-kv-blue")  # the kernel, as run 2 is killed ...
    metrics.oom_killed("kv", "bh-kv-blue", "run-2")  # ... then the engine of run 2
    metrics.oom_killed("kv", "bh-kv-blue", "run-2")
    assert value(metrics, "blackhole_instance_oom_kills_total", "kv") == 2
    metrics.oom_killed("kv", "bh-kv-blue", "run-3")  # a third run, the kernel not watching
    assert value(metrics, "blackhole_instance_oom_kills_total", "kv") == 3


def test_the_rollback_reasons_are_those_the_swap_raises() -> None:
    raised = set()
    for path in (TOP / "controller" / "swap").rglob("*.py"):
        raised |= set(re.findall(r'SwapFailure\(\s*"(\w+)"', path.read_text()))
    assert raised, "the swap raises its failures as SwapFailure(reason, message)"
    assert raised == set(telemetry.ROLLBACK_REASONS)


class _World:
    def __init__(self, tmp_path: Path) -> None:
        self.specs = tmp_path / "specs"
        self.specs.mkdir()
        self.store = Store(tmp_path / "data" / "state.db")
        self.source = DirectorySource(self.specs, self.store, lambda key: None)
        self.runtime = MemoryRuntime()
        self.metrics = telemetry.Metrics()
        self.offset = 0.0
        self.reconciler = Reconciler(
            self.source,
            self.runtime,
            memory_protocol.MemoryPlugins(self.runtime),
            metrics=self.metrics,
            clock=lambda: time.time() + self.offset,
        )

    def write(self, name: str) -> None:
        (self.specs / f"{name}.yaml").write_text(SPEC.format(name=name))
        self.source.rescan()

    async def passes(self, key: str, count: int = 4) -> None:
        for _ in range(count):
            await self.reconciler.reconcile(key)


async def test_the_reconciler_makes_a_plugins_series_and_removes_them(tmp_path: Path) -> None:
    world = _World(tmp_path)
    world.write("echo")
    await world.reconciler.reconcile("echo")
    assert value(world.metrics, "blackhole_instance_restarts_total", "echo") == 0
    assert value(world.metrics, "blackhole_swap_rollbacks_total", "echo", reason="SwapAborted") == 0
    assert value(world.metrics, "blackhole_gateway_rate_limited_total", "echo") == 0
    (world.specs / "echo.yaml").unlink()
    world.source.rescan()
    await world.reconciler.reconcile("echo")
    assert samples(world.metrics, "echo") == {}


async def test_oom_kills_are_counted_across_restarts(tmp_path: Path) -> None:
    world = _World(tmp_path)
    world.write("echo")
    await world.passes("echo")
    for restart in range(1, 3):
        world.runtime.crash("bh-echo-blue", exit_code=137, oom=True)
        await world.passes("echo")  # each pass sees the run that ended, backing off
        world.offset += 2 * restart
        await world.passes("echo")
        assert value(world.metrics, "blackhole_instance_restarts_total", "echo") == restart
        assert value(world.metrics, "blackhole_instance_oom_kills_total", "echo") == restart


def test_the_gateway_makes_the_series_of_the_plugins_in_its_table() -> None:
    routes = router.Router()
    controls = control.ControlServer(routes)
    entry = control.entry(router.Declared.of(_spec()), None, None)
    controls.apply_table({"kv": entry, "echo": entry})
    assert value(routes.metrics, "blackhole_gateway_rate_limited_total", "kv") == 0
    assert value(routes.metrics, "blackhole_gateway_held", "echo") == 0
    assert value(routes.metrics, "blackhole_gateway_request_duration_seconds_count", "kv") == 0
    routes.metrics.answered("kv", "get", 200, 0.0)
    controls.apply_table({"echo": entry})
    assert samples(routes.metrics, "kv") == {}
    controls.apply_table({"kv": entry, "echo": entry})
    assert value(routes.metrics, "blackhole_gateway_in_flight", "kv") == 0


async def test_calls_in_flight_are_exported_after_a_plugin_is_declared_again() -> None:
    routes = router.Router()
    routes.set_route("kv", "unix:/kv.sock", "bh-kv-blue", _spec())
    routes.metrics.plugin_seen("kv")
    async with routes.admit("kv", _spec().gateway, 1.0):
        assert value(routes.metrics, "blackhole_gateway_in_flight", "kv") == 1
    routes.metrics.plugin_forgotten("kv")
    routes.metrics.plugin_seen("kv")
    async with routes.admit("kv", _spec().gateway, 1.0):
        assert value(routes.metrics, "blackhole_gateway_in_flight", "kv") == 1
    assert value(routes.metrics, "blackhole_gateway_in_flight", "kv") == 0


def _spec() -> models.PluginSpec:
    return models.PluginSpec.model_validate({"image": "blackhole/x:1", "version": "1.0.0"})
