"""Docker and Podman: one backend, with an engine setting where their APIs agree.

Both engines speak the Docker Engine API (Podman through ``podman system
service``), so one docker-py client drives either. This module owns the
connection to an engine and the translation of a :class:`PluginSpec` into
the isolation settings of a container: no network, read-only root, tmpfs
``/tmp``, a non-root user, no capabilities, ``no-new-privileges``, and CPU,
memory (swap included) and pids limits, and the backend itself
(:class:`ContainerRuntime`): instances by deterministic name and ownership
labels, a socket directory per instance, labelled named volumes, private
networks between plugins that name each other. ``docker`` is imported here only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests.exceptions
from docker.models import containers as docker_containers

from controller.errors import (
    EngineUnavailableError,
    InstanceConflictError,
    InstanceNotFoundError,
    RuntimeBackendError,
    SpecError,
    SpecIssue,
)
from controller.runtimes import base
from controller.spec import models
from controller.spec.keys import plugin_key

log = logging.getLogger(__name__)
T = TypeVar("T")

CPU_PERIOD_US = 100_000
"""The CFS period the CPU quota is expressed in (the kernel's default, 100 ms)."""

DEFAULT_USER = "65532:65532"
"""The unprivileged uid:gid plugins run as unless configured otherwise."""

TMP_SIZE = "64m"
START_CPU_MILLIS = 2000
"""Default CPU (millicores) of an instance until it is ready."""
LABEL_START_CPU = models.LABEL_PREFIX + "start-cpu-boost"
"""On an instance started with more CPU than its spec's: the spec's CFS quota, in microseconds
per period, to apply once it is ready (a restarted controller reads it back)."""


class Engine(StrEnum):
    """The container engines this backend drives."""

    DOCKER = "docker"
    PODMAN = "podman"


def default_run_dir() -> Path:
    """Where sockets and engine settings live; the same rule as ``scripts/lib.sh``."""
    if configured := os.environ.get("BLACKHOLE_RUN_DIR"):
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/blackhole")
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "blackhole"
    return Path(f"/tmp/blackhole-{os.geteuid()}")


def engine_url(engine: Engine) -> str:
    """The API endpoint of ``engine``: ``BLACKHOLE_<ENGINE>_HOST`` or the default socket."""
    if configured := os.environ.get(f"BLACKHOLE_{engine.name}_HOST"):
        return configured
    if engine is Engine.DOCKER:
        return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return f"unix://{default_run_dir() / 'podman' / 'podman.sock'}"


def connect(engine: Engine, url: str | None = None, timeout: int = 60) -> docker.DockerClient:
    """A client of ``engine``, checked to answer; raises :class:`EngineUnavailableError`."""
    url = url or engine_url(engine)
    try:
        client = docker.DockerClient(base_url=url, version="auto", timeout=timeout)
        client.ping()
    except docker.errors.DockerException as e:
        raise EngineUnavailableError(
            f"{engine} does not answer at {url}: {e}. Start it with scripts/engines.sh "
            f"{engine}, or point BLACKHOLE_{engine.name}_HOST at its API socket."
        ) from e
    return client


@dataclass(frozen=True)
class EngineInfo:
    """What an engine says about itself."""

    engine: Engine
    version: str
    api_version: str


def describe(engine: Engine, url: str | None = None) -> EngineInfo:
    """Connect to ``engine`` and report its version; raises :class:`EngineUnavailableError`."""
    client = connect(engine, url, timeout=10)
    try:
        info = client.version()
    except docker.errors.DockerException as e:
        raise EngineUnavailableError(f"{engine} at {url}: {e}") from e
    finally:
        client.close()
    return EngineInfo(engine, str(info.get("Version", "?")), str(info.get("ApiVersion", "?")))


@dataclass(frozen=True)
class Isolation:
    """Operator-wide isolation settings that specs cannot override."""

    user: str = DEFAULT_USER
    """uid:gid the plugin's processes run as; never root."""
    tmp_size: str = TMP_SIZE
    """Size of the private tmpfs on /tmp."""

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


def container_options(
    spec: models.PluginSpec,
    *,
    name: str,
    labels: Mapping[str, str],
    isolation: Isolation = Isolation(),
    socket_dir: Path | None = None,
    volumes: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The docker-py ``containers.create`` arguments that run ``spec`` isolated.

    The same arguments work on Docker and on Podman's Docker-compatible API:
    CPU is set as a CFS quota (Podman's API ignores ``nano_cpus``) and swap
    is pinned to the memory limit, so a plugin gets no swap at all.
    ``socket_dir`` is mounted at ``/run/blackhole``; ``volumes`` maps each
    spec volume's name to the engine volume (or checked host path) behind it.
    """
    uid = isolation.user.split(":", 1)[0]
    if uid in {"0", "root"}:
        raise ValueError("plugins never run as root; configure an unprivileged uid:gid")
    memory = spec.resources.memory.as_int()
    mounts = []
    if socket_dir is not None:
        mounts.append(docker.types.Mount(base.SOCKET_DIR_IN_INSTANCE, str(socket_dir), type="bind"))
    for volume in spec.volumes:
        source = (volumes or {})[volume.name]
        mounts.append(
            docker.types.Mount(
                volume.mount_path,
                source,
                type="bind" if volume.host_path else "volume",
                read_only=volume.read_only,
            )
        )
    return {
        "image": spec.image,
        "name": name,
        "labels": dict(labels),
        "user": isolation.user,
        "environment": {**spec.env, **(env or {})},
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={isolation.tmp_size}"},
        "mounts": mounts,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": spec.resources.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "cpu_period": CPU_PERIOD_US,
        "cpu_quota": spec.resources.cpu.as_millis() * CPU_PERIOD_US // 1000,
        "detach": True,
    }


def check_host_paths(spec: models.PluginSpec, root: Path | None) -> list[SpecIssue]:
    """Host paths must resolve, symlinks followed, to a directory under ``root``."""
    issues = []
    for index, volume in enumerate(spec.volumes):
        if volume.host_path is None:
            continue
        field = f"spec.volumes[{index}].hostPath"
        if root is None:
            issues.append(
                _issue(
                    field,
                    "host paths are not allowed: the controller has no host-path root "
                    "(start it with --host-path-root DIR)",
                    volume.host_path,
                )
            )
            continue
        real_root = root.resolve()
        path = Path(volume.host_path)
        if not path.is_relative_to(real_root) and not path.is_relative_to(root):
            issues.append(
                _issue(
                    field,
                    f"is outside the allowed host-path root {root}; use a directory under it",
                    volume.host_path,
                )
            )
            continue
        real = path.resolve()
        if not real.is_relative_to(real_root):
            issues.append(
                _issue(
                    field,
                    f"resolves through a symlink to {real}, outside the allowed "
                    f"host-path root {root}",
                    volume.host_path,
                )
            )
        elif not real.is_dir():
            issues.append(
                _issue(
                    field, "does not exist or is not a directory; create it first", volume.host_path
                )
            )
    return issues


def _issue(path: str, message: str, value: object) -> SpecIssue:
    return SpecIssue("runtime", None, path, message, value=value, has_value=True)


def link_network(a: str, b: str, controller_id: str = base.DEFAULT_CONTROLLER) -> str:
    """The network two plugins share when each names the other in ``peers``."""
    first, second = sorted((a, b))
    digest = hashlib.sha256(f"{controller_id}/{first}/{second}".encode()).hexdigest()[:12]
    return f"bh-link-{digest}"


@dataclass(frozen=True)
class Settings:
    """How the backend reaches its engine and where it keeps instance files."""

    engine: Engine
    data_dir: Path
    """Per-instance socket directories live in ``data_dir/instances``."""
    url: str | None = None
    controller_id: str = base.DEFAULT_CONTROLLER
    """Several controllers may share an engine; each owns only what carries its id."""
    host_path_root: Path | None = None
    """Host paths must lie under this directory; None refuses host paths."""
    isolation: Isolation = Isolation()
    start_cpu_millis: int = START_CPU_MILLIS
    """CPU an instance may use until it is ready, where its spec allows less: a start's imports
    are then not throttled. Once its socket accepts, the spec's limit applies. 0: none."""
    threads: int = 8
    """Engine calls run on this many threads, so the event loop never blocks."""


class ContainerRuntime:
    """The Runtime protocol on Docker or Podman, through the Docker Engine API."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = str(settings.engine)
        self.controller_id = settings.controller_id
        self._client: docker.DockerClient | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.threads, thread_name_prefix=f"{self.name}-api"
        )
        self._network_lock = threading.Lock()
        self._notify: base.Inotify | None = None
        self._sockets: dict[int, str] = {}
        """inotify watches of starting instances' socket directories: watch to plugin key."""
        self._settled: set[str] = set()
        """Instances started with extra CPU that have their spec's limit now."""
        self._following = False
        """Whether the engine's events are being followed (so inspections may be reused)."""
        self._seen: dict[str, tuple[float, base.Instance | None]] = {}
        self._changed: dict[str, float] = {}
        """When each container last changed, by an event or by this backend."""
        self._owner = {
            base.LABEL_MANAGED_BY: base.MANAGED_BY,
            base.LABEL_CONTROLLER: settings.controller_id,
        }

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = connect(self.settings.engine, self.settings.url)
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except docker.errors.NotFound as e:
            raise InstanceNotFoundError(f"{self.name}: {e.explanation or e}") from e
        except docker.errors.APIError as e:
            if e.status_code == 409 or "already in use" in str(e.explanation):  # Podman: 500
                raise InstanceConflictError(f"{self.name}: {e.explanation or e}") from e
            raise RuntimeBackendError(f"{self.name}: {e.explanation or e}") from e
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise EngineUnavailableError(f"{self.name} does not answer: {e}") from e

    def capabilities(self) -> base.Capabilities:
        return base.Capabilities(
            networks=frozenset({models.NetworkMode.NONE, models.NetworkMode.PRIVATE}),
            volumes=True,
            host_paths=self.settings.host_path_root is not None,
        )

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        issues = check_host_paths(desired.spec, self.settings.host_path_root)
        network = desired.spec.permissions.network
        if network not in self.capabilities().networks:
            issues.append(
                _issue(
                    "spec.permissions.network",
                    f"is not supported on {self.name} yet; use none or private",
                    network.value,
                )
            )
        return issues

    def _selector(self, **extra: str) -> dict[str, Any]:
        labels = {**self._owner, **extra}
        return {"label": [f"{k}={v}" for k, v in labels.items()]}

    async def list_owned(self, plugin: str | None = None) -> list[base.Instance]:
        extra = {base.LABEL_PLUGIN: plugin} if plugin else {}
        rows = await self._call(
            self.client.api.containers, all=True, filters=self._selector(**extra)
        )
        found = []
        for row in rows:
            labels = row.get("Labels") or {}
            if base.LABEL_COLOR not in labels:
                continue  # an egress proxy or other helper, not an instance
            if row.get("State") == "running":
                created = datetime.fromtimestamp(int(row.get("Created") or 0), UTC)
                name, ident = _row_name(row), row.get("Id", "")
                found.append(_instance_from_labels(name, labels, ident, started_at=created))
                continue
            try:
                found.append(await self.inspect(_row_name(row)))
            except InstanceNotFoundError:
                continue  # removed in between
        return found

    async def inspect(self, name: str) -> base.Instance:
        """The instance, from the engine, or from what it said last while its events are followed.

        Like an informer's cache: while the event stream runs, any event of a
        container drops what is known of it, and so do this backend's own
        writes; entries also expire after :data:`SEEN_SECONDS`. Passes that
        find nothing changed then cost the engine nothing, which matters
        when hundreds of instances are being started.
        """
        seen = self._seen.get(name)
        if seen is not None and time.monotonic() - seen[0] < SEEN_SECONDS:
            if seen[1] is None:
                raise InstanceNotFoundError(f"{self.name}: no container {name}")
            return seen[1]
        stamp = time.monotonic()
        try:
            attrs = await self._call(self.client.api.inspect_container, name)
        except InstanceNotFoundError:
            self._remember(name, stamp, None)
            raise
        instance = _instance_from_inspect(attrs)
        self._remember(name, stamp, instance)
        return instance

    def _remember(self, name: str, stamp: float, instance: base.Instance | None) -> None:
        # Only while events are followed, and only if no event came while the engine answered.
        if self._following and self._changed.get(name, 0.0) < stamp:
            self._seen[name] = (stamp, instance)

    def _forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self._changed[name] = time.monotonic()

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        issues = self.validate(desired)
        if issues:
            raise SpecError(issues)
        name = desired.name
        socket_dir = self.socket_dir(name)
        await self._call(self._prepare_socket_dir, socket_dir)
        self._forget(name)
        if self._notify is not None:  # before it starts, so that its socket is not missed
            with contextlib.suppress(OSError):
                watch = self._notify.add(socket_dir, base.IN_CREATE | base.IN_MOVED_TO)
                self._sockets[watch] = plugin_key(desired.plugin, desired.namespace)
        volumes = {}
        for volume in desired.spec.volumes:
            if volume.host_path is not None:
                volumes[volume.name] = str(Path(volume.host_path).resolve())
            else:
                volumes[volume.name] = await self._call(self._ensure_volume, desired, volume.name)
        env = {
            "BLACKHOLE_SOCKET": f"{base.SOCKET_DIR_IN_INSTANCE}/{base.SOCKET_NAME}",
            "BLACKHOLE_PLUGIN": desired.plugin,
            "BLACKHOLE_VERSION": str(desired.spec.version),
            "BLACKHOLE_COLOR": desired.color.value,
            "BLACKHOLE_CONFIG": json.dumps(desired.spec.config, sort_keys=True),
            "BLACKHOLE_GATEWAY_SOCKET": f"{base.SOCKET_DIR_IN_INSTANCE}/{base.GATEWAY_SOCKET_NAME}",
        }
        options = container_options(
            desired.spec,
            name=name,
            labels={**desired.labels, **self._owner},
            isolation=self.settings.isolation,
            socket_dir=socket_dir,
            volumes=volumes,
            env=env,
        )
        self._settled.discard(name)  # a new container of that name, not yet lowered
        boost = self.settings.start_cpu_millis * CPU_PERIOD_US // 1000
        if boost > options["cpu_quota"]:
            options["labels"][LABEL_START_CPU] = str(options["cpu_quota"])
            options["cpu_quota"] = boost
        links = self._links(desired)
        if links:
            options["network_mode"] = links[0]
        try:
            ident = await self._call(self._create_and_start, options, desired, links)
        finally:
            self._forget(name)
        return base.Instance(
            name=name,
            plugin=desired.plugin,
            color=desired.color,
            version=str(desired.spec.version),
            spec_hash=desired.spec_hash,
            state=base.InstanceState.RUNNING,
            started_at=datetime.now(UTC),
            namespace=desired.namespace,
            id=ident,
            labels=options["labels"],
        )

    def _links(self, desired: base.InstanceSpec) -> list[str]:
        if desired.spec.permissions.network is not models.NetworkMode.PRIVATE:
            return []
        return [
            link_network(desired.plugin, peer, self.controller_id)
            for peer in desired.spec.permissions.peers
        ]

    def _create_and_start(
        self, options: dict[str, Any], desired: base.InstanceSpec, links: list[str]
    ) -> str:
        for peer, network in zip(desired.spec.permissions.peers, links, strict=True):
            self._ensure_link(network, desired.plugin, peer)
        # The low-level create: the high-level one inspects what it created, a call
        # that costs the engine as much as the create itself when hundreds start.
        arguments = docker_containers._create_container_args(  # type: ignore[attr-defined]
            {**options, "version": self.client.api.api_version}
        )
        ident = str(self.client.api.create_container(**arguments)["Id"])
        try:
            for network in links[1:]:
                self.client.api.connect_container_to_network(ident, network)
            self.client.api.start(ident)
        except BaseException:
            with contextlib.suppress(docker.errors.DockerException):
                self.client.api.remove_container(ident, force=True)
            raise
        return ident

    def _ensure_link(self, network: str, plugin: str, peer: str) -> None:
        # Engines allow two networks of one name; the lock keeps the two peers' passes
        # from both creating it.
        with self._network_lock:
            try:
                self.client.api.inspect_network(network)
                return
            except docker.errors.NotFound:
                pass
            first, second = sorted((plugin, peer))
            self.client.api.create_network(
                network,
                driver="bridge",
                internal=True,
                check_duplicate=True,
                labels={**self._owner, LABEL_LINK: f"{first}.{second}"},
            )

    def _ensure_volume(self, desired: base.InstanceSpec, volume: str) -> str:
        """The engine volume behind a spec volume: created once, owned by the plugin's user."""
        name = base.volume_name(desired.plugin, volume, desired.namespace, desired.controller_id)
        try:
            attrs = self.client.api.inspect_volume(name)
        except docker.errors.NotFound:
            labels = {
                **self._owner,
                base.LABEL_PLUGIN: desired.plugin,
                base.LABEL_VOLUME: volume,
            }
            attrs = self.client.api.create_volume(name, labels=labels)
            mountpoint = Path(attrs.get("Mountpoint") or "")
            if mountpoint.is_dir():  # an engine on this host: hand the directory to the plugin
                os.chown(mountpoint, *self.settings.isolation.uid_gid)
                mountpoint.chmod(0o700)
        return name

    def socket_dir(self, name: str) -> Path:
        """The host directory mounted into instance ``name`` at ``/run/blackhole``."""
        return self.settings.data_dir / "instances" / name

    def _prepare_socket_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / base.SOCKET_NAME).unlink(missing_ok=True)
        os.chown(path, *self.settings.isolation.uid_gid)
        path.chmod(0o700)

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        if instance.state is not base.InstanceState.RUNNING:
            return False
        path = self.socket_dir(instance.name) / base.SOCKET_NAME
        if not await base.probe_socket(path, timeout):
            return False
        quota = instance.labels.get(LABEL_START_CPU)
        if quota is not None and instance.name not in self._settled:
            await self._call(self._set_cpu_quota, instance.name, int(quota))
            self._settled.add(instance.name)
        return True

    def _set_cpu_quota(self, name: str, quota: int) -> None:
        """Lower a started instance's CPU to its spec's (``quota`` per :data:`CPU_PERIOD_US`)."""
        if self.settings.engine is Engine.PODMAN:  # its Docker-compatible API has no update
            api = self.client.api
            url = f"{api.base_url}/v4.0.0/libpod/containers/{name}/update"
            resources = {"cpu": {"quota": quota, "period": CPU_PERIOD_US}}
            api._raise_for_status(api._post_json(url, data=resources))  # type: ignore[attr-defined]
        else:
            self.client.api.update_container(name, cpu_quota=quota, cpu_period=CPU_PERIOD_US)

    def endpoint(self, instance: base.Instance) -> str:
        return f"unix:{self.socket_dir(instance.name) / base.SOCKET_NAME}"

    async def stop(self, name: str, timeout: float) -> None:
        self._forget(name)
        with contextlib.suppress(InstanceNotFoundError):
            await self._call(self._stop, name, max(0, round(timeout)))

    def _stop(self, name: str, timeout: int) -> None:
        # A paused container is thawed first, so that it gets its SIGTERM and drains:
        # Podman refuses to stop one at all, Docker would wait out the timeout.
        if (self.client.api.inspect_container(name).get("State") or {}).get("Paused"):
            with contextlib.suppress(docker.errors.APIError):  # thawed in between
                self.client.api.unpause(name)
        self.client.api.stop(name, timeout=timeout)

    async def remove(self, name: str) -> None:
        self._forget(name)
        self._settled.discard(name)
        with contextlib.suppress(InstanceNotFoundError):
            await self._call(self._kill_and_remove, name)
        self._forget(name)
        await self._call(shutil.rmtree, self.socket_dir(name), True)

    def _kill_and_remove(self, name: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            self.client.api.kill(name)  # Podman's remove would wait out the stop timeout
        self.client.api.remove_container(name, force=True)

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        networks = await self._call(self.client.api.networks, filters=self._selector())
        for network in networks:
            members = (network.get("Labels") or {}).get(LABEL_LINK, "").split(".")
            if plugin not in members:
                continue
            attrs = await self._call(self.client.api.inspect_network, network["Id"])
            if attrs.get("Containers"):
                continue  # the peer still uses it; its own release removes it
            with contextlib.suppress(InstanceNotFoundError, RuntimeBackendError):
                await self._call(self.client.api.remove_network, network["Id"])

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        """Nothing to move: on one host, plugins are reached only through the gateway."""

    async def logs(self, name: str, tail: int) -> list[str]:
        raw = await self._call(self.client.api.logs, name, tail=tail, timestamps=False)
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return text.splitlines()[-tail:] if tail else []

    async def stats(self, name: str) -> base.Stats:
        raw = await self._call(self.client.api.stats, name, stream=False)
        cpu = raw.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0)
        memory = raw.get("memory_stats", {})
        return base.Stats(
            cpu_seconds=cpu / 1e9,
            memory_bytes=int(memory.get("usage", 0)),
            memory_limit_bytes=int(memory.get("limit", 0)),
            pids=int(raw.get("pids_stats", {}).get("current", 0)),
        )

    async def events(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        # One label, and actions picked here: Podman 4 honours only the first value of a
        # repeated filter key.
        filters = {"label": [f"{base.LABEL_CONTROLLER}={self.controller_id}"]}
        stream = await self._call(self.client.events, decode=True, filters=filters)

        def pump() -> None:
            try:
                for event in stream:
                    event_data: dict[str, Any] = event  # type: ignore[assignment]
                    action = str(event_data.get("Action") or event_data.get("status") or "")
                    if event_data.get("Type") != "container":
                        continue
                    labels = (event_data.get("Actor") or {}).get("Attributes") or {}
                    if labels.get("name"):  # whatever happened, what was known of it is old
                        loop.call_soon_threadsafe(self._forget, str(labels["name"]))
                    if action not in _EVENTS:
                        continue
                    if labels.get(base.LABEL_MANAGED_BY) != base.MANAGED_BY:
                        continue
                    plugin = labels.get(base.LABEL_PLUGIN)
                    if plugin and base.LABEL_COLOR in labels:
                        namespace = labels.get(base.LABEL_NAMESPACE)
                        key = plugin_key(plugin, namespace)
                        loop.call_soon_threadsafe(queue.put_nowait, key)
            except Exception:  # the stream ends when it is closed or when the engine goes away
                log.debug("%s event stream ended", self.name, exc_info=True)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=pump, name=f"{self.name}-events", daemon=True)
        thread.start()
        notify = base.Inotify()
        loop.add_reader(notify.fd, self._socket_appeared, notify, queue)
        self._notify = notify
        self._following = True
        try:
            while (key := await queue.get()) is not None:
                yield key
        finally:
            self._following = False
            self._seen.clear()
            loop.remove_reader(notify.fd)
            notify.close()
            self._notify = None
            self._sockets.clear()
            stream.close()

    def _socket_appeared(self, notify: base.Inotify, queue: asyncio.Queue[str | None]) -> None:
        """Queue a plugin's key the moment its instance's socket appears: it can be Ready now.

        Readiness is then seen when it happens, not at the next probe, and
        instances that start take no engine calls while they are starting.
        Each starting instance's directory is watched alone, nothing below it.
        """
        for wd, mask, filename in notify.read():
            if mask & base.IN_IGNORED:  # its directory was removed
                self._sockets.pop(wd, None)
            elif filename == base.SOCKET_NAME and wd in self._sockets:
                queue.put_nowait(self._sockets.pop(wd))
                notify.remove(wd)

    # Images, for the plugin registry: bundles carry theirs as docker save archives.

    async def load_image(self, archive: Path) -> str:
        """Load a ``docker save`` archive; the id (``sha256:<hex>``) of the image it held."""
        return await self._call(self._load_image, archive)

    def _load_image(self, archive: Path) -> str:
        with archive.open("rb") as handle:
            messages = list(self.client.api.load_image(handle))  # type: ignore[no-untyped-call]
        loaded = []
        for message in messages:
            if "error" in message:
                raise RuntimeBackendError(f"{self.name} could not load {archive}: {message}")
            text = str(message.get("stream", ""))
            for prefix in ("Loaded image ID: ", "Loaded image: "):
                if text.startswith(prefix):
                    loaded.append(text.removeprefix(prefix).strip())
        if not loaded:
            raise RuntimeBackendError(f"{self.name} loaded no image from {archive}: {messages}")
        attrs = self.client.api.inspect_image(loaded[0])  # type: ignore[no-untyped-call]
        return str(attrs["Id"])

    async def image_id(self, reference: str) -> str | None:
        """The id of the image ``reference`` names, or None when the engine has none."""
        try:
            attrs = await self._call(self.client.api.inspect_image, reference)
        except InstanceNotFoundError:
            return None
        return str(attrs["Id"])

    async def remove_image(self, reference: str) -> None:
        """Remove an image (refused by the engine while a container uses it)."""
        with contextlib.suppress(InstanceNotFoundError):
            await self._call(self.client.api.remove_image, reference)

    async def save_image(self, reference: str, archive: Path) -> None:
        """Write ``reference`` as a ``docker save`` archive, tagged, for a bundle."""
        await self._call(self._save_image, reference, archive)

    def _save_image(self, reference: str, archive: Path) -> None:
        with archive.open("wb") as out:
            for chunk in self.client.api.get_image(reference):
                out.write(chunk)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()


_EVENTS = frozenset({"start", "die", "oom"})
SEEN_SECONDS = 30.0
"""Longest an inspection is reused while events are followed."""
"""Container events that send the plugin to the queue."""
LABEL_LINK = models.LABEL_PREFIX + "link"
"""On a private network: the two plugins it links, as ``a.b``."""


def _row_name(row: Mapping[str, Any]) -> str:
    names = row.get("Names") or [""]
    return str(names[0]).lstrip("/")


def _instance_from_labels(
    name: str, labels: Mapping[str, str], ident: str, **state: Any
) -> base.Instance:
    return base.Instance(
        name=name,
        plugin=labels.get(base.LABEL_PLUGIN, ""),
        color=models.Color(labels.get(base.LABEL_COLOR, "blue")),
        version=labels.get(base.LABEL_VERSION, ""),
        spec_hash=labels.get(base.LABEL_SPEC_HASH, ""),
        state=state.pop("state", base.InstanceState.RUNNING),
        namespace=labels.get(base.LABEL_NAMESPACE) or None,
        id=ident,
        labels=dict(labels),
        **state,
    )


_STATES = {
    "running": base.InstanceState.RUNNING,
    "paused": base.InstanceState.PAUSED,
    "created": base.InstanceState.CREATED,
    "configured": base.InstanceState.CREATED,
    "initialized": base.InstanceState.CREATED,
    "exited": base.InstanceState.EXITED,
    "stopped": base.InstanceState.EXITED,
    "dead": base.InstanceState.EXITED,
}


def _instance_from_inspect(attrs: Mapping[str, Any]) -> base.Instance:
    state = attrs.get("State") or {}
    status = _STATES.get(str(state.get("Status", "")).lower(), base.InstanceState.UNKNOWN)
    exit_code = state.get("ExitCode")
    return _instance_from_labels(
        str(attrs.get("Name", "")).lstrip("/"),
        (attrs.get("Config") or {}).get("Labels") or {},
        str(attrs.get("Id", "")),
        state=status,
        exit_code=None if status is not base.InstanceState.EXITED else exit_code,
        oom_killed=bool(state.get("OOMKilled")),
        started_at=_timestamp(state.get("StartedAt")),
        finished_at=_timestamp(state.get("FinishedAt")),
        pid=int(state.get("Pid") or 0) or None,
    )


def _timestamp(text: object) -> datetime | None:
    """An engine's RFC 3339 time (nanoseconds, Z or offset); None for the zero time."""
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text)
    if match is None:
        return None
    fraction = (match[2] or ".0")[:7]
    zone = "+00:00" if match[3] in (None, "Z") else match[3]
    return datetime.fromisoformat(f"{match[1]}{fraction}{zone}")
