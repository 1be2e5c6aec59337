"""The process runtime: plugins as supervised processes in cgroups and namespaces of their own.

No engine: this backend runs a plugin from a directory (``spec.process``:
the directory under the controller's plugin root, its entrypoint, and a
virtual environment or ``pythonPath``), through :mod:`launcher`, a fork
server with the SDK already imported that it starts once. Each instance
gets what a container would: a cgroup of its own (v1 or v2: memory with no
swap beyond it, CPU quota, pids), new mount, PID, IPC, UTS and network
namespaces (loopback only, ``network: none``), a read-only root with a
private ``/tmp``, an unprivileged uid with no capabilities, a seccomp filter
modelled on Docker's default profile (:mod:`process_seccomp`), and its socket
directory ``DATA_DIR/instances/<name>`` at ``/run/blackhole``.

What runs is known from files, so that a restarted controller adopts it:
``DATA_DIR/processes/<name>.json`` (labels, pid and the pid's start time,
written by the instance's shim, checked against ``/proc``), ``<name>.exit``
(exit code, whether the cgroup's OOM killer fired) and ``<name>.log`` (the
plugin's output: at most 8 MiB, the part before in ``<name>.log.1``). Exits
and sockets appearing are seen through inotify.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import platform
import shutil
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.errors import (
    EngineUnavailableError,
    InstanceConflictError,
    InstanceNotFoundError,
    RuntimeBackendError,
    SpecError,
    SpecIssue,
)
from controller.runtimes import base, process_seccomp
from controller.spec import models
from controller.spec.keys import plugin_key

log = logging.getLogger(__name__)

NAME = "process"
CPU_PERIOD_US = 100_000
"""The CFS period the CPU quota is expressed in (the kernel's default, 100 ms)."""
DEFAULT_USER = "65532:65532"
"""The unprivileged uid:gid plugins run as, the same as in containers."""
TMP_BYTES = 64 << 20
"""Size of each instance's private /tmp."""
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
"""Host directories every instance sees, read-only; with its code and interpreter, all it sees."""
PRIVATE_DIRS = ("/proc", "/dev", "/run", "/tmp")
"""Directories each instance gets its own of; what lies below them on the host is bound over."""
RESERVED_MOUNTS = (*PRIVATE_DIRS, *SYSTEM_DIRS)
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
"""The cgroup v1 hierarchies an instance joins (limits, and the readings of the metrics)."""
V2_CONTROLLERS = ("memory", "cpu", "pids", "io")
LAUNCHER = Path(__file__).with_name("launcher.py")
STOP_POLL = 0.02


def _issue(path: str, message: str, value: object = None) -> SpecIssue:
    return SpecIssue("runtime", None, path, message, value=value, has_value=value is not None)


# Cgroups.


@dataclass(frozen=True)
class Group:
    """An instance's cgroup: the directories to join, and where OOM kills are counted."""

    dirs: tuple[Path, ...]
    oom_file: Path | None


class Cgroups:
    """Creates, limits, empties and removes instances' cgroups, on cgroup v1 or v2.

    v1: one directory per hierarchy (``memory``, ``cpu``, ``cpuacct``,
    ``pids``, ``blkio``) at ``<root>/<controller>/<group>``, as the metrics
    reader finds them from ``/proc/<pid>/cgroup``; v2: ``<root>/<group>`` in
    the unified hierarchy, the controllers enabled in each parent's
    ``cgroup.subtree_control``.
    """

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root
        self.unified = (root / "cgroup.controllers").exists()

    @property
    def version(self) -> int:
        return 2 if self.unified else 1

    def dirs(self, group: str) -> dict[str, Path]:
        """The group's directory in each hierarchy (controller name to directory)."""
        if self.unified:
            return {"": self.root / group}
        return {c: self.root / c / group for c in V1_CONTROLLERS if (self.root / c).is_dir()}

    def create(self, group: str, resources: models.Resources) -> Group:
        memory = resources.memory.as_int()
        quota = resources.cpu.as_millis() * CPU_PERIOD_US // 1000
        if self.unified:
            return self._create_v2(group, memory, quota, resources.pids)
        made: list[Path] = []
        for controller, directory in self.dirs(group).items():
            directory.mkdir(parents=True, exist_ok=True)
            if directory.resolve() not in made:
                made.append(directory.resolve())
            if controller == "memory":
                swap = directory / "memory.memsw.limit_in_bytes"
                accounted = swap.exists()  # only with swap accounting
                if accounted:
                    with contextlib.suppress(OSError):  # lowering: swap first; raising: after
                        _write(swap, memory)
                _write(directory / "memory.limit_in_bytes", memory)
                if accounted:
                    _write(swap, memory)
            elif controller == "cpu":
                _write(directory / "cpu.cfs_period_us", CPU_PERIOD_US)
                _write(directory / "cpu.cfs_quota_us", quota)
            elif controller == "pids":
                _write(directory / "pids.max", resources.pids)
        oom = self.dirs(group).get("memory")
        return Group(tuple(made), oom / "memory.oom_control" if oom else None)

    def _create_v2(self, group: str, memory: int, quota: int, pids: int) -> Group:
        available = set(_read(self.root / "cgroup.controllers").split())
        wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in available)
        parent = self.root
        for part in Path(group).parts:
            if wanted:
                with contextlib.suppress(OSError):  # enabled already, or not delegated here
                    _write(parent / "cgroup.subtree_control", wanted)
            parent = parent / part
            parent.mkdir(exist_ok=True)
        directory = self.root / group
        limits: dict[str, object] = {}
        if "memory" in available:  # the whole group is killed at an OOM, as a container is
            limits |= {"memory.max": memory, "memory.oom.group": 1}
            if (directory / "memory.swap.max").exists():  # only with swap accounting
                limits["memory.swap.max"] = 0
        if "cpu" in available:
            limits["cpu.max"] = f"{quota} {CPU_PERIOD_US}"
        if "pids" in available:
            limits["pids.max"] = pids
        for name, value in limits.items():
            _write(directory / name, value)
        return Group((directory,), directory / "memory.events")

    def procs(self, group: str) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs(group).values():
            found.update(int(p) for p in _read(directory / "cgroup.procs").split())
        return found

    def kill(self, group: str) -> None:
        """SIGKILL every process in the group."""
        dirs = self.dirs(group)
        if self.unified and (dirs[""] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(dirs[""] / "cgroup.kill", 1)
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
        dirs = self.dirs(group)
        if self.unified:
            directory = dirs[""]
            cpu = _keyed(directory / "cpu.stat").get("usage_usec", 0) / 1e6
            limit = _read(directory / "memory.max")
            return base.Stats(
                cpu_seconds=cpu,
                memory_bytes=_int(directory / "memory.current"),
                memory_limit_bytes=int(limit) if limit.isdigit() else 0,
                pids=_int(directory / "pids.current"),
            )
        return base.Stats(
            cpu_seconds=_int(dirs.get("cpuacct", Path("/nonexistent")) / "cpuacct.usage") / 1e9,
            memory_bytes=_int(dirs.get("memory", Path("/nonexistent")) / "memory.usage_in_bytes"),
            memory_limit_bytes=_int(
                dirs.get("memory", Path("/nonexistent")) / "memory.limit_in_bytes"
            ),
            pids=_int(dirs.get("pids", Path("/nonexistent")) / "pids.current"),
        )


def _write(path: Path, value: object) -> None:
    with open(path, "w") as handle:
        handle.write(str(value))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _int(path: Path) -> int:
    text = _read(path)
    return int(text) if text.isdigit() else 0


def _keyed(path: Path) -> dict[str, int]:
    values = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


# Processes.


def starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: object, started: object) -> bool:
    return isinstance(pid, int) and pid > 0 and starttime(pid) == started


