"""The Runtime contract: the same assertions against Docker, Podman, processes and in memory.

If the in-memory backend the unit tests rely on drifted from the real
engines, these tests would show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.errors import InstanceConflictError, InstanceNotFoundError
from controller.runtimes import base, container, memory, process
from controller.spec import models

from .conftest import PLUGIN_DIR, PLUGIN_IMAGE, get_engine, new_controller_id

BACKENDS = ["docker", "podman", "process", "memory"]


@dataclass
class Backend:
    runtime: base.Runtime
    kill: Callable[[str], None]
    """``kill -9`` of the instance's main process."""


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    ident = new_controller_id()
    if request.param == "memory":
        fake = memory.MemoryRuntime(ident)
        yield Backend(fake, lambda name: fake.crash(name, 137))
        await fake.close()
        return
    data = Path(tempfile.mkdtemp(prefix="bh-contract-"))
    runtime: base.Runtime
    if request.param == "process":
        runtime = process.ProcessRuntime(
            process.Settings(data_dir=data, controller_id=ident, plugin_root=PLUGIN_DIR.parent)
        )

        def kill(name: str) -> None:
            state = json.loads((data / "processes" / f"{name}.json").read_text())
            os.kill(state["pid"], signal.SIGKILL)

    else:
        engine = get_engine(container.Engine(request.param))
        runtime = container.ContainerRuntime(
            container.Settings(engine=engine.kind, data_dir=data, controller_id=ident)
        )

        def kill(name: str) -> None:
            os.kill(engine.client.api.inspect_container(name)["State"]["Pid"], signal.SIGKILL)

    try:
        yield Backend(runtime, kill)
    finally:
        for instance in await runtime.list_owned():
            await runtime.remove(instance.name)
        await runtime.close()


def desired(
    plugin: str, controller_id: str, color: models.Color = models.Color.BLUE, **env: str
) -> base.InstanceSpec:
    spec = models.PluginSpec.model_validate(
        {
            "image": PLUGIN_IMAGE,
            "process": {"path": PLUGIN_DIR.name},
            "version": "1.2.3",
            "env": env,
            "resources": {"memory": "64Mi"},
        }
    )
    labels = {
        base.LABEL_PLUGIN: plugin,
        base.LABEL_COLOR: color.value,
        base.LABEL_VERSION: "1.2.3",
        base.LABEL_SPEC_HASH: base.instance_hash(spec),
    }
    return base.InstanceSpec(
        plugin=plugin, color=color, spec=spec, labels=labels, controller_id=controller_id
    )


def name(backend: Backend, plugin: str) -> str:
    return base.instance_name(plugin, models.Color.BLUE, None, backend.runtime.controller_id)


async def until_ready(runtime: base.Runtime, name: str, timeout: float = 20) -> base.Instance:
    async with asyncio.timeout(timeout):
        while True:
            instance = await runtime.inspect(name)
            if await runtime.ready(instance, 1.0):
                return instance
            await asyncio.sleep(0.05)


async def until_state(
    runtime: base.Runtime, name: str, state: base.InstanceState, timeout: float = 20
) -> base.Instance:
    async with asyncio.timeout(timeout):
        while (instance := await runtime.inspect(name)).state is not state:
            await asyncio.sleep(0.05)
    return instance


async def test_started_instance_is_listed_with_its_labels_and_becomes_ready(backend: Backend):
    runtime = backend.runtime
    want = desired("alpha", backend.runtime.controller_id)
    started = await runtime.start(want)
    assert started.name == name(backend, "alpha")
    [listed] = await runtime.list_owned()
    assert (listed.name, listed.plugin, listed.color) == (
        name(backend, "alpha"),
        "alpha",
        models.Color.BLUE,
    )
    assert listed.version == "1.2.3"
    assert listed.spec_hash == want.spec_hash
    assert listed.labels[base.LABEL_MANAGED_BY] == base.MANAGED_BY
    instance = await until_ready(runtime, name(backend, "alpha"))
    assert instance.state is base.InstanceState.RUNNING
    assert instance.started_at is not None
    lines = await runtime.logs(name(backend, "alpha"), 10)
    assert lines
    assert all(isinstance(line, str) for line in lines)


async def test_list_owned_filters_by_plugin(backend: Backend):
    await backend.runtime.start(desired("alpha", backend.runtime.controller_id))
    await backend.runtime.start(desired("beta", backend.runtime.controller_id))
    assert {i.plugin for i in await backend.runtime.list_owned()} == {"alpha", "beta"}
    assert [i.plugin for i in await backend.runtime.list_owned("beta")] == ["beta"]
    assert await backend.runtime.list_owned("gamma") == []


