"""Instances' cgroups: created with the spec's limits, emptied, removed, read.

v1: one directory per hierarchy (``memory``, ``cpu``, ``cpuacct``, ``pids``,
``blkio``) at ``<root>/<controller>/<group>``, as the metrics reader finds
them from ``/proc/<pid>/cgroup``; v2: ``<root>/<group>`` in the unified
hierarchy, the controllers enabled in each parent's ``cgroup.subtree_control``.
The files themselves are read and written through :mod:`controller.cgroups`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from controller import cgroups
from controller.runtimes import base
from controller.spec import models

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
"""The cgroup v1 hierarchies an instance joins (limits, and the readings of the metrics)."""
V2_CONTROLLERS = ("memory", "cpu", "pids", "io")
SPARE = ".spare-"
"""The start of a spare group's name (``.spare-<pid>``): the launcher's spare plugin process
waits there, limits unset, until a start renames the group to the instance's (v1 only; no
instance's name starts with a dot)."""


@dataclass(frozen=True)
class Group:
    """An instance's cgroup: the directories to join, and where OOM kills are counted."""

    dirs: tuple[Path, ...]
    oom_file: Path | None


@dataclass(frozen=True)
class Write:
    """One limit: ``value`` into the cgroup file ``path``; ``optional``: it may fail."""

    path: Path
    value: int
    optional: bool = False


@dataclass(frozen=True)
class Plan:
    """A v1 group's directories and the writes of its limits, in order."""

    group: Group
    writes: list[Write]


def apply(writes: list[Write]) -> None:
    """Write the limits, in order."""
    for write in writes:
        try:
            cgroups.write(write.path, write.value)
        except OSError:
            if not write.optional:
                raise


