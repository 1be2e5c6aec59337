"""Desired state on Kubernetes: Plugin objects (``plugins.blackhole.dev``), watched.

An informer lists the Plugin objects of every namespace (or of the
configured ones), watches from the listed ``resourceVersion`` and lists
again on ``410 Gone``; keys are ``namespace/name``. A key is enqueued when
its spec, labels or deletion changes, not when only its status does (the
controller's own writes). Status goes back through the ``status``
subresource as a JSON patch of the whole status; events become Kubernetes
Events on the Plugin (and are kept in the controller's store for
``bhctl describe``).

Each Plugin carries the finalizer ``blackhole.dev/cleanup`` while the
controller runs it: deleting the object marks it, the reconciler removes its
instances and what they shared, and :meth:`KubernetesSource.forget` then
removes the finalizer, which lets the API server delete it. ownerReferences
let Kubernetes' garbage collector remove the rest if the controller is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller import kubeapi
from controller.errors import SpecError, SpecIssue, StoreUnavailableError
from controller.sources import store as store_module
from controller.sources.base import Desired, spec_hash
from controller.spec import loader, models
from controller.spec.keys import plugin_key, split_key

log = logging.getLogger(__name__)

FINALIZER = f"{models.API_GROUP}/cleanup"
PLURAL = "plugins"
VERSION = models.API_VERSION.split("/")[1]
COMPONENT = "blackhole-controller"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
SYNC_SECONDS = 30.0


class KubernetesSource:
    """The Plugin objects of a Kubernetes API server."""

    def __init__(
        self,
        api: client.ApiClient,
        store: store_module.Store,
        enqueue: Callable[[str], None],
        *,
        namespaces: tuple[str, ...] = (),
        resync_seconds: float = 300.0,
    ) -> None:
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.store = store
        self.enqueue = enqueue
        self.namespaces = namespaces
        self.resync_seconds = resync_seconds
        self.errors: dict[str, SpecError] = {}
        self._desired: dict[str, Desired] = {}
        self._invalid: set[str] = set()
        """Objects whose spec never validated since this controller started."""
        self._reports: set[asyncio.Task[None]] = set()
        self._informer = kubeapi.Informer("plugins", self._listers(), self._changed)

    def _listers(self) -> list[tuple[kubeapi.Lister, dict[str, Any]]]:
        group, version = models.API_GROUP, VERSION
        if self.namespaces:
            return [
                (
                    self.objects.list_namespaced_custom_object,
                    {"group": group, "version": version, "namespace": n, "plural": PLURAL},
                )
                for n in self.namespaces
            ]
        return [
            (
                self.objects.list_cluster_custom_object,
                {"group": group, "version": version, "plural": PLURAL},
            )
        ]

    # What is declared.

    def get(self, key: str) -> Desired | None:
        return self._desired.get(key)

    def declared_keys(self) -> list[str]:
        """Every Plugin object not being deleted, the invalid ones too (theirs is not an
        orphan's fate: what they run is left alone)."""
        return sorted(self._desired.keys() | self._invalid)

    def declares(self, key: str) -> bool:
        return key in self._desired or key in self._invalid

    def _object(self, key: str) -> kubeapi.Object | None:
        namespace, name = split_key(key)
        return self._informer.get((namespace or "", name))

    def _changed(self, before: kubeapi.Object | None, after: kubeapi.Object | None) -> None:
        obj = after or before
        assert obj is not None
        namespace, name = kubeapi.key_of(obj)
        key = plugin_key(name, namespace)
        origin = f"plugins.{models.API_GROUP}/{key}"
        previous = self._desired.get(key)
        deleting = after is not None and bool(
            (after.get("metadata") or {}).get("deletionTimestamp")
        )
        if after is None or deleting:
            self._desired.pop(key, None)
            self._invalid.discard(key)
            self.errors.pop(origin, None)
            self.enqueue(key)
            return
        try:
            plugin = _plugin(after, origin)
        except SpecError as e:
            # An invalid object changes nothing that runs: the last valid spec
            # stays (none after a restart: then the plugin is left as it is).
            if str(self.errors.get(origin)) != str(e):
                log.error("invalid Plugin %s:\n%s", key, e)
                self._report_invalid(key, after, e)
            self.errors[origin] = e
            if previous is None:
                self._invalid.add(key)
            return
        self.errors.pop(origin, None)
        self._invalid.discard(key)
        current = Desired(plugin, origin, spec_hash(plugin))
        self._desired[key] = current
        if previous is None or previous.spec_hash != current.spec_hash:
            self.enqueue(key)

    def _report_invalid(self, key: str, obj: kubeapi.Object, error: SpecError) -> None:
        """Say why in the object's status: Ready False, reason InvalidSpec."""
        raw = obj.get("status") or {}
        try:
            status = models.PluginStatus.model_validate(raw) if raw else models.PluginStatus()
        except ValueError:
            status = models.PluginStatus()
        generation = (obj.get("metadata") or {}).get("generation")
        status.conditions = [c for c in status.conditions if c.type != "Ready"] + [
            models.Condition(
                type="Ready",
                status="False",
                reason="InvalidSpec",
                message=str(error)[:32768],
                last_transition_time=datetime.datetime.now(datetime.UTC),
                observed_generation=generation,
            )
        ]
        task = asyncio.get_running_loop().create_task(self._write_quietly(key, status))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _write_quietly(self, key: str, status: models.PluginStatus) -> None:
        try:
            await self.write_status(key, status)
        except kubeapi.KubernetesApiError as e:
            log.warning("%s", e)

    # Written by the reconciler.

    async def read_status(self, key: str) -> models.PluginStatus | None:
        obj = self._object(key)
        raw = (obj or {}).get("status")
        if not raw:
            return None
        try:
            return models.PluginStatus.model_validate(raw)
        except ValueError as e:
            log.warning("%s: ignoring a status this controller cannot read: %s", key, e)
            return None

    async def write_status(self, key: str, status: models.PluginStatus) -> None:
        namespace, name = split_key(key)
        assert namespace is not None  # every Plugin object has one
        body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        patch = [{"op": "add", "path": "/status", "value": body}]
        obj = await self._patch(
            f"writing the status of {key}",
            self.objects.patch_namespaced_custom_object_status,
            namespace,
            name,
            patch,
            JSON_PATCH,
        )
        if obj:
            self._informer.put(obj)

    async def record_event(
        self, key: str, type: store_module.EventType, reason: str, message: str
    ) -> None:
        try:
            await asyncio.to_thread(self.store.record, key, type, reason, message)
        except StoreUnavailableError as e:  # reported by the store's health; passes go on
            log.debug("event %s of %s not recorded: %s", reason, key, e)
        obj = self._object(key)
        if obj is None:
            return
        namespace, name = kubeapi.key_of(obj)
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": models.API_VERSION,
                "kind": models.KIND,
                "name": name,
                "namespace": namespace,
                "uid": (obj.get("metadata") or {}).get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._call(
                f"recording an event on {key}", self.core.create_namespaced_event, namespace, body
            )
        except kubeapi.KubernetesApiError as e:
            log.warning("%s", e)  # the event is kept in the store all the same

    async def events(self, key: str) -> list[store_module.Event]:
        return await asyncio.to_thread(self.store.events, key)

    async def forget(self, key: str) -> None:
        """The plugin's instances are gone: release the object to the API server."""
        await asyncio.to_thread(self.store.forget, key)
        obj = self._object(key)
        if obj is None or not (obj.get("metadata") or {}).get("deletionTimestamp"):
            return
        await self._set_finalizer(obj, present=False)

    async def known(self) -> list[str]:
        """Plugins being deleted that still carry the finalizer."""
        known: list[str] = []
        for obj in self._informer.items():
            metadata = obj.get("metadata") or {}
            if metadata.get("deletionTimestamp") and FINALIZER in (
                metadata.get("finalizers") or []
            ):
                namespace, name = kubeapi.key_of(obj)
                known.append(plugin_key(name, namespace))
        return known

    # The admin API's writes: not on Kubernetes.

    async def apply(self, text: str | bytes, origin: str = "<apply>") -> list[Desired]:
        raise SpecError([_kubectl(origin, "kubectl apply -f FILE")])

    async def delete(self, key: str) -> bool:
        raise SpecError([_kubectl(key, f"kubectl delete plugin {key.rpartition('/')[2]}")])

    # Following changes.

    async def run(self, stop: asyncio.Event) -> None:
        self._informer.start()
        try:
            async with asyncio.timeout(SYNC_SECONDS):
                await self._informer.synced.wait()
        except TimeoutError:
            log.warning("Plugin objects not listed within %.0fs; still trying", SYNC_SECONDS)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._finalize(stop))
            group.create_task(self._resync(stop))
        self._informer.stop()

    async def _finalize(self, stop: asyncio.Event) -> None:
        """Put the finalizer on every declared Plugin that lacks it (once, then as they come)."""
        while not stop.is_set():
            for obj in self._informer.items():
                metadata = obj.get("metadata") or {}
                if metadata.get("deletionTimestamp") or FINALIZER in (
                    metadata.get("finalizers") or []
                ):
                    continue
                try:
                    await self._set_finalizer(obj, present=True)
                except kubeapi.KubernetesApiError as e:
                    log.warning("%s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)

    async def _resync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.resync_seconds)
            except TimeoutError:
                for key in sorted(self._desired):
                    self.enqueue(key)

    async def _set_finalizer(self, obj: kubeapi.Object, *, present: bool) -> None:
        metadata = obj.get("metadata") or {}
        namespace, name = kubeapi.key_of(obj)
        finalizers = [f for f in metadata.get("finalizers") or [] if f != FINALIZER]
        if present:
            finalizers.append(FINALIZER)
        # The resourceVersion makes this a compare-and-swap: another writer's
        # finalizers are never lost to ours (409, and the next round retries).
        patch = {
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": metadata.get("resourceVersion"),
            }
        }
        updated = await self._patch(
            f"{'adding' if present else 'removing'} the finalizer of {namespace}/{name}",
            self.objects.patch_namespaced_custom_object,
            namespace,
            name,
            patch,
            MERGE_PATCH,
        )
        if updated and present:
            self._informer.put(updated)

    async def _patch(
        self,
        doing: str,
        fn: Callable[..., Any],
        namespace: str,
        name: str,
        patch: Any,
        content_type: str,
    ) -> Any:
        """A patch of one Plugin object (or its status); None when it is gone."""
        return await self._call(
            doing,
            fn,
            models.API_GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            patch,
            _content_type=content_type,
        )

    async def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            response = await asyncio.to_thread(fn, *args, _preload_content=False, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None  # deleted meanwhile: nothing to write to
            raise kubeapi.error(e, doing) from e
        except urllib3.exceptions.HTTPError as e:
            raise kubeapi.error(e, doing) from e
        data = response.data
        return json.loads(data) if data else None


def _plugin(obj: kubeapi.Object, origin: str) -> models.Plugin:
    """The Plugin in ``obj``, validated like a spec file; raises :class:`SpecError`."""
    metadata = obj.get("metadata") or {}
    known = {
        "name",
        "namespace",
        "labels",
        "annotations",
        "generation",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
        "finalizers",
    }
    document = {
        "apiVersion": obj.get("apiVersion", models.API_VERSION),
        "kind": obj.get("kind", models.KIND),
        "metadata": {k: v for k, v in metadata.items() if k in known},
        "spec": obj.get("spec") or {},
    }
    # ensure_ascii=False: libyaml refuses the surrogate pairs JSON escapes emoji as.
    loaded = loader.load_text(json.dumps(document, ensure_ascii=False), origin)
    plugin = loaded[0].plugin
    if plugin.metadata.generation is None:
        meta = plugin.metadata.model_copy(update={"generation": 1})
        plugin = plugin.model_copy(update={"metadata": meta})
    return plugin


def _kubectl(where: str, command: str) -> SpecIssue:
    return SpecIssue(
        where,
        None,
        "metadata.name",
        f"this controller follows Plugin objects on Kubernetes; use {command}",
    )
