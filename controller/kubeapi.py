"""The Kubernetes API, for the backends that speak it: connecting, and informers.

Shared by the Kubernetes source (Plugin objects), the Kubernetes runtime
(Deployments, Pods) and leader election (Leases), and used nowhere else. The
official client is synchronous: its calls run in threads, and each
:class:`Informer` keeps one thread that lists, then watches from the listed
``resourceVersion``, and lists again when the server says the version is too
old (``410 Gone``), in the shape of client-go's reflector. Objects are kept
as the JSON the server sent, not as the client's models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from controller.errors import ControllerError

log = logging.getLogger(__name__)

Object = dict[str, Any]
ObjectKey = tuple[str, str]
"""(namespace, name); the namespace is empty for objects outside namespaces."""

WATCH_SECONDS = 300
"""How long one watch request lasts before it is made again (from the last version seen)."""
RETRY_SECONDS = 2.0


class KubernetesApiError(ControllerError):
    """The Kubernetes API refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def connect(
    kubeconfig: str | None = None, context: str | None = None, *, agent: str = ""
) -> client.ApiClient:
    """A client from the pod's service account when in a cluster, else from a kubeconfig.

    ``agent`` is sent as the User-Agent, so that the API server's audit log
    tells the controller's replicas apart.
    """
    api = _client(kubeconfig, context)
    if agent:
        api.user_agent = agent
    return api


def _client(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    try:
        configuration = client.Configuration()
        config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    except (config.ConfigException, OSError) as e:
        raise KubernetesApiError(
            f"no Kubernetes API to talk to: not in a cluster, and no usable kubeconfig ({e})"
        ) from e
    return client.ApiClient(configuration)


def error(e: Exception, doing: str) -> KubernetesApiError:
    """The API's failure as the controller's error, with the server's message."""
    if isinstance(e, ApiException):
        message = e.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(e.body or "{}").get("message") or message
        return KubernetesApiError(f"{doing}: {e.status} {message}", e.status)
    return KubernetesApiError(f"{doing}: {e}")


def key_of(obj: Object) -> ObjectKey:
    metadata = obj.get("metadata") or {}
    return (metadata.get("namespace") or "", metadata.get("name") or "")


def resource_version(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


Lister = Callable[..., Any]
"""A list call of the client (e.g. ``AppsV1Api.list_deployment_for_all_namespaces``)."""
Changed = Callable[[Object | None, Object | None], None]
"""Called with (before, after) for every object added, changed or deleted."""


class Informer:
    """A cache of the objects one list call returns, kept current by watching.

    ``listers`` are list calls that all feed the same cache (one per
    namespace, or one for all namespaces); ``changed`` is called on the
    event loop that started the informer.
    """

    def __init__(
        self,
        name: str,
        listers: list[tuple[Lister, dict[str, Any]]],
        changed: Changed,
        *,
        label_selector: str | None = None,
    ) -> None:
        self.name = name
        self.listers = listers
        self.changed = changed
        self.label_selector = label_selector
        self.synced = asyncio.Event()
        """Set once every lister has listed once."""
        self._objects: dict[ObjectKey, Object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._listed = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for index, (lister, kwargs) in enumerate(self.listers):
            thread = threading.Thread(
                target=self._run,
                args=(lister, kwargs),
                name=f"informer-{self.name}-{index}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching; the threads end when their current request does."""
        self._stop.set()

    def get(self, key: ObjectKey) -> Object | None:
        with self._lock:
            return self._objects.get(key)

    def items(self) -> list[Object]:
        with self._lock:
            return list(self._objects.values())

    def put(self, obj: Object) -> None:
        """Our own write, seen before its watch event arrives (which then changes nothing)."""
        self._apply("MODIFIED", obj, scope=None)

    def _run(self, lister: Lister, kwargs: dict[str, Any]) -> None:
        scope = kwargs.get("namespace")
        first = True
        while not self._stop.is_set():
            try:
                version = self._relist(lister, kwargs, scope)
                if first:
                    first = False
                    self._mark_listed()
                for event in self._watch(lister, kwargs, version):
                    self._apply(event["type"], event["raw_object"], scope)
            except _Gone:
                log.info("%s: watch expired (410 Gone); listing again", self.name)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                if not self._stop.is_set():
                    log.warning("%s: %s; listing again in %.0fs", self.name, e, RETRY_SECONDS)
                    self._stop.wait(RETRY_SECONDS)

    def _selector(self) -> dict[str, Any]:
        return {"label_selector": self.label_selector} if self.label_selector else {}

    def _relist(self, lister: Lister, kwargs: dict[str, Any], scope: str | None) -> str:
        response = lister(**kwargs, **self._selector(), _preload_content=False)
        listing = json.loads(response.data)
        items = listing.get("items") or []
        fresh = {key_of(item): item for item in items}
        with self._lock:
            mine = {k: v for k, v in self._objects.items() if scope is None or k[0] == scope}
            gone = [mine[k] for k in mine.keys() - fresh.keys()]
            for k in mine.keys() - fresh.keys():
                del self._objects[k]
        for obj in gone:
            self._notify(obj, None)
        for item in items:
            self._apply("MODIFIED", item, scope)
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, lister: Lister, kwargs: dict[str, Any], version: str) -> Iterator[Object]:
        stream = watch.Watch()
        while not self._stop.is_set():
            try:
                for event in stream.stream(
                    lister,
                    **kwargs,
                    **self._selector(),
                    resource_version=version or None,
                    allow_watch_bookmarks=True,
                    deserialize=False,
                    timeout_seconds=WATCH_SECONDS,
                    _request_timeout=WATCH_SECONDS + 30,
                ):
                    if self._stop.is_set():
                        stream.stop()
                        return
                    raw = event.get("raw_object") or event.get("object") or {}
                    if event["type"] == "ERROR":
                        if raw.get("code") == 410:
                            raise _Gone()
                        raise ValueError(f"watch error: {raw.get('message') or raw}")
                    version = resource_version(raw) or version
                    if event["type"] == "BOOKMARK":
                        continue
                    yield {"type": event["type"], "raw_object": raw}
            except ApiException as e:
                if e.status == 410:
                    raise _Gone() from e
                raise
            except KeyError as e:
                # The client's check of ERROR events without deserializing: it
                # looks for a key that only deserialized events have. Such an
                # event is most often 410 Gone; listing again is right either way.
                raise _Gone() from e

    def _apply(self, kind: str, obj: Object, scope: str | None) -> None:
        key = key_of(obj)
        with self._lock:
            before = self._objects.get(key)
            if kind == "DELETED":
                self._objects.pop(key, None)
                after = None
            else:
                if before is not None and _older(obj, before):
                    return
                self._objects[key] = obj
                after = obj
        if before is None and after is None:
            return
        if before is not None and after is not None and before == after:
            return
        self._notify(before, after)

    def _notify(self, before: Object | None, after: Object | None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.changed, before, after)

    def _mark_listed(self) -> None:
        with self._lock:
            self._listed += 1
            done = self._listed >= len(self.listers)
        if done and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.synced.set)


def _older(obj: Object, than: Object) -> bool:
    """Whether ``obj`` is an older version than ``than`` (numeric resourceVersions only).

    resourceVersions are opaque; comparing them is only a guard against our own
    write being overtaken by the watch event of an earlier version.
    """
    a, b = resource_version(obj), resource_version(than)
    return a.isdigit() and b.isdigit() and int(a) < int(b)
