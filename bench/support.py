"""What the benchmarks share: a real controller process to measure, waiting, and plotting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.admin import client as admin_client
from controller.cli import gateway as gateway_process
from controller.runtimes import base, container, process


@dataclass
class Controller:
    """``bhctl run`` on Docker (or another runtime) in a folder of its own."""

    specs: Path
    data: Path
    ident: str
    admin: admin_client.AdminClient
    process: subprocess.Popen[bytes]

    def addresses(self) -> dict[str, str]:
        """Where its gateway (and metrics) listen."""
        return dict(json.loads((self.data / "addresses.json").read_text()))

    def status(self, name: str) -> dict[str, Any]:
        """The plugin's status while it is Ready; empty otherwise."""
        try:
            items = {i["metadata"]["name"]: i for i in self.admin.list()["items"]}
        except admin_client.ControllerNotRunningError:
            return {}
        status = dict((items.get(name) or {}).get("status") or {})
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )
        return status if ready else {}

    async def until(self, condition: Callable[[], object], timeout: float = 120) -> None:
        """Wait for ``condition`` (read in a thread); exit if the controller dies or time is up."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(condition):
            if self.process.poll() is not None:
                sys.exit(f"the controller exited; see {self.data.parent / 'controller.log'}")
            if time.monotonic() > deadline:
                sys.exit(f"timed out after {timeout}s; see {self.data.parent / 'controller.log'}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def controller(
    root: Path,
    specs: dict[str, str],
    *options: str,
    runtime: str = "docker",
    env: dict[str, str] | None = None,
) -> AsyncIterator[Controller]:
    """Run ``bhctl run`` on the spec files ``specs`` (name to text); remove all it made after.

    ``env`` is added to this process's environment for it (e.g. a ``PYTHONPATH``)."""
    folder, data = root / "specs", root / "data"
    folder.mkdir(parents=True)
    for name, text in specs.items():
        (folder / name).write_text(text)
    ident = f"bench-{uuid.uuid4().hex[:8]}"
    command = [
        str(Path(sys.executable).parent / "bhctl"), "run", "--specs", str(folder),
        "--data-dir", str(data), "--controller-id", ident, "--gateway-addr", "127.0.0.1:0",
        "--log-level", "warning", "--runtime", runtime, *options,
    ]  # fmt: skip
    with (root / "controller.log").open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    admin = admin_client.AdminClient(data / "admin.sock", timeout=10)
    try:
        yield Controller(folder, data, ident, admin, process)
    finally:
        process.terminate()
        process.wait(30)
        await asyncio.to_thread(gateway_process.stop_running, data)  # it outlives the controller
        await _remove_instances(runtime, data, ident)


async def _remove_instances(runtime: str, data: Path, ident: str) -> None:
    if runtime == "process":
        processes = process.ProcessRuntime(process.Settings(data_dir=data, controller_id=ident))
        for instance in await processes.list_owned():
            await processes.remove(instance.name)
        return
    client = container.connect(container.Engine(runtime))
    selector: dict[str, str | list[str] | bool] = {"label": f"{base.LABEL_CONTROLLER}={ident}"}
    for found in client.containers.list(all=True, filters=selector):
        found.remove(force=True)
    client.close()


def wait_for_socket(path: Path, deadline: float) -> None:
    """Wait until the Unix socket at ``path`` accepts, before ``deadline`` (monotonic)."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.0005)
    raise TimeoutError(f"{path} did not accept within the deadline")


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files, or an exit that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: .venv/bin/pip install matplotlib")
    return plt
