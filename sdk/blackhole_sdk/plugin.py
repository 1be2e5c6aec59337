"""The ``Plugin`` base class and ``serve()``: a plugin listening on its Unix socket.

The controller starts each instance with ``BLACKHOLE_SOCKET`` (where to
listen), ``BLACKHOLE_PLUGIN``, ``BLACKHOLE_VERSION``, ``BLACKHOLE_COLOR`` and
``BLACKHOLE_CONFIG`` (the spec's ``config`` as JSON). ``serve()`` listens
there, answers calls, and on SIGTERM stops taking connections, lets the
calls in flight finish and exits 0. Logs go to stderr.

Calls are JSON lines: ``{"method": ..., "payload": ...}`` in, ``{"result":
...}`` or ``{"error": ...}`` out, one per line, many per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("blackhole_sdk")


class PluginError(Exception):
    """A call failed in a way the caller should see: its message is sent back."""


class Plugin:
    """Subclass it: override ``initialize`` and ``handle`` (and ``health`` if it can fail)."""

    def initialize(self, config: dict[str, Any]) -> None:
        """Called once before the first call, with the spec's ``config``."""

    def handle(self, method: str, payload: Any) -> Any:
        """Answer one call; raise :class:`PluginError` to send an error back."""
        raise PluginError(f"unknown method {method!r}")

    def health(self) -> bool:
        """Whether the plugin can take calls."""
        return True


class _Server:
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self.in_flight += 1
                self.idle.clear()
                try:
                    answer = self.call(line)
                finally:
                    self.in_flight -= 1
                    if self.in_flight == 0:
                        self.idle.set()
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def call(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            method = request["method"]
        except (ValueError, KeyError, TypeError):
            return {"error": 'a call is a JSON object with "method" and "payload"'}
        if method == "health":
            return {"result": {"healthy": self.plugin.health()}}
        try:
            return {"result": self.plugin.handle(str(method), request.get("payload"))}
        except PluginError as e:
            return {"error": str(e)}


async def _serve(plugin: Plugin, path: Path) -> None:
    config = json.loads(os.environ.get("BLACKHOLE_CONFIG") or "{}")
    plugin.initialize(config)
    server_state = _Server(plugin)
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(server_state.connection, path=str(path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "%s %s listening on %s",
        os.environ.get("BLACKHOLE_PLUGIN", type(plugin).__name__),
        os.environ.get("BLACKHOLE_VERSION", ""),
        path,
    )
    await stop.wait()
    log.info("draining: %d call(s) in flight", server_state.in_flight)
    server.close()
    await server_state.idle.wait()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def serve(plugin: Plugin, socket_path: str | None = None) -> None:
    """Serve ``plugin`` on ``socket_path`` (default ``$BLACKHOLE_SOCKET``) until SIGTERM."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    path = socket_path or os.environ.get("BLACKHOLE_SOCKET")
    if not path:
        sys.exit("no socket to listen on: set BLACKHOLE_SOCKET or pass socket_path")
    asyncio.run(_serve(plugin, Path(path)))
