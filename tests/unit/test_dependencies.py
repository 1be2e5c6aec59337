"""The reconciler's gates on the in-memory runtime: dependency order, and specs naming bundles."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.protocol import memory as memory_protocol
from controller.reconcile.reconciler import Reconciler
from controller.registry import registry
from controller.runtimes.memory import MemoryRuntime
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.spec import conditions, models
from tests import bundles

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
spec:
{body}"""


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.specs = tmp_path / "specs"
        self.specs.mkdir()
        self.data = tmp_path / "data"
        self.store = Store(self.data / "state.db")
        self.source = DirectorySource(self.specs, self.store, lambda key: None)
        self.runtime = MemoryRuntime()
        self.plugins = memory_protocol.MemoryPlugins(self.runtime)
        self.registry = registry.Registry(registry.Settings(self.data), self.runtime)
        self.reconciler = Reconciler(self.source, self.runtime, self.plugins, bundles=self.registry)
        self.started: list[str] = []
        start = self.runtime.start

        async def recording_start(desired):
            self.started.append(desired.plugin)
            return await start(desired)

        self.runtime.start = recording_start  # type: ignore[method-assign]

    def write(self, name: str, body: str) -> None:
        (self.specs / f"{name}.yaml").write_text(SPEC.format(name=name, body=body))
        self.source.rescan()

    def ready(self, name: str) -> bool:
        status = self.store.status(name)
        return status is not None and conditions.is_true(status.conditions, "Ready")

    def ready_condition(self, name: str) -> models.Condition:
        status = self.store.status(name)
        assert status is not None
        found = conditions.find(status.conditions, "Ready")
        assert found is not None
        return found


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _plain(version: str = "1.0.0", depends: str = "") -> str:
    text = f"  image: blackhole/example-echo:0.1.0\n  version: {version}\n"
    return text + (f"  dependsOn: {depends}\n" if depends else "")


async def test_a_chain_starts_in_dependency_order_and_ready_follows_it(world: World) -> None:
    world.write("a", _plain(depends='[{name: b, version: "^1"}]'))
    world.write("b", _plain(depends="[{name: c}]"))
    world.write("c", _plain())
    # Passes in the worst order for it, as a queue might run them: A first.
    history: list[tuple[str, bool, bool, bool]] = []
    for _ in range(6):
        for key in ("a", "b", "c"):
            await world.reconciler.reconcile(key)
            history.append((key, world.ready("a"), world.ready("b"), world.ready("c")))
    assert world.started == ["c", "b", "a"]
    assert all(world.ready(n) for n in "abc")
    for _, a, b, c in history:
        assert not a or b, "A was Ready before B"
        assert not b or c, "B was Ready before C"
    waiting = world.store.events("a")[0]
    assert (waiting.reason, waiting.message) == ("DependencyNotReady", "waiting for b to be Ready")


async def test_a_plugin_is_not_ready_while_what_it_depends_on_is_not(world: World) -> None:
    world.write("a", _plain(depends="[{name: b}]"))
    world.write("b", _plain())
    for _ in range(4):
        for key in ("b", "a"):
            await world.reconciler.reconcile(key)
    assert world.ready("a")
    world.runtime.unready.add("bh-b-blue")
    for _ in range(4):  # b's failureThreshold is 3
        await world.reconciler.reconcile("b")
    await world.reconciler.reconcile("a")
    assert not world.ready("b")
    held = world.ready_condition("a")
    assert (held.status, held.reason) == ("False", "DependencyNotReady")
    assert "bh-a-blue" in world.runtime.instances, "a keeps running meanwhile"
    writes = world.runtime.writes()
    before = world.store.status("a")
    await world.reconciler.reconcile("a")
    assert world.store.status("a") == before, "an unchanged wait writes no new status"
    assert world.runtime.writes() == writes


async def test_a_dependency_cycle_starts_nothing_and_names_the_cycle(world: World) -> None:
    world.write("a", _plain(depends="[{name: b}]"))
    world.write("b", _plain(depends="[{name: c}]"))
    world.write("c", _plain(depends="[{name: a}]"))
    for key in ("a", "b", "c"):
        await world.reconciler.reconcile(key)
    assert world.started == []
    status = world.store.status("a")
    assert status is not None
    assert status.phase is models.Phase.FAILED
    ready = world.ready_condition("a")
    assert ready.reason == "DependencyCycle"
    assert "a -> b -> c -> a" in ready.message


async def test_an_unsatisfiable_range_or_a_missing_plugin_starts_nothing(world: World) -> None:
    world.write("a", _plain(depends='[{name: b, version: ">=2"}]'))
    world.write("b", _plain("1.4.0"))
    world.write("x", _plain(depends="[{name: nobody}]"))
    for key in ("b", "a", "x"):
        await world.reconciler.reconcile(key)
    assert world.started == ["b"]
    assert world.ready_condition("a").reason == "DependencyUnsatisfied"
    assert world.ready_condition("a").message == "b 1.4.0 is not in >=2"
    assert world.ready_condition("x").reason == "DependencyMissing"


async def test_a_spec_naming_an_installed_bundle_runs_it(world: World, tmp_path: Path) -> None:
    keys = bundles.Keys(tmp_path / "keys", trust=world.data / "registry" / "trusted")
    path = bundles.make_bundle(tmp_path / "work", "kv", "1.2.0", key=keys.private, stateVersion=1)
    await world.registry.install(str(path))
    world.write("kv", '  bundle: "kv@^1.2"\n')
    for _ in range(3):
        await world.reconciler.reconcile("kv")
    assert world.ready("kv")
    instance = world.runtime.instances["bh-kv-blue"]
    assert instance.version == "1.2.0"
    status = world.store.status("kv")
    assert status is not None
    assert status.active_version == "1.2.0"


async def test_a_spec_naming_a_refused_bundle_starts_nothing_and_says_why(
    world: World, tmp_path: Path
) -> None:
    keys = bundles.Keys(tmp_path / "keys", trust=world.data / "registry" / "trusted")
    path = bundles.make_bundle(tmp_path / "work", "kv", "1.2.0", key=keys.private)
    await world.registry.install(str(path))
    world.write("kv", '  bundle: "kv@^2"\n')
    await world.reconciler.reconcile("kv")
    assert world.started == []
    ready = world.ready_condition("kv")
    assert ready.reason == "BundleNotFound"
    assert "no installed version of kv is in ^2 (installed: 1.2.0)" in ready.message
    status = world.store.status("kv")
    assert status is not None
    assert status.phase is models.Phase.FAILED
    for key in (world.data / "registry" / "trusted").iterdir():
        key.unlink()
    world.write("kv", '  bundle: "kv@^1"\n')
    await world.reconciler.reconcile("kv")
    assert world.started == []
    assert world.ready_condition("kv").reason == "UntrustedKey"


async def test_a_broken_policy_file_starts_nothing_and_says_why(
    world: World, tmp_path: Path
) -> None:
    keys = bundles.Keys(tmp_path / "keys", trust=world.data / "registry" / "trusted")
    await world.registry.install(
        str(bundles.make_bundle(tmp_path / "work", "kv", "1.2.0", key=keys.private))
    )
    (world.data / "registry" / "policy.yaml").write_text("maxResources: {memory: lots}\n")
    world.write("kv", '  bundle: "kv"\n')
    await world.reconciler.reconcile("kv")
    assert world.started == []
    ready = world.ready_condition("kv")
    assert ready.reason == "RegistryError"
    assert "policy.yaml:1: maxResources.memory" in ready.message
