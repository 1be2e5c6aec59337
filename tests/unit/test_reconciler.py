"""The reconciler against the in-memory runtime: what runs and what status says."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from controller.errors import PermanentError, TemporaryError
from controller.protocol import memory as memory_protocol
from controller.reconcile.reconciler import Reconciler
from controller.runtimes import base
from controller.runtimes.memory import MemoryRuntime
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.spec import conditions, models

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
  labels: {{team: {team}}}
spec:
  image: blackhole/example-echo:0.1.0
  version: {version}
  resources: {{memory: {memory}}}
  restart: {{maxRestarts: 2, backoffSeconds: 1, maxBackoffSeconds: 4}}
{extra}"""


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.specs = tmp_path / "specs"
        self.specs.mkdir()
        self.store = Store(tmp_path / "data" / "state.db")
        self.queued: list[str] = []
        self.source = DirectorySource(self.specs, self.store, self.queued.append)
        self.runtime = MemoryRuntime()
        self.clock = Clock()
        self.plugins = memory_protocol.MemoryPlugins(self.runtime)
        self.reconciler = Reconciler(
            self.source, self.runtime, self.plugins, clock=self.clock, requests=self.store
        )

    def write(
        self,
        name: str,
        version: str = "1.0.0",
        team: str = "a",
        memory: str = "64Mi",
        extra: str = "",
    ) -> None:
        text = SPEC.format(name=name, version=version, team=team, memory=memory, extra=extra)
        (self.specs / f"{name}.yaml").write_text(text)
        self.source.rescan()

    async def settle(self, key: str, passes: int = 5) -> models.PluginStatus:
        for _ in range(passes):
            await self.reconciler.reconcile(key)
        status = self.store.status(key)
        assert status is not None
        return status


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_a_spec_becomes_a_ready_instance(world: World) -> None:
    world.write("echo")
    status = await world.settle("echo")
    [instance] = world.runtime.instances.values()
    assert instance.name == "bh-echo-blue"
    assert instance.labels[base.LABEL_PLUGIN] == "echo"
    assert instance.labels[base.LABEL_VERSION] == "1.0.0"
    assert instance.labels["team"] == "a"
    assert status.phase is models.Phase.RUNNING
    assert status.observed_generation == 1
    assert conditions.is_true(status.conditions, "Ready")
    assert [e.reason for e in world.store.events("echo")] == ["Created", "Ready"]


async def test_a_resync_of_an_unchanged_spec_writes_nothing(world: World) -> None:
    world.write("echo")
    await world.settle("echo")
    writes, before = world.runtime.writes(), world.store.status("echo")
    await world.settle("echo", passes=10)
    assert world.runtime.writes() == writes
    assert world.store.status("echo") == before


async def test_a_label_change_restarts_nothing(world: World) -> None:
    world.write("echo")
    await world.settle("echo")
    writes = world.runtime.writes()
    world.write("echo", team="b")
    status = await world.settle("echo")
    assert world.runtime.writes() == writes
    assert status.observed_generation == 2


async def test_a_resource_change_of_a_recreate_plugin_replaces_the_instance(world: World) -> None:
    world.write("echo", extra="  hotSwap: {strategy: Recreate}\n")
    await world.settle("echo")
    first = world.runtime.instances["bh-echo-blue"].id
    world.write("echo", memory="96Mi", extra="  hotSwap: {strategy: Recreate}\n")
    status = await world.settle("echo")
    assert world.runtime.instances["bh-echo-blue"].id != first
    assert status.observed_generation == 2
    assert status.phase is models.Phase.RUNNING
    assert world.store.events("echo")[-2].reason == "Replaced"


async def test_a_crash_is_restarted_after_backoff_and_counted(world: World) -> None:
    world.write("echo")
    await world.settle("echo")
    world.runtime.crash("bh-echo-blue", exit_code=137, line="killed")
    result = await world.reconciler.reconcile("echo")
    assert result.requeue_after is not None
    assert 0 < result.requeue_after <= 1.0, "first restart waits backoffSeconds"
    state = world.runtime.instances["bh-echo-blue"].state
    assert state is base.InstanceState.EXITED
    world.clock.offset += 1.1
    status = await world.settle("echo")
    assert world.runtime.instances["bh-echo-blue"].state is base.InstanceState.RUNNING
    [record] = status.instances
    assert record.restarts == 1
    assert record.last_exit_code == 137
    assert status.phase is models.Phase.RUNNING


