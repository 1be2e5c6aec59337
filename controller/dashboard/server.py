"""The dashboard's HTTP server: its own listener (``bhctl run --dashboard-addr``), its pages,
a live stream per plugin page, and the swap actions.

- ``GET /``: the plugin list (``?q=`` filters it); ``GET /plugins/{name}``: one plugin;
  ``GET /catalog?q=``: the registry's catalog, searched;
- ``GET /plugins/{name}/live``: server-sent events, one ``sections`` event each time a
  part of the page changes (the HTML of each changed part, by element id, and which
  actions apply), checked every :data:`LIVE_SECONDS`;
- ``POST /api/plugins/{name}/swap/{action}``: promote, abort, undo or retry, through the
  admin API's checks and the same request its pass answers; only with
  ``Authorization: Bearer TOKEN`` of a token that has ``dashboard: admin`` in the gateway's
  tokens file, else ``401``/``403``. A GET never acts, and a POST from another origin is
  refused, so no other site can act in an operator's browser (the token is a header, which
  no form or cross-site request sends);
- ``GET /api/requests/{id}?wait=S``: a request's outcome once the controller answers it.

Everything it shows is read through :class:`~controller.admin.server.AdminServer`, as the
admin API reads it; it keeps only the chart samples (:mod:`.history`). Every asset ships in
the package (``static/``); nothing is fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import socket
from importlib import resources
from typing import Any

from aiohttp import web

from controller.admin import server as admin_server
from controller.dashboard import history, pages
from controller.errors import ControllerError
from controller.gateway import auth
from controller.metrics import exposition
from controller.registry import registry

log = logging.getLogger(__name__)

LIVE_SECONDS = 1.0
"""How often a live stream looks for a change."""
KEEPALIVE_SECONDS = 15.0
"""A comment is sent on a quiet stream this often, so that proxies keep it open."""
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclasses.dataclass
class _Snapshot:
    """The live parts of one plugin's page, as last read and rendered."""

    read_at: float
    fingerprint: str
    """Of the documents the parts were rendered from."""
    sections: dict[str, tuple[str, str]]
    """By element id: the digest of its HTML, and the HTML."""
    actions: dict[str, bool]


class DashboardError(ControllerError):
    """The dashboard cannot listen where it was asked to."""


