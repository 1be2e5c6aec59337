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
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from controller.admin import server
from controller.errors import ControllerError
from controller.reconcile import manager, queue
from controller.runtimes import container
from controller.sources import directory, store

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


@dataclass(frozen=True)
class Options:
    specs: Path | None
    runtime: container.Engine
    data_dir: Path
    workers: int
    resync_seconds: float
    host_path_root: Path | None
    controller_id: str


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


async def serve(options: Options) -> None:
    """Run the controller until SIGTERM/SIGINT."""
    with _lock(options.data_dir):
        records = store.Store(options.data_dir / "state.db")
        work = queue.WorkQueue()
        source = directory.DirectorySource(
            options.specs, records, work.add, resync_seconds=options.resync_seconds
        )
        runtime = container.ContainerRuntime(
            container.Settings(
                engine=options.runtime,
                data_dir=options.data_dir,
                controller_id=options.controller_id,
                host_path_root=options.host_path_root,
                threads=options.workers,
            )
        )
        info = await asyncio.to_thread(container.describe, options.runtime)
        log.info(
            "controller %s on %s %s (API %s), specs from %s, data in %s",
            options.controller_id,
            info.engine,
            info.version,
            info.api_version,
            options.specs or "the admin API only",
            options.data_dir,
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        admin = server.AdminServer(source, runtime, admin_socket(options.data_dir))
        await admin.start()
        try:
            await manager.Manager(source, runtime, work, workers=options.workers).run(stop)
        finally:
            await admin.stop()
            await runtime.close()
            records.close()
        log.info("stopped")
