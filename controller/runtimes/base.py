"""The ``Runtime`` protocol every backend implements, and the records it speaks in.

In the shape of Nomad's ``DriverPlugin``: a backend says what it can do
(:meth:`Runtime.capabilities`), checks what it is asked to run
(:meth:`Runtime.validate`), lists what it runs for this controller
(:meth:`Runtime.list_owned`), and starts, inspects, probes, stops and removes
instances by their deterministic name. The reconciler talks to backends only
through this module; backends never read specs from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from controller.errors import IncompatiblePluginError, SpecError, SpecIssue
from controller.spec import models
from controller.spec.keys import PluginKey, plugin_key

MANAGED_BY = "blackhole-controller"
LABEL_MANAGED_BY = models.LABEL_PREFIX + "managed-by"
LABEL_CONTROLLER = models.LABEL_PREFIX + "controller"
LABEL_PLUGIN = models.LABEL_PREFIX + "plugin"
LABEL_NAMESPACE = models.LABEL_PREFIX + "namespace"
LABEL_COLOR = models.LABEL_PREFIX + "color"
LABEL_VERSION = models.LABEL_PREFIX + "version"
LABEL_SPEC_HASH = models.LABEL_PREFIX + "spec-hash"
LABEL_REPLICA = models.LABEL_PREFIX + "replica"
"""Which of its color's instances it is (spec.replicas), on all but the first."""
LABEL_START_CPU = models.LABEL_PREFIX + "start-cpu-millis"
"""On an instance started with more CPU than its spec's: that CPU, in millicores."""
LABEL_QUOTA_WHEN_READY = models.LABEL_PREFIX + "start-cpu-boost"
"""On an instance started with more CPU than its spec's: the spec's CFS quota, in microseconds
per period, to apply once its socket accepts (a restarted controller reads it back)."""
START_CPU_MILLIS = 2000
"""Default CPU (millicores) of an instance until its socket accepts (bhctl run --start-cpu)."""
"""On an instance started with more CPU than its spec's: that CPU, in millicores."""
LABEL_VOLUME = models.LABEL_PREFIX + "volume"

SOCKET_DIR_IN_INSTANCE = "/run/blackhole"
"""Where an instance finds its socket directory."""
SOCKET_NAME = "plugin.sock"
"""The file name of the socket a plugin listens on, inside its socket directory."""
GATEWAY_SOCKET_NAME = "gateway.sock"
"""The socket beside it through which the plugin calls other plugins (when its spec allows)."""


