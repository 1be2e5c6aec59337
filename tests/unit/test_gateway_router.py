"""The gateway's router, tokens and limits, without plugins: gates, holds, buckets, labels."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import resource
import time
from pathlib import Path

import pytest

from controller.cli import run
from controller.gateway import auth, connections, router
from controller.metrics import telemetry
from controller.spec import models


def spec(**gateway: object) -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {"image": "blackhole/x:1", "version": "1.0.0", "gateway": gateway}
    )


async def test_no_route_is_refused_at_once_and_a_route_is_followed() -> None:
    routes = router.Router()
    with pytest.raises(router.Refused) as down:
        async with routes.admit("kv", spec().gateway, 5):
            pass
    assert (down.value.status, down.value.reason) == (503, "PluginNotReady")
    routes.set_route("kv", "unix:/a.sock", "bh-kv-blue", spec())
    async with routes.admit("kv", spec().gateway, 5) as endpoint:
        assert endpoint == "unix:/a.sock"
        assert routes.in_flight("unix:/a.sock") == 1
    assert routes.in_flight("unix:/a.sock") == 0
    routes.clear_route("kv")
    assert routes.route("kv") is None


async def test_held_calls_wait_and_go_to_the_route_set_before_release() -> None:
    routes = router.Router()
    routes.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
    routes.hold("kv")
    reached: list[str] = []

    async def one_call() -> None:
        async with routes.admit("kv", spec().gateway, 5) as endpoint:
            reached.append(endpoint)

    calls = [asyncio.create_task(one_call()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert reached == []
    assert routes.gates["kv"].held == 3
    routes.set_route("kv", "unix:/green.sock", "bh-kv-green", spec())
    routes.release("kv")
    await asyncio.gather(*calls)
    assert reached == ["unix:/green.sock"] * 3


async def test_a_hold_longer_than_the_call_timeout_is_a_504() -> None:
    routes = router.Router()
    routes.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
    routes.hold("kv")
    with pytest.raises(router.Refused) as held:
        async with routes.admit("kv", spec().gateway, 0.05):
            pass
    assert held.value.status == 504


async def test_wait_idle_returns_when_the_last_call_ends() -> None:
    routes = router.Router()
    routes.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
    release = asyncio.Event()

    async def slow_call() -> None:
        async with routes.admit("kv", spec().gateway, 5):
            await release.wait()

    task = asyncio.create_task(slow_call())
    await asyncio.sleep(0.01)
    assert await routes.wait_idle("unix:/blue.sock", 0.05) == 1, "the deadline passed"
    waiting = asyncio.create_task(routes.wait_idle("unix:/blue.sock", 5))
    await asyncio.sleep(0.01)
    release.set()
    assert await waiting == 0
    await task


async def test_concurrency_and_rate_limits() -> None:
    routes = router.Router()
    narrow = spec(maxConcurrentCalls=1, rateLimit={"callsPerSecond": 1000, "burst": 2})
    routes.set_route("kv", "unix:/blue.sock", "bh-kv-blue", narrow)
    async with routes.admit("kv", narrow.gateway, 5):
        with pytest.raises(router.Refused) as busy:
            async with routes.admit("kv", narrow.gateway, 5):
                pass
        assert (busy.value.status, busy.value.reason) == (429, "TooManyCalls")
    bucket = router.TokenBucket(rate=2, burst=2)
    assert bucket.take() == 0
    assert bucket.take() == 0
    wait = bucket.take()
    assert 0.4 < wait <= 0.5


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    digest = hashlib.sha256(b"hashed-token-value").hexdigest()
    path.write_text(
        "tokens:\n"
        "  - {name: clear, token: clear-token-0123456789, plugins: [kv]}\n"
        f"  - {{name: hashed, sha256: {digest}, plugins: ['*']}}\n"
    )
    path.chmod(0o600)
    tokens = auth.Tokens.load(path)
    clear = tokens.find("clear-token-0123456789")
    assert clear is not None
    assert clear.allows("kv")
    assert not clear.allows("other")
    hashed = tokens.find("hashed-token-value")
    assert hashed is not None
    assert hashed.allows("anything")
    assert tokens.find("nope") is None
    path.chmod(0o644)
    with pytest.raises(auth.TokensFileError, match="chmod 600"):
        auth.Tokens.load(path)
    path.chmod(0o600)
    path.write_text("tokens:\n  - {name: short, token: abc, plugins: [kv]}\n")
    with pytest.raises(auth.TokensFileError, match=r"tokens\[0\]: needs sha256"):
        auth.Tokens.load(path)


def test_the_gateway_is_not_exposed_without_tokens(tmp_path: Path) -> None:
    options = run.Options(
        specs=None,
        runtime=run.RuntimeChoice.DOCKER,
        data_dir=tmp_path,
        workers=1,
        resync_seconds=60,
        host_path_root=None,
        controller_id="default",
        gateway_address="0.0.0.0:8080",
    )
    with pytest.raises(run.GatewayConfigError, match="without authentication"):
        run.gateway_tokens(options)
    assert run.gateway_tokens(dataclasses.replace(options, gateway_address="[::1]:8080")) is None


def test_a_change_of_the_plugins_it_may_call_is_announced() -> None:
    routes = router.Router()
    changed: list[str] = []
    routes.listeners.append(changed.append)
    caller = models.PluginSpec.model_validate(
        {"image": "blackhole/x:1", "version": "1.0.0", "permissions": {"callPlugins": ["kv"]}}
    )
    routes.set_route("app", "unix:/a.sock", "bh-app-blue", spec())
    routes.set_route("app", "unix:/a.sock", "bh-app-blue", spec())
    routes.set_route("app", "unix:/a.sock", "bh-app-blue", caller)
    assert changed == ["app", "app"], "set, then the new permission; the same route is no change"


def test_method_labels_come_only_from_answered_calls_and_stay_bounded() -> None:
    metrics = telemetry.Metrics()
    started = time.perf_counter()
    metrics.answered("kv", "get", 200, started)
    for i in range(5000):
        metrics.answered("kv", f"made-up-{i}", 501, started)  # the plugin knows no such method
        metrics.answered("kv", None, 404, started)  # refused before it reached the plugin
        metrics.answered("kv", f"m{i}" * 30, 200, started)
    metrics.answered("kv", "get", 500, started)
    labels = {
        sample.labels["method"]
        for metric in metrics.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert "get" in labels
    assert not any(label.startswith("made-up") for label in labels)
    assert len(labels) <= telemetry.METHODS_PER_PLUGIN + 1
    assert len(metrics._answers) <= (telemetry.METHODS_PER_PLUGIN + 1) * 4


def test_the_open_files_limit_is_raised_and_the_connection_cap_fits_it() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert run.open_files_limit() == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == run.open_files_limit()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = connections.Limits(max_connections=4096)
    assert run.fit_gateway_limits(limits, 1 << 20) == limits
    fitted = run.fit_gateway_limits(limits, 2048)
    assert fitted.max_connections == (2048 - run.FILES_RESERVED) // 2
    assert fitted.header_timeout == limits.header_timeout
    with pytest.raises(ValueError, match="header_timeout"):
        connections.Limits(header_timeout=0)


async def test_a_color_of_replicas_is_balanced_by_fewest_calls_in_flight() -> None:
    routes = router.Router()
    replicas = ["unix:/r0.sock", "unix:/r1.sock", "unix:/r2.sock"]
    routes.set_route("kv", replicas[0], "bh-kv-blue", spec(), replicas)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(routes.admit("kv", spec().gateway, 5))
        second = await stack.enter_async_context(routes.admit("kv", spec().gateway, 5))
        assert first != second  # the busy one is passed over
        third = await stack.enter_async_context(routes.admit("kv", spec().gateway, 5))
        assert {first, second, third} == set(replicas)
        # One call ends: the next goes to the replica it left idle, whichever turn it is.
        async with routes.admit("kv", spec().gateway, 5) as fourth:
            assert fourth in replicas
        assert routes.in_flight(replicas[0]) == 3  # the color's calls, all its replicas
    assert routes.in_flight(replicas[0]) == 0
    assert not routes.by_replica
    reached: collections.Counter[str] = collections.Counter()
    for _ in range(30):  # one call at a time: all tied at 0, taken in turn
        async with routes.admit("kv", spec().gateway, 5) as endpoint:
            reached[endpoint] += 1
    assert reached == {r: 10 for r in replicas}
    assert routes.counts[replicas[0]].calls == 34  # counted under the color's endpoint


async def test_a_busy_replica_gets_no_calls_until_it_is_the_least_busy() -> None:
    routes = router.Router()
    replicas = ["unix:/r0.sock", "unix:/r1.sock"]
    routes.set_route("kv", replicas[0], "bh-kv-blue", spec(), replicas)
    slow = routes.admit("kv", spec().gateway, 5)
    busy = await slow.__aenter__()
    for _ in range(5):
        async with routes.admit("kv", spec().gateway, 5) as endpoint:
            assert endpoint != busy
    await slow.__aexit__(None, None, None)


async def test_a_replica_dropped_from_the_route_gets_no_more_calls() -> None:
    routes = router.Router()
    routes.set_route(
        "kv", "unix:/r0.sock", "bh-kv-blue", spec(), ["unix:/r0.sock", "unix:/r1.sock"]
    )
    routes.set_route("kv", "unix:/r0.sock", "bh-kv-blue", spec(), ["unix:/r1.sock"])  # r0 is down
    for _ in range(4):
        async with routes.admit("kv", spec().gateway, 5) as endpoint:
            assert endpoint == "unix:/r1.sock"
    routes.set_route("kv", "unix:/r0.sock", "bh-kv-blue", spec())  # one replica: no pool
    assert not routes.gates["kv"].pools
    async with routes.admit("kv", spec().gateway, 5) as endpoint:
        assert endpoint == "unix:/r0.sock"
    routes.set_route(
        "kv", "unix:/r0.sock", "bh-kv-blue", spec(), ["unix:/r0.sock", "unix:/r1.sock"]
    )
    routes.clear_route("kv")
    assert not routes.gates["kv"].pools


async def test_a_canary_weight_applies_to_its_color_and_its_replicas_share_it() -> None:
    routes = router.Router()
    blue = ["unix:/b0.sock", "unix:/b1.sock"]
    green = ["unix:/g0.sock", "unix:/g1.sock", "unix:/g2.sock"]
    routes.set_route("kv", blue[0], "bh-kv-blue", spec(), blue)
    routes.set_canary("kv", green[0], 50, endpoints=green)
    draws = iter([0.1, 0.9] * 30)
    routes.draw = lambda: next(draws)
    reached: collections.Counter[str] = collections.Counter()
    for _ in range(60):
        async with routes.admit("kv", spec().gateway, 5) as endpoint:
            reached[endpoint] += 1
    assert sum(reached[g] for g in green) == 30
    assert sum(reached[b] for b in blue) == 30
    assert all(reached[g] == 10 for g in green)
    assert all(reached[b] == 15 for b in blue)
    assert routes.counts[green[0]].calls == 30
    assert routes.counts[blue[0]].calls == 30
    routes.set_canary("kv", None, 0)
    assert set(routes.gates["kv"].pools) == {blue[0]}


def test_a_call_a_replica_dropped_has_a_spare_even_once_the_replica_left_the_pool() -> None:
    routes = router.Router()
    replicas = ["unix:/r0.sock", "unix:/r1.sock", "unix:/r2.sock"]
    routes.set_route("kv", replicas[0], "bh-kv-blue", spec(), replicas)
    assert routes.spare("kv", replicas[1], set())
    routes.set_route("kv", replicas[0], "bh-kv-blue", spec(), [replicas[0], replicas[2]])
    assert routes.spare("kv", replicas[1], set()), "taken out under the call: others remain"
    assert not routes.spare("kv", replicas[1], {replicas[0], replicas[2]})
    routes.set_route("kv", replicas[0], "bh-kv-blue", spec())  # one instance: no replicas
    assert not routes.spare("kv", replicas[0], set())
