"""A platform that restarts crashed instances itself (a kubelet): its exits are counted from
what it reports, against the same crash-loop limit, and nothing is recreated for them."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.runtimes import base
from controller.spec import conditions, models

from .test_reconciler import World


def _platform(world: World) -> None:
    """Make the world's memory runtime one that restarts crashed instances by itself."""
    runtime = world.runtime
    runtime.capabilities = lambda: base.Capabilities(  # type: ignore[method-assign]
        networks=frozenset({models.NetworkMode.NONE}),
        volumes=True,
        host_paths=False,
        restarts_crashed=True,
        not_enforced={"spec.resources.pids": "no per-instance PID limit here"},
    )


def _exit(world: World, name: str, *, running_again: bool) -> None:
    """The instance exited 3; the platform restarted it (running_again) or will."""
    instance = world.runtime.instances[name]
    now = datetime.now(UTC)
    world.runtime.instances[name] = replace(
        instance,
        state=base.InstanceState.RUNNING if running_again else base.InstanceState.EXITED,
        restarting=not running_again,
        crashes=instance.crashes + 1,
        exit_code=3,
        finished_at=now,
        started_at=now if running_again else instance.started_at,
    )


@pytest.fixture
def kube_world(tmp_path: Path) -> World:
    world = World(tmp_path)
    _platform(world)
    return world


async def test_a_restart_the_status_coalesced_is_counted_and_nothing_recreated(
    kube_world: World,
) -> None:
    world = kube_world
    world.write("echo")
    status = await world.settle("echo")
    assert conditions.is_true(status.conditions, conditions.READY)
    [instance] = world.runtime.instances.values()
    _exit(world, instance.name, running_again=True)  # exited, already running again
    status = await world.settle("echo")
    [record] = status.instances
    assert (record.restarts, record.last_exit_code) == (1, 3)
    assert conditions.is_true(status.conditions, conditions.READY)  # shook hands again
    assert world.runtime.calls["start"] == 1
    assert world.runtime.calls["remove"] == 0
    assert world.runtime.instances[instance.name].id == instance.id
    assert "Restarted" in [e.reason for e in world.store.events("echo")]
    unenforced = conditions.find(status.conditions, conditions.UNENFORCED)
    assert unenforced is not None
    assert unenforced.status == "True"


async def test_an_exit_waiting_for_the_platform_is_back_off_then_past_the_limit_a_crash_loop(
    kube_world: World,
) -> None:
    world = kube_world
    world.write("echo")  # restart: maxRestarts 2
    await world.settle("echo")
    [name] = world.runtime.instances
    _exit(world, name, running_again=False)
    status = await world.settle("echo")
    ready = conditions.find(status.conditions, conditions.READY)
    assert ready is not None
    assert ready.reason == "BackOff"
    assert world.runtime.calls["start"] == 1
    assert world.runtime.calls["stop"] == 0  # left to the platform
    for _ in range(2):
        _exit(world, name, running_again=True)
        status = await world.settle("echo")
    # Three exits within the window, maxRestarts 2: a crash loop, stopped, not recreated.
    degraded = conditions.find(status.conditions, conditions.DEGRADED)
    assert degraded is not None
    assert degraded.reason == "CrashLoop"
    assert "crashed 3 times" in degraded.message
    assert world.runtime.calls["stop"] >= 1
    assert world.runtime.calls["start"] == 1
    # Held there, pass after pass, the count and the exit code stay those of the exits.
    status = await world.settle("echo")
    degraded = conditions.find(status.conditions, conditions.DEGRADED)
    assert degraded is not None
    assert "crashed 3 times" in degraded.message
    assert "last exit code 3" in degraded.message
    assert world.runtime.calls["start"] == 1
    # Once the window has passed, it is started again.
    world.clock.offset += 301
    status = await world.settle("echo")
    assert world.runtime.calls["start"] == 2
    assert conditions.is_true(status.conditions, conditions.READY)
