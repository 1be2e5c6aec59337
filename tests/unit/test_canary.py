"""Canary swaps and analyses: the spec's rules, the coordinator's steps against the in-memory
runtime and the in-process router (weights, promote, abort, builtin analyses that pass and
fail), the router's weighted and sticky choice and its per-endpoint counts, and the canary
and the counts over the real control socket."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pydantic
import pytest
import yaml

from controller.cli import tree
from controller.gateway import counts, router
from controller.gateway.counts import Stats
from controller.spec import models
from controller.swap import analysis

from .test_gateway_control import KV, controller_side, gateway_side, socket_dir  # noqa: F401
from .test_reconciler import World

CANARY = """\
  hotSwap:
    strategy: Canary
    scaleDownDelaySeconds: 0
    canary:
      stickyHeader: X-User
      steps:
        - setWeight: 10
        - pause: {}
        - setWeight: 50
        - pause: {durationSeconds: 30}
"""

ANALYZED = """\
  hotSwap:
    strategy: Canary
    scaleDownDelaySeconds: 0
    analysis:
      - {name: success, builtin: SuccessRate, min: 0.95, intervalSeconds: 5, count: 2}
    canary:
      steps:
        - setWeight: 20
        - analysis: {metrics: [success]}
"""


def hot_swap(**fields: object) -> models.HotSwap:
    return models.HotSwap.model_validate(fields)


def test_a_canary_is_refused_for_a_plugin_that_keeps_state() -> None:
    steps = {"steps": [{"setWeight": 50}]}
    with pytest.raises(pydantic.ValidationError, match="this plugin keeps state"):
        models.PluginSpec.model_validate(
            {
                "image": "x/y:1",
                "version": "1.0.0",
                "state": {"version": 1},
                "hotSwap": {"strategy": "Canary", "canary": steps},
            }
        )
    models.PluginSpec.model_validate(
        {"image": "x/y:1", "version": "1.0.0", "hotSwap": {"strategy": "Canary", "canary": steps}}
    )


def test_the_canary_spec_says_what_is_wrong() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"strategy Canary needs canary\.steps"):
        hot_swap(strategy="Canary")
    with pytest.raises(pydantic.ValidationError, match="canary is for strategy Canary"):
        hot_swap(canary={"steps": [{"setWeight": 5}]})
    with pytest.raises(pydantic.ValidationError, match="exactly one of setWeight"):
        hot_swap(strategy="Canary", canary={"steps": [{"setWeight": 5, "pause": {}}]})
    with pytest.raises(pydantic.ValidationError, match="nope: no such measurement"):
        hot_swap(
            strategy="Canary",
            canary={"steps": [{"analysis": {"metrics": ["nope"]}}]},
            analysis=[{"name": "ok", "builtin": "Calls", "min": 1}],
        )
    with pytest.raises(pydantic.ValidationError, match="give builtin or prometheus"):
        hot_swap(analysis=[{"name": "ok", "min": 1}])
    with pytest.raises(pydantic.ValidationError, match=r"min 2\.0 is above max 1\.0"):
        hot_swap(analysis=[{"name": "ok", "builtin": "Calls", "min": 2, "max": 1}])
    with pytest.raises(pydantic.ValidationError, match="give min, max or both"):
        hot_swap(analysis=[{"name": "ok", "prometheus": {"query": "up"}}])


def _green(world: World) -> str:
    return world.runtime.endpoint(world.runtime.instances["bh-kv-green"])


def _blue(world: World) -> str:
    return world.runtime.endpoint(world.runtime.instances["bh-kv-blue"])


async def test_a_canary_steps_through_its_weights_and_is_promoted(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    world.write("kv")
    await world.settle("kv")
    world.write("kv", version="1.1.0", extra=CANARY)
    status = await world.settle("kv")
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.CANARY
    assert (status.swap.canary_step, status.swap.weight) == (1, 10), "paused at 10%"
    gate = routes.gates["kv"]
    assert (gate.canary, gate.weight, gate.sticky) == (_green(world), 10.0, "x-user")
    assert gate.endpoint == _blue(world), "the stable color stays the route"
    weight = world.reconciler.metrics.canary_weight.labels("kv")
    assert weight._value.get() == 10
    assert status.phase is models.Phase.SWAPPING

    world.reconciler.request("kv", "promote")
    status = await world.settle("kv", passes=1)
    assert status.swap is not None
    assert (status.swap.canary_step, status.swap.weight) == (3, 50), "on to the timed pause"
    assert routes.gates["kv"].weight == 50.0
    status = await world.settle("kv", passes=2)
    assert status.swap is not None
    assert status.swap.weight == 50, "30 s have not passed"

    world.clock.offset += 31
    status = await world.settle("kv")
    assert status.swap is None
    assert status.active_color is models.Color.GREEN
    assert routes.route("kv") == _green(world)
    assert routes.gates["kv"].canary is None
    assert weight._value.get() == 0, "no canary any more"
    assert "bh-kv-blue" not in world.runtime.instances
    reasons = [e.reason for e in world.store.events("kv")]
    assert reasons.count("CanaryWeight") == 2


async def test_an_abort_at_any_step_sends_every_call_to_the_stable_color(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    world.write("kv")
    await world.settle("kv")
    world.write("kv", version="1.1.0", extra=CANARY)
    await world.settle("kv")
    blue = _blue(world)
    assert routes.gates["kv"].canary is not None
    world.reconciler.request("kv", "abort")
    status = await world.settle("kv", passes=1)
    assert status.swap is None
    assert status.last_swap is not None
    assert status.last_swap.result == "Aborted"
    gate = routes.gates["kv"]
    assert (gate.endpoint, gate.canary, gate.weight) == (blue, None, 0.0)
    assert "bh-kv-green" not in world.runtime.instances
    assert world.reconciler.metrics.canary_weight.labels("kv")._value.get() == 0


async def _analysis_swap(world: World, routes: router.Router, ok: int, failed: int) -> None:
    world.write("kv")
    await world.settle("kv")
    world.write("kv", version="1.1.0", extra=ANALYZED)
    status = await world.settle("kv", passes=2)
    assert status.swap is not None
    assert status.swap.analysis is not None
    assert status.swap.weight == 20
    for _ in range(2):  # two intervals of calls, unless the first failed
        if "bh-kv-green" not in world.runtime.instances:
            break
        green = routes.counts[_green(world)]
        for n in range(ok + failed):
            green.record(n < failed, 0.002)
        world.clock.offset += 6
        await world.settle("kv", passes=1)


async def test_a_failed_success_rate_rolls_the_canary_back_saying_why(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    await _analysis_swap(world, routes, ok=80, failed=20)
    status = world.store.status("kv")
    assert status is not None
    assert status.swap is None
    assert status.last_swap is not None
    assert status.last_swap.reason == "SwapFailedAnalysis"
    message = status.last_swap.message or ""
    assert "success (SuccessRate) failed 1 of 1" in message
    assert "values 0.8, wanted >= 0.95" in message
    assert routes.gates["kv"].canary is None
    assert status.active_version == "1.0.0"
    metrics = world.reconciler.metrics
    assert metrics.analysis_runs.labels("kv", "Failed")._value.get() == 1
    assert metrics.analysis_measurements.labels("kv", "Failed")._value.get() == 1
    assert metrics.rollbacks.labels("kv", "SwapFailedAnalysis")._value.get() == 1


async def test_a_passed_analysis_lets_the_canary_on(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    await _analysis_swap(world, routes, ok=99, failed=1)
    status = await world.settle("kv")
    assert status.swap is None
    assert status.active_version == "1.1.0"
    metrics = world.reconciler.metrics
    assert metrics.analysis_runs.labels("kv", "Successful")._value.get() == 1
    assert metrics.analysis_measurements.labels("kv", "Successful")._value.get() == 2


async def test_an_interval_without_calls_is_inconclusive_not_a_failure(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    world.write("kv")
    await world.settle("kv")
    world.write("kv", version="1.1.0", extra=ANALYZED)
    await world.settle("kv", passes=2)
    world.clock.offset += 6
    status = await world.settle("kv", passes=1)
    assert status.swap is not None
    assert status.swap.analysis is not None
    [result] = status.swap.analysis.measurements
    assert (result.measured, result.failures, result.inconclusive) == (0, 0, 1)
    assert result.phase == "Running"


async def test_a_blue_green_swap_is_analyzed_before_and_after_promotion(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    world.write("kv")
    await world.settle("kv")
    world.write(
        "kv",
        version="1.1.0",
        extra="""\
  hotSwap:
    scaleDownDelaySeconds: 0
    analysis:
      - {name: p99, builtin: LatencyP99, max: 0.1, intervalSeconds: 5, count: 1}
    prePromotionAnalysis: [p99]
    postPromotionAnalysis: [p99]