class DashboardServer:
    """Serves the dashboard over what ``admin`` reads; acts only for ``tokens``' admins."""

    def __init__(
        self,
        admin: admin_server.AdminServer,
        *,
        tokens: auth.Tokens | None,
        bundles: registry.Registry | None = None,
        interval: float = history.INTERVAL,
    ) -> None:
        self.admin = admin
        self.tokens = tokens
        self.bundles = bundles
        self.history = history.History(admin.top, admin.listing, interval=interval)
        self._stop = asyncio.Event()
        self._snapshots: dict[str, _Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sampler: asyncio.Task[None] | None = None
        self._static = {
            name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC
        }
        app = web.Application(middlewares=[_headers])
        app.add_routes(
            [
                web.get("/", self._list),
                web.get("/plugins/{name}", self._plugin),
                web.get("/plugins/{name}/live", self._live),
                web.get("/catalog", self._catalog),
                web.post("/api/plugins/{name}/swap/{action}", self._act),
                web.get("/api/requests/{id}", self._answer),
                web.get("/static/{file}", self._asset),
                web.get("/healthz", self._healthz),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)

    async def start(self, address: str) -> str:
        """Listen on ``HOST:PORT`` (port 0 picks one); the address really listened on."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise DashboardError(f"{address!r}: use HOST:PORT, e.g. 127.0.0.1:8090")
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await exposition.bind(listener, (host, int(port)), "dashboard")
        except OSError as e:
            listener.close()
            raise DashboardError(f"the dashboard cannot listen on {address}: {e.strerror}") from e
        await self._runner.setup()
        await web.SockSite(self._runner, listener).start()
        bound_port = listener.getsockname()[1]
        bound = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        self._sampler = asyncio.create_task(self.history.run(self._stop), name="dashboard")
        log.info("dashboard on http://%s/", bound)
        return bound

    async def stop(self) -> None:
        self._stop.set()  # the live streams end
        if self._sampler is not None:
            await self._sampler
        await self._runner.cleanup()

    # Pages.

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name],
            content_type=STATIC[name],
            headers={"Cache-Control": "no-cache"},
        )

    async def _list(self, request: web.Request) -> web.Response:
        listing = await self.admin.listing()
        query = request.query.get("q", "")
        return _page("Plugins", pages.plugin_list(listing, query), "plugins")

    async def _plugin(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        answer = await self._read(name)
        revisions = await self._revisions(name)
        try:
            snapshots: list[dict[str, Any]] | None = await self.admin.state_history(name)
        except web.HTTPServiceUnavailable:
            snapshots = None
        body = pages.plugin_page(
            answer,
            revisions,
            snapshots,
            pages.charts_for(answer["plugin"], self.history),
            self.admin.runtime.controller_id,
        )
        return _page(answer["plugin"]["metadata"]["name"], body, "")

    async def _catalog(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "")
        found = (
            await asyncio.to_thread(self.bundles.search, query)
            if self.bundles is not None
            else None
        )
        return _page("Catalog", pages.catalog_page(found, query), "catalog")

    async def _read(self, name: str) -> dict[str, Any]:
        try:
            return await self.admin.plugin(name)
        except web.HTTPNotFound:
            raise web.HTTPNotFound(
                text=pages.layout("Not found", pages.error_page(404, f'no plugin "{name}"')),
                content_type="text/html",
            ) from None

    async def _revisions(self, name: str) -> list[dict[str, Any]]:
        try:
            return await self.admin.revisions(name)
        except web.HTTPServiceUnavailable:
            return []

    # The live stream.

    async def _live(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        await self._read(name)  # 404 before the stream starts
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **SECURITY_HEADERS,
            }
        )
        await response.prepare(request)
        sent: dict[str, str] = {}
        quiet = 0.0
        with contextlib.suppress(ConnectionResetError):
            while not self._stop.is_set():
                found = await self._snapshot(name)
                if found is None:
                    await response.write(b"event: gone\ndata: {}\n\n")
                    break
                changed = {p: html for p, (d, html) in found.sections.items() if sent.get(p) != d}
                if changed or not sent:
                    sent.update({p: d for p, (d, _) in found.sections.items()})
                    message = {"sections": changed, "actions": found.actions}
                    await response.write(
                        f"event: sections\ndata: {json.dumps(message)}\n\n".encode()
                    )
                    quiet = 0.0
                elif quiet >= KEEPALIVE_SECONDS:
                    await response.write(b": keepalive\n\n")
                    quiet = 0.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), LIVE_SECONDS)
                quiet += LIVE_SECONDS
        return response

    async def _snapshot(self, name: str) -> _Snapshot | None:
        """The live parts of ``name``'s page, read at most once per :data:`LIVE_SECONDS`
        whatever the number of streams, and rendered again only when what they show
        changed (None: the plugin is gone)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            kept = self._snapshots.get(name)
            now = asyncio.get_running_loop().time()
            if kept is not None and now - kept.read_at < LIVE_SECONDS * 0.9:
                return kept
            try:
                answer = await self.admin.plugin(name)
            except web.HTTPNotFound:
                self._snapshots.pop(name, None)
                return None
            key = _key(answer["plugin"])
            fingerprint = hashlib.sha256(
                json.dumps(answer, sort_keys=True, default=str).encode()
                + repr(self.history.version(key)).encode()
            ).hexdigest()
            if kept is not None and kept.fingerprint == fingerprint:
                kept.read_at = now
                return kept
            sections = pages.plugin_sections(
                answer,
                await self._revisions(name),
                pages.charts_for(answer["plugin"], self.history),
                self.admin.runtime.controller_id,
            )
            found = _Snapshot(
                now,
                fingerprint,
                {p: (hashlib.sha256(h.encode()).hexdigest(), h) for p, h in sections.items()},
                pages.allowed_actions(answer["plugin"]),
            )
            self._snapshots[name] = found
            return found

    # Actions.

    def _admin_token(self, request: web.Request) -> auth.Token:
        """The dashboard admin presenting the request's bearer token; refuses anyone else."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            raise _refused(web.HTTPForbidden, f"a request from {origin} may not act here")
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise _refused(
                web.HTTPUnauthorized,
                "read-only: acting needs a token with dashboard: admin in the gateway's "
                "tokens file (enter it in the Token field)",
            )
        token = self.tokens.find(presented.strip()) if self.tokens is not None else None
        if token is None:
            raise _refused(web.HTTPUnauthorized, "this token is not known to the controller")
        if not token.dashboard_admin:
            raise _refused(
                web.HTTPForbidden, f'token "{token.name}" has no dashboard: admin; it may not act'
            )
        return token

    async def _act(self, request: web.Request) -> web.Response:
        token = self._admin_token(request)
        name, action = request.match_info["name"], request.match_info["action"]
        revision = request.query.get("revision")
        answer = await self.admin.swap(name, action, revision)
        log.info(
            "dashboard: %s asked %s of %s (request %s)", token.name, action, name, answer["request"]
        )
        return web.json_response(answer)

    async def _answer(self, request: web.Request) -> web.Response:
        try:
            id = int(request.match_info["id"])
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            raise _refused(web.HTTPBadRequest, "the request id and wait must be numbers") from None
        return web.json_response(await self.admin.answer(id, wait))


def _key(document: dict[str, Any]) -> str:
    metadata = document["metadata"]
    return (
        f"{metadata['namespace']}/{metadata['name']}"
        if metadata.get("namespace")
        else metadata["name"]
    )


def _page(title: str, body: str, current: str) -> web.Response:
    return web.Response(text=pages.layout(title, body, current=current), content_type="text/html")


def _refused(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def _headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """The security headers on every answer."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as e:
        e.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response
