"""The admin API served on a Unix socket (mode 0600) in the controller's data directory.

HTTP with JSON bodies, so that ``curl --unix-socket`` works too:

- ``GET /v1/plugins``: every declared plugin with its status, and the specs
  that failed to load;
- ``GET /v1/plugins/{name}``: one plugin with its status, origin and events;
- ``POST /v1/plugins``: apply YAML specs (the body); ``422`` lists every problem; each
  plugin is reported ``created``, ``configured`` or ``unchanged``; with ``?dryRun=true``
  nothing is applied and each plugin's change is told instead: ``created``,
  ``unchanged``, ``in-place``, ``swap`` or ``replace``, with the fields that differ;
- ``DELETE /v1/plugins/{name}``: delete an applied spec (``409`` for a file's);
- ``GET /v1/plugins/{name}/logs?color=&replica=&tail=&previous=&timestamps=``: an instance's last
  lines (``previous=true``: of the instance other than the active one, while it is kept;
  ``timestamps=true``: each starting with the time the runtime read it, RFC 3339 in UTC);
- ``POST /v1/plugins/{name}/swap/{action}``: request ``promote``, ``abort``, ``undo``
  (``?revision=N``: to that revision) or ``retry`` of a plugin's swap;
- ``GET /v1/plugins/{name}/revisions``: the plugin's revisions, oldest first;
- ``GET /v1/requests/{id}?wait=SECONDS``: an operator's request (a swap action, a state
  import) and its outcome, ``Pending``, ``Done`` or ``Refused``; ``wait`` holds the
  answer up to that long (at most 30 s) while it is pending;
- ``POST /v1/down?volumes=true|false``: take the controller down: it finishes the passes
  in flight, removes every instance it owns with their networks (and, with
  ``volumes=true``, its named volumes), stops the gateway it runs and exits; the answer,
  sent once all that is done, names what was removed.

Only the owner of the data directory can reach it; there is no other auth.

While one of the controller's stores fails (a full or read-only disk, an
I/O error) or after a damaged one was replaced, each plugin it concerns
carries the condition ``StoreUnavailable`` or ``StoreDamaged`` and the events
about it, and ``GET /v1/plugins`` lists them under ``controller``; a write
that needs the failing store is answered ``503`` with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from controller import database, unix
from controller.errors import (
    ControllerError,
    InstanceNotFoundError,
    SpecError,
    StoreUnavailableError,
)
from controller.gateway import control, router
from controller.metrics import telemetry
from controller.protocol import client
from controller.reconcile import manager, reconciler
from controller.runtimes import base
from controller.sources import base as sources_base
from controller.spec import loader, models, safe_yaml
from controller.state import snapshots

log = logging.getLogger(__name__)

MAX_BODY = safe_yaml.MAX_BYTES
REQUEST_WAIT_MAX = 30.0
"""Longest ``GET /v1/requests/{id}?wait=`` holds its answer, in seconds."""
IMPORT_TIMEOUT = 120.0
"""How long a state import request waits for the plugin's pass to answer (else 202)."""
"""Largest spec body accepted, in bytes (the spec loader's limit)."""


