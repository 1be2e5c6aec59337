"""The admin API served on a Unix socket (mode 0600) in the controller's data directory.

HTTP with JSON bodies, so that ``curl --unix-socket`` works too:

- ``GET /v1/plugins``: every declared plugin with its status, and the specs
  that failed to load;
- ``GET /v1/plugins/{name}``: one plugin with its status, origin and events;
- ``POST /v1/plugins``: apply YAML specs (the body); ``422`` lists every problem;
- ``DELETE /v1/plugins/{name}``: delete an applied spec (``409`` for a file's);
- ``GET /v1/plugins/{name}/logs?color=&tail=``: an instance's last lines.

Only the owner of the data directory can reach it; there is no other auth.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.errors import ControllerError, InstanceNotFoundError, SpecError
from controller.runtimes import base
from controller.sources import directory
from controller.spec import models

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
"""Largest spec body accepted, in bytes."""


class AdminServer:
    """Serves the admin API for one source and runtime."""

    def __init__(
        self, source: directory.DirectorySource, runtime: base.Runtime, path: Path
    ) -> None:
        self.source = source
        self.runtime = runtime
        self.path = path
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/v1/plugins", self._list),
                web.post("/v1/plugins", self._apply),
                web.get("/v1/plugins/{name}", self._get),
                web.delete("/v1/plugins/{name}", self._delete),
                web.get("/v1/plugins/{name}/logs", self._logs),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with base.unix_address(self.path) as address:
            sock.bind(address)
        self.path.chmod(0o600)
        site = web.SockSite(self._runner, sock)
        await site.start()
        log.info("admin API on unix://%s", self.path)

    async def stop(self) -> None:
        await self._runner.cleanup()
        self.path.unlink(missing_ok=True)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _document(self, desired: directory.Desired) -> dict[str, Any]:
        status = await self.source.read_status(desired.plugin.key)
        plugin = desired.plugin.model_copy(update={"status": status or models.PluginStatus()})
        return plugin.to_document()

    async def _list(self, request: web.Request) -> web.Response:
        items = []
        for key in self.source.declared_keys():
            desired = self.source.get(key)
            if desired is not None:
                items.append(await self._document(desired))
        errors = [{"origin": o, "message": str(e)} for o, e in sorted(self.source.errors.items())]
        return web.json_response({"items": items, "errors": errors})

    def _desired(self, request: web.Request) -> directory.Desired:
        name = request.match_info["name"]
        desired = self.source.get(name)
        if desired is None:
            raise web.HTTPNotFound(
                text=_error(f'no plugin "{name}"; see bhctl get'), content_type="application/json"
            )
        return desired

    async def _get(self, request: web.Request) -> web.Response:
        desired = self._desired(request)
        document = await self._document(desired)
        events = await self.source.events(desired.plugin.key)
        return web.json_response(
            {
                "plugin": document,
                "origin": desired.origin,
                "events": [e.to_document() for e in events],
            }
        )

    async def _apply(self, request: web.Request) -> web.Response:
        text = await request.text()
        origin = request.query.get("origin", "<apply>")
        try:
            applied = await self.source.apply(text, origin)
        except SpecError as e:
            return web.json_response(
                {"error": "invalid spec", "issues": [str(i) for i in e.issues]}, status=422
            )
        return web.json_response(
            {"applied": [{"name": d.plugin.key, "generation": d.generation} for d in applied]}
        )

    async def _delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            deleted = await self.source.delete(name)
        except SpecError as e:
            return web.json_response(
                {"error": "declared by a file", "issues": [str(i) for i in e.issues]}, status=409
            )
        if not deleted:
            raise web.HTTPNotFound(
                text=_error(f'no applied plugin "{name}"'), content_type="application/json"
            )
        return web.json_response({"deleted": name})

    async def _logs(self, request: web.Request) -> web.Response:
        desired = self._desired(request)
        try:
            tail = int(request.query.get("tail", "100"))
        except ValueError:
            raise web.HTTPBadRequest(
                text=_error("tail must be a number"), content_type="application/json"
            ) from None
        status = await self.source.read_status(desired.plugin.key)
        color_text = request.query.get("color") or (
            status.active_color.value if status and status.active_color else "blue"
        )
        try:
            color = models.Color(color_text)
        except ValueError:
            raise web.HTTPBadRequest(
                text=_error(f'color "{color_text}": use blue or green'),
                content_type="application/json",
            ) from None
        name = base.instance_name(
            desired.plugin.name,
            color,
            desired.plugin.metadata.namespace,
            self.runtime.controller_id,
        )
        try:
            lines = await self.runtime.logs(name, tail)
        except InstanceNotFoundError:
            raise web.HTTPNotFound(
                text=_error(f"{name} does not exist"), content_type="application/json"
            ) from None
        except ControllerError as e:
            raise web.HTTPBadGateway(text=_error(str(e)), content_type="application/json") from e
        return web.json_response({"instance": name, "lines": lines})


def _error(message: str) -> str:
    return json.dumps({"error": message})