# The backend.


@dataclass(frozen=True)
class Settings:
    """Where the backend keeps instance files and where it finds plugins."""

    data_dir: Path
    controller_id: str = base.DEFAULT_CONTROLLER
    plugin_root: Path | None = None
    """Plugin directories (``spec.process.path``) lie under it; default ``data_dir/plugins``."""
    host_path_root: Path | None = None
    """Host paths of volumes must lie under it; None refuses host paths."""
    user: str = DEFAULT_USER
    """uid:gid the plugins run as; never root."""
    tmp_bytes: int = TMP_BYTES
    python: str = sys.executable
    """The interpreter of the launcher, and of plugins without a virtual environment."""
    cgroup_root: Path = Path("/sys/fs/cgroup")

    @property
    def plugins(self) -> Path:
        return self.plugin_root or self.data_dir / "plugins"

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


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
    groups = Cgroups(settings.cgroup_root)
    if not groups.dirs("x"):
        raise EngineUnavailableError(f"{NAME}: no cgroup hierarchy at {settings.cgroup_root}")
    if not os.access(settings.python, os.X_OK):
        raise EngineUnavailableError(f"{NAME}: no Python at {settings.python}")
    try:
        _seccomp()
    except RuntimeBackendError as e:
        raise EngineUnavailableError(str(e)) from e
    try:
        import blackhole_sdk  # noqa: F401 - only whether it is there

        warm = True
    except ImportError:
        warm = False
    return HostInfo(f"Linux {platform.release()}", groups.version, warm)