class Cgroups:
    """Creates, limits, empties and removes instances' cgroups, on cgroup v1 or v2."""

    def __init__(self, root: Path = cgroups.ROOT) -> None:
        self.root = root
        self.unified = cgroups.is_unified(root)
        self._reader = cgroups.Cgroups(root)

    @property
    def version(self) -> int:
        return 2 if self.unified else 1

    def dirs(self, group: str) -> dict[str, Path]:
        """The group's directory in each hierarchy (controller name to directory)."""
        if self.unified:
            return {"": self.root / group}
        return {c: self.root / c / group for c in V1_CONTROLLERS if (self.root / c).is_dir()}

    def create(
        self, group: str, resources: models.Resources, start_cpu_millis: int | None = None
    ) -> Group:
        """Make the group with ``resources``' limits; its CPU ``start_cpu_millis`` instead of
        the spec's when that is more (the start-up boost, see :meth:`set_cpu_quota`)."""
        if self.unified:
            memory = resources.memory.as_int()
            quota = cgroups.cpu_quota(max(resources.cpu.as_millis(), start_cpu_millis or 0))
            return self._create_v2(group, memory, quota, resources.pids)
        planned = self.plan(group, resources, start_cpu_millis)
        for directory in planned.group.dirs:
            directory.mkdir(parents=True, exist_ok=True)
        apply(planned.writes)
        return planned.group

    def plan(
        self, group: str, resources: models.Resources, start_cpu_millis: int | None = None
    ) -> Plan:
        """v1: the group's directories and the writes of its limits, in order, made by
        :meth:`create` or by the launcher onto a spare group it renames (:data:`SPARE`)."""
        memory = resources.memory.as_int()
        quota = cgroups.cpu_quota(max(resources.cpu.as_millis(), start_cpu_millis or 0))
        made: list[Path] = []
        writes: list[Write] = []
        for controller, directory in self.dirs(group).items():
            if directory.resolve() not in made:
                made.append(directory.resolve())
            if controller == "memory":
                swap = directory / "memory.memsw.limit_in_bytes"
                # Only with swap accounting, which the hierarchy's root tells.
                accounted = (self.root / controller / swap.name).exists()
                if accounted:  # lowering: swap first (may fail); raising: after
                    writes.append(Write(swap, memory, optional=True))
                writes.append(Write(directory / "memory.limit_in_bytes", memory))
                if accounted:
                    writes.append(Write(swap, memory))
            elif controller == "cpu":
                writes.append(Write(directory / "cpu.cfs_period_us", cgroups.CPU_PERIOD_US))
                writes.append(Write(directory / "cpu.cfs_quota_us", quota))
            elif controller == "pids":
                writes.append(Write(directory / "pids.max", resources.pids))
        oom = self.dirs(group).get("memory")
        return Plan(Group(tuple(made), oom / "memory.oom_control" if oom else None), writes)

    def spare_parents(self, parent: str) -> list[Path]:
        """v1: the directories (one per hierarchy, in :meth:`plan`'s order) under which the
        launcher keeps its spare group, beside the instances' groups of ``parent``."""
        seen: list[Path] = []
        for directory in self.dirs(parent).values():
            if directory.resolve() not in seen:
                seen.append(directory.resolve())
        return seen

    def spares(self, parent: str) -> list[str]:
        """The spare groups (:data:`SPARE`) under ``parent``, in any hierarchy, as groups."""
        found: set[str] = set()
        for directory in self.dirs(parent).values():
            with contextlib.suppress(OSError):
                found.update(p.name for p in directory.iterdir() if p.name.startswith(SPARE))
        return sorted(f"{parent}/{name}" for name in found)

    def _create_v2(self, group: str, memory: int, quota: int, pids: int) -> Group:
        available = set(cgroups.text(self.root / "cgroup.controllers").split())
        wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in available)
        parent = self.root
        for part in Path(group).parts:
            if wanted:
                with contextlib.suppress(OSError):  # enabled already, or not delegated here
                    cgroups.write(parent / "cgroup.subtree_control", wanted)
            parent = parent / part
            parent.mkdir(exist_ok=True)
        directory = self.root / group
        limits: dict[str, object] = {}
        if "memory" in available:  # the whole group is killed at an OOM, as a container is
            limits |= {"memory.max": memory, "memory.oom.group": 1}
            if (directory / "memory.swap.max").exists():  # only with swap accounting
                limits["memory.swap.max"] = 0
        if "cpu" in available:
            limits["cpu.max"] = f"{quota} {cgroups.CPU_PERIOD_US}"
        if "pids" in available:
            limits["pids.max"] = pids
        for name, value in limits.items():
            cgroups.write(directory / name, value)
        return Group((directory,), directory / "memory.events")

    def set_cpu_quota(self, group: str, quota: int) -> None:
        """Give the group ``quota`` microseconds of CPU per CFS period (its spec's, after a
        start-up boost)."""
        directory = self.dirs(group).get("" if self.unified else "cpu")
        if directory is None:
            return
        if self.unified:
            if (directory / "cpu.max").exists():  # the cpu controller is enabled there
                cgroups.write(directory / "cpu.max", f"{quota} {cgroups.CPU_PERIOD_US}")
        else:
            cgroups.write(directory / "cpu.cfs_quota_us", quota)

    def procs(self, group: str) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs(group).values():
            found.update(int(p) for p in cgroups.text(directory / "cgroup.procs").split())
        return found

    def kill(self, group: str) -> None:
        """SIGKILL every process in the group."""
        dirs = self.dirs(group)
        if self.unified and (dirs[""] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                cgroups.write(dirs[""] / "cgroup.kill", 1)
                return
        for pid in self.procs(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, group: str) -> None:
        """Remove the group's directories (empty them first with :meth:`kill`)."""
        for directory in self.dirs(group).values():
            for _ in range(100):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.01)  # the last process is still being torn down
            with contextlib.suppress(OSError):
                directory.parent.rmdir()  # the controller's level, once empty

    def stats(self, group: str) -> base.Stats:
        """The group's resource use, read as the metrics read it."""
        paths = {"": f"/{group}"} if self.unified else dict.fromkeys(V1_CONTROLLERS, f"/{group}")
        reading = self._reader.read_group(paths)
        return base.Stats(
            cpu_seconds=reading.cpu_seconds,
            memory_bytes=reading.memory_usage_bytes,
            memory_limit_bytes=reading.memory_limit_bytes,
            pids=reading.pids,
        )
