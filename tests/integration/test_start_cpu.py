"""Docker, Podman, processes: an instance starts with more CPU than its spec's, has the spec's
once ready; a spec's resources.startCpu overrides the controller's, "0" turns it off.

The limit is read where the kernel enforces it, the instance's cgroup, not
from the engine's inspection (Podman's keeps the value the container was
created with).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from controller import cgroups
from controller.runtimes import base, container, process
from controller.spec import models

from .conftest import PLUGIN_DIR, PLUGIN_IMAGE, EngineUnderTest, new_controller_id


def cpu_quota(pid: int) -> int:
    """The CFS quota, in microseconds per 100 ms period, of the cgroup that holds ``pid``."""
    paths = cgroups.cgroup_paths(pid) or {}
    if (cgroups.ROOT / "cgroup.controllers").exists():
        quota, period = (cgroups.ROOT / paths[""].lstrip("/") / "cpu.max").read_text().split()
    else:
        group = cgroups.ROOT / "cpu" / paths["cpu"].lstrip("/")
        quota = (group / "cpu.cfs_quota_us").read_text().strip()
        period = (group / "cpu.cfs_period_us").read_text().strip()
    assert period == "100000"
    return int(quota)


def want(ident: str, cpu: str, start_cpu: str | None = None) -> base.InstanceSpec:
    resources = {"cpu": cpu} if start_cpu is None else {"cpu": cpu, "startCpu": start_cpu}
    spec = models.PluginSpec.model_validate(
        {
            "image": PLUGIN_IMAGE,
            "version": "1.0.0",
            "resources": resources,
            "process": {"path": PLUGIN_DIR.name},
        }
    )
    labels = {
        base.LABEL_PLUGIN: "boosted",
        base.LABEL_COLOR: "blue",
        base.LABEL_VERSION: "1.0.0",
        base.LABEL_SPEC_HASH: base.instance_hash(spec),
    }
    return base.InstanceSpec("boosted", models.Color.BLUE, spec, labels, controller_id=ident)


async def until_ready(runtime: base.Runtime, instance: base.Instance) -> None:
    async with asyncio.timeout(60):
        while not await runtime.ready(instance, timeout=1):
            await asyncio.sleep(0.05)


async def start_and_read(
    engine: EngineUnderTest,
    cpu: str,
    start_cpu_millis: int,
    *,
    adopted: bool = False,
    spec_start_cpu: str | None = None,
) -> tuple[int, int]:
    """The instance's CPU quota just after its start and once ready. ``adopted``: the backend
    that started it is gone before it is ready, and a new one (a restarted controller's) sees
    it ready."""
    ident = new_controller_id()
    data = Path(tempfile.mkdtemp(prefix="bh-start-cpu-"))
    settings = container.Settings(
        engine=engine.kind, data_dir=data, controller_id=ident, start_cpu_millis=start_cpu_millis
    )
    runtime = container.ContainerRuntime(settings)
    try:
        instance = await runtime.start(want(ident, cpu, spec_start_cpu))
        pid = engine.client.api.inspect_container(instance.name)["State"]["Pid"]
        at_start = cpu_quota(pid)
        if adopted:
            await runtime.close()
            runtime = container.ContainerRuntime(settings)
            [instance] = await runtime.list_owned()
        await until_ready(runtime, instance)
        return at_start, cpu_quota(pid)
    finally:
        for owned in await runtime.list_owned():
            await runtime.remove(owned.name)
        await runtime.close()
        shutil.rmtree(data, ignore_errors=True)


async def test_instance_starts_with_more_cpu_and_has_the_specs_once_ready(
    engine: EngineUnderTest,
) -> None:
    assert await start_and_read(engine, "250m", 2000) == (200_000, 25_000)


async def test_an_instance_adopted_before_it_was_ready_gets_the_specs_cpu_once_ready(
    engine: EngineUnderTest,
) -> None:
    assert await start_and_read(engine, "250m", 2000, adopted=True) == (200_000, 25_000)


async def test_a_spec_at_or_above_the_start_cpu_is_never_changed(engine: EngineUnderTest) -> None:
    assert await start_and_read(engine, "1500m", 1000) == (150_000, 150_000)


async def test_no_start_cpu_starts_at_the_specs_limit(engine: EngineUnderTest) -> None:
    assert await start_and_read(engine, "250m", 0) == (25_000, 25_000)


async def test_the_specs_start_cpu_overrides_the_controllers(engine: EngineUnderTest) -> None:
    assert await start_and_read(engine, "250m", 2000, spec_start_cpu="1") == (100_000, 25_000)


async def test_a_spec_turns_the_boost_off(engine: EngineUnderTest) -> None:
    assert await start_and_read(engine, "250m", 2000, spec_start_cpu="0") == (25_000, 25_000)


async def test_a_process_starts_with_more_cpu_and_has_the_specs_once_ready() -> None:
    ident = new_controller_id()
    data = Path(tempfile.mkdtemp(prefix="bh-start-cpu-"))
    settings = process.Settings(
        data_dir=data, controller_id=ident, plugin_root=PLUGIN_DIR.parent, start_cpu_millis=2000
    )
    runtime = process.ProcessRuntime(settings)
    try:
        instance = await runtime.start(want(ident, "250m"))
        assert instance.pid is not None
        at_start = cpu_quota(instance.pid)
        assert base.start_cpu_of(instance) == "2"
        await until_ready(runtime, instance)
        assert (at_start, cpu_quota(instance.pid)) == (200_000, 25_000)
    finally:
        for owned in await runtime.list_owned():
            await runtime.remove(owned.name)
        await runtime.close()
        shutil.rmtree(data, ignore_errors=True)
