"""The process runtime: plugins as supervised processes in cgroups and namespaces of their own.

No engine: this backend runs a plugin from a directory (``spec.process``:
the directory under the controller's plugin root, its entrypoint, and a
virtual environment or ``pythonPath``), through the launcher (:mod:`.launcher`
and :mod:`.shim`), a fork server with the SDK already imported that it starts
once; on cgroup v1 it keeps one spare plugin process already moved into a
spare cgroup (``.spare-<pid>``, beside the instances' groups), which a start
renames to the instance's and limits (spares found with no launcher running
are orphans, removed). Each instance gets what a container would: a cgroup of its own
(:mod:`.cgroups`; v1 or v2: memory with no swap beyond it, CPU quota, pids),
new mount, PID, IPC, UTS and network namespaces (loopback only, ``network:
none``), a read-only root with a private ``/tmp``, an unprivileged uid with no
capabilities, a seccomp filter modelled on Docker's default profile
(:mod:`.seccomp`), and its socket directory ``DATA_DIR/instances/<name>`` at
``/run/blackhole``. What it is asked to run is checked by :mod:`.validation`;
what runs is known from files (:mod:`.records`), so that a restarted
controller adopts it. Exits and sockets appearing are seen through inotify.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller import cgroups as cgroupfs
from controller import inotify as linux_inotify
from controller.errors import (
    EngineUnavailableError,
    InstanceConflictError,
    InstanceNotFoundError,
    RuntimeBackendError,
    SpecIssue,
)
from controller.runtimes import base, inotify
from controller.runtimes.process import cgroups, launcher, records, seccomp, validation
from controller.spec import models

log = logging.getLogger(__name__)

NAME = "process"
TMP_BYTES = 64 << 20
"""Size of each instance's private /tmp."""
STOP_POLL = 0.02


@dataclass(frozen=True)
class Settings:
    """Where the backend keeps instance files and where it finds plugins."""

    data_dir: Path
    controller_id: str = base.DEFAULT_CONTROLLER
    plugin_root: Path | None = None
    """Plugin directories (``spec.process.path``) lie under it; default ``data_dir/plugins``."""
    host_path_root: Path | None = None
    """Host paths of volumes must lie under it; None refuses host paths."""
    user: str = base.DEFAULT_USER
    """uid:gid the plugins run as; never root."""
    tmp_bytes: int = TMP_BYTES
    python: str = sys.executable
    """The interpreter of the launcher, and of plugins without a virtual environment."""
    cgroup_root: Path = cgroupfs.ROOT
    start_cpu_millis: int = base.START_CPU_MILLIS
    """CPU (millicores) of an instance until its socket accepts, where its spec allows less."""

    @property
    def plugins(self) -> Path:
        return self.plugin_root or self.data_dir / "plugins"


@dataclass(frozen=True)
class HostInfo:
    """What ``bhctl engines`` says of the process runtime."""

    kernel: str
    cgroup_version: int
    warm: bool


def describe(settings: Settings | None = None) -> HostInfo:
    """Check that this host can run plugins as processes; raises :class:`EngineUnavailableError`."""
    settings = settings or Settings(data_dir=Path("/nonexistent"))
    if os.geteuid() != 0:
        raise EngineUnavailableError(
            f"{NAME}: the process runtime needs root (to create cgroups and namespaces and "
            "to switch plugins to an unprivileged user); run the controller as root"
        )
    groups = cgroups.Cgroups(settings.cgroup_root)
    if not groups.dirs("x"):
        raise EngineUnavailableError(f"{NAME}: no cgroup hierarchy at {settings.cgroup_root}")
    if not os.access(settings.python, os.X_OK):
        raise EngineUnavailableError(f"{NAME}: no Python at {settings.python}")
    try:
        seccomp.compiled()
    except RuntimeBackendError as e:
        raise EngineUnavailableError(str(e)) from e
    try:
        import blackhole_sdk  # noqa: F401 - only whether it is there

        warm = True
    except ImportError:
        warm = False
    return HostInfo(f"Linux {platform.release()}", groups.version, warm)