async def test_a_crash_loop_degrades_with_exit_code_and_logs(world: World) -> None:
    world.write("echo")
    await world.settle("echo")
    for _ in range(3):
        world.runtime.crash("bh-echo-blue", exit_code=3, oom=True, line="boom: out of cheese")
        world.clock.offset += 10
        await world.settle("echo", passes=3)
    status = world.store.status("echo")
    assert status is not None
    assert status.phase is models.Phase.DEGRADED
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.status == "True"
    assert degraded.reason == "CrashLoop"
    assert "exit code 3 (OOM killed)" in degraded.message
    assert "boom: out of cheese" in degraded.message
    assert world.runtime.instances["bh-echo-blue"].state is base.InstanceState.EXITED
    assert status.instances[0].restarts == 2
    assert status.instances[0].oom_killed


async def test_a_deleted_spec_removes_its_instance_and_status(world: World) -> None:
    world.write("echo")
    await world.settle("echo")
    (world.specs / "echo.yaml").unlink()
    world.source.rescan()
    await world.reconciler.reconcile("echo")
    assert world.runtime.instances == {}
    assert world.store.status("echo") is None


async def test_a_spec_the_runtime_refuses_creates_nothing(world: World) -> None:
    extra = "  volumes:\n    - {name: data, mountPath: /data, hostPath: /etc}\n"
    world.write("echo", extra=extra)
    with pytest.raises(PermanentError, match=r"spec.volumes\[0\].hostPath"):
        await world.reconciler.reconcile("echo")
    assert world.runtime.calls["start"] == 0
    status = world.store.status("echo")
    assert status is not None
    assert status.phase is models.Phase.FAILED


async def test_a_plugin_of_another_protocol_version_is_failed_and_not_retried(world: World) -> None:
    world.write("old")
    world.plugins.incompatible.add("bh-old-blue")
    with pytest.raises(PermanentError, match="protocol version 99"):
        await world.settle("old")
    await world.settle("old")  # an unchanged spec is not started again
    status = world.store.status("old")
    assert status is not None
    assert status.phase is models.Phase.FAILED
    ready = conditions.find(status.conditions, "Ready")
    assert ready is not None
    assert ready.reason == "ProtocolMismatch"
    assert world.runtime.instances == {}
    assert world.runtime.calls["start"] == 1
    world.plugins.incompatible.clear()
    world.write("old", version="1.0.1")  # a new spec is tried again
    status = await world.settle("old")
    assert conditions.is_true(status.conditions, "Ready")


async def test_a_state_version_other_than_the_spec_says_is_refused(world: World) -> None:
    world.write("kv", extra="  state: {version: 2}\n")
    world.plugins.state_versions["bh-kv-blue"] = 1
    with pytest.raises(PermanentError, match="state version 1"):
        await world.settle("kv")
    status = world.store.status("kv")
    assert status is not None
    ready = conditions.find(status.conditions, "Ready")
    assert ready is not None
    assert ready.reason == "StateVersionMismatch"
    assert world.runtime.instances == {}


async def test_a_controller_that_may_not_act_touches_nothing(world: World) -> None:
    """Without the Lease renewed in time, a pass acts on nothing (another replica may)."""
    leading = [True]
    world.reconciler.may_act = lambda: leading[0]
    world.write("echo")
    await world.settle("echo")
    writes = world.runtime.writes()
    world.write("echo", version="2.0.0")
    leading[0] = False
    with pytest.raises(TemporaryError, match="Lease"):
        await world.reconciler.reconcile("echo")
    assert world.runtime.writes() == writes
    assert world.store.status("echo") is not None
    assert world.store.status("echo").active_version == "1.0.0"  # type: ignore[union-attr]


class AnnouncingRuntime(MemoryRuntime):
    """A runtime that queues a plugin when its starting instance's socket appears."""

    def capabilities(self) -> base.Capabilities:
        return dataclasses.replace(super().capabilities(), announces_sockets=True)


@pytest.mark.parametrize("announces", [False, True])
async def test_a_starting_instance_is_probed_seldom_where_its_socket_is_announced(
    tmp_path: Path, announces: bool
) -> None:
    world = World(tmp_path)
    if announces:
        world.runtime = AnnouncingRuntime()
        world.reconciler = Reconciler(
            world.source, world.runtime, memory_protocol.MemoryPlugins(world.runtime)
        )
    world.write("echo")
    world.runtime.unready.add("bh-echo-blue")  # its socket does not accept yet
    await world.reconciler.reconcile("echo")  # starts it
    waits = [(await world.reconciler.reconcile("echo")).requeue_after for _ in range(3)]
    assert all(w is not None for w in waits)
    if announces:
        assert min(w or 0 for w in waits) >= 1.0, waits
    else:
        assert max(w or 0 for w in waits) < 0.2, waits
    world.runtime.unready.clear()  # its socket accepts: the pass it brings says Ready
    await world.reconciler.reconcile("echo")
    status = world.store.status("echo")
    assert status is not None
    assert conditions.is_true(status.conditions, "Ready")
