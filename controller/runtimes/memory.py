"""An in-memory runtime: the Runtime protocol with no engine behind it.

For tests of the reconciler that need no Docker, and as the third backend
of the contract suite, which runs the same assertions against it as against
Docker and Podman so that it cannot drift from them. Instances "run" until
:meth:`MemoryRuntime.crash` says they died; every call is counted in
:attr:`MemoryRuntime.calls`, so a test can check that a pass wrote nothing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import tarfile
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from controller.errors import InstanceConflictError, InstanceNotFoundError, SpecIssue
from controller.runtimes import base
from controller.spec import models
from controller.spec.keys import plugin_key

WRITES = frozenset(
    {"start", "stop", "remove", "release", "remove_volumes", "freeze", "thaw", "promote"}
)
"""The calls that change what runs."""


class MemoryRuntime:
    """Instances as records in a dict, owned by one controller id."""

    def __init__(self, controller_id: str = base.DEFAULT_CONTROLLER) -> None:
        self.name = "memory"
        self.controller_id = controller_id
        self.instances: dict[str, base.Instance] = {}
        self.output: dict[str, list[tuple[datetime, str]]] = collections.defaultdict(list)
        """Each instance's lines, with when each was written."""
        self.volumes: set[str] = set()
        """The named volumes instances were started with (kept until removed)."""
        self.calls: collections.Counter[str] = collections.Counter()
        self.routed: dict[str, models.Color] = {}
        """Where each plugin's stable address points (see :meth:`route`)."""
        self.images: dict[str, str] = {}
        """Image references (tags and ids) to the ids of the images loaded."""
        self.unready: set[str] = set()
        """Names of instances whose health check fails."""
        self._ids = itertools.count(1)
        self._events: asyncio.Queue[str | None] = asyncio.Queue()

    def capabilities(self) -> base.Capabilities:
        return base.Capabilities(
            networks=frozenset({models.NetworkMode.NONE}), volumes=True, host_paths=False
        )

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        return base.host_paths_refused(desired, "host paths are not allowed on the memory runtime")

    async def list_owned(self, plugin: str | None = None) -> list[base.Instance]:
        self.calls["list_owned"] += 1
        return [
            i
            for i in self.instances.values()
            if i.labels.get(base.LABEL_CONTROLLER) == self.controller_id
            and (plugin is None or i.plugin == plugin)
        ]

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        self.calls["start"] += 1
        base.refuse(self.validate(desired))
        if desired.name in self.instances:
            raise InstanceConflictError(f"memory: {desired.name} exists")
        labels = {**desired.labels, **base.owner_labels(self.controller_id)}
        instance = base.started_instance(desired, f"mem-{next(self._ids)}", labels)
        self.instances[desired.name] = instance
        self.volumes |= {
            base.volume_name(desired.plugin, v.name, desired.namespace, self.controller_id)
            for v in desired.spec.volumes
            if v.host_path is None
        }
        self.write(desired.name, f"{desired.plugin} {desired.spec.version} started")
        self._events.put_nowait(instance.key)
        return instance

    async def inspect(self, name: str) -> base.Instance:
        self.calls["inspect"] += 1
        try:
            return self.instances[name]
        except KeyError:
            raise InstanceNotFoundError(f"memory: no instance {name}") from None

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        self.calls["ready"] += 1
        current = self.instances.get(instance.name)
        return (
            current is not None
            and current.state is base.InstanceState.RUNNING
            and instance.name not in self.unready
        )

    def endpoint(self, instance: base.Instance) -> str:
        return f"memory:{instance.name}"

    def crash(self, name: str, exit_code: int = 137, *, oom: bool = False, line: str = "") -> None:
        """Make a running instance die, as a kill or an out-of-memory kill would."""
        instance = self.instances[name]
        if line:
            self.write(name, line)
        self.instances[name] = replace(
            instance,
            state=base.InstanceState.EXITED,
            exit_code=exit_code,
            oom_killed=oom,
            finished_at=datetime.now(UTC),
        )
        self._events.put_nowait(instance.key)

    def write(self, name: str, line: str) -> None:
        """A line of output of instance ``name``, written now."""
        self.output[name].append((datetime.now(UTC), line))

    def pause(self, name: str) -> None:
        """Freeze a running instance, as ``docker pause`` does: alive, answering nothing."""
        self.instances[name] = replace(self.instances[name], state=base.InstanceState.PAUSED)

    async def freeze(self, name: str) -> None:
        self.calls["freeze"] += 1
        self.pause(name)

    async def thaw(self, name: str) -> None:
        self.calls["thaw"] += 1
        self.instances[name] = replace(self.instances[name], state=base.InstanceState.RUNNING)

    async def promote(self, standby: str, name: str) -> base.Instance:
        self.calls["promote"] += 1
        if name in self.instances:
            raise InstanceConflictError(f"memory: {name} exists")
        thawed = self.instances.pop(standby)
        self.output[name] = self.output.pop(standby, [])
        self.instances[name] = replace(thawed, name=name)
        return self.instances[name]

    async def stop(self, name: str, timeout: float) -> None:
        self.calls["stop"] += 1
        alive = (base.InstanceState.RUNNING, base.InstanceState.PAUSED)
        if name in self.instances and self.instances[name].state in alive:
            self.crash(name, exit_code=0)  # thawed first, as the engines' backend does

    async def remove(self, name: str) -> None:
        self.calls["remove"] += 1
        self.instances.pop(name, None)
        self.output.pop(name, None)

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        self.calls["release"] += 1

    async def remove_volumes(self) -> list[str]:
        self.calls["remove_volumes"] += 1
        removed, self.volumes = sorted(self.volumes), set()
        return removed

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        self.calls["route"] += 1
        self.routed[plugin_key(plugin, namespace)] = color

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        self.calls["logs"] += 1
        if name not in self.instances:
            raise InstanceNotFoundError(f"memory: no instance {name}")
        lines = [
            f"{at.isoformat(timespec='microseconds').replace('+00:00', 'Z')} {line}"
            if timestamps
            else line
            for at, line in self.output[name]
        ]
        return lines[-tail:] if tail else []

    async def stats(self, name: str) -> base.Stats:
        self.calls["stats"] += 1
        if name not in self.instances:
            raise InstanceNotFoundError(f"memory: no instance {name}")
        return base.Stats(cpu_seconds=0.0, memory_bytes=0, memory_limit_bytes=0, pids=1)

    async def events(self) -> AsyncIterator[str]:
        while (key := await self._events.get()) is not None:
            yield key

    async def close(self) -> None:
        self._events.put_nowait(None)

    async def load_image(self, archive: Path) -> str:
        """Take a ``docker save`` archive's image by its tags and config digest, as engines do."""
        self.calls["load_image"] += 1
        with tarfile.open(archive) as saved:
            manifest = saved.extractfile("manifest.json")
            assert manifest is not None
            (entry,) = json.load(manifest)
            config = saved.extractfile(entry["Config"])
            assert config is not None
            digest = "sha256:" + hashlib.sha256(config.read()).hexdigest()
        for tag in entry.get("RepoTags") or []:
            self.images[tag] = digest
        self.images[digest] = digest
        return digest

    async def image_id(self, reference: str) -> str | None:
        return self.images.get(reference)

    async def remove_image(self, reference: str) -> None:
        self.calls["remove_image"] += 1
        digest = self.images.pop(reference, None)
        if digest is not None and digest not in self.images.values():
            self.images.pop(digest, None)

    def writes(self) -> int:
        """How many calls changed what runs."""
        return sum(self.calls[c] for c in WRITES)
