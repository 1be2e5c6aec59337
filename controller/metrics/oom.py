"""OOM kills seen as they happen, through the kernel's cgroup v1 OOM notification.

The engines do not all say that an instance was killed for memory (Podman 4
on cgroup v1 reports exit code 137 and ``OOMKilled: false``), and a reading
every few seconds misses a kill that takes milliseconds. So each tracked
instance's memory cgroup gets an eventfd registered on ``memory.oom_control``
(``cgroup.event_control``); the kernel signals it at the OOM, while the
cgroup still exists, and once more when the cgroup is removed. So a signal
while the cgroup exists, or two signals read at once after it is gone, is
taken as an OOM kill (the OOM killer is on for every instance, so an OOM
there kills); one signal after it is gone is only the instance ending.

On cgroup v2 there is no such notification: there the OOM kills are known
from the engine's report and from ``memory.events`` at each reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller import cgroups

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    pid: int
    eventfd: int
    control: int
    memory: Path


class OomWatch:
    """Calls ``on_oom(instance)`` when an instance's cgroup kills a process for memory."""

    def __init__(self, on_oom: Callable[[str], None], root: Path = cgroups.ROOT) -> None:
        self.on_oom = on_oom
        self.root = root
        self.supported = (root / "memory").is_dir() and not (root / "cgroup.controllers").exists()
        self._watches: dict[str, _Watch] = {}

    def watch(self, name: str, pid: int) -> None:
        """Watch instance ``name`` whose main process is ``pid``; a no-op when watched already."""
        current = self._watches.get(name)
        if current is not None and current.pid == pid:
            return
        self.unwatch(name)
        if not self.supported:
            return
        paths = cgroups.cgroup_paths(pid)
        if paths is None or "memory" not in paths:
            return
        memory = self.root / "memory" / paths["memory"].lstrip("/")
        try:
            eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as e:
            log.debug("no eventfd for %s: %s", name, e)
            return
        try:
            control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(eventfd)
            return
        try:
            (memory / "cgroup.event_control").write_text(f"{eventfd} {control}")
            asyncio.get_running_loop().add_reader(eventfd, self._fired, name)
        except (OSError, RuntimeError) as e:
            log.debug("cannot watch %s for OOM kills: %s", name, e)
            os.close(eventfd)
            os.close(control)
            return
        self._watches[name] = _Watch(pid, eventfd, control, memory)

    def unwatch(self, name: str) -> None:
        watch = self._watches.pop(name, None)
        if watch is None:
            return
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_reader(watch.eventfd)
        for fd in (watch.eventfd, watch.control):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for name in list(self._watches):
            self.unwatch(name)

    def _fired(self, name: str) -> None:
        """The kernel signals an OOM while the cgroup exists, and once more at its removal."""
        watch = self._watches.get(name)
        if watch is None:
            return
        try:
            signals = os.eventfd_read(watch.eventfd)
        except OSError:
            signals = 0
        if _kills(watch.memory) is not None or signals >= 2:
            self.on_oom(name)
        if _kills(watch.memory) is None:  # the cgroup is gone: the instance ended
            self.unwatch(name)


def _kills(memory: Path) -> int | None:
    """The cgroup's count of processes killed for memory; None when the cgroup is gone."""
    try:
        text = (memory / "memory.oom_control").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0