""",
    )
    status = await world.settle("kv", passes=2)
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.ANALYZING
    assert routes.gates["kv"].preview == _green(world), "measured on preview calls"
    routes.counts[_green(world)].record(False, 0.003)
    world.clock.offset += 6
    status = await world.settle("kv", passes=1)
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.PROMOTED
    assert [r.at for r in status.swap.analyses] == ["PrePromotion"]
    status = await world.settle("kv", passes=1)
    assert status.swap is not None
    assert status.swap.analysis is not None, "post-promotion runs"
    for _ in range(10):
        routes.counts[_green(world)].record(False, 2.0)
    world.clock.offset += 6
    status = await world.settle("kv", passes=1)
    assert status.last_swap is not None
    assert status.last_swap.reason == "SwapFailedAnalysis"
    assert "analysis PostPromotion: p99 (LatencyP99)" in (status.last_swap.message or "")
    assert status.active_color is models.Color.BLUE
    assert routes.route("kv") == _blue(world)


def test_the_router_splits_by_weight_and_keeps_a_header_on_its_color() -> None:
    routes = router.Router()
    routes.route_to("kv", "unix:/blue", "blue", KV)
    routes.set_canary("kv", "unix:/green", 30, "X-User")
    gate = routes.gates["kv"]
    picks = [routes._pick(gate, "unix:/blue", None) for _ in range(20_000)]
    share = picks.count("unix:/green") / len(picks)
    assert 0.28 < share < 0.32
    users = {
        f"user-{n}": routes._pick(gate, "unix:/blue", {"x-user": f"user-{n}"}) for n in range(2000)
    }
    again = {u: routes._pick(gate, "unix:/blue", {"x-user": u}) for u in users}
    assert users == again, "the same header value, the same color"
    assert 0.26 < list(users.values()).count("unix:/green") / len(users) < 0.34
    routes.set_canary("kv", "unix:/green", 60, "X-User")
    moved = {u: routes._pick(gate, "unix:/blue", {"x-user": u}) for u in users}
    assert all(moved[u] == "unix:/green" for u, e in users.items() if e == "unix:/green"), (
        "a caller on the new color stays there as its weight grows"
    )
    routes.set_canary("kv", None, 0)
    assert routes._pick(gate, "unix:/blue", None) == "unix:/blue"
    assert gate.weight == 0.0


async def test_the_router_counts_each_endpoints_calls_and_its_5xx() -> None:
    routes = router.Router()
    routes.route_to("kv", "unix:/blue", "blue", KV)
    routes.set_canary("kv", "unix:/green", 100)
    limits = KV.gateway
    async with routes.admit("kv", limits, 1.0) as endpoint:
        assert endpoint == "unix:/green"
    for status in (500, 502, 404):
        with pytest.raises(router.Refused):
            async with routes.admit("kv", limits, 1.0):
                raise router.Refused(status, "PluginError", "no")
    stats = await routes.stats("unix:/green")
    assert stats is not None
    assert (stats.calls, stats.failures) == (4, 2), "a 4xx is no failure"
    async with routes.admit("kv", limits, 1.0, preview=False):
        pass
    assert (await routes.stats("unix:/blue")) == Stats()


def test_stats_quantiles_and_intervals() -> None:
    stats = Stats()
    for n in range(100):
        stats.record(n >= 90, 0.003 if n < 50 else 0.2)
    assert stats.value("SuccessRate") == pytest.approx(0.9)
    assert stats.value("ErrorCount") == 10
    assert 0.0025 <= stats.quantile(0.5) <= 0.005
    assert 0.1 <= stats.quantile(0.99) <= 0.25
    later = stats.plus(Stats(10, 0, [10] + [0] * len(counts.LATENCY_BOUNDS)))
    delta = later.since(stats)
    assert delta is not None
    assert (delta.calls, delta.failures) == (10, 0)
    assert stats.since(later) is None, "counts that went back: a gateway started again"
    assert Stats().value("SuccessRate") is None
    assert math.isnan(Stats().quantile(0.5))
    assert Stats.from_json(stats.to_json()) == stats


def test_a_prometheus_answer_is_one_value_or_says_why_not() -> None:
    assert analysis._one_value({"resultType": "scalar", "result": [1, "0.5"]}) == 0.5
    vector = {"resultType": "vector", "result": [{"metric": {}, "value": [1, "3"]}]}
    assert analysis._one_value(vector) == 3
    with pytest.raises(analysis.AnalysisError, match="gave 0 series, not one"):
        analysis._one_value({"resultType": "vector", "result": []})
    query = 'sum(x{plugin="{{plugin}}", color="{{color}}"})'
    filled = analysis.fill(query, {"plugin": "kv", "color": "green"})
    assert filled == 'sum(x{plugin="kv", color="green"})'


async def test_a_prometheus_measurement_without_an_address_fails_saying_so() -> None:
    metric = models.Measurement.model_validate(
        {"name": "q", "prometheus": {"query": "up"}, "min": 1, "count": 1}
    )
    run = analysis.start("PrePromotion", [metric], 0.0)

    async def no_stats(endpoint: str) -> Stats | None:
        return None

    source = analysis.Source(no_stats, analysis.Prometheus(None), "unix:/g", {}, {})
    assert await analysis.measure(run, [metric], source, 20.0) is None
    assert run.phase == "Failed"
    assert "--prometheus-url" in analysis.failed_message(run, [metric])


async def test_a_gateway_that_does_not_count_fails_a_builtin_analysis_saying_so() -> None:
    metric = models.Measurement.model_validate(
        {"name": "s", "builtin": "SuccessRate", "min": 0.9, "count": 1}
    )
    run = analysis.start("PrePromotion", [metric], 0.0)

    async def no_stats(endpoint: str) -> Stats | None:
        return None

    source = analysis.Source(no_stats, analysis.Prometheus(None), "unix:/g", {}, {})
    assert await analysis.measure(run, [metric], source, 0.0) is None
    assert "does not count calls per color" in analysis.failed_message(run, [metric])


async def test_the_canary_and_the_counts_cross_the_control_socket(socket_dir: Path) -> None:  # noqa: F811
    path = socket_dir / "gateway.sock"
    async with gateway_side(path) as gateway, controller_side(path) as (remote, _):
        remote.set_route(
            "kv",
            "unix:/blue",
            "bh-kv-blue",
            models.PluginSpec.model_validate({"image": "x/y:1", "version": "1.0.0"}),
        )
        remote.set_canary("kv", "unix:/green", 25, "X-User")
        remote.start_syncing()
        await asyncio.wait_for(gateway.ready.wait(), 30)
        await remote.acknowledged()
        gate = gateway.router.gates["kv"]
        assert (gate.canary, gate.weight, gate.sticky) == ("unix:/green", 25.0, "x-user")
        gateway.router.counts["unix:/green"].record(True, 0.01)
        gateway.router.counts["unix:/green"].record(False, 0.01)
        stats = await remote.stats("unix:/green")
        assert stats is not None
        assert (stats.calls, stats.failures) == (2, 1)
        remote.set_canary("kv", None, 0)
        await remote.acknowledged()
        assert (gate.canary, gate.weight) == (None, 0.0)
        assert "canary" not in remote.table()["kv"]


async def test_the_rollout_tree_shows_revisions_colors_weights_and_analyses(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    world.write("kv")
    await world.settle("kv")
    world.write("kv", version="1.1.0", extra=ANALYZED)
    status = await world.settle("kv", passes=2)
    assert status.swap is not None
    spec = models.PluginSpec.model_validate(
        {"image": "x/y:1", "version": "1.1.0", "hotSwap": hot_swap_of(ANALYZED)}
    )
    document = {
        "metadata": {"name": "kv"},
        "spec": spec.model_dump(mode="json", by_alias=True),
        "status": status.model_dump(mode="json", by_alias=True),
    }
    revisions = [
        {"revision": 1, "specHash": status.swap.from_hash},
        {"revision": 2, "specHash": status.swap.to_hash},
    ]
    lines = tree.rollout(document, revisions)
    text = "\n".join(lines)
    assert "Strategy:    Canary" in text
    assert "  Step:      2/2 (analysis success)" in text
    assert "  Weight:    20%" in text
    assert "├── revision 1  blue  1.0.0  weight 80%  [active]" in lines
    assert "└── revision 2  green  1.1.0  weight 20%  [canary]" in lines
    assert "    ├── instance green: running, ready" in lines
    assert "    └── analysis step 2 of 2: Running" in lines
    assert "        └── success: Running, 0 measured" in lines


def hot_swap_of(extra: str) -> object:
    return yaml.safe_load(extra)["hotSwap"]


async def test_a_promote_goes_past_a_running_analysis_and_says_so(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = router.Router(world.reconciler.metrics)
    world.reconciler.routes = routes
    world.write("kv")
    await world.settle("kv")
    world.write("kv", version="1.1.0", extra=ANALYZED)
    status = await world.settle("kv", passes=2)
    assert status.swap is not None
    assert status.swap.analysis is not None
    world.reconciler.request("kv", "promote")
    status = await world.settle("kv", passes=1)
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.PROMOTED
    assert [(r.at, r.phase) for r in status.swap.analyses] == [("step 2 of 2", "Skipped")]
    assert world.reconciler.metrics.analysis_runs.labels("kv", "Skipped")._value.get() == 1
    status = await world.settle("kv")
    assert status.swap is None
    assert status.active_version == "1.1.0"
