"""What must hold before a plugin starts, and before it counts as Ready.

Two gates, each a small function the reconciler calls once per pass:

- a spec naming ``bundle: NAME@RANGE`` is resolved by the registry
  (:meth:`controller.registry.Registry.resolve`) into the image, version,
  state version and dependencies of the highest installed version in range,
  or refused with the registry's reason; nothing starts for a refused spec;
- a plugin whose ``dependsOn`` names plugins that are missing, of a version
  outside the range, part of a cycle, or not Ready, is not started (so
  plugins start in dependency order), and one already running is not Ready
  until they are.

Neighbours: :mod:`controller.reconcile.reconciler` calls these;
:mod:`controller.registry.dependencies` finds cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from controller.errors import BundleRefusedError, RegistryError
from controller.registry import dependencies
from controller.sources import base as sources_base
from controller.spec import conditions, models
from controller.spec.keys import plugin_key, split_key
from controller.spec.semver import Version, VersionError

WAIT_SECONDS = 1.0
"""How soon a plugin waiting for its dependencies looks again."""
BROKEN_SECONDS = 10.0
"""How soon a plugin with a dependency cycle, a missing dependency or a refused bundle looks
again: another plugin's spec, or an install, may fix it."""


class Bundles(Protocol):
    """The registry, as the reconciler uses it."""

    async def resolve(self, spec: models.PluginSpec) -> models.PluginSpec: ...


class Source(Protocol):
    def get(self, key: str) -> sources_base.Desired | None: ...

    async def read_status(self, key: str) -> models.PluginStatus | None: ...


@dataclass(frozen=True)
class Blocked:
    """Why a plugin may not start or be Ready yet."""

    reason: str
    """BundleNotFound and the registry's other reasons, DependencyCycle, DependencyMissing,
    DependencyUnsatisfied or DependencyNotReady."""
    message: str
    retry: float
    broken: bool
    """Whether it needs a change to be fixed (Failed), rather than time (Pending)."""


async def resolve_bundle(
    bundles: Bundles | None, spec: models.PluginSpec
) -> tuple[models.PluginSpec, Blocked | None]:
    """The spec with what its bundle supplies, or why the bundle is refused."""
    if spec.bundle is None:
        return spec, None
    if bundles is None:
        return spec, Blocked(
            "RegistryUnavailable",
            f"spec.bundle: {spec.bundle} names a bundle, but this controller has no registry",
            BROKEN_SECONDS,
            broken=True,
        )
    try:
        return await bundles.resolve(spec), None
    except BundleRefusedError as e:
        return spec, Blocked(e.reason, f"bundle {spec.bundle} refused: {e}", BROKEN_SECONDS, True)
    except RegistryError as e:  # e.g. an unreadable policy file: nothing runs until it is fixed
        return spec, Blocked("RegistryError", f"bundle {spec.bundle}: {e}", BROKEN_SECONDS, True)


async def waiting_for(source: Source, key: str, spec: models.PluginSpec) -> Blocked | None:
    """Why ``spec``'s dependencies keep it from starting or being Ready; None when they don't."""
    if not spec.depends_on:
        return None
    namespace, _ = split_key(key)
    graph: dict[str, list[str]] = {key: [plugin_key(d.name, namespace) for d in spec.depends_on]}
    pending = list(graph[key])
    while pending:
        node = pending.pop()
        if node in graph:
            continue
        desired = source.get(node)
        graph[node] = (
            [plugin_key(d.name, namespace) for d in desired.plugin.spec.depends_on]
            if desired
            else []
        )
        pending += graph[node]
    cycle = dependencies.find_cycle(graph, key)
    if cycle is not None:
        return Blocked(
            "DependencyCycle",
            f"dependency cycle: {' -> '.join(cycle)}; none of them can start first",
            BROKEN_SECONDS,
            broken=True,
        )
    missing, unsatisfied, unready = [], [], []
    for dependency in spec.depends_on:
        other = plugin_key(dependency.name, namespace)
        desired = source.get(other)
        if desired is None:
            missing.append(dependency.name)
            continue
        status = await source.read_status(other)
        ready = status is not None and conditions.is_true(status.conditions, conditions.READY)
        running = status.active_version if ready and status is not None else None
        declared = desired.plugin.spec.version
        try:
            version = Version.parse(running) if running else declared
        except VersionError:
            version = declared
        if version is not None and not dependency.version.matches(version):
            unsatisfied.append(f"{dependency.name} {version} is not in {dependency.version}")
        elif not ready:
            unready.append(dependency.name)
    if missing:
        return Blocked(
            "DependencyMissing",
            f"depends on {', '.join(missing)}, which no spec declares",
            BROKEN_SECONDS,
            broken=True,
        )
    if unsatisfied:
        return Blocked("DependencyUnsatisfied", "; ".join(unsatisfied), BROKEN_SECONDS, True)
    if unready:
        return Blocked(
            "DependencyNotReady",
            f"waiting for {', '.join(unready)} to be Ready",
            WAIT_SECONDS,
            broken=False,
        )
    return None
