"""The container backend itself: the Runtime protocol on Docker or Podman.

It composes the rest of this package: the engine connection (:mod:`engine`),
the isolation a spec becomes (:mod:`isolation`), private networks
(:mod:`networks`), volumes (:mod:`volumes`), the inspection cache
(:mod:`inspection`), the engine's event thread (:mod:`events`), image load
and save (:mod:`images`) and the start-up CPU boost (:mod:`start_cpu`).
Instances have deterministic names and ownership labels, and a socket
directory each on this host, mounted at ``/run/blackhole``. Engine calls run
on a pool of threads, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models import containers as docker_containers

from controller import inotify as linux_inotify
from controller.errors import ControllerError, InstanceNotFoundError, SpecIssue
from controller.runtimes import base, inotify
from controller.runtimes.container import (
    engine,
    events,
    images,
    inspection,
    isolation,
    networks,
    start_cpu,
    volumes,
)
from controller.spec import models

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How the backend reaches its engine and where it keeps instance files."""

    engine: engine.Engine
    data_dir: Path
    """Per-instance socket directories live in ``data_dir/instances``."""
    url: str | None = None
    controller_id: str = base.DEFAULT_CONTROLLER
    """Several controllers may share an engine; each owns only what carries its id."""
    host_path_root: Path | None = None
    """Host paths must lie under this directory; None refuses host paths."""
    isolation: isolation.Isolation = field(default_factory=isolation.Isolation)
    start_cpu_millis: int = start_cpu.START_CPU_MILLIS
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
        self._sockets = inotify.SocketWatch()
        self._settled: set[str] = set()
        """Instances started with extra CPU that have their spec's limit now."""
        self._cache = inspection.InspectionCache()
        self._owner = base.owner_labels(settings.controller_id)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = engine.connect(self.settings.engine, self.settings.url)
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        with engine.translated(self.name):
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def capabilities(self) -> base.Capabilities:
        return base.Capabilities(
            networks=frozenset({models.NetworkMode.NONE, models.NetworkMode.PRIVATE}),
            volumes=True,
            host_paths=self.settings.host_path_root is not None,
            announces_sockets=self._cache.following,
        )

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        issues = base.check_host_paths(desired.spec, self.settings.host_path_root)
        network = desired.spec.permissions.network
        if network not in self.capabilities().networks:
            issues.append(
                SpecIssue(
                    "runtime",
                    None,
                    "spec.permissions.network",
                    f"is not supported on {self.name} yet; use none or private",
                    value=network.value,
                    has_value=True,
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
            if base.LABEL_COLOR not in (row.get("Labels") or {}):
                continue  # an egress proxy or other helper, not an instance
            if row.get("State") == "running":
                found.append(inspection.instance_from_row(row))
                continue
            try:
                found.append(await self.inspect(inspection.row_name(row)))
            except InstanceNotFoundError:
                continue  # removed in between
        return found

    async def inspect(self, name: str) -> base.Instance:
        """The instance, from the engine, or from what it said last while its events are followed
        (see :class:`inspection.InspectionCache`)."""
        known, instance = self._cache.get(name)
        if known:
            if instance is None:
                raise InstanceNotFoundError(f"{self.name}: no container {name}")
            return instance
        stamp = time.monotonic()
        try:
            attrs = await self._call(self.client.api.inspect_container, name)
        except InstanceNotFoundError:
            self._cache.remember(name, stamp, None)
            raise
        instance = inspection.instance_from_inspect(attrs)
        self._cache.remember(name, stamp, instance)
        return instance

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        base.refuse(self.validate(desired))
        name = desired.name
        socket_dir = self.socket_dir(name)
        user = self.settings.isolation.user
        await self._call(base.prepare_socket_dir, socket_dir, user)
        self._cache.forget(name)
        # Watched before it starts, so that its socket is not missed.
        self._sockets.add(
            socket_dir, desired.key, linux_inotify.IN_CREATE | linux_inotify.IN_MOVED_TO
        )
        sources = await self._call(volumes.sources, self.client, desired, self._owner, user)
        options = isolation.container_options(
            desired.spec,
            name=name,
            labels={**desired.labels, **self._owner},
            isolation=self.settings.isolation,
            socket_dir=socket_dir,
            volumes=sources,
            env=base.plugin_environment(desired),
        )
        self._settled.discard(name)  # a new container of that name, not yet lowered
        start_cpu.boost(
            options, base.start_cpu_millis(desired.spec, self.settings.start_cpu_millis)
        )
        links = networks.links(desired, self.controller_id)
        if links:
            options["network_mode"] = links[0]
        try:
            ident = await self._call(self._create_and_start, options, desired, links)
        finally:
            self._cache.forget(name)
        return base.started_instance(desired, ident, options["labels"])

    def _create_and_start(
        self, options: dict[str, Any], desired: base.InstanceSpec, links: list[str]
    ) -> str:
        for peer, network in zip(desired.spec.permissions.peers, links, strict=True):
            networks.ensure_link(
                self.client, self._network_lock, network, desired.plugin, peer, self._owner
            )
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

    def socket_dir(self, name: str) -> Path:
        """The host directory mounted into instance ``name`` at ``/run/blackhole``."""
        return self.settings.data_dir / "instances" / name

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        if instance.state is not base.InstanceState.RUNNING:
            return False
        path = self.socket_dir(instance.name) / base.SOCKET_NAME
        if not await base.probe_socket(path, timeout):
            return False
        quota = instance.labels.get(start_cpu.LABEL_START_CPU)
        if quota is not None and instance.name not in self._settled:
            await self._call(
                start_cpu.set_quota, self.client, self.settings.engine, instance.name, int(quota)
            )
            self._settled.add(instance.name)
        return True

    def endpoint(self, instance: base.Instance) -> str:
        return f"unix:{self.socket_dir(instance.name) / base.SOCKET_NAME}"

    async def stop(self, name: str, timeout: float) -> None:
        self._cache.forget(name)
        with contextlib.suppress(InstanceNotFoundError):
            await self._call(self._stop, name, max(0, round(timeout)))

    def _stop(self, name: str, timeout: int) -> None:
        # A paused container is thawed first, so that it gets its SIGTERM and drains:
        # Podman refuses to stop one at all, Docker would wait out the timeout.
        if (self.client.api.inspect_container(name).get("State") or {}).get("Paused"):
            with contextlib.suppress(docker.errors.APIError):  # thawed in between
                self.client.api.unpause(name)
        self.client.api.stop(name, timeout=timeout)

    # Warm standbys (base.Standbys).

    async def freeze(self, name: str) -> None:
        self._cache.forget(name)
        await self._call(self.client.api.pause, name)
        self._cache.forget(name)

    async def thaw(self, name: str) -> None:
        self._cache.forget(name)
        await self._call(self.client.api.unpause, name)
        self._cache.forget(name)

    async def promote(self, standby: str, name: str) -> base.Instance:
        thawed = await self.inspect(standby)
        await self._call(self._promote, standby, name)
        for forgotten in (standby, name):
            self._cache.forget(forgotten)
        if standby in self._settled:
            self._settled.discard(standby)
            self._settled.add(name)
        return dataclasses.replace(thawed, name=name)

    def _promote(self, standby: str, name: str) -> None:
        # The socket directory is bind-mounted by its inode: renamed, the standby keeps it,
        # and the crashed instance's endpoint now leads to the standby's socket.
        target = self.socket_dir(name)
        shutil.rmtree(target, ignore_errors=True)
        self.socket_dir(standby).rename(target)
        self.client.api.rename(standby, name)

    async def remove(self, name: str) -> None:
        self._cache.forget(name)
        self._settled.discard(name)
        with contextlib.suppress(InstanceNotFoundError):
            await self._call(self._kill_and_remove, name)
        self._cache.forget(name)
        await self._call(shutil.rmtree, self.socket_dir(name), True)

    def _kill_and_remove(self, name: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            self.client.api.kill(name)  # Podman's remove would wait out the stop timeout
        self.client.api.remove_container(name, force=True)

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        await self._call(networks.remove_unused, self.client, self._owner, plugin)

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        """Nothing to move: on one host, plugins are reached only through the gateway."""

    async def remove_volumes(self) -> list[str]:
        return await self._call(volumes.remove_owned, self.client, self._owner)

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        raw = await self._call(self.client.api.logs, name, tail=tail, timestamps=timestamps)
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
        filters = events.selector(self.controller_id)
        stream = await self._call(self.client.events, decode=True, filters=filters)
        events.follow(stream, self.name, loop, queue, self._cache.forget)
        notify = self._sockets.open()
        loop.add_reader(notify.fd, self._socket_appeared, notify, queue)
        self._cache.following = True
        try:
            stamp = time.monotonic()  # after the events are followed: no change falls between
            with contextlib.suppress(ControllerError):  # then each name is inspected, as before
                rows = await self._call(
                    self.client.api.containers, all=True, filters=self._selector()
                )
                self._cache.listed(stamp, (inspection.row_name(row) for row in rows))
            while (key := await queue.get()) is not None:
                yield key
        finally:
            self._cache.stop_following()
            loop.remove_reader(notify.fd)
            self._sockets.close()
            stream.close()

    def _socket_appeared(
        self, notify: linux_inotify.Inotify, queue: asyncio.Queue[str | None]
    ) -> None:
        """Queue a plugin's key the moment its instance's socket appears: it can be Ready now.

        Readiness is then seen when it happens, not at the next probe, and
        instances that start take no engine calls while they are starting.
        """
        for event in notify.read():
            if (key := self._sockets.appeared(*event)) is not None:
                queue.put_nowait(key)

    # Images, for the plugin registry.

    async def load_image(self, archive: Path) -> str:
        """Load a ``docker save`` archive; the id (``sha256:<hex>``) of the image it held."""
        return await self._call(images.load, self.client, archive, self.name)

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
        await self._call(images.save, self.client, reference, archive)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
