"""An instance that is alive but answers nothing (paused, frozen) is health-failed and restarted."""

from __future__ import annotations

from pathlib import Path

from controller.runtimes import base
from controller.runtimes.container import inspection
from controller.spec import conditions
from tests.unit.test_reconciler import World


def test_the_engines_paused_state_is_paused_not_unknown() -> None:
    attrs = {
        "Name": "/bh-echo-blue",
        "Id": "abc",
        "State": {"Status": "paused", "Paused": True, "Running": True, "Pid": 42},
        "Config": {"Labels": {base.LABEL_PLUGIN: "echo", base.LABEL_COLOR: "blue"}},
    }
    instance = inspection.instance_from_inspect(attrs)
    assert instance.state is base.InstanceState.PAUSED
    assert instance.exit_code is None


async def test_a_paused_instance_fails_its_health_checks_and_is_restarted(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.write("echo")
    await world.settle("echo")
    world.runtime.pause("bh-echo-blue")
    threshold = 3  # the default health.failureThreshold
    for _ in range(threshold - 1):
        await world.reconciler.reconcile("echo")
        assert world.runtime.instances["bh-echo-blue"].state is base.InstanceState.PAUSED
    await world.reconciler.reconcile("echo")
    stopped = world.runtime.instances["bh-echo-blue"].state
    assert stopped is base.InstanceState.EXITED, "stopped at the failureThreshold-th failed check"
    unhealthy = [e for e in world.store.events("echo") if e.reason == "Unhealthy"]
    assert len(unhealthy) == 1
    assert "paused" in unhealthy[0].message
    world.clock.offset += 1.1  # restart.backoffSeconds
    status = await world.settle("echo")
    running = world.runtime.instances["bh-echo-blue"].state
    assert running is base.InstanceState.RUNNING
    assert conditions.is_true(status.conditions, conditions.READY)
    assert [i.restarts for i in status.instances] == [1]