class ProcessRuntime:
    """The Runtime protocol with plain processes: cgroups, namespaces, an unprivileged user."""

    def __init__(self, settings: Settings) -> None:
        base.user_ids(settings.user)  # never root
        self.settings = settings
        self.name = NAME
        self.controller_id = settings.controller_id
        self.cgroups = cgroups.Cgroups(settings.cgroup_root)
        self._owner = base.owner_labels(settings.controller_id)
        self._launcher: launcher.Launcher | None = None
        self._starting_launcher = asyncio.Lock()
        self._queue: asyncio.Queue[str] | None = None
        self._sockets = inotify.SocketWatch()
        self._keys: dict[str, str] = {}
        """Instance name to its plugin's key, for the instances seen by this backend."""
        self._settled: set[str] = set()
        """Instances started with more CPU than their spec's that have their spec's now."""

    # Paths.

    @property
    def processes(self) -> Path:
        return self.settings.data_dir / "processes"

    def socket_dir(self, name: str) -> Path:
        return self.settings.data_dir / "instances" / name

    def _file(self, name: str, suffix: str) -> Path:
        return self.processes / f"{name}.{suffix}"

    def _group(self, name: str) -> str:
        return f"{self._parent}/{name}"

    def plugin_dir(self, source: models.ProcessSource) -> Path:
        """The plugin's directory on this host (not yet checked to be under the root)."""
        return self.settings.plugins / source.path

    # What it can run.

    def capabilities(self) -> base.Capabilities:
        return base.Capabilities(
            networks=frozenset({models.NetworkMode.NONE}),
            volumes=True,
            host_paths=self.settings.host_path_root is not None,
        )

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        return validation.check(desired.spec, self.settings.plugins, self.settings.host_path_root)

    # What runs.

    async def list_owned(self, plugin: str | None = None) -> list[base.Instance]:
        found = []
        names = sorted(p.name[: -len(".json")] for p in self.processes.glob("*.json"))
        for name in names:
            try:
                instance = await self.inspect(name)
            except InstanceNotFoundError:
                continue
            labels = instance.labels
            if any(labels.get(k) != v for k, v in self._owner.items()):
                continue
            if plugin is None or instance.plugin == plugin:
                found.append(instance)
        return found

    async def inspect(self, name: str) -> base.Instance:
        instance = await records.read(name, self._file(name, "json"), self._file(name, "exit"))
        if instance is None:
            raise InstanceNotFoundError(f"{NAME}: no instance {name}")
        self._keys[name] = base.key_of(instance.labels)
        return instance

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        base.refuse(self.validate(desired))
        name = desired.name
        if self._file(name, "json").exists():
            raise InstanceConflictError(f"{NAME}: {name} exists; remove it first")
        running = await self._ensure_launcher()
        labels = {**desired.labels, **self._owner}
        boost = base.start_cpu_millis(desired.spec, self.settings.start_cpu_millis)
        if boost is not None:
            labels[base.LABEL_START_CPU] = str(boost)
            labels[base.LABEL_QUOTA_WHEN_READY] = str(
                cgroupfs.cpu_quota(desired.spec.resources.cpu.as_millis())
            )
        key = base.key_of(labels)
        self._keys[name] = key
        self._settled.discard(name)  # a new instance of that name, not yet lowered
        request = await asyncio.to_thread(self._prepare, desired, labels, running)
        self._sockets.add(self.socket_dir(name), key)
        try:
            reply = await running.launch(request)
        except BaseException:
            await asyncio.to_thread(self._clean, name)
            raise
        if self._queue is not None:
            self._queue.put_nowait(key)
        pid = int(reply["pid"])
        log.debug("%s started as pid %s%s", name, pid, " (a spare)" if reply.get("spare") else "")
        return base.started_instance(desired, f"{pid}.{reply['starttime']}", labels, pid=pid)

    def _prepare(
        self, desired: base.InstanceSpec, labels: dict[str, str], running: launcher.Launcher
    ) -> dict[str, Any]:
        """Directories, cgroup and the launch request of ``desired`` (blocking: in a thread)."""
        name, spec = desired.name, desired.spec
        assert spec.process is not None
        uid, gid = base.user_ids(self.settings.user)
        self.processes.mkdir(parents=True, exist_ok=True)
        root = self.settings.data_dir / "process-root"
        root.mkdir(mode=0o755, exist_ok=True)
        socket_dir = self.socket_dir(name)
        base.prepare_socket_dir(socket_dir, self.settings.user)
        self._file(name, "exit").unlink(missing_ok=True)
        start_cpu = int(labels[base.LABEL_START_CPU]) if base.LABEL_START_CPU in labels else None
        limits: list[cgroups.Write] = []
        if self.cgroups.unified:  # made here; the launcher's spares are v1's (see .shim)
            group = self.cgroups.create(self._group(name), spec.resources, start_cpu)
        else:  # made by the launcher: its spare's groups renamed, these limits written
            planned = self.cgroups.plan(self._group(name), spec.resources, start_cpu)
            group, limits = planned.group, planned.writes
        directory = self.plugin_dir(spec.process).resolve()
        entrypoint = str(directory / spec.process.entrypoint)
        python_path = [str((directory / p).resolve()) for p in spec.process.python_path]
        warm = spec.process.virtualenv is None and running.warm
        binds = [*validation.SYSTEM_DIRS, str(directory), *python_path]
        if spec.process.virtualenv is None:
            python = self.settings.python
            binds += running.paths
        else:
            venv = (directory / spec.process.virtualenv).resolve()
            python = str(venv / "bin" / "python")
            binds += _virtualenv_paths(venv)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            **spec.env,
            **base.plugin_environment(desired),
        }
        if python_path and not warm:
            env["PYTHONPATH"] = os.pathsep.join(python_path)
        volumes = []
        for volume in spec.volumes:
            if volume.host_path is not None:
                source = base.host_path_source(volume)
            else:
                source = self._volume_dir(desired, volume.name)
            volumes.append([str(source), volume.mount_path, volume.read_only])
        return {
            "name": name,
            "warm": warm,
            "argv": [python, entrypoint],
            "entrypoint": entrypoint,
            "python_path": python_path,
            "env": env,
            "cwd": str(directory),
            "uid": uid,
            "gid": gid,
            "cgroups": [str(d) for d in group.dirs],
            "limits": [[str(w.path), w.value, w.optional] for w in limits],
            "oom_file": str(group.oom_file) if group.oom_file else None,
            "binds": sorted({b for b in binds if b != "/"}),
            "root": str(root),
            "socket_dir": str(socket_dir),
            "volumes": volumes,
            "tmp_bytes": self.settings.tmp_bytes,
            "network": spec.permissions.network is models.NetworkMode.NONE,
            "log": str(self._file(name, "log")),
            "state": str(self._file(name, "json")),
            "exit": str(self._file(name, "exit")),
            "record": {"labels": labels},
            "seccomp": base64.b64encode(seccomp.compiled()).decode(),
        }

    def _volume_dir(self, desired: base.InstanceSpec, volume: str) -> Path:
        """A named volume: a directory of the controller's, handed to the plugin's user once."""
        name = base.volume_name(desired.plugin, volume, desired.namespace, desired.controller_id)
        path = self.settings.data_dir / "volumes" / name
        if not path.is_dir():
            base.hand_over(path, self.settings.user)
        return path

    async def _ensure_launcher(self) -> launcher.Launcher:
        async with self._starting_launcher:
            if self._launcher is None or not self._launcher.running:
                if self._launcher is not None:
                    await self._launcher.close()  # its waiting copy then discards its spare
                await asyncio.to_thread(self._remove_spares)  # left by a launcher gone
                parents = [] if self.cgroups.unified else self.cgroups.spare_parents(self._parent)
                self._launcher = await launcher.start(self.settings.python, parents, cgroups.SPARE)
            return self._launcher

    @property
    def _parent(self) -> str:
        """The group under which this controller's instances' groups and spares lie."""
        return f"blackhole/{self.controller_id}"

    def _remove_spares(self) -> None:
        """Kill the processes of spare groups found and remove those groups (no launcher of
        this backend's runs: a spare found is an orphan, e.g. of a controller killed)."""
        for group in self.cgroups.spares(self._parent):
            log.info("removing the orphaned spare cgroup %s", group)
            self.cgroups.kill(group)
            self.cgroups.remove(group)

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        if instance.state is not base.InstanceState.RUNNING:
            return False
        path = self.socket_dir(instance.name) / base.SOCKET_NAME
        if not await base.probe_socket(path, timeout):
            return False
        quota = instance.labels.get(base.LABEL_QUOTA_WHEN_READY)
        if quota is not None and instance.name not in self._settled:
            await asyncio.to_thread(
                self.cgroups.set_cpu_quota, self._group(instance.name), int(quota)
            )
            self._settled.add(instance.name)
        return True

    def endpoint(self, instance: base.Instance) -> str:
        return f"unix:{self.socket_dir(instance.name) / base.SOCKET_NAME}"

    async def stop(self, name: str, timeout: float) -> None:
        try:
            instance = await self.inspect(name)
        except InstanceNotFoundError:
            return
        if instance.state is not base.InstanceState.RUNNING or instance.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(instance.pid, signal.SIGTERM)
        if await self._until_exited(name, timeout):
            return
        await asyncio.to_thread(self.cgroups.kill, self._group(name))
        await self._until_exited(name, 10.0)

    async def _until_exited(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                instance = await self.inspect(name)
            except InstanceNotFoundError:
                return True
            if instance.state is not base.InstanceState.RUNNING:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(STOP_POLL)

    async def remove(self, name: str) -> None:
        try:
            instance = await self.inspect(name)
        except InstanceNotFoundError:
            instance = None
        if instance is not None and instance.state is base.InstanceState.RUNNING:
            if instance.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(instance.pid, signal.SIGKILL)
            await asyncio.to_thread(self.cgroups.kill, self._group(name))
            await self._until_exited(name, 10.0)
        await asyncio.to_thread(self._clean, name)
        self._keys.pop(name, None)
        self._settled.discard(name)

    def _clean(self, name: str) -> None:
        group = self._group(name)
        self.cgroups.kill(group)
        self.cgroups.remove(group)
        for suffix in records.SUFFIXES:
            self._file(name, suffix).unlink(missing_ok=True)
        shutil.rmtree(self.socket_dir(name), ignore_errors=True)

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        """Nothing is shared between a plugin's instances but its volumes, which are kept."""

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        """Nothing to move: processes are reached only through the gateway."""

    async def remove_volumes(self) -> list[str]:
        """The named volumes' directories under the data directory (the controller's own)."""

        def remove() -> list[str]:
            root = self.settings.data_dir / "volumes"
            found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            for path in found:
                shutil.rmtree(path)
            return [p.name for p in found]

        return await asyncio.to_thread(remove)

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        if not self._file(name, "json").exists():
            raise InstanceNotFoundError(f"{NAME}: no instance {name}")
        text = await asyncio.to_thread(records.tail, self._file(name, "log"))
        return records.log_lines(text, timestamps)[-tail:] if tail else []

    async def stats(self, name: str) -> base.Stats:
        if not self._file(name, "json").exists():
            raise InstanceNotFoundError(f"{NAME}: no instance {name}")
        return await asyncio.to_thread(self.cgroups.stats, self._group(name))

    async def events(self) -> AsyncIterator[str]:
        self.processes.mkdir(parents=True, exist_ok=True)
        queue: asyncio.Queue[str] = asyncio.Queue()
        notify = self._sockets.open()
        exits = notify.add(self.processes, linux_inotify.IN_MOVED_TO)
        loop = asyncio.get_running_loop()
        loop.add_reader(notify.fd, self._notified, notify, exits, queue)
        self._queue = queue
        warming = asyncio.create_task(self._warm_up(), name="process-launcher")
        try:
            while True:
                yield await queue.get()
        finally:
            warming.cancel()
            loop.remove_reader(notify.fd)
            self._sockets.close()
            self._queue = None

    async def _warm_up(self) -> None:
        """Start the launcher now, so that the first plugin does not wait for its imports."""
        try:
            await self._ensure_launcher()
        except EngineUnavailableError as e:
            log.warning("%s", e)

    def _notified(
        self, notify: linux_inotify.Inotify, exits: int, queue: asyncio.Queue[str]
    ) -> None:
        for wd, mask, filename in notify.read():
            if (key := self._sockets.appeared(wd, mask, filename)) is not None:
                queue.put_nowait(key)
            elif wd == exits and filename.endswith(".exit"):
                name = filename.removesuffix(".exit")
                key = self._keys.get(name)
                if key is None:
                    record = records.load(self._file(name, "json")) or {}
                    key = base.key_of(record.get("labels") or {})
                if key:
                    queue.put_nowait(key)

    async def close(self) -> None:
        """Stop the launcher; its spare is discarded with it (here, if it is not by then)."""
        running, self._launcher = self._launcher, None
        if running is not None:
            await running.close()
            await asyncio.to_thread(self._remove_spares)


def _virtualenv_paths(venv: Path) -> list[str]:
    """The virtual environment and the installation of Python it was made from."""
    paths = [str(venv)]
    try:
        config = (venv / "pyvenv.cfg").read_text()
    except OSError:
        config = ""
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            paths.append(str(Path(value.strip()).resolve().parent))
    paths.append(str((venv / "bin" / "python").resolve().parent.parent))
    return paths