@dataclass
class _Launcher:
    process: asyncio.subprocess.Process
    warm: bool
    paths: list[str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ProcessRuntime:
    """The Runtime protocol with plain processes: cgroups, namespaces, an unprivileged user."""

    def __init__(self, settings: Settings) -> None:
        uid, _ = settings.uid_gid
        if uid == 0:
            raise ValueError("plugins never run as root; configure an unprivileged uid:gid")
        self.settings = settings
        self.name = NAME
        self.controller_id = settings.controller_id
        self.cgroups = Cgroups(settings.cgroup_root)
        self._owner = {
            base.LABEL_MANAGED_BY: base.MANAGED_BY,
            base.LABEL_CONTROLLER: settings.controller_id,
        }
        self._launcher: _Launcher | None = None
        self._starting_launcher = asyncio.Lock()
        self._queue: asyncio.Queue[str] | None = None
        self._notify: base.Inotify | None = None
        self._sockets: dict[int, str] = {}
        """inotify watches of starting instances' socket directories: watch to plugin key."""
        self._keys: dict[str, str] = {}
        """Instance name to its plugin's key, for the instances seen by this backend."""

    # Paths.

    @property
    def processes(self) -> Path:
        return self.settings.data_dir / "processes"

    def socket_dir(self, name: str) -> Path:
        return self.settings.data_dir / "instances" / name

    def _file(self, name: str, suffix: str) -> Path:
        return self.processes / f"{name}.{suffix}"

    def _group(self, name: str) -> str:
        return f"blackhole/{self.controller_id}/{name}"

    # What it can run.

    def capabilities(self) -> base.Capabilities:
        return base.Capabilities(
            networks=frozenset({models.NetworkMode.NONE}),
            volumes=True,
            host_paths=self.settings.host_path_root is not None,
        )

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        spec = desired.spec
        issues = []
        if spec.runtime not in (None, models.RuntimeName.PROCESS):
            issues.append(
                _issue(
                    "spec.runtime",
                    f"this controller runs plugins as processes; use process or leave "
                    f"it out, or run the plugin on a {spec.runtime.value} controller",
                    spec.runtime.value,
                )
            )
        if spec.permissions.network is not models.NetworkMode.NONE:
            issues.append(
                _issue(
                    "spec.permissions.network",
                    "is not supported on the process runtime; use none",
                    spec.permissions.network.value,
                )
            )
        if spec.process is None:
            issues.append(
                _issue(
                    "spec.process",
                    "the process runtime runs a plugin from a directory: give spec.process.path "
                    "(under the plugin root) and its entrypoint",
                )
            )
        else:
            issues += self._check_source(spec.process)
        issues += self._check_volumes(spec)
        return issues

    def plugin_dir(self, source: models.ProcessSource) -> Path:
        """The plugin's directory on this host (not yet checked to be under the root)."""
        return self.settings.plugins / source.path

    def _check_source(self, source: models.ProcessSource) -> list[SpecIssue]:
        root = self.settings.plugins.resolve()
        directory = self.plugin_dir(source).resolve()
        if not directory.is_relative_to(root):
            return [
                _issue(
                    "spec.process.path",
                    f"resolves to {directory}, outside the plugin root {root} "
                    "(bhctl run --plugin-root)",
                    source.path,
                )
            ]
        if not directory.is_dir():
            return [
                _issue(
                    "spec.process.path",
                    f"{directory} is not a directory; unpack the plugin under {root}",
                    source.path,
                )
            ]
        if str(directory) in PRIVATE_DIRS:
            return [
                _issue(
                    "spec.process.path",
                    f"is {directory} itself, of which each plugin gets a private one; "
                    f"put the plugin in a directory below it",
                    source.path,
                )
            ]
        issues = []
        entry = (directory / source.entrypoint).resolve()
        if not entry.is_relative_to(directory) or not entry.is_file():
            issues.append(
                _issue(
                    "spec.process.entrypoint",
                    f"{entry} is not a file inside {directory}",
                    source.entrypoint,
                )
            )
        if source.virtualenv is not None:
            venv = (directory / source.virtualenv).resolve()
            python = venv / "bin" / "python"
            if not venv.is_relative_to(directory) or not os.access(python, os.X_OK):
                issues.append(
                    _issue(
                        "spec.process.virtualenv",
                        f"{python} is not an interpreter; create it with python3 -m venv",
                        source.virtualenv,
                    )
                )
        for index, entry_path in enumerate(source.python_path):
            path = (directory / entry_path).resolve()
            if not path.is_relative_to(directory) or not path.is_dir():
                issues.append(
                    _issue(
                        f"spec.process.pythonPath[{index}]",
                        f"{path} is not a directory inside {directory}",
                        entry_path,
                    )
                )
        return issues

    def _check_volumes(self, spec: models.PluginSpec) -> list[SpecIssue]:
        issues = []
        root = self.settings.host_path_root
        for index, volume in enumerate(spec.volumes):
            mount = Path(volume.mount_path)
            if any(mount == Path(r) or mount.is_relative_to(r) for r in RESERVED_MOUNTS):
                issues.append(
                    _issue(
                        f"spec.volumes[{index}].mountPath",
                        "is a directory the process runtime provides itself; mount elsewhere, "
                        "e.g. /data",
                        volume.mount_path,
                    )
                )
            if volume.host_path is None:
                continue
            field_path = f"spec.volumes[{index}].hostPath"
            if root is None:
                issues.append(
                    _issue(
                        field_path,
                        "host paths are not allowed: the controller has no host-path root "
                        "(start it with --host-path-root DIR)",
                        volume.host_path,
                    )
                )
                continue
            real = Path(volume.host_path).resolve()
            if not real.is_relative_to(root.resolve()):
                issues.append(
                    _issue(
                        field_path,
                        f"resolves to {real}, outside the allowed host-path root {root}",
                        volume.host_path,
                    )
                )
            elif not real.is_dir():
                issues.append(
                    _issue(
                        field_path,
                        "does not exist or is not a directory; create it first",
                        volume.host_path,
                    )
                )
        return issues

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
        record = _load(self._file(name, "json"))
        if record is None:
            raise InstanceNotFoundError(f"{NAME}: no instance {name}")
        ended = _load(self._file(name, "exit"))
        if ended is None and not _alive(record.get("pid"), record.get("starttime")):
            # Reaped: its shim writes the exit file now, unless the shim is gone too.
            deadline = time.monotonic() + 2.0
            while _alive(record.get("shim"), record.get("shim_starttime")):
                ended = _load(self._file(name, "exit"))
                if ended is not None or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            ended = ended or _load(self._file(name, "exit")) or {"exit_code": None}
        labels = dict(record.get("labels") or {})
        self._keys[name] = _key(labels)
        started = record.get("started_at")
        finished = (ended or {}).get("finished_at")
        return base.Instance(
            name=name,
            plugin=labels.get(base.LABEL_PLUGIN, ""),
            color=models.Color(labels.get(base.LABEL_COLOR, "blue")),
            version=labels.get(base.LABEL_VERSION, ""),
            spec_hash=labels.get(base.LABEL_SPEC_HASH, ""),
            state=base.InstanceState.RUNNING if ended is None else base.InstanceState.EXITED,
            exit_code=None if ended is None else ended.get("exit_code"),
            oom_killed=bool((ended or {}).get("oom_killed")),
            started_at=datetime.fromtimestamp(started, UTC) if started else None,
            finished_at=datetime.fromtimestamp(finished, UTC) if finished else None,
            namespace=labels.get(base.LABEL_NAMESPACE) or None,
            id=f"{record.get('pid')}.{record.get('starttime')}",
            labels=labels,
            pid=record.get("pid") if ended is None else None,
        )

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        issues = self.validate(desired)
        if issues:
            raise SpecError(issues)
        name = desired.name
        if self._file(name, "json").exists():
            raise InstanceConflictError(f"{NAME}: {name} exists; remove it first")
        launcher = await self._ensure_launcher()
        labels = {**desired.labels, **self._owner}
        key = _key(labels)
        self._keys[name] = key
        request = await asyncio.to_thread(self._prepare, desired, labels, launcher)
        if self._notify is not None:
            with contextlib.suppress(OSError):
                self._sockets[self._notify.add(self.socket_dir(name), base.IN_CREATE)] = key
        try:
            reply = await self._launch(launcher, request)
        except BaseException:
            await asyncio.to_thread(self._clean, name)
            raise
        if self._queue is not None:
            self._queue.put_nowait(key)
        return base.Instance(
            name=name,
            plugin=desired.plugin,
            color=desired.color,
            version=str(desired.spec.version),
            spec_hash=desired.spec_hash,
            state=base.InstanceState.RUNNING,
            started_at=datetime.now(UTC),
            namespace=desired.namespace,
            id=f"{reply['pid']}.{reply['starttime']}",
            labels=labels,
            pid=int(reply["pid"]),
        )

    def _prepare(
        self, desired: base.InstanceSpec, labels: dict[str, str], launcher: _Launcher
    ) -> dict[str, Any]:
        """Directories, cgroup and the launch request of ``desired`` (blocking: in a thread)."""
        name, spec = desired.name, desired.spec
        assert spec.process is not None
        uid, gid = self.settings.uid_gid
        self.processes.mkdir(parents=True, exist_ok=True)
        root = self.settings.data_dir / "process-root"
        root.mkdir(mode=0o755, exist_ok=True)
        socket_dir = self.socket_dir(name)
        socket_dir.mkdir(parents=True, exist_ok=True)
        (socket_dir / base.SOCKET_NAME).unlink(missing_ok=True)
        os.chown(socket_dir, uid, gid)
        socket_dir.chmod(0o700)
        self._file(name, "exit").unlink(missing_ok=True)
        group = self.cgroups.create(self._group(name), spec.resources)
        directory = self.plugin_dir(spec.process).resolve()
        entrypoint = str(directory / spec.process.entrypoint)
        python_path = [str((directory / p).resolve()) for p in spec.process.python_path]
        warm = spec.process.virtualenv is None and launcher.warm
        binds = [*SYSTEM_DIRS, str(directory), *python_path]
        if spec.process.virtualenv is None:
            python = self.settings.python
            binds += launcher.paths
        else:
            venv = (directory / spec.process.virtualenv).resolve()
            python = str(venv / "bin" / "python")
            binds += _virtualenv_paths(venv)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            **spec.env,
            "BLACKHOLE_SOCKET": f"{base.SOCKET_DIR_IN_INSTANCE}/{base.SOCKET_NAME}",
            "BLACKHOLE_PLUGIN": desired.plugin,
            "BLACKHOLE_VERSION": str(spec.version),
            "BLACKHOLE_COLOR": desired.color.value,
            "BLACKHOLE_CONFIG": json.dumps(spec.config, sort_keys=True),
            "BLACKHOLE_GATEWAY_SOCKET": f"{base.SOCKET_DIR_IN_INSTANCE}/{base.GATEWAY_SOCKET_NAME}",
        }
        if python_path and not warm:
            env["PYTHONPATH"] = os.pathsep.join(python_path)
        volumes = []
        for volume in spec.volumes:
            if volume.host_path is not None:
                source = Path(volume.host_path).resolve()
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
            "seccomp": base64.b64encode(_seccomp()).decode(),
        }

    def _volume_dir(self, desired: base.InstanceSpec, volume: str) -> Path:
        """A named volume: a directory of the controller's, handed to the plugin's user once."""
        name = base.volume_name(desired.plugin, volume, desired.namespace, desired.controller_id)
        path = self.settings.data_dir / "volumes" / name
        if not path.is_dir():
            path.mkdir(parents=True)
            os.chown(path, *self.settings.uid_gid)
            path.chmod(0o700)
        return path

    async def _ensure_launcher(self) -> _Launcher:
        async with self._starting_launcher:
            current = self._launcher
            if current is not None and current.process.returncode is None:
                return current
            process = await asyncio.create_subprocess_exec(
                self.settings.python,
                "-I",
                str(LAUNCHER),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                hello = await _receive(process)
            except (asyncio.IncompleteReadError, ValueError) as e:
                raise EngineUnavailableError(
                    f"{NAME}: the launcher ({self.settings.python} {LAUNCHER}) did not start: {e}"
                ) from e
            self._launcher = _Launcher(process, bool(hello["warm"]), list(hello["paths"]))
            log.info(
                "process launcher %s started (%s)",
                hello["pid"],
                "SDK preloaded" if hello["warm"] else "no SDK to preload: plugins start cold",
            )
            return self._launcher

    async def _launch(self, launcher: _Launcher, request: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(request).encode()
        stdin = launcher.process.stdin
        assert stdin is not None
        async with launcher.lock:
            try:
                stdin.write(struct.pack("!I", len(body)) + body)
                await stdin.drain()
                reply = await _receive(launcher.process)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                launcher.process.kill()
                raise RuntimeBackendError(f"{NAME}: the launcher failed: {e}") from e
        if "error" in reply:
            raise RuntimeBackendError(f"{NAME}: {request['name']} did not start: {reply['error']}")
        return reply

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        if instance.state is not base.InstanceState.RUNNING:
            return False
        return await base.probe_socket(self.socket_dir(instance.name) / base.SOCKET_NAME, timeout)

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

    def _clean(self, name: str) -> None:
        group = self._group(name)
        self.cgroups.kill(group)
        self.cgroups.remove(group)
        for suffix in ("json", "exit", "log", "log.1"):
            self._file(name, suffix).unlink(missing_ok=True)
        shutil.rmtree(self.socket_dir(name), ignore_errors=True)

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        """Nothing is shared between a plugin's instances but its volumes, which are kept."""

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        """Nothing to move: processes are reached only through the gateway."""

    async def logs(self, name: str, tail: int) -> list[str]:
        if not self._file(name, "json").exists():
            raise InstanceNotFoundError(f"{NAME}: no instance {name}")
        text = await asyncio.to_thread(_tail, self._file(name, "log"))
        return text.splitlines()[-tail:] if tail else []

    async def stats(self, name: str) -> base.Stats:
        if not self._file(name, "json").exists():
            raise InstanceNotFoundError(f"{NAME}: no instance {name}")
        return await asyncio.to_thread(self.cgroups.stats, self._group(name))

    async def events(self) -> AsyncIterator[str]:
        self.processes.mkdir(parents=True, exist_ok=True)
        queue: asyncio.Queue[str] = asyncio.Queue()
        notify = base.Inotify()
        exits = notify.add(self.processes, base.IN_MOVED_TO)
        loop = asyncio.get_running_loop()
        loop.add_reader(notify.fd, self._notified, notify, exits, queue)
        self._queue, self._notify = queue, notify
        warming = asyncio.create_task(self._warm_up(), name="process-launcher")
        try:
            while True:
                yield await queue.get()
        finally:
            warming.cancel()
            loop.remove_reader(notify.fd)
            notify.close()
            self._queue = self._notify = None
            self._sockets.clear()

    async def _warm_up(self) -> None:
        """Start the launcher now, so that the first plugin does not wait for its imports."""
        try:
            await self._ensure_launcher()
        except EngineUnavailableError as e:
            log.warning("%s", e)

    def _notified(self, notify: base.Inotify, exits: int, queue: asyncio.Queue[str]) -> None:
        for wd, mask, filename in notify.read():
            if mask & base.IN_IGNORED:  # its directory was removed
                self._sockets.pop(wd, None)
                continue
            if wd == exits and filename.endswith(".exit"):
                name = filename.removesuffix(".exit")
                key = self._keys.get(name)
                if key is None:
                    record = _load(self._file(name, "json")) or {}
                    key = _key(record.get("labels") or {})
                if key:
                    queue.put_nowait(key)
            elif filename == base.SOCKET_NAME and wd in self._sockets:
                queue.put_nowait(self._sockets.pop(wd))
                notify.remove(wd)

    async def close(self) -> None:
        launcher, self._launcher = self._launcher, None
        if launcher is None:
            return
        if launcher.process.stdin is not None:
            launcher.process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await launcher.process.wait()
        except TimeoutError:
            launcher.process.kill()
            await launcher.process.wait()


async def _receive(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    size = struct.unpack("!I", await process.stdout.readexactly(4))[0]
    reply: dict[str, Any] = json.loads(await process.stdout.readexactly(size))
    return reply


def _key(labels: dict[str, str]) -> str:
    plugin = labels.get(base.LABEL_PLUGIN, "")
    namespace = labels.get(base.LABEL_NAMESPACE)
    return plugin_key(plugin, namespace) if plugin else plugin


def _load(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            loaded: dict[str, Any] = json.load(handle)
            return loaded
    except (OSError, ValueError):
        return None


def _tail(path: Path, size: int = 256 << 10) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _seccomp() -> bytes:
    """The compiled seccomp filter every plugin runs under."""
    try:
        return process_seccomp.program()
    except (ImportError, RuntimeError, OSError) as e:
        raise RuntimeBackendError(
            f"{NAME}: cannot build the seccomp filter plugins run under ({e}); install "
            "libseccomp (Debian: apt-get install libseccomp2) and pyseccomp"
        ) from e


def _virtualenv_paths(venv: Path) -> list[str]:
    """The virtual environment and the installation of Python it was made from."""
    paths = [str(venv)]
    for line in _read(venv / "pyvenv.cfg").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            paths.append(str(Path(value.strip()).resolve().parent))
    paths.append(str((venv / "bin" / "python").resolve().parent.parent))
    return paths
