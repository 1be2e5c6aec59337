"""``/metrics`` over HTTP: the registry in Prometheus' text format, collected off the event loop.

Collection reads every instance's cgroup files; it runs in a thread, so a
scrape never stalls reconciles or gateway calls. Also how the controller's
TCP listeners bind (:func:`bind`, the gateway's too): a port taken for a
moment, say by an outgoing connection while the controller was down, is
tried again for :data:`BIND_SECONDS` before giving up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controller.errors import ControllerError

log = logging.getLogger(__name__)

BIND_SECONDS = 5.0
"""How long a listener tries a port that is in use before giving up."""


async def bind(listener: socket.socket, address: tuple[str, int], what: str) -> None:
    """Bind ``listener``, trying again while the port is in use, for :data:`BIND_SECONDS`.

    Ports in the kernel's ephemeral range can be held by outgoing connections
    while a server is down; they are given back within moments. Any other
    error, and a port still in use at the end, raises :class:`OSError`.
    """
    deadline = time.monotonic() + BIND_SECONDS
    delay = 0.05
    while True:
        try:
            listener.bind(address)
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            log.warning("%s: %s:%d is in use; trying again", what, *address)
        await asyncio.sleep(delay)
        delay = min(0.5, delay * 2)


class MetricsServerError(ControllerError):
    """The metrics endpoint cannot listen."""


class MetricsServer:
    """Serves ``GET /metrics`` (and ``/healthz``) for one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.extra: Callable[[], bytes] | None = None
        """More series in the text format, appended at each scrape (the gateway process's)."""
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self, address: str) -> str:
        """Listen on ``HOST:PORT`` (port 0 picks one); the address really listened on."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise MetricsServerError(f"{address!r}: use HOST:PORT, e.g. 127.0.0.1:9100")
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await bind(listener, (host, int(port)), "metrics")
        except OSError as e:
            listener.close()
            raise MetricsServerError(f"metrics cannot listen on {address}: {e.strerror}") from e
        await self._runner.setup()
        await web.SockSite(self._runner, listener).start()
        bound_port = listener.getsockname()[1]
        bound = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        log.info("metrics on http://%s/metrics", bound)
        return bound

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._collect)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _collect(self) -> bytes:
        body = generate_latest(self.registry)
        return body + self.extra() if self.extra is not None else body

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})
