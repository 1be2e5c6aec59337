"""The warm standby (spec.restart.standby): started, frozen, promoted on a crash, replaced."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controller.runtimes import base, remote
from controller.runtimes.memory import MemoryRuntime
from controller.spec import conditions, models

from .test_reconciler import World

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: echo}}
spec:
  image: blackhole/example-echo:0.1.0
  version: {version}
  restart: {{backoffSeconds: 1, standby: {standby}}}
"""
ACTIVE = "bh-echo-blue"
STANDBY = "bh-echo-blue-standby"


def write(world: World, version: str = "1.0.0", standby: bool = True) -> None:
    text = SPEC.format(version=version, standby="true" if standby else "false")
    (world.specs / "echo.yaml").write_text(text)
    world.source.rescan()


@pytest.fixture
def world(tmp_path: Path) -> World:
    world = World(tmp_path)
    write(world)
    return world


async def frozen(world: World) -> models.PluginStatus:
    status = await world.settle("echo")
    assert world.runtime.instances[STANDBY].state is base.InstanceState.PAUSED
    assert status.standby is not None
    assert status.standby.state is models.StandbyState.FROZEN
    return status


async def test_a_standby_is_started_beside_the_ready_instance_and_frozen(world: World) -> None:
    status = await frozen(world)
    active, standby = world.runtime.instances[ACTIVE], world.runtime.instances[STANDBY]
    assert active.state is base.InstanceState.RUNNING
    assert (standby.color, standby.spec_hash) == (active.color, active.spec_hash)
    assert status.standby == models.StandbyStatus(
        name=STANDBY, color=models.Color.BLUE, version="1.0.0", state=models.StandbyState.FROZEN
    )
    assert [i.color for i in status.instances] == [models.Color.BLUE], "not an instance"
    assert conditions.is_true(status.conditions, conditions.READY)


async def test_none_is_kept_by_default(world: World) -> None:
    write(world, standby=False)
    status = await world.settle("echo")
    assert STANDBY not in world.runtime.instances
    assert status.standby is None


async def test_a_crash_is_answered_by_the_standby_which_is_then_replaced(world: World) -> None:
    await frozen(world)
    standby_id = world.runtime.instances[STANDBY].id
    world.runtime.crash(ACTIVE, exit_code=137, line="killed")
    await world.reconciler.reconcile("echo")  # the backoff
    world.clock.offset += 1.1
    starts = world.runtime.calls["start"]
    await world.reconciler.reconcile("echo")
    promoted = world.runtime.instances[ACTIVE]
    assert promoted.id == standby_id, "the pre-started instance took the crashed one's place"
    assert promoted.state is base.InstanceState.RUNNING
    assert world.runtime.calls["start"] == starts, "no cold start"
    status = world.store.status("echo")
    assert status is not None
    assert conditions.is_true(status.conditions, conditions.READY), "Ready in the same pass"
    assert [i.restarts for i in status.instances] == [1]
    restarted = [e for e in world.store.events("echo") if e.reason == "Restarted"]
    assert "from its standby" in restarted[-1].message
    status = await frozen(world)
    assert world.runtime.instances[STANDBY].id not in (standby_id, "")
    assert status.standby is not None
    assert status.standby.promoted == 1


async def test_a_standby_of_another_spec_is_never_promoted(world: World) -> None:
    await frozen(world)
    stale = world.runtime.instances[STANDBY]
    labels = {**stale.labels, base.LABEL_SPEC_HASH: "0" * 16}
    world.runtime.instances[STANDBY] = dataclasses.replace(stale, spec_hash="0" * 16, labels=labels)
    world.runtime.crash(ACTIVE)
    world.clock.offset += 1.1
    status = await world.settle("echo")
    assert world.runtime.instances[ACTIVE].id != stale.id, "started cold"
    assert conditions.is_true(status.conditions, conditions.READY)
    replaced = world.runtime.instances[STANDBY]
    assert replaced.id != stale.id
    assert replaced.spec_hash != "0" * 16
    restarted = [e for e in world.store.events("echo") if e.reason == "Restarted"]
    assert "from its standby" not in restarted[-1].message


async def test_a_standby_of_the_other_color_is_never_promoted(world: World) -> None:
    await frozen(world)
    blue = world.runtime.instances.pop(STANDBY)
    green = base.standby_name("bh-echo-green")
    labels = {**blue.labels, base.LABEL_COLOR: "green"}
    world.runtime.instances[green] = dataclasses.replace(
        blue, name=green, color=models.Color.GREEN, labels=labels
    )
    world.runtime.crash(ACTIVE)
    world.clock.offset += 1.1
    await world.settle("echo")
    assert world.runtime.instances[ACTIVE].id != blue.id, "started cold"
    assert green not in world.runtime.instances, "the other color's standby is removed"
    assert world.runtime.instances[STANDBY].color is models.Color.BLUE


async def test_a_new_version_gets_a_standby_of_its_own(world: World) -> None:
    await frozen(world)
    old = world.runtime.instances[STANDBY]
    write(world, version="1.1.0")
    await world.settle("echo", passes=8)
    world.clock.offset += 3600  # past scaleDownDelaySeconds: the old color is gone
    status = await world.settle("echo", passes=8)
    assert status.swap is None
    assert status.active_version == "1.1.0"
    assert status.active_color is not None
    active = world.runtime.instances[base.instance_name("echo", status.active_color)]
    standby = world.runtime.instances[base.standby_name(active.name)]
    assert (standby.color, standby.spec_hash) == (active.color, active.spec_hash)
    assert standby.id != old.id
    assert [n for n in world.runtime.instances if n.endswith("standby")] == [standby.name]


async def test_turning_it_off_or_deleting_the_plugin_removes_the_standby(world: World) -> None:
    await frozen(world)
    write(world, standby=False)
    status = await world.settle("echo")
    assert STANDBY not in world.runtime.instances
    assert status.standby is None
    write(world)
    await frozen(world)
    (world.specs / "echo.yaml").unlink()
    world.source.rescan()
    for _ in range(2):
        await world.reconciler.reconcile("echo")
    assert world.runtime.instances == {}
    assert world.store.status("echo") is None


async def test_a_plugin_without_one_never_looks_for_one(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(world, standby=False)
    await world.settle("echo")
    asked: list[str] = []
    inspect = world.runtime.inspect

    async def recorded(name: str) -> base.Instance:
        asked.append(name)
        return await inspect(name)

    monkeypatch.setattr(world.runtime, "inspect", recorded)
    await world.settle("echo")
    assert asked
    assert not [name for name in asked if name.endswith(base.STANDBY_SUFFIX)]


def test_a_runtime_wrapped_with_remote_plugins_keeps_its_hosts_standbys() -> None:
    host = MemoryRuntime()
    assert base.standbys_of(remote.WithRemotes(host, None)) is host
    assert base.standbys_of(object()) is None