async def test_a_name_can_be_started_only_once(backend: Backend):
    await backend.runtime.start(desired("alpha", backend.runtime.controller_id))
    with pytest.raises(InstanceConflictError):
        await backend.runtime.start(desired("alpha", backend.runtime.controller_id))
    assert len(await backend.runtime.list_owned()) == 1


async def test_missing_instances(backend: Backend):
    with pytest.raises(InstanceNotFoundError):
        await backend.runtime.inspect(name(backend, "nothing"))
    with pytest.raises(InstanceNotFoundError):
        await backend.runtime.logs(name(backend, "nothing"), 5)
    await backend.runtime.stop(name(backend, "nothing"), 1)
    await backend.runtime.remove(name(backend, "nothing"))


async def test_a_killed_instance_reports_exit_code_137(backend: Backend):
    await backend.runtime.start(desired("alpha", backend.runtime.controller_id))
    await until_ready(backend.runtime, name(backend, "alpha"))
    backend.kill(name(backend, "alpha"))
    dead = await until_state(backend.runtime, name(backend, "alpha"), base.InstanceState.EXITED)
    assert dead.exit_code == 137
    assert not dead.oom_killed
    assert dead.finished_at is not None
    assert not await backend.runtime.ready(dead, 1.0)
    [listed] = await backend.runtime.list_owned()
    assert listed.state is base.InstanceState.EXITED
    assert listed.exit_code == 137


async def test_stop_then_remove(backend: Backend):
    await backend.runtime.start(desired("alpha", backend.runtime.controller_id))
    await until_ready(backend.runtime, name(backend, "alpha"))
    await backend.runtime.stop(name(backend, "alpha"), 5)
    stopped = await backend.runtime.inspect(name(backend, "alpha"))
    assert stopped.state is base.InstanceState.EXITED
    assert stopped.exit_code == 0, "the plugin exits cleanly on SIGTERM"
    await backend.runtime.remove(name(backend, "alpha"))
    assert await backend.runtime.list_owned() == []


async def test_events_name_the_plugin_whose_instance_changed(backend: Backend):
    runtime = backend.runtime
    seen: list[str] = []

    async def follow() -> None:
        async for key in runtime.events():
            seen.append(key)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # let the event stream connect
    await runtime.start(desired("alpha", backend.runtime.controller_id))
    await until_ready(runtime, name(backend, "alpha"))
    backend.kill(name(backend, "alpha"))
    async with asyncio.timeout(20):
        while seen.count("alpha") < 2:
            await asyncio.sleep(0.05)
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower


async def test_a_host_path_outside_the_root_is_refused_naming_the_field(backend: Backend):
    spec = desired("alpha", backend.runtime.controller_id).spec.model_copy(
        update={
            "volumes": [
                models.Volume.model_validate(
                    {"name": "etc", "mountPath": "/host", "hostPath": "/etc"}
                )
            ]
        }
    )
    want = base.InstanceSpec(
        "alpha", models.Color.BLUE, spec, desired("alpha", backend.runtime.controller_id).labels
    )
    [issue] = backend.runtime.validate(want)
    assert issue.path == "spec.volumes[0].hostPath"
    assert issue.value == "/etc"
    assert await backend.runtime.list_owned() == []


async def test_logs_with_timestamps_are_the_same_lines_each_with_when_it_was_read(
    backend: Backend,
):
    runtime = backend.runtime
    before = datetime.now(UTC) - timedelta(seconds=5)  # engines' clocks round
    await runtime.start(desired("alpha", runtime.controller_id))
    await until_ready(runtime, name(backend, "alpha"))
    plain = await runtime.logs(name(backend, "alpha"), 100)
    stamped = await runtime.logs(name(backend, "alpha"), 100, timestamps=True)
    assert plain
    assert [line.split(" ", 1)[1] if " " in line else "" for line in stamped] == plain
    for line in stamped:
        at = datetime.fromisoformat(line.split(" ", 1)[0][:26].rstrip("Z") + "+00:00")
        assert before <= at <= datetime.now(UTC)


async def test_remove_volumes_removes_the_named_volumes_once_no_instance_uses_them(
    backend: Backend,
):
    runtime = backend.runtime
    want = desired("alpha", runtime.controller_id)
    volumes = [models.Volume.model_validate({"name": "data", "mountPath": "/data"})]
    spec = want.spec.model_copy(update={"volumes": volumes})
    await runtime.start(
        base.InstanceSpec("alpha", want.color, spec, want.labels, None, want.controller_id)
    )
    await until_ready(runtime, name(backend, "alpha"))
    await runtime.remove(name(backend, "alpha"))
    volume = base.volume_name("alpha", "data", None, runtime.controller_id)
    assert await runtime.remove_volumes() == [volume]
    assert await runtime.remove_volumes() == []
