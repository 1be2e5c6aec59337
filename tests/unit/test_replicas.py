"""spec.replicas on the in-memory runtime: N instances of a color, each restarted on its own,
one route balanced over the Ready ones, and a swap of all of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydantic
import pytest

from controller.admin import columns
from controller.cli import tree
from controller.errors import PermanentError
from controller.gateway import router
from controller.spec import conditions, models
from tests.unit.test_reconciler import World

REPLICAS = "  replicas: 3\n  hotSwap: {scaleDownDelaySeconds: 30}\n"
NAMES = ["bh-echo-blue", "bh-echo-blue-1", "bh-echo-blue-2"]


@pytest.fixture
def echo(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.reconciler.routes = router.Router()
    world.write("echo", extra=REPLICAS)
    return world


def pool(world: World) -> tuple[str, ...]:
    gate = world.reconciler.routes.gates["echo"]  # type: ignore[attr-defined]
    assert gate.endpoint is not None
    found = gate.pools.get(gate.endpoint)
    return found.endpoints if found else (gate.endpoint,)


def endpoint(world: World, name: str) -> str:
    return world.runtime.endpoint(world.runtime.instances[name])


def test_replicas_of_a_plugin_that_keeps_state_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"replicas 2: .*spec\.state"):
        models.PluginSpec.model_validate(
            {"image": "blackhole/x:1", "version": "1.0.0", "replicas": 2, "state": {"version": 1}}
        )
    spec = models.PluginSpec.model_validate({"image": "blackhole/x:1", "version": "1.0.0"})
    assert spec.replicas == 1


async def test_three_replicas_run_and_are_routed_to(echo: World) -> None:
    status = await echo.settle("echo")
    assert sorted(echo.runtime.instances) == NAMES
    assert [(i.color, i.replica, i.ready) for i in status.instances] == [
        (models.Color.BLUE, r, True) for r in range(3)
    ]
    ready = conditions.find(status.conditions, conditions.READY)
    assert ready is not None
    assert (ready.status, ready.message) == ("True", "3/3 replicas Ready")
    assert pool(echo) == tuple(endpoint(echo, n) for n in NAMES)


async def test_a_killed_replica_is_restarted_alone_and_left_out_of_the_route(echo: World) -> None:
    await echo.settle("echo")
    ids = {n: echo.runtime.instances[n].id for n in NAMES}
    echo.runtime.crash("bh-echo-blue-1", exit_code=137, line="killed")
    await echo.reconciler.reconcile("echo")  # backing off: not restarted yet
    assert pool(echo) == tuple(endpoint(echo, n) for n in (NAMES[0], NAMES[2]))
    status = echo.store.status("echo")
    assert status is not None
    ready = conditions.find(status.conditions, conditions.READY)
    assert ready is not None
    assert ready.status == "True"
    assert ready.message.startswith("2/3 replicas Ready")
    echo.clock.offset += 1.1
    status = await echo.settle("echo")
    assert {n: echo.runtime.instances[n].id for n in (NAMES[0], NAMES[2])} == {
        n: ids[n] for n in (NAMES[0], NAMES[2])
    }, "the others were not touched"
    assert echo.runtime.instances["bh-echo-blue-1"].id != ids["bh-echo-blue-1"]
    assert [i.restarts for i in status.instances] == [0, 1, 0]
    assert pool(echo) == tuple(endpoint(echo, n) for n in NAMES)


async def test_a_scale_down_removes_the_last_replicas(echo: World) -> None:
    await echo.settle("echo")
    echo.write("echo", extra=REPLICAS.replace("3", "1"))
    status = await echo.settle("echo")
    assert sorted(echo.runtime.instances) == ["bh-echo-blue"]
    assert [i.replica for i in status.instances] == [0]
    gate = echo.reconciler.routes.gates["echo"]  # type: ignore[attr-defined]
    assert not gate.pools
    assert gate.endpoint == endpoint(echo, "bh-echo-blue")


class _Watched(router.Router):
    """A router that counts the times a plugin is left with no route."""

    def __init__(self) -> None:
        super().__init__()
        self.cleared = 0

    def clear_route(self, key: str) -> None:
        self.cleared += 1
        super().clear_route(key)


async def test_a_scale_down_keeps_the_first_replica_routed_throughout(echo: World) -> None:
    """Calls go on to the replica kept while the ones past the count are removed: the
    route is narrowed, never taken away (calls would fail with 503 meanwhile)."""
    watched = _Watched()
    echo.reconciler.routes = watched
    await echo.settle("echo")
    watched.cleared = 0
    echo.write("echo", extra=REPLICAS.replace("3", "1"))
    await echo.settle("echo")
    assert sorted(echo.runtime.instances) == ["bh-echo-blue"]
    assert watched.cleared == 0
    assert watched.gates["echo"].endpoint == endpoint(echo, "bh-echo-blue")


async def test_a_swaps_replicas_are_probed_while_the_first_is_not_ready(echo: World) -> None:
    await echo.settle("echo")
    echo.write("echo", version="1.1.0", extra=REPLICAS)
    echo.runtime.unready.add("bh-echo-green")
    status = await echo.settle("echo")
    assert status.swap is not None
    records = {(i.color, i.replica): i.ready for i in status.instances}
    assert records[(models.Color.GREEN, 0)] is False
    assert records[(models.Color.GREEN, 1)] is True, "probed though the first is not Ready"
    assert records[(models.Color.GREEN, 2)] is True
    echo.runtime.unready.discard("bh-echo-green")
    status = await echo.settle("echo", passes=1)
    assert status.active_color is models.Color.GREEN, "the others were Ready already"


async def test_a_swap_starts_all_replicas_of_the_new_color_before_the_flip(echo: World) -> None:
    await echo.settle("echo")
    echo.write("echo", version="1.1.0", extra=REPLICAS)
    echo.runtime.unready.add("bh-echo-green-2")
    await echo.reconciler.reconcile("echo")  # the swap begins: all three start
    green = ["bh-echo-green", "bh-echo-green-1", "bh-echo-green-2"]
    assert set(green) <= set(echo.runtime.instances)
    status = await echo.settle("echo")
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.STARTING, "one of the three is not Ready"
    assert status.active_color is models.Color.BLUE
    assert pool(echo) == tuple(endpoint(echo, n) for n in NAMES), "blue serves meanwhile"
    echo.runtime.unready.discard("bh-echo-green-2")
    status = await echo.settle("echo")
    assert status.active_color is models.Color.GREEN
    assert pool(echo) == tuple(endpoint(echo, n) for n in green)
    echo.clock.offset += 31
    status = await echo.settle("echo")
    assert sorted(echo.runtime.instances) == green
    assert [(i.color, i.replica) for i in status.instances] == [
        (models.Color.GREEN, r) for r in range(3)
    ]
    ready = conditions.find(status.conditions, conditions.READY)
    assert ready is not None
    assert ready.message == "3/3 replicas Ready"


async def test_bhctl_get_shows_how_many_replicas_are_ready(echo: World) -> None:
    await echo.settle("echo")
    echo.runtime.crash("bh-echo-blue-2", exit_code=1)
    await echo.reconciler.reconcile("echo")
    desired = echo.source.get("echo")
    assert desired is not None
    status = echo.store.status("echo")
    item = desired.plugin.model_copy(update={"status": status}).to_document()
    assert columns.row(item, ["READY"]) == ["2/3"]
    lines = tree.rollout(item, [])
    assert "    ├── instance blue: running, ready" in lines
    assert "    ├── instance blue-1: running, ready" in lines
    assert "    └── instance blue-2: exited, not ready" in lines


async def test_replicas_on_a_runtime_of_one_instance_a_color_are_refused(echo: World) -> None:
    one = dataclasses.replace(echo.runtime.capabilities(), replicas=False)
    echo.runtime.capabilities = lambda: one  # type: ignore[method-assign]
    with pytest.raises(PermanentError, match=r"spec\.replicas"):
        await echo.reconciler.reconcile("echo")
    assert echo.runtime.instances == {}
    status = echo.store.status("echo")
    assert status is not None
    ready = conditions.find(status.conditions, conditions.READY)
    assert ready is not None
    assert ready.reason == "InvalidSpec"
    assert "runs one instance of each color" in ready.message


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ({"remote": {"address": "10.0.3.2:7443"}, "image": None}, "replicas: a remote plugin"),
        ({"restart": {"standby": True}}, "restart.standby: a plugin of several replicas"),
    ],
)
def test_replicas_are_refused_with_a_remote_address_or_a_standby(extra, refused):
    spec = {"image": "blackhole/example-echo:0.1.0", "version": "0.1.0", "replicas": 3, **extra}
    document = {
        "apiVersion": "blackhole.dev/v1alpha1",
        "kind": "Plugin",
        "metadata": {"name": "echo"},
        "spec": {k: v for k, v in spec.items() if v is not None},
    }
    with pytest.raises(pydantic.ValidationError, match=refused):
        models.Plugin.model_validate(document)


def test_a_promoted_canary_of_replicas_keeps_its_pool_once_its_weight_goes() -> None:
    """The table of a canary's end routes to its color and drops the canary in one go: the
    color's replicas stay balanced over, not only its first."""
    routes = router.Router()
    spec = models.PluginSpec.model_validate({"image": "e:1", "version": "1.0.0"})
    declared = router.Declared.of(spec)
    blue, green = ["b0", "b1"], ["g0", "g1"]
    routes.route_to("echo", blue[0], "bh-echo-blue", declared, blue)
    routes.set_canary("echo", green[0], 50, None, green)
    routes.route_to("echo", green[0], "bh-echo-green", declared, green)  # promoted
    routes.set_canary("echo", None, 0)
    gate = routes.gates["echo"]
    assert gate.endpoint == green[0]
    assert gate.pools[green[0]].endpoints == tuple(green)
    assert blue[0] not in gate.pools
