"""The launcher protocol, on the backend's side: start the fork server, send it launch requests.

The launcher is :mod:`.shim` run as a program of its own, given where to
keep its spare plugin process's cgroups (cgroup v1; see :func:`start`). It
answers once when it is up (its pid, whether it preloaded the SDK, the
directories its interpreter reads code from), then one answer per launch
request (the plugin's pid and start time and whether it was a spare, or an
error). Each message is JSON behind a 4-byte big-endian length. One request
is in flight at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import EngineUnavailableError, RuntimeBackendError

log = logging.getLogger(__name__)

PROGRAM = Path(__file__).with_name("shim.py")
"""The launcher's program, run by path: it must not import the controller."""


@dataclass
class Launcher:
    """A running launcher: its process and what it said when it started."""

    process: asyncio.subprocess.Process
    warm: bool
    """Whether it preloaded the SDK (plugins without a virtual environment start warm)."""
    paths: list[str]
    """The directories its interpreter reads code from: a warm plugin's root must have them."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def launch(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one launch request; the answer (``pid``, ``starttime``), or raise."""
        body = json.dumps(request).encode()
        stdin = self.process.stdin
        assert stdin is not None
        async with self.lock:
            try:
                stdin.write(struct.pack("!I", len(body)) + body)
                await stdin.drain()
                reply = await _receive(self.process)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.process.kill()
                raise RuntimeBackendError(f"process: the launcher failed: {e}") from e
        if "error" in reply:
            raise RuntimeBackendError(f"process: {request['name']} did not start: {reply['error']}")
        return reply

    async def close(self) -> None:
        """Close its input (it then exits), killing it if it does not within 5 seconds."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def start(python: str, spare_parents: list[Path], spare_prefix: str) -> Launcher:
    """Start the launcher under ``python`` and wait for its first answer; it keeps a spare
    plugin process in a group ``<spare_prefix><pid>`` under each of ``spare_parents`` (none:
    no spare)."""
    spares = {"parents": [str(p) for p in spare_parents], "prefix": spare_prefix}
    process = await asyncio.create_subprocess_exec(
        python,
        "-I",
        str(PROGRAM),
        json.dumps(spares),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        hello = await _receive(process)
    except (asyncio.IncompleteReadError, ValueError) as e:
        raise EngineUnavailableError(
            f"process: the launcher ({python} {PROGRAM}) did not start: {e}"
        ) from e
    log.info(
        "process launcher %s started (%s)",
        hello["pid"],
        "SDK preloaded" if hello["warm"] else "no SDK to preload: plugins start cold",
    )
    return Launcher(process, bool(hello["warm"]), list(hello["paths"]))


async def _receive(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    size = struct.unpack("!I", await process.stdout.readexactly(4))[0]
    reply: dict[str, Any] = json.loads(await process.stdout.readexactly(size))
    return reply
