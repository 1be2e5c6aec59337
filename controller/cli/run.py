"""``bhctl run``: the single-host controller process, assembled and run until SIGTERM.

Owns the data directory (a lock file keeps a second controller out), opens
the store, connects the runtime, serves the admin API and runs the manager.
SIGTERM or SIGINT finishes the passes in flight and exits 0, leaving every
instance running for the next controller to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import controller
from controller.admin import server
from controller.errors import ControllerError
from controller.gateway import auth, router
from controller.gateway import server as gateway_server
from controller.metrics import exposition, telemetry, violations
from controller.protocol import client
from controller.reconcile import manager, queue
from controller.runtimes import base, container, process
from controller.sources import directory, store
from controller.spec import models
from controller.state import snapshots

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``BLACKHOLE_DATA_DIR``, else /var/lib/blackhole as root, else the user's data home."""
    if configured := os.environ.get("BLACKHOLE_DATA_DIR"):
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/lib/blackhole")
    home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(home) / "blackhole"


def admin_socket(data_dir: Path) -> Path:
    return data_dir / "admin.sock"


def addresses_file(data_dir: Path) -> Path:
    """Where a running controller says it listens (gateway, metrics), for ``bhctl call``."""
    return data_dir / "addresses.json"


def gateway_address(data_dir: Path) -> str:
    """The HTTP address of the gateway of the controller on ``data_dir`` (else the default)."""
    try:
        return str(json.loads(addresses_file(data_dir).read_text())["http"])
    except (OSError, ValueError, KeyError, TypeError):
        return Options.gateway_address


def write_addresses(data_dir: Path, bound: dict[str, str]) -> None:
    path = addresses_file(data_dir)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(bound) + "\n")
    temporary.replace(path)


class RuntimeChoice(StrEnum):
    """Where ``bhctl run`` runs instances: a container engine, or plain processes."""

    DOCKER = "docker"
    PODMAN = "podman"
    PROCESS = "process"


@dataclass(frozen=True)
class Options:
    specs: Path | None
    runtime: RuntimeChoice
    data_dir: Path
    workers: int
    resync_seconds: float
    host_path_root: Path | None
    controller_id: str
    gateway_address: str = "127.0.0.1:8080"
    gateway_grpc_address: str | None = "127.0.0.1:8081"
    gateway_tokens: Path | None = None
    metrics_address: str | None = "127.0.0.1:9100"
    thresholds: violations.Thresholds = field(default_factory=violations.Thresholds)
    plugin_root: Path | None = None
    """Where the process runtime finds plugin directories (default ``data_dir/plugins``)."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (``BLACKHOLE_EVENT_LOOP=asyncio`` for the standard one).

    The gateway relays a call faster on it: see ``bench/gateway.py``.
    """
    if os.environ.get("BLACKHOLE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


class AlreadyRunningError(ControllerError):
    """Another controller holds the data directory."""


@contextlib.contextmanager
def _lock(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    with (data_dir / "controller.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunningError(
                f"another controller is running on {data_dir}; stop it or use --data-dir"
            ) from None
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


class GatewayConfigError(ControllerError):
    """The gateway's settings would expose plugins, or cannot be read."""


def gateway_tokens(options: Options) -> auth.Tokens | None:
    """The gateway's tokens; refuses to let anyone on the network call plugins unauthenticated."""
    if options.gateway_tokens is not None:
        return auth.Tokens.load(options.gateway_tokens)
    for address in (options.gateway_address, options.gateway_grpc_address):
        if address and not _loopback(address):
            raise GatewayConfigError(
                f"the gateway would listen on {address} without authentication: anyone who "
                "reaches it could call every plugin. Give --gateway-tokens FILE, or listen "
                "on a loopback address"
            )
    return None


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _lookup(source: directory.DirectorySource) -> gateway_server.Lookup:
    def lookup(key: str) -> models.Plugin | None:
        desired = source.get(key)
        return desired.plugin if desired is not None else None

    return lookup


async def _runtime(options: Options) -> base.Runtime:
    """The backend ``options`` ask for, checked to work on this host."""
    if options.runtime is RuntimeChoice.PROCESS:
        settings = process.Settings(
            data_dir=options.data_dir,
            controller_id=options.controller_id,
            plugin_root=options.plugin_root,
            host_path_root=options.host_path_root,
        )
        host = await asyncio.to_thread(process.describe, settings)
        log.info(
            "controller %s on processes (%s, cgroup v%d), plugins from %s, specs from %s, "
            "data in %s",
            options.controller_id,
            host.kernel,
            host.cgroup_version,
            settings.plugins,
            options.specs or "the admin API only",
            options.data_dir,
        )
        return process.ProcessRuntime(settings)
    engine = container.Engine(options.runtime.value)
    info = await asyncio.to_thread(container.describe, engine)
    log.info(
        "controller %s on %s %s (API %s), specs from %s, data in %s",
        options.controller_id,
        info.engine,
        info.version,
        info.api_version,
        options.specs or "the admin API only",
        options.data_dir,
    )
    return container.ContainerRuntime(
        container.Settings(
            engine=engine,
            data_dir=options.data_dir,
            controller_id=options.controller_id,
            host_path_root=options.host_path_root,
            threads=options.workers,
        )
    )


async def serve(options: Options) -> None:
    """Run the controller until SIGTERM/SIGINT."""
    tokens = gateway_tokens(options)
    with _lock(options.data_dir):
        records = store.Store(options.data_dir / "state.db")
        work = queue.WorkQueue()
        source = directory.DirectorySource(
            options.specs, records, work.add, resync_seconds=options.resync_seconds
        )
        runtime = await _runtime(options)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        plugins = client.Clients()
        metrics = telemetry.Metrics(version=controller.__version__)
        routes = router.Router(metrics)
        gateway = gateway_server.Gateway(_lookup(source), routes, plugins, tokens=tokens)
        states = snapshots.Snapshots(options.data_dir / "snapshots.db")
        control = manager.Manager(
            source,
            runtime,
            work,
            plugins,
            routes=routes,
            snapshots=states,
            metrics=metrics,
            thresholds=options.thresholds,
            workers=options.workers,
        )
        exposition_server = exposition.MetricsServer(metrics.registry)
        admin = server.AdminServer(
            source, runtime, admin_socket(options.data_dir), control=control, plugins=plugins
        )
        await admin.start()
        try:
            bound = await gateway.start(options.gateway_address, options.gateway_grpc_address)
            if options.metrics_address:
                bound["metrics"] = await exposition_server.start(options.metrics_address)
            write_addresses(options.data_dir, bound)
            await control.run(stop)
        finally:
            await exposition_server.stop()
            await gateway.stop()
            await admin.stop()
            await plugins.close()
            await runtime.close()
            states.close()
            records.close()
        log.info("stopped")