def open_socket(path: Path) -> int:
    """An ``O_PATH`` descriptor of the plugin's socket at ``path``, reached through no link.

    A plugin owns its socket directory (it binds its socket there) and can
    put any name in it; the directories above it are the controller's. So
    only the last two names are looked up here, neither followed if it is a
    link, and what is found must be a socket owned by the owner of its
    directory (the plugin's user, whom the runtime gave the directory).
    Anything else (a link to another plugin's socket, a file, someone
    else's socket) raises :class:`IncompatiblePluginError` with reason
    ``SocketTampered``; nothing there yet raises :class:`FileNotFoundError`.

    Connect through :func:`fd_address` of the result: it leads to this very
    socket for as long as the descriptor is open, whatever the plugin makes
    of the name afterwards.
    """
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    parent = os.open(path.parent.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        directory = os.open(path.parent.name, flags | os.O_DIRECTORY, dir_fd=parent)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise _tampered(path.parent, "is not a directory but a link or a file") from None
    finally:
        os.close(parent)
    try:
        found = os.open(path.name, flags, dir_fd=directory)
        owner = os.fstat(directory).st_uid
    finally:
        os.close(directory)
    status = os.fstat(found)
    if stat.S_ISSOCK(status.st_mode) and status.st_uid == owner:
        return found
    os.close(found)
    if stat.S_ISSOCK(status.st_mode):
        why = f"is a socket of uid {status.st_uid}, not of its directory's owner (uid {owner})"
    else:
        why = f"is {_KINDS.get(stat.S_IFMT(status.st_mode), 'not a socket')}, not a socket"
    raise _tampered(path, why)


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


def _tampered(path: Path, why: str) -> IncompatiblePluginError:
    return IncompatiblePluginError(
        "SocketTampered",
        f"{path} {why}: the controller connects only to the socket the plugin listens on, "
        "never through a link; the instance is refused",
    )


def fd_address(descriptor: int) -> str:
    """The address that connects to the socket open as ``descriptor`` (see :func:`open_socket`)."""
    return f"/proc/self/fd/{descriptor}"


LISTEN_GRACE_SECONDS = 0.05
"""How long a socket that is bound but refuses connections is tried again (a server binds,
then listens: one seen between the two accepts a moment later)."""


async def probe_socket(path: Path, timeout: float) -> bool:
    """Whether the plugin's socket at ``path`` accepts a connection within ``timeout`` seconds.

    A name there that is no socket of the plugin's counts as there: the
    connection that follows (the handshake) refuses it, with the reason. A
    socket that refuses is tried again every millisecond for up to
    :data:`LISTEN_GRACE_SECONDS` (within ``timeout``).
    """
    try:
        descriptor = open_socket(path)
    except IncompatiblePluginError:
        return True
    except OSError:
        return False
    loop = asyncio.get_running_loop()
    retry_until = loop.time() + min(timeout, LISTEN_GRACE_SECONDS)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    _, writer = await asyncio.open_unix_connection(fd_address(descriptor))
                    break
                except ConnectionRefusedError:
                    if loop.time() >= retry_until:
                        return False
                    await asyncio.sleep(0.001)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        os.close(descriptor)


def refuse(issues: list[SpecIssue]) -> None:
    """Raise :class:`SpecError` when ``issues`` holds any: what they are about cannot start."""
    if issues:
        raise SpecError(issues)


def host_paths_refused(desired: InstanceSpec, why: str) -> list[SpecIssue]:
    """An issue for each host-path volume of ``desired``, on a runtime without them."""
    return [
        SpecIssue(
            "runtime",
            None,
            f"spec.volumes[{index}].hostPath",
            why,
            value=volume.host_path,
            has_value=True,
        )
        for index, volume in enumerate(desired.spec.volumes)
        if volume.host_path is not None
    ]


def replicas_refused(desired: InstanceSpec, why: str) -> list[SpecIssue]:
    """An issue for a spec of several replicas, on a runtime that runs one a color."""
    replicas = desired.spec.replicas
    if replicas == 1:
        return []
    return [SpecIssue("runtime", None, "spec.replicas", why, value=replicas, has_value=True)]


def check_host_paths(spec: models.PluginSpec, root: Path | None) -> list[SpecIssue]:
    """The host-path rules of every backend that mounts host directories, one issue a volume.

    A host path (absolute and without "..", as the spec model already makes
    it) must be written under ``root`` (the root as given or with its own links
    resolved), must still lie under the resolved root once every symlink on
    the way is followed, and must then be an existing directory. ``root`` None
    refuses host paths altogether.
    """
    issues = []
    for index, volume in enumerate(spec.volumes):
        if volume.host_path is None:
            continue
        why = _host_path_problem(Path(volume.host_path), root)
        if why is not None:
            issues.append(_issue(f"spec.volumes[{index}].hostPath", why, volume.host_path))
    return issues


def _host_path_problem(path: Path, root: Path | None) -> str | None:
    if root is None:
        return (
            "host paths are not allowed: the controller has no host-path root "
            "(start it with --host-path-root DIR)"
        )
    real_root = root.resolve()
    if not path.is_relative_to(real_root) and not path.is_relative_to(root):
        return f"is outside the allowed host-path root {root}; use a directory under it"
    real = path.resolve()
    if not real.is_relative_to(real_root):
        return f"resolves through a symlink to {real}, outside the allowed host-path root {root}"
    if not real.is_dir():
        return "does not exist or is not a directory; create it first"
    return None


def host_path_source(volume: models.Volume) -> Path:
    """The directory a checked host-path volume mounts: its path with every link resolved."""
    assert volume.host_path is not None
    return Path(volume.host_path).resolve()


def _issue(path: str, message: str, value: object) -> SpecIssue:
    return SpecIssue("runtime", None, path, message, value=value, has_value=True)


DEFAULT_USER = "65532:65532"
"""The unprivileged uid:gid plugins run as unless configured otherwise, on every backend."""


def user_ids(user: str) -> tuple[int, int]:
    """The uid and gid of ``uid:gid`` (the gid defaults to the uid); never root.

    Raises :class:`ValueError` for root (uid 0, or the name) and for names:
    the controller hands directories to the plugin's user, so it needs numbers.
    """
    uid_text, _, gid_text = user.partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        raise ValueError(f"user {user!r} is not uid:gid, e.g. {DEFAULT_USER}") from None
    if uid == 0:
        raise ValueError("plugins never run as root; configure an unprivileged uid:gid")
    return uid, gid


def hand_over(directory: Path, user: str) -> None:
    """Create ``directory`` (and its parents) and make it the plugin user's alone (mode 0700)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chown(directory, *user_ids(user))
    directory.chmod(0o700)


def prepare_socket_dir(directory: Path, user: str) -> None:
    """An instance's socket directory, handed to its user, without the last run's socket."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SOCKET_NAME).unlink(missing_ok=True)
    hand_over(directory, user)


def plugin_environment(desired: InstanceSpec) -> dict[str, str]:
    """The ``BLACKHOLE_*`` variables every plugin is started with, on every backend.

    They name the socket to listen on and the gateway's socket beside it (as
    the instance sees them), the plugin, its version and color, and its
    ``config`` as JSON. They take precedence over the spec's ``env``.
    """
    return {
        "BLACKHOLE_SOCKET": f"{SOCKET_DIR_IN_INSTANCE}/{SOCKET_NAME}",
        "BLACKHOLE_PLUGIN": desired.plugin,
        "BLACKHOLE_VERSION": str(desired.spec.version),
        "BLACKHOLE_COLOR": desired.color.value,
        "BLACKHOLE_CONFIG": json.dumps(desired.spec.config, sort_keys=True),
        "BLACKHOLE_GATEWAY_SOCKET": f"{SOCKET_DIR_IN_INSTANCE}/{GATEWAY_SOCKET_NAME}",
    }


def owner_labels(controller_id: str) -> dict[str, str]:
    """The labels that make an instance (or a network, a volume) ``controller_id``'s."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_CONTROLLER: controller_id}


def key_of(labels: Mapping[str, str]) -> PluginKey:
    """The key of the plugin whose instance carries ``labels``; "" when they name none."""
    plugin = labels.get(LABEL_PLUGIN, "")
    return plugin_key(plugin, labels.get(LABEL_NAMESPACE) or None) if plugin else PluginKey("")


class InstanceState(StrEnum):
    """What a runtime says an instance is doing."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    """Frozen by someone (``docker pause``): alive, but it answers nothing; the health
    checks fail it and the controller restarts it."""
    EXITED = "exited"
    UNKNOWN = "unknown"


DEFAULT_CONTROLLER = "default"


def instance_name(
    plugin: str,
    color: models.Color,
    namespace: str | None = None,
    controller_id: str = DEFAULT_CONTROLLER,
    replica: int = 0,
) -> str:
    """The deterministic name of a plugin's instance: ``bh-<plugin>-<color>``, and
    ``bh-<plugin>-<color>-<replica>`` for the replicas after the first.

    A namespace, and a controller id other than the default, are put in front
    of the plugin's name, so that controllers sharing an engine never collide.
    """
    scope = [] if controller_id == DEFAULT_CONTROLLER else [controller_id]
    scope += [namespace] if namespace else []
    return "-".join(["bh", *scope, plugin, color.value, *([str(replica)] if replica else [])])


def volume_name(
    plugin: str,
    volume: str,
    namespace: str | None = None,
    controller_id: str = DEFAULT_CONTROLLER,
) -> str:
    """The engine volume behind a spec volume: ``bh-<plugin>-<volume>``, scoped like instances."""
    scope = [] if controller_id == DEFAULT_CONTROLLER else [controller_id]
    scope += [namespace] if namespace else []
    return "-".join(["bh", *scope, plugin, volume])


def start_cpu_millis(spec: models.PluginSpec, default: int) -> int | None:
    """The CPU (millicores) an instance of ``spec`` starts with when that is more than its
    spec's (the start-up boost): its ``resources.startCpu``, else the controller's
    ``default``; None when it starts at its spec's CPU."""
    wanted = spec.resources.start_cpu
    millis = default if wanted is None else wanted.as_millis()
    return millis if millis > spec.resources.cpu.as_millis() else None


def start_cpu_of(instance: Instance) -> str | None:
    """The CPU ``instance`` started with above its spec's, as a quantity ("2", "1500m")."""
    millis = instance.labels.get(LABEL_START_CPU, "")
    if not millis.isdigit():
        return None
    value = int(millis)
    return str(value // 1000) if value % 1000 == 0 else f"{value}m"


def instance_hash(spec: models.PluginSpec) -> str:
    """A digest of what an instance is made from: a change of it needs a new instance.

    Health, restart, hot-swap settings, dependencies, capabilities and which
    plugins it may call are read by the controller and the gateway, not by the
    instance, so changing them replaces nothing.
    """
    made_of = spec.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={
            "image",
            "version",
            "runtime",
            "process",
            "permissions",
            "resources",
            "volumes",
            "env",
            "config",
            "state",
            "remote",
        },
    )
    made_of.get("permissions", {}).pop("callPlugins", None)
    made_of.get("resources", {}).pop("startCpu", None)  # read at a start only
    text = json.dumps(made_of, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class InstanceSpec:
    """One instance to run: a plugin's spec in one color, with its ownership labels."""

    plugin: str
    color: models.Color
    spec: models.PluginSpec
    labels: Mapping[str, str]
    """Every label the instance carries: the plugin's own and the controller's."""
    namespace: str | None = None
    controller_id: str = DEFAULT_CONTROLLER
    owner_uid: str | None = None
    """The uid of the Plugin object it belongs to, where the source has one (Kubernetes)."""
    standby: bool = False
    """The warm standby of the color's instance (see :class:`Standbys`), not the instance."""
    replica: int = 0
    """Which of its color's instances it is (0 unless the spec asks for replicas)."""

    @property
    def name(self) -> str:
        name = instance_name(
            self.plugin, self.color, self.namespace, self.controller_id, self.replica
        )
        return standby_name(name) if self.standby else name

    @property
    def spec_hash(self) -> str:
        return self.labels[LABEL_SPEC_HASH]

    @property
    def key(self) -> PluginKey:
        """The key of the plugin it belongs to."""
        return plugin_key(self.plugin, self.namespace)


@dataclass(frozen=True)
class Instance:
    """One instance as the runtime reports it."""

    name: str
    plugin: str
    color: models.Color
    version: str
    spec_hash: str
    state: InstanceState
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    namespace: str | None = None
    id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    pid: int | None = None
    """The main process on this host, when it runs here (its cgroup holds the instance)."""
    address: str | None = None
    """``host:port`` where it is reached over the network, for runtimes that reach it so."""
    crashes: int = 0
    """Where the platform restarts crashed instances by itself (``restarts_crashed``): how
    many times this one exited so far (a kubelet's ``restartCount``, plus one while it
    waits out its restart back-off). ``exit_code``, ``oom_killed`` and ``finished_at``
    then tell of its last exit even while it runs again."""
    restarting: bool = False
    """Exited, and the platform starts it again by itself after its back-off."""
    waiting: str = ""
    """Why it does not run yet, where the platform says (CamelCase, e.g. Unschedulable,
    ContainerCreating, ImagePullBackOff); ``waiting_message`` says more. Until it runs its
    ``started_at`` is None and the startup deadline does not count, except for a wait that
    fails (``ImagePullBackOff``, ...), whose ``started_at`` is when it was made."""
    waiting_message: str = ""

    @property
    def key(self) -> PluginKey:
        """The key of the plugin it belongs to."""
        return plugin_key(self.plugin, self.namespace)

    @property
    def replica(self) -> int:
        """Which of its color's instances it is (0: the first, or the only one)."""
        text = self.labels.get(LABEL_REPLICA, "")
        return int(text) if text.isdigit() else 0


def started_instance(
    desired: InstanceSpec, ident: str, labels: Mapping[str, str], pid: int | None = None
) -> Instance:
    """``desired`` as a backend reports it the moment it has started it: running since now."""
    return Instance(
        name=desired.name,
        plugin=desired.plugin,
        color=desired.color,
        version=str(desired.spec.version),
        spec_hash=desired.spec_hash,
        state=InstanceState.RUNNING,
        started_at=datetime.now(UTC),
        namespace=desired.namespace,
        id=ident,
        labels=dict(labels),
        pid=pid,
    )


def instance_from_labels(
    name: str,
    labels: Mapping[str, str],
    ident: str,
    state: InstanceState,
    *,
    exit_code: int | None = None,
    oom_killed: bool = False,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    pid: int | None = None,
) -> Instance:
    """An instance found on a runtime, known by the ownership labels it carries."""
    return Instance(
        name=name,
        plugin=labels.get(LABEL_PLUGIN, ""),
        color=models.Color(labels.get(LABEL_COLOR, "blue")),
        version=labels.get(LABEL_VERSION, ""),
        spec_hash=labels.get(LABEL_SPEC_HASH, ""),
        state=state,
        exit_code=exit_code,
        oom_killed=oom_killed,
        started_at=started_at,
        finished_at=finished_at,
        namespace=labels.get(LABEL_NAMESPACE) or None,
        id=ident,
        labels=dict(labels),
        pid=pid,
    )


def owned_by(
    instance: Instance, controller_id: str, plugin: str, namespace: str | None = None
) -> bool:
    """Whether ``instance`` carries the labels of ``controller_id``'s instance of ``plugin``."""
    labels = instance.labels
    return (
        labels.get(LABEL_MANAGED_BY) == MANAGED_BY
        and labels.get(LABEL_CONTROLLER) == controller_id
        and labels.get(LABEL_PLUGIN) == plugin
        and (labels.get(LABEL_NAMESPACE) or None) == namespace
        and LABEL_COLOR in labels
    )


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, so that specs asking for more are refused up front."""

    networks: frozenset[models.NetworkMode]
    volumes: bool
    host_paths: bool
    restarts_crashed: bool = False
    """Whether the platform restarts an exited instance by itself (a kubelet does): the
    controller then stops one it decides not to restart yet."""
    not_enforced: Mapping[str, str] = field(default_factory=dict)
    """Spec fields this backend runs but cannot enforce (field -> why): the plugin's status
    says so (condition Unenforced), its spec is not refused."""
    replicas: bool = True
    """Whether it runs ``spec.replicas`` (each replica an instance of its own); where not,
    a spec asking for more than one is refused."""
    announces_sockets: bool = False
    """Whether it queues a plugin the moment a starting instance's socket appears (its
    :meth:`Runtime.events`): readiness probes before then are only a fallback, made
    seldom."""


@dataclass(frozen=True)
class Stats:
    """A point-in-time resource reading of one instance."""

    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int
    pids: int


def standby_name(name: str) -> str:
    """The name of the warm standby of instance ``name``."""
    return f"{name}-{STANDBY_SUFFIX}"


STANDBY_SUFFIX = "standby"


@runtime_checkable
class Standbys(Protocol):
    """What a runtime that keeps warm standbys adds to :class:`Runtime`.

    A standby is started like any instance (:attr:`InstanceSpec.standby` gives
    it its own name), frozen once its socket accepts, and, when its color's
    instance crashed, thawed (while the crashed one is removed) and promoted
    in its place: it then has that instance's name and endpoint.
    """

    async def freeze(self, name: str) -> None:
        """Pause instance ``name``: alive, using no CPU, answering nothing until thawed."""
        ...

    async def thaw(self, name: str) -> None:
        """Resume a frozen instance."""
        ...

    async def promote(self, standby: str, name: str) -> Instance:
        """Give thawed ``standby`` the name and endpoint of instance ``name`` (removed
        already); the instance it is now."""
        ...


def standbys_of(runtime: object) -> Standbys | None:
    """``runtime`` as one that keeps warm standbys, or None. A runtime that wraps another
    (``host``: the host's runtime with remote plugins beside it) keeps its host's."""
    if isinstance(runtime, Standbys):
        return runtime
    host = getattr(runtime, "host", None)
    return standbys_of(host) if host is not None else None


class Runtime(Protocol):
    """What the reconciler needs from a place that runs plugin instances."""

    name: str
    controller_id: str
    """This controller's identity on the runtime: it owns only what carries it."""

    def capabilities(self) -> Capabilities:
        """What this backend can run."""
        ...

    def validate(self, desired: InstanceSpec) -> list[SpecIssue]:
        """Problems that would stop ``desired`` from starting here; empty when none."""
        ...

    async def list_owned(self, plugin: str | None = None) -> list[Instance]:
        """Every instance this controller owns (of ``plugin`` only, when given)."""
        ...

    async def start(self, desired: InstanceSpec) -> Instance:
        """Create and start ``desired``; its name must be free (remove the old one first)."""
        ...

    async def inspect(self, name: str) -> Instance:
        """The instance called ``name``; raises :class:`InstanceNotFoundError`."""
        ...

    async def ready(self, instance: Instance, timeout: float) -> bool:
        """Whether ``instance``'s endpoint accepts connections within ``timeout`` seconds."""
        ...

    def endpoint(self, instance: Instance) -> str:
        """Where the plugin protocol reaches ``instance``: ``unix:PATH`` or ``HOST:PORT``."""
        ...

    async def stop(self, name: str, timeout: float) -> None:
        """Ask the instance to stop, kill it after ``timeout`` seconds; no error if gone."""
        ...

    async def remove(self, name: str) -> None:
        """Remove the instance (stopping it at once); no error if it is already gone."""
        ...

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        """Remove what the plugin's instances shared (networks); called once none is left."""
        ...

    async def remove_volumes(self) -> list[str]:
        """Remove every named volume this controller owns, once no instance uses them; the
        names of those removed (host paths are never touched)."""
        ...

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        """Point the plugin's stable address at ``color`` (runtimes without one do nothing)."""
        ...

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        """The instance's last ``tail`` lines of output; ``timestamps``: each line starts
        with the time it was read from the instance and a space (RFC 3339, UTC)."""
        ...

    async def stats(self, name: str) -> Stats:
        """The instance's current resource use."""
        ...

    def events(self) -> AsyncIterator[str]:
        """Keys of plugins whose instances changed state (died, started), as they happen."""
        ...

    async def close(self) -> None:
        """Release the backend's connections and threads."""
        ...