class AdminServer:
    """Serves the admin API for one source and runtime."""

    def __init__(
        self,
        source: sources_base.Source,
        runtime: base.Runtime,
        path: Path,
        *,
        control: manager.Manager | None = None,
        plugins: client.Clients | None = None,
        down: Callable[[bool], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.source = source
        self.down = down
        """Takes the controller down (``bhctl down``): what it removed; None: not here."""
        self.runtime = runtime
        self.path = path
        self.control = control
        self.plugins = plugins
        self._cpu: dict[str, tuple[float, float]] = {}
        """Per instance: when its CPU time was last read, and what it was."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
        app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/v1/plugins", self._list),
                web.post("/v1/plugins", self._apply),
                web.get("/v1/plugins/{name}", self._get),
                web.delete("/v1/plugins/{name}", self._delete),
                web.get("/v1/plugins/{name}/logs", self._logs),
                web.post("/v1/plugins/{name}/swap/{action}", self._swap),
                web.get("/v1/plugins/{name}/revisions", self._revisions),
                web.get("/v1/plugins/{name}/state", self._state_history),
                web.get("/v1/plugins/{name}/state/export", self._state_export),
                web.post("/v1/plugins/{name}/state/import", self._state_import),
                web.get("/v1/requests/{id}", self._request),
                web.get("/v1/top", self._top),
                web.post("/v1/down", self._down),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with unix.unix_address(self.path) as address:
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

    @property
    def _health(self) -> database.Health | None:
        return self.control.metrics.stores if self.control is not None else None

    def _store_conditions(self, plugin: models.Plugin | None) -> list[models.Condition]:
        """The conditions the stores' health puts on ``plugin`` (None: on the controller)."""
        health = self._health
        if health is None:
            return []
        found = []
        for fault in health.faults().values():
            if _concerns(fault.store, plugin):
                found.append(
                    models.Condition(
                        type="StoreUnavailable",
                        status="True",
                        reason=fault.reason,
                        message=f"{fault.path}: {fault.operation} failed {fault.failures} "
                        f"time(s): {fault.message}; retrying with backoff",
                        last_transition_time=fault.since,
                    )
                )
        for reset in health.resets().values():
            if _concerns(reset.store, plugin):
                found.append(
                    models.Condition(
                        type="StoreDamaged",
                        status="True",
                        reason="MovedAside",
                        message=reset.message,
                        last_transition_time=reset.time,
                    )
                )
        return found

    async def _document(self, desired: sources_base.Desired) -> dict[str, Any]:
        status = await self.source.read_status(desired.plugin.key) or models.PluginStatus()
        extra = self._store_conditions(desired.plugin)
        if extra:
            kinds = {c.type for c in extra}
            status = status.model_copy(
                update={"conditions": [c for c in status.conditions if c.type not in kinds] + extra}
            )
        plugin = desired.plugin.model_copy(update={"status": status})
        return plugin.to_document()

    async def listing(self) -> dict[str, Any]:
        """Every declared plugin with its status, the specs that failed to load, and the
        controller's own conditions (``GET /v1/plugins``)."""
        items = []
        for key in self.source.declared_keys():
            desired = self.source.get(key)
            if desired is not None:
                items.append(await self._document(desired))
        errors = [{"origin": o, "message": str(e)} for o, e in sorted(self.source.errors.items())]
        conditions = [
            c.model_dump(mode="json", by_alias=True, exclude_none=True)
            for c in self._store_conditions(None)
        ]
        return {"items": items, "errors": errors, "controller": {"conditions": conditions}}

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(await self.listing())

    def _desired(self, request: web.Request) -> sources_base.Desired:
        return self.desired(request.match_info["name"])

    def desired(self, name: str) -> sources_base.Desired:
        """The declared plugin ``name``; 404 when there is none."""
        desired = self.source.get(name)
        if desired is None:
            raise web.HTTPNotFound(
                text=_error(f'no plugin "{name}"; see bhctl get'), content_type="application/json"
            )
        return desired

    async def plugin(self, name: str) -> dict[str, Any]:
        """One plugin with its status, origin and events (``GET /v1/plugins/{name}``)."""
        desired = self.desired(name)
        document = await self._document(desired)
        events = [e.to_document() for e in await self.source.events(desired.plugin.key)]
        health = self._health
        if health is not None:
            events += [
                {
                    "type": e.type,
                    "reason": e.reason,
                    "message": e.message,
                    "firstTimestamp": e.time.isoformat(),
                    "lastTimestamp": e.time.isoformat(),
                    "count": 1,
                }
                for e in list(health.events)
                if _concerns(e.store, desired.plugin)
            ]
            events.sort(key=lambda e: str(e["lastTimestamp"]))
        return {"plugin": document, "origin": desired.origin, "events": events}

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(await self.plugin(request.match_info["name"]))

    async def _apply(self, request: web.Request) -> web.Response:
        text = await request.read()  # bytes: the loader decodes and bounds them
        origin = request.query.get("origin", "<apply>")
        try:
            if request.query.get("dryRun") == "true":
                return web.json_response({"changes": await self._changes(text, origin)})
            before = {
                k: d.spec_hash for k in self.source.declared_keys() if (d := self.source.get(k))
            }
            applied = await self.source.apply(text, origin)
        except SpecError as e:
            return web.json_response(
                {"error": "invalid spec", "issues": [str(i) for i in e.issues]}, status=422
            )
        return web.json_response(
            {
                "applied": [
                    {
                        "name": d.plugin.key,
                        "generation": d.generation,
                        "change": "created"
                        if d.plugin.key not in before
                        else "unchanged"
                        if before[d.plugin.key] == d.spec_hash
                        else "configured",
                    }
                    for d in applied
                ]
            }
        )

    async def _changes(self, text: bytes, origin: str) -> list[dict[str, Any]]:
        """What applying ``text`` would change, plugin by plugin (see :func:`change`)."""
        loaded = await asyncio.to_thread(loader.load_text, text, origin)
        found = []
        for item in loaded:
            existing = self.source.get(item.plugin.key)
            status = await self.source.read_status(item.plugin.key) if existing else None
            found.append(change(existing, item.plugin, status))
        return found

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
            replica = int(request.query.get("replica", "0"))
        except ValueError:
            raise web.HTTPBadRequest(
                text=_error("replica must be a number"), content_type="application/json"
            ) from None
        replicas = desired.plugin.spec.replicas
        if not 0 <= replica < replicas:
            raise web.HTTPBadRequest(
                text=_error(
                    f"replica {replica}: {desired.plugin.name} has replicas 0 to {replicas - 1}"
                ),
                content_type="application/json",
            )
        previous = request.query.get("previous") == "true"
        if previous:  # the other color: the instance a swap replaced, while it is kept
            color_text = "green" if color_text == "blue" else "blue"
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
            replica,
        )
        try:
            lines = await self.runtime.logs(
                name, tail, timestamps=request.query.get("timestamps") == "true"
            )
        except InstanceNotFoundError:
            kept = " (no previous instance is kept)" if previous else ""
            raise web.HTTPNotFound(
                text=_error(f"{name} does not exist{kept}"), content_type="application/json"
            ) from None
        except ControllerError as e:
            raise web.HTTPBadGateway(text=_error(str(e)), content_type="application/json") from e
        return web.json_response({"instance": name, "lines": lines})

    async def top(self) -> list[dict[str, Any]]:
        """Every running instance's resource use, read from its cgroup now (``GET /v1/top``)."""
        metrics = self._reconciler().metrics
        return await asyncio.to_thread(self._readings, metrics)

    async def _top(self, request: web.Request) -> web.Response:
        return web.json_response({"instances": await self.top()})

    def _readings(self, metrics: telemetry.Metrics) -> list[dict[str, Any]]:
        tracked = dict(metrics.instances)
        stale = [n for n in tracked if time.monotonic() - self._cpu.get(n, (0.0, 0.0))[0] > 10]
        if stale:  # a CPU rate needs two readings: take a first one now
            for name in stale:
                reading = metrics.cgroups.read(tracked[name].pid)
                if reading is not None:
                    self._cpu[name] = (time.monotonic(), reading.cpu_seconds)
            time.sleep(0.25)
        rows = []
        for name, instance in sorted(tracked.items()):
            reading = metrics.cgroups.read(instance.pid)
            if reading is None:
                continue
            now = time.monotonic()
            then, cpu = self._cpu.get(name, (now, reading.cpu_seconds))
            self._cpu[name] = (now, reading.cpu_seconds)
            rows.append(
                {
                    "instance": name,
                    "plugin": instance.plugin,
                    "namespace": instance.namespace,
                    "color": instance.color,
                    "version": instance.version,
                    "cpuCores": (reading.cpu_seconds - cpu) / (now - then) if now > then else 0.0,
                    "memoryWorkingSetBytes": reading.memory_working_set_bytes,
                    "memoryLimitBytes": reading.memory_limit_bytes,
                    "pids": reading.pids,
                    "networkReceiveBytes": reading.network_receive_bytes,
                    "networkTransmitBytes": reading.network_transmit_bytes,
                    "fsReadBytes": reading.fs_read_bytes,
                    "fsWriteBytes": reading.fs_write_bytes,
                    "oomEvents": reading.oom_events,
                }
            )
        for name in set(self._cpu) - set(tracked):
            del self._cpu[name]
        return rows

    async def _down(self, request: web.Request) -> web.Response:
        if self.down is None:
            raise web.HTTPServiceUnavailable(
                text=_error(
                    "this controller is not taken down from here: on Kubernetes, delete the "
                    "Plugin objects (kubectl delete plugins --all) and helm uninstall"
                ),
                content_type="application/json",
            )
        volumes = request.query.get("volumes", "false")
        if volumes not in ("true", "false"):
            raise web.HTTPBadRequest(
                text=_error(f"volumes={volumes!r}: use true or false"),
                content_type="application/json",
            )
        try:
            removed = await self.down(volumes == "true")
        except ControllerError as e:
            raise web.HTTPBadGateway(text=_error(str(e)), content_type="application/json") from e
        return web.json_response(removed)

    # Swaps and state.

    def _reconciler(self) -> reconciler.Reconciler:
        if self.control is None or self.plugins is None:
            raise web.HTTPServiceUnavailable(
                text=_error("this controller does not run swaps"), content_type="application/json"
            )
        return self.control.reconciler

    async def swap(self, name: str, action: str, revision: str | None = None) -> dict[str, Any]:
        """Request ``action`` of ``name``'s swap, checked first (``POST
        /v1/plugins/{name}/swap/{action}``): the plugin, the action and the request's id,
        which its pass answers. A refusal raises the HTTP error to answer with."""
        desired = self.desired(name)
        if action not in ("promote", "abort", "undo", "retry"):
            raise _refused(web.HTTPNotFound, f"{action!r}: use promote, abort, undo or retry")
        target = self._reconciler()
        key = desired.plugin.key
        status = await self.source.read_status(key) or models.PluginStatus()
        argument = ""
        if revision is not None:
            if action != "undo":
                raise _refused(web.HTTPBadRequest, f"a revision is only for undo, not {action}")
            argument = await self._revision_to_undo(key, revision, status)
        elif action == "retry":
            last = status.last_swap
            if status.swap is not None or last is None or last.result == "Promoted":
                raise _refused(web.HTTPConflict, f"{key}: no rolled-back swap to retry")
        elif status.swap is None and action != "undo":
            raise _refused(web.HTTPConflict, f"{key} has no swap in progress")
        elif status.swap is None:
            last = status.last_swap
            if last is None or last.result != "Promoted" or not last.from_hash:
                raise _refused(
                    web.HTTPConflict, f"{key}: no promoted swap to undo; edit its spec instead"
                )
        elif action == "promote" and status.swap.step is models.SwapStep.PROMOTED:
            raise _refused(web.HTTPConflict, f"{key}: the swap is promoted already")
        recorded = await asyncio.to_thread(target.request, key, action, argument)
        assert self.control is not None
        self.control.queue.add(key)
        return {"plugin": key, "requested": action, "request": recorded.id}

    async def _swap(self, request: web.Request) -> web.Response:
        return web.json_response(
            await self.swap(
                request.match_info["name"],
                request.match_info["action"],
                request.query.get("revision"),
            )
        )

    async def _revision_to_undo(self, key: str, text: str, status: models.PluginStatus) -> str:
        """The revision ``undo --to-revision`` asks for, checked: its number as the argument."""
        if not text.isdigit() or int(text) < 1:
            raise web.HTTPBadRequest(
                text=_error(f"revision {text!r}: use a revision number, e.g. 3"),
                content_type="application/json",
            )
        if status.swap is not None:
            raise web.HTTPConflict(
                text=_error(
                    f"{key}: a swap to {status.swap.to_version} is in progress "
                    f"({status.swap.step.value}); abort it first"
                ),
                content_type="application/json",
            )
        found = await asyncio.to_thread(self._specs().revision, key, int(text))
        if found is None:
            raise web.HTTPNotFound(
                text=_error(f"no revision {text} of {key} is kept; see bhctl swap history {key}"),
                content_type="application/json",
            )
        return str(found.revision)

    async def _revisions(self, request: web.Request) -> web.Response:
        return web.json_response({"revisions": await self.revisions(request.match_info["name"])})

    def _specs(self) -> snapshots.Specs:
        return snapshots.Specs(self._snapshots())

    async def answer(self, id: int, wait: float = 0.0) -> dict[str, Any]:
        """Recorded request ``id`` and its outcome, waiting up to ``wait`` seconds (at most
        :data:`REQUEST_WAIT_MAX`) while a pass has not answered it."""
        target = self._reconciler()
        wait = min(wait, REQUEST_WAIT_MAX)
        if wait > 0:
            found = await target.wait_answer(id, wait)
        else:
            found = await asyncio.to_thread(target.requests.request, id)
        if found is None:
            raise _refused(web.HTTPNotFound, f"no request {id}")
        return found.to_document()

    async def _request(self, request: web.Request) -> web.Response:
        """One recorded request and its outcome; ``?wait=S``: up to S seconds for the answer."""
        try:
            id = int(request.match_info["id"])
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            raise web.HTTPBadRequest(
                text=_error("the request id and wait must be numbers"),
                content_type="application/json",
            ) from None
        return web.json_response(await self.answer(id, wait))

    async def state_history(self, name: str) -> list[dict[str, Any]]:
        """The state snapshots of ``name``, oldest first, without their bytes."""
        desired = self.desired(name)
        history = await asyncio.to_thread(self._snapshots().history, desired.plugin.key)
        return [s.to_document() for s in history]

    async def revisions(self, name: str) -> list[dict[str, Any]]:
        """The revisions of ``name``, oldest first."""
        desired = self.desired(name)
        found = await asyncio.to_thread(self._specs().revisions, desired.plugin.key)
        return [r.to_document() for r in found]

    async def _state_history(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"snapshots": await self.state_history(request.match_info["name"])}
        )

    async def _active(self, key: str) -> tuple[client.Clients, models.PluginStatus, str]:
        """The plugin clients, the status and the endpoint of ``key``'s serving instance."""
        routes = self._reconciler().routes
        status = await self.source.read_status(key)
        endpoint = (
            routes.route(key) if isinstance(routes, router.Router | control.RemoteRoutes) else None
        )
        if self.plugins is None or status is None or endpoint is None:
            raise web.HTTPConflict(
                text=_error(f"{key} has no Ready instance to take its state from or to"),
                content_type="application/json",
            )
        return self.plugins, status, endpoint

    def _snapshots(self) -> snapshots.Snapshots:
        states = self._reconciler().snapshots
        if states is None:
            raise web.HTTPServiceUnavailable(
                text=_error("this controller keeps no state snapshots"),
                content_type="application/json",
            )
        return states

    async def _state_export(self, request: web.Request) -> web.Response:
        """A stored snapshot (``?snapshot=ID``), or the live state of the active instance."""
        desired = self._desired(request)
        key = desired.plugin.key
        states = self._snapshots()
        if "snapshot" in request.query:
            try:
                snapshot = await asyncio.to_thread(states.get, key, int(request.query["snapshot"]))
            except (ValueError, ControllerError) as e:
                raise web.HTTPNotFound(text=_error(str(e)), content_type="application/json") from e
        else:
            plugins, status, endpoint = await self._active(key)
            try:
                state = await plugins.export_state(endpoint, 60)
            except ControllerError as e:
                raise web.HTTPBadGateway(
                    text=_error(str(e)), content_type="application/json"
                ) from e
            snapshot = await asyncio.to_thread(
                states.save,
                key,
                status.active_version or "",
                state.version,
                state.data,
                snapshots.EXPORT,
            )
            snapshot = dataclasses.replace(snapshot, data=state.data)
        return web.json_response(
            {"snapshot": snapshot.to_document(), "data": base64.b64encode(snapshot.data).decode()}
        )

    async def _state_import(self, request: web.Request) -> web.Response:
        """Replace the active instance's state; what it had is kept as a snapshot first."""
        desired = self._desired(request)
        key = desired.plugin.key
        try:
            body = await request.json()
            version = int(body["stateVersion"])
            data = base64.b64decode(body["data"], validate=True)
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPBadRequest(
                text=_error(f'send {{"stateVersion": N, "data": base64}}: {e}'),
                content_type="application/json",
            ) from e
        states = self._snapshots()
        target = self._reconciler()
        status = await self.source.read_status(key) or models.PluginStatus()
        if status.swap is not None:
            raise web.HTTPConflict(
                text=_error(
                    f"{key}: a swap to {status.swap.to_version} is in progress "
                    f"({status.swap.step.value}); import after it ends, or abort it"
                ),
                content_type="application/json",
            )
        running = status.active_version or ""
        kept = await asyncio.to_thread(states.save, key, running, version, data, "import")
        # Carried out by the plugin's own pass, the one writer of its instances and routes.
        recorded = await asyncio.to_thread(target.request, key, "import", str(kept.id))
        assert self.control is not None
        self.control.queue.add(key)
        answer = await target.wait_answer(recorded.id, IMPORT_TIMEOUT)
        if answer is None or answer.outcome is None:
            return web.json_response(
                {"plugin": key, "request": recorded.id, "outcome": "Pending"}, status=202
            )
        if answer.outcome == "Refused":
            raise web.HTTPConflict(text=_error(answer.message), content_type="application/json")
        if answer.outcome != "Done":
            raise web.HTTPBadGateway(text=_error(answer.message), content_type="application/json")
        return web.json_response({"plugin": key, **json.loads(answer.message)})


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every HTTP error aiohttp raises (unknown route, body too large, ...) answered as JSON."""
    try:
        response: web.StreamResponse = await handler(request)
    except StoreUnavailableError as e:
        return web.json_response({"error": str(e), "reason": e.reason}, status=503)
    except web.HTTPException as e:
        if e.content_type == "application/json" or e.status < 400:
            raise
        message = e.text or e.reason
        if isinstance(e, web.HTTPRequestEntityTooLarge):
            message = f"the body is over the limit of {MAX_BODY} bytes (1 MiB)"
        return web.json_response({"error": message}, status=e.status)
    return response


def _concerns(store: str, plugin: models.Plugin | None) -> bool:
    """Whether a fault of ``store`` concerns ``plugin``: every plugin's status is in the state
    store; the snapshots only concern plugins whose state is checkpointed."""
    if plugin is None or store != snapshots.STORE:
        return True
    return plugin.spec.state is not None


def change(
    existing: sources_base.Desired | None,
    plugin: models.Plugin,
    status: models.PluginStatus | None,
) -> dict[str, Any]:
    """What declaring ``plugin`` over ``existing`` does, by the reconciler's rules (the
    README's "Edits"): ``created``, ``unchanged``; ``in-place`` when what an instance is
    made of (:func:`~controller.runtimes.base.instance_hash`) stays; else ``swap`` for a
    Ready plugin swapped blue/green, ``replace`` for one that is not Ready or swaps with
    ``hotSwap.strategy: Recreate``. ``fields``: each dotted path that differs."""
    name = plugin.key
    if existing is None:
        return {"name": name, "change": "created", "fields": []}
    before, after = _declared(existing.plugin), _declared(plugin)
    fields = [
        {"path": path, "from": before.get(path), "to": after.get(path)}
        for path in sorted(set(before) | set(after))
        if before.get(path) != after.get(path)
    ]
    if not fields:
        return {"name": name, "change": "unchanged", "fields": []}
    if base.instance_hash(existing.plugin.spec) == base.instance_hash(plugin.spec):
        return {"name": name, "change": "in-place", "fields": fields}
    ready = status is not None and any(
        c.type == "Ready" and c.status == "True" for c in status.conditions
    )
    if not ready:
        return {"name": name, "change": "replace", "why": "not Ready", "fields": fields}
    if plugin.spec.hot_swap.strategy == "Recreate":
        return {"name": name, "change": "replace", "why": "strategy Recreate", "fields": fields}
    return {"name": name, "change": "swap", "fields": fields}


def _declared(plugin: models.Plugin) -> dict[str, Any]:
    """Every leaf of the spec and the labels, by dotted path."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value

    walk("spec", plugin.spec.model_dump(mode="json", by_alias=True, exclude_none=True))
    walk("metadata.labels", dict(plugin.metadata.labels or {}))
    return {k: v for k, v in flat.items() if v != {}}


def _error(message: str) -> str:
    return json.dumps({"error": message})


def _refused(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    """The HTTP error ``kind`` with ``message`` as its JSON body."""
    return kind(text=_error(message), content_type="application/json")
