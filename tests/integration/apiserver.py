"""A Kubernetes API server for tests: kmock's HTTP emulator with a real server's rules.

No kube-apiserver can run on this machine, so the controller's Kubernetes code
talks to ``kmock`` over real HTTP with the official client, and
:class:`ApiServer` gives it the semantics of a real server that the product
relies on. ``test_kube_conformance.py`` checks each one, naming the API
documentation it follows. In short:

- **identity and versions**: ``uid``, ``creationTimestamp``, ``generation``
  (bumped when anything but ``metadata`` and ``status`` changes), a cluster-wide
  ``resourceVersion`` bumped on every write that changes something (a write that
  changes nothing changes no version and sends no event); lists carry the current one;
- **optimistic concurrency**: a stale ``metadata.resourceVersion`` gets ``409``;
- **writes**: create (``409 AlreadyExists``), JSON merge patch and JSON patch
  (a strategic merge patch is taken as a merge patch), PUT, delete with
  finalizers (``deletionTimestamp`` first) and ``propagationPolicy``;
- **names**: DNS-1123 subdomains, DNS-1035 labels for Services, DNS-1123 labels
  for Namespaces, label keys and values, all with their lengths (``422``);
- **namespaces that must exist** (``404``; ``default``, ``kube-system`` and
  ``kube-public`` exist from the start, with their ``kubernetes.io/metadata.name`` label);
- **CustomResourceDefinitions** served as stored: a custom resource is ``404``
  until its CRD exists, and each write is pruned, defaulted and validated against
  the stored CRD's ``openAPIV3Schema`` and CEL rules (``tests/kubeschema.py``),
  ``422`` with a Status whose ``details.causes`` name the fields; replacing the
  CRD changes the schema the next write meets;
- **status subresource**: a write to ``/status`` changes only ``status``, a write
  to the object ignores ``status`` (creates drop it), for custom resources with the
  subresource and for Deployments, Services, Pods and PersistentVolumeClaims;
- **Deployments**: ``spec.selector`` required, matching the template's labels,
  immutable; ``replicas`` defaulted to 1;
- **Services**: a ``clusterIP`` allocated from 10.96.0.0/12 (``None``: headless),
  immutable, carried over when an update leaves it out; ports' ``protocol`` and
  ``targetPort`` defaulted;
- **Secrets**: ``stringData`` folded into base64 ``data``, ``type`` defaulted;
- **garbage collection**: an object none of whose owners exists (by
  ``ownerReferences`` uid, in its own namespace or cluster-scoped: a reference
  across namespaces counts as absent) is deleted in the background, after its
  owner's deletion or its own write; an owner deleted with
  ``propagationPolicy: Orphan`` has its dependents' references to it removed
  instead; references must name apiVersion, kind, name and uid, at most one
  with ``controller: true``;
- **PersistentVolumeClaims**: ``spec`` immutable but for ``resources``, whose
  storage request may not shrink (growing it is allowed, as with an expandable
  StorageClass);
- **Events**: ``involvedObject.namespace`` must be the Event's;
- **label selectors** (equality-based and existence) on list and watch;
- **watches** from a ``resourceVersion`` send what happened after it (none, or
  ``0``: the current objects as ``ADDED`` first), end after ``timeoutSeconds``,
  send ``BOOKMARK`` events with the current version when ``allowWatchBookmarks``
  (every :attr:`ApiServer.bookmark_seconds`), and answer ``410 Gone`` from a
  version older than the kept history (:meth:`ApiServer.expire` compacts it).

It does NOT do: server-side apply, authentication or RBAC (tests record the
calls and compare them with the chart's rules instead), admission webhooks,
NetworkPolicy enforcement, Events' aggregation, Table output for kubectl's
printer columns, field selectors, conversion between CRD versions, strategic
merge patch's list merging.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import copy
import datetime
import ipaddress
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import parsing

from controller.spec import quantity
from tests import kubeschema

DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"
SERVICES = "v1/services"
NAMESPACES = "v1/namespaces"
ENDPOINT_SLICES = "discovery.k8s.io/v1/endpointslices"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
RESOURCES = [
    ENDPOINT_SLICES,
    "blackhole.dev/v1alpha1/plugins",
    DEPLOYMENTS,
    PODS,
    SERVICES,
    "v1/secrets",
    "v1/persistentvolumeclaims",
    "v1/events",
    "networking.k8s.io/v1/networkpolicies",
    "coordination.k8s.io/v1/leases",
    NAMESPACES,
    CRDS,
]
KINDS = {
    "deployments": "Deployment",
    "pods": "Pod",
    "services": "Service",
    "secrets": "Secret",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "events": "Event",
    "networkpolicies": "NetworkPolicy",
    "leases": "Lease",
    "endpointslices": "EndpointSlice",
    "namespaces": "Namespace",
    "customresourcedefinitions": "CustomResourceDefinition",
}
WITH_STATUS = {"deployments", "services", "pods", "persistentvolumeclaims"}
"""Built-in resources with a status subresource (custom ones: as their CRD says)."""
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions"}
SERVICE_RANGE = ipaddress.ip_network("10.96.0.0/12")
HISTORY = 10_000
"""Watch events kept: a watch from an older version is answered 410 Gone."""

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def matches(obj: dict[str, Any], selector: str | None) -> bool:
    """Whether ``obj``'s labels satisfy an equality-based selector (``a=b,c!=d,e,!f``)."""
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> Any:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {})


def conflict(kind: str, name: str) -> Any:
    return _status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {kind} "{name}": the object '
        "has been modified; please apply your changes to the latest version and try "
        "again",
        {"name": name, "kind": kind},
    )


def not_found(resource: Any, name: str | None) -> Any:
    what = f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)
    return _status(404, "NotFound", f'{what} "{name}" not found', {"name": name, "kind": what})


def invalid(kind: str, group: str, name: str, causes: list[kubeschema.Cause]) -> Any:
    """422, with the causes as a real server lists them."""
    qualified = f"{kind}.{group}" if group else kind
    message = f'{qualified} "{name}" is invalid: ' + ", ".join(c.message for c in causes)
    details = {
        "name": name,
        "group": group,
        "kind": kind,
        "causes": [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
    }
    return _status(422, "Invalid", message, details)


def _cause(field: str, message: str, reason: str = "FieldValueInvalid") -> kubeschema.Cause:
    return kubeschema.Cause(field, reason, f"{field}: {message}")


def name_causes(plural: str, name: Any) -> list[kubeschema.Cause]:
    """What a real server says of ``name`` for a ``plural`` object (empty: a good name)."""
    if not isinstance(name, str) or not name:
        return [
            _cause(
                "metadata.name",
                "Required value: name or generateName is required",
                "FieldValueRequired",
            )
        ]
    if plural == "services":
        if len(name) > 63 or not DNS1035_LABEL.match(name):
            return [
                _cause(
                    "metadata.name",
                    f'Invalid value: "{name}": a DNS-1035 label must '
                    "consist of lower case alphanumeric characters or '-', start with an "
                    "alphabetic character, and end with an alphanumeric character, at most "
                    "63 characters",
                )
            ]
    elif plural == "namespaces":
        if len(name) > 63 or not DNS1123_LABEL.match(name):
            return [
                _cause(
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 label of at most 63 characters',
                )
            ]
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return [
            _cause(
                "metadata.name",
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain '
                "of at most 253 characters",
            )
        ]
    return []


def label_causes(labels: Any) -> list[kubeschema.Cause]:
    causes = []
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        if (
            len(name) > 63
            or not LABEL_NAME.match(name)
            or (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)))
        ):
            causes.append(
                _cause(
                    "metadata.labels",
                    f'Invalid value: "{key}": a qualified name '
                    "of at most 63 characters, with an optional DNS subdomain "
                    "prefix",
                )
            )
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            causes.append(
                _cause(
                    "metadata.labels",
                    f'Invalid value: "{value}": a valid label '
                    "value must be 63 characters or less, alphanumeric, '-', '_' or "
                    "'.', starting and ending alphanumeric",
                )
            )
    return causes


def _parse_path(path: str) -> Any:
    """kmock's URL parsing, plus the Namespace objects' own URLs (``/api/v1/namespaces[/x]``),
    which it reads as a namespace with no resource."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        subresource = parts[4] if len(parts) > 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
    return _kmock_parse_path(path)


_kmock_parse_path = parsing.parse_path
parsing.parse_path = _parse_path


def owner_causes(references: Any) -> list[kubeschema.Cause]:
    """What a real server says of ``metadata.ownerReferences``."""
    causes = []
    for ref in references or []:
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                where = f"metadata.ownerReferences.{field}"
                causes.append(_cause(where, f'Invalid value: "": {field} must not be empty'))
    if sum(1 for ref in references or [] if ref.get("controller")) > 1:
        causes.append(
            _cause(
                "metadata.ownerReferences",
                "Invalid value: only one reference can have Controller set to true",
            )
        )
    return causes


def _patched(obj: dict[str, Any], patch: Any) -> dict[str, Any]:
    from kmock._internal import dicts

    return dict(copy.deepcopy(dicts.patch_dict(copy.deepcopy(obj), patch)))


@dataclass(frozen=True)
class Refusal:
    """A request the server refused (4xx), for tests to check who was refused what."""

    agent: str
    method: str
    path: str
    status: int
    message: str


@dataclass(frozen=True)
class _Event:
    version: int
    resource: Any
    namespace: str | None
    type: str
    object: dict[str, Any]


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the semantics listed in the module's docstring."""

    bookmark_seconds: float = 2.0
    """How often a watch that allows them gets a BOOKMARK (a real server: about a minute)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self._version = 0
        self._writes = asyncio.Lock()
        self._history: list[_Event] = []
        self._compacted = 0
        """Watches from this version or older are answered 410 Gone."""
        self._expired = 0
        """Bumped by expire(): every open watch ends with 410 Gone."""
        self._changed = asyncio.Condition()
        self._addresses = (str(a) for a in itertools.islice(SERVICE_RANGE.hosts(), 10, None))
        self._collector: asyncio.Task[None] | None = None
        self.refused: list[Refusal] = []
        self.pruned: list[tuple[str, str, list[str]]] = []
        """(User-Agent, object, fields) of every write the schema pruned fields from."""
        self._agent = ""
        resources: Any = self.resources
        for resource in RESOURCES:
            resources[resource] = {}
        for namespace in ("default", "kube-system", "kube-public"):
            self._put(kmock.resource(NAMESPACES), self._namespace(namespace), "ADDED")

    # Storage and the watch history.

    def _next(self) -> str:
        self._version = next(self._versions)
        return str(self._version)

    def _get(self, resource: Any, namespace: str | None, name: str | None) -> dict[str, Any] | None:
        found = self._peek(resource, namespace, name)
        return copy.deepcopy(found) if found is not None else None

    def _peek(
        self, resource: Any, namespace: str | None, name: str | None
    ) -> dict[str, Any] | None:
        """The stored object itself, not to be changed (:meth:`_get` gives a copy)."""
        key: Any = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return dict(self.objects[key].raw)

    def _put(self, resource: Any, obj: dict[str, Any], kind: str) -> dict[str, Any]:
        """Store ``obj`` at a new resourceVersion (or remove it: DELETED) and record the event."""
        metadata = obj["metadata"]
        key = (resource, metadata.get("namespace"), metadata["name"])
        metadata["resourceVersion"] = self._next()
        if kind == "DELETED":
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        self._history.append(
            _Event(self._version, resource, metadata.get("namespace"), kind, copy.deepcopy(obj))
        )
        if len(self._history) > 2 * HISTORY:
            self._compacted = self._history[-HISTORY - 1].version
            del self._history[:-HISTORY]
        self._notify()
        return obj

    def _notify(self) -> None:
        async def tell() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # made outside a loop: nobody watches yet
            asyncio.get_running_loop().create_task(tell())

    def _namespace(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now(),
                "labels": {"kubernetes.io/metadata.name": name},
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    # Custom resources, as their CRDs say.

    def _crd(self, resource: Any) -> dict[str, Any] | None:
        if not resource.group or resource.group in (
            "apps",
            "discovery.k8s.io",
            "networking.k8s.io",
            "coordination.k8s.io",
            "apiextensions.k8s.io",
        ):
            return None
        name = f"{resource.plural}.{resource.group}"
        return self._peek(kmock.resource(CRDS), None, name) or {"missing": name}

    def _version_of(self, crd: dict[str, Any], resource: Any) -> dict[str, Any] | None:
        for version in crd["spec"]["versions"]:
            if version["name"] == resource.version and version.get("served", True):
                return dict(version)
        return None

    def _has_status(self, resource: Any) -> bool:
        crd = self._crd(resource)
        if crd is None:
            return str(resource.plural) in WITH_STATUS
        if "missing" in crd:
            return False
        version = self._version_of(crd, resource) or {}
        return "status" in (version.get("subresources") or {})

    def _require_served(self, resource: Any, name: str | None) -> None:
        crd = self._crd(resource)
        if crd is not None and ("missing" in crd or self._version_of(crd, resource) is None):
            raise not_found(resource, name)

    def _kind(self, resource: Any) -> str:
        crd = self._crd(resource)
        if crd is not None and "missing" not in crd:
            return str(crd["spec"]["names"]["kind"])
        return KINDS.get(str(resource.plural), str(resource.plural))

    # Requests.

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        try:
            return await self._answer(request)
        except kmock.KubernetesError as e:
            agent = str(request.headers.get("User-Agent", ""))
            refusal = Refusal(
                agent, str(request.method), str(request.url.path), e.status, e.message or ""
            )
            self.refused.append(refusal)
            raise

    async def _answer(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is None:
            return await super()._handle(request)
        self._require_served(request.resource, request.name)
        if request.method == "GET":
            return await super()._handle(request)
        async with self._writes:
            self._agent = str(request.headers.get("User-Agent", ""))
            if request.method == "POST":
                body = self._create(request)
            elif request.method == "DELETE" and request.name:
                body = self._delete(
                    request.resource, request.namespace, request.name, self._propagation(request)
                )
            elif request.method in ("PUT", "PATCH") and request.name:
                body = self._update(request)
            else:
                raise _status(405, "MethodNotAllowed", f"{request.method} is not supported here")
        return aiohttp.web.json_response(body, status=201 if request.method == "POST" else 200)

    def _propagation(self, request: Any) -> str:
        body = request.data if isinstance(request.data, dict) else {}
        return str(
            body.get("propagationPolicy") or request.params.get("propagationPolicy") or "Background"
        )

    def _create(self, request: Any) -> dict[str, Any]:
        resource = request.resource
        plural = str(resource.plural)
        if not isinstance(request.data, dict):
            raise _status(400, "BadRequest", "the body of the request was not a JSON object")
        obj = copy.deepcopy(request.data)
        metadata = obj.setdefault("metadata", {})
        namespace = request.namespace
        if plural in CLUSTER_SCOPED:
            namespace = None
        elif metadata.get("namespace") not in (None, namespace):
            raise _status(
                400,
                "BadRequest",
                "the namespace of the provided object does not "
                "match the namespace sent on the request",
            )
        name = metadata.get("name")
        kind = self._kind(resource)
        causes = name_causes(plural, name) + label_causes(metadata.get("labels"))
        causes += owner_causes(metadata.get("ownerReferences"))
        if causes:
            raise invalid(kind, resource.group or "", str(name), causes)
        if namespace is not None and self._get(kmock.resource(NAMESPACES), None, namespace) is None:
            raise _status(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )
        if self._get(resource, namespace, name) is not None:
            what = f"{plural}.{resource.group}" if resource.group else plural
            raise _status(
                409,
                "AlreadyExists",
                f'{what} "{name}" already exists',
                {"name": name, "kind": what},
            )
        for kept in ("resourceVersion", "deletionTimestamp", "generation"):
            metadata.pop(kept, None)
        if namespace is not None:
            metadata["namespace"] = namespace
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now()
        metadata["generation"] = 1
        if self._has_status(resource):
            obj.pop("status", None)
        obj = self._admit(resource, obj, None)
        if metadata.get("ownerReferences"):
            self._collect_soon()  # an owner that is not there: the collector deletes it
        return self._put(resource, obj, "ADDED")

    def _update(self, request: Any) -> dict[str, Any]:
        resource = request.resource
        stored = self._get(resource, request.namespace, request.name)
        kind = self._kind(resource)
        if stored is None:
            raise not_found(resource, request.name)
        if request.method == "PUT":
            if not isinstance(request.data, dict):
                raise _status(400, "BadRequest", "the body of the request was not a JSON object")
            after = copy.deepcopy(request.data)
            if (after.get("metadata") or {}).get("name") not in (None, request.name):
                raise _status(
                    400, "BadRequest", "the name of the object does not match the name on the URL"
                )
        else:
            try:
                after = _patched(stored, request.data)
            except Exception as e:  # a JSON patch that does not apply
                raise _status(422, "UnprocessableEntity", f"the patch does not apply: {e}") from e
        metadata = after.setdefault("metadata", {})
        wanted = metadata.get("resourceVersion")
        if wanted not in (None, "") and wanted != stored["metadata"]["resourceVersion"]:
            raise conflict(f"{resource.plural}.{resource.group}".rstrip("."), request.name)
        for kept in (
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
            "deletionTimestamp",
        ):
            if kept in stored["metadata"]:
                metadata[kept] = stored["metadata"][kept]
            else:
                metadata.pop(kept, None)
        if self._has_status(resource):
            if request.subresource == "status":
                after = {**copy.deepcopy(stored), "status": after.get("status")}
                if after["status"] is None:
                    del after["status"]
            elif "status" in stored:
                after["status"] = stored["status"]
            else:
                after.pop("status", None)
        causes = label_causes(metadata.get("labels")) + owner_causes(
            metadata.get("ownerReferences")
        )
        if causes:
            raise invalid(kind, resource.group or "", request.name, causes)
        after = self._admit(resource, after, stored)
        body = {k: v for k, v in after.items() if k not in ("metadata", "status")}
        before = {k: v for k, v in stored.items() if k not in ("metadata", "status")}
        if body != before:
            after["metadata"]["generation"] = int(stored["metadata"].get("generation") or 1) + 1
        same = {**after, "metadata": {**after["metadata"], "resourceVersion": None}}
        if same == {**stored, "metadata": {**stored["metadata"], "resourceVersion": None}}:
            return stored  # nothing changed: no new version, no event
        gone = metadata.get("deletionTimestamp") and not metadata.get("finalizers")
        if gone:
            self._put(resource, after, "DELETED")
            self._collect_soon()
            return after
        if metadata.get("ownerReferences"):
            self._collect_soon()
        return self._put(resource, after, "MODIFIED")

    def _delete(
        self, resource: Any, namespace: str | None, name: str, policy: str
    ) -> dict[str, Any]:
        stored = self._get(resource, namespace, name)
        if stored is None:
            raise not_found(resource, name)
        metadata = stored["metadata"]
        if metadata.get("finalizers"):
            if not metadata.get("deletionTimestamp"):
                metadata["deletionTimestamp"] = now()
                return self._put(resource, stored, "MODIFIED")
            return stored
        self._put(resource, stored, "DELETED")
        if policy == "Orphan":
            self._orphan(metadata["uid"])
        else:
            self._collect_soon()
        return stored

    # Each kind's rules.

    def _admit(
        self, resource: Any, obj: dict[str, Any], stored: dict[str, Any] | None
    ) -> dict[str, Any]:
        plural = str(resource.plural)
        kind = self._kind(resource)
        name = str(obj["metadata"].get("name"))
        group = resource.group or ""
        crd = self._crd(resource)
        causes: list[kubeschema.Cause] = []
        if crd is not None:
            version = self._version_of(crd, resource) or {}
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema is not None:
                if dropped := kubeschema.pruned_fields(schema, obj):
                    self.pruned.append((self._agent, f"{resource.plural}/{name}", dropped))
                obj, causes = kubeschema.admit(schema, obj)
        elif plural == "deployments":
            causes = self._deployment(obj, stored)
        elif plural == "services":
            causes = self._service(obj, stored)
        elif plural == "persistentvolumeclaims" and stored is not None:
            causes = self._claim(obj, stored)
        elif plural == "events":
            involved = (obj.get("involvedObject") or {}).get("namespace")
            if involved not in (None, "", obj["metadata"].get("namespace")):
                causes = [
                    _cause(
                        "involvedObject.namespace",
                        f'Invalid value: "{involved}": does not match event.namespace',
                    )
                ]
        elif plural == "secrets":
            data = obj.setdefault("data", {}) or {}
            for key, value in (obj.pop("stringData", None) or {}).items():
                data[key] = base64.b64encode(value.encode()).decode()
            obj["data"] = data
            obj.setdefault("type", "Opaque")
        elif plural == "namespaces":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            obj["status"] = {"phase": "Active"}
        elif plural == "customresourcedefinitions":
            names = (obj.get("spec") or {}).get("names") or {}
            expected = f"{names.get('plural')}.{(obj.get('spec') or {}).get('group')}"
            if name != expected:
                causes = [
                    _cause(
                        "metadata.name",
                        f'Invalid value: "{name}": must be spec.names.'
                        f'plural+"."+spec.group ({expected})',
                    )
                ]
        if causes:
            raise invalid(kind, group, name, causes)
        return obj

    def _deployment(self, obj: dict[str, Any], stored: dict[str, Any] | None) -> list[Any]:
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        selector = spec.get("selector")
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector:
            return [_cause("spec.selector", "Required value", "FieldValueRequired")]
        causes = []
        wanted = selector.get("matchLabels") or {}
        if not wanted or any(labels.get(k) != v for k, v in wanted.items()):
            causes.append(
                _cause(
                    "spec.template.metadata.labels",
                    f"Invalid value: {labels}: `selector` does not match template `labels`",
                )
            )
        if stored is not None and stored["spec"].get("selector") != selector:
            causes.append(_cause("spec.selector", f"Invalid value: {selector}: field is immutable"))
        return causes

    def _claim(self, obj: dict[str, Any], stored: dict[str, Any]) -> list[Any]:
        """A claim's spec is immutable but for its requests, which may only grow."""
        spec, old = obj.get("spec") or {}, stored.get("spec") or {}
        if {k: v for k, v in spec.items() if k != "resources"} != {
            k: v for k, v in old.items() if k != "resources"
        }:
            return [
                _cause(
                    "spec",
                    "Forbidden: spec is immutable after creation except "
                    "resources.requests and volumeAttributesClassName for bound claims",
                )
            ]
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        before = ((old.get("resources") or {}).get("requests") or {}).get("storage")
        if (
            size
            and before
            and quantity.Quantity(size).as_int() < quantity.Quantity(before).as_int()
        ):
            return [
                _cause(
                    "spec.resources.requests.storage",
                    f"Forbidden: field can not be less than previous value ({before})",
                )
            ]
        return []

    def _service(self, obj: dict[str, Any], stored: dict[str, Any] | None) -> list[Any]:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        if stored is not None:
            old = stored["spec"].get("clusterIP")
            if not spec.get("clusterIP"):  # left out of an update: carried over
                spec["clusterIP"], spec["clusterIPs"] = old, stored["spec"].get("clusterIPs")
            elif spec["clusterIP"] != old:
                return [
                    _cause(
                        "spec.clusterIP",
                        f'Invalid value: "{spec["clusterIP"]}": field is immutable',
                    )
                ]
            return []
        if spec.get("clusterIP") == "None":
            spec["clusterIPs"] = ["None"]
        elif spec.get("clusterIP"):
            try:
                inside = ipaddress.ip_address(spec["clusterIP"]) in SERVICE_RANGE
            except ValueError:
                inside = False
            if not inside:
                return [
                    _cause(
                        "spec.clusterIP",
                        f'Invalid value: "{spec["clusterIP"]}": '
                        f"provided IP is not in the valid range ({SERVICE_RANGE})",
                    )
                ]
            spec["clusterIPs"] = [spec["clusterIP"]]
        else:
            taken = {
                (dict(o.raw).get("spec") or {}).get("clusterIP")
                for key, o in list(self.objects.items())
                if key[0] == kmock.resource(SERVICES) and not o.deleted
            }
            address = next(a for a in self._addresses if a not in taken)
            spec["clusterIP"], spec["clusterIPs"] = address, [address]
        return []

    # Garbage collection.

    def _collect_soon(self) -> None:
        if self._collector is None or self._collector.done():
            self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        """Delete the objects whose every owner is gone, until none is left (background)."""
        await asyncio.sleep(0)
        while True:
            async with self._writes:
                everything = self._view()
                # An owner is found by uid, in the dependent's namespace or cluster-scoped:
                # a reference across namespaces counts as absent.
                owners = {(ns, o["metadata"].get("uid")) for (_, ns, _), o in everything.items()}
                orphans = [
                    (resource, obj)
                    for (resource, ns, _), obj in everything.items()
                    if (refs := obj["metadata"].get("ownerReferences"))
                    and not any(
                        (ns, r.get("uid")) in owners or (None, r.get("uid")) in owners for r in refs
                    )
                    and not obj["metadata"].get("deletionTimestamp")
                ]
                for resource, obj in orphans:
                    metadata = obj["metadata"]
                    self._delete(
                        resource, metadata.get("namespace"), metadata["name"], "Background"
                    )
            if not orphans:
                return

    def _orphan(self, uid: str) -> None:
        for (resource, _, _), viewed in self._view().items():
            refs = viewed["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                obj = copy.deepcopy(viewed)
                obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                self._put(resource, obj, "MODIFIED")

    def _view(self) -> dict[tuple[Any, str | None, str], dict[str, Any]]:
        """The stored objects themselves, to read only."""
        return {key: dict(obj.raw) for key, obj in list(self.objects.items()) if not obj.deleted}

    def _everything(
        self, resource: Any = None
    ) -> dict[tuple[Any, str | None, str], dict[str, Any]]:
        """Copies of the stored objects (of ``resource``, or all)."""
        return {
            key: copy.deepcopy(dict(obj.raw))
            for key, obj in list(self.objects.items())
            if not obj.deleted and (resource is None or key[0] == resource)
        }

    # Reads.

    async def _serve_list(self, request: Any) -> Any:
        payload: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        payload["items"] = [i for i in payload["items"] if matches(i, selector)]
        payload["metadata"] = {"resourceVersion": str(self._version)}
        return payload

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        yield b""  # the headers, at once
        resource, namespace = request.resource, request.namespace
        selector = request.params.get("labelSelector")
        loop = asyncio.get_running_loop()
        timeout = request.params.get("timeoutSeconds")
        deadline = loop.time() + float(timeout) if timeout else None
        bookmarks = request.params.get("allowWatchBookmarks") == "true"
        given = request.params.get("resourceVersion") or "0"
        epoch = self._expired

        def wanted(obj: dict[str, Any], ns: str | None) -> bool:
            return (namespace is None or ns == namespace) and matches(obj, selector)

        if given == "0":
            cursor = self._version
            for (_, ns, _), obj in self._everything(resource).items():
                if wanted(obj, ns):
                    yield {"type": "ADDED", "object": obj}
        else:
            cursor = int(given)
            if cursor < self._compacted:
                yield self._gone()
                return
        next_bookmark = loop.time() + self.bookmark_seconds
        while True:
            start = bisect.bisect_right(self._history, cursor, key=lambda e: e.version)
            for event in self._history[start:]:
                cursor = event.version
                if event.resource == resource and wanted(event.object, event.namespace):
                    yield {"type": event.type, "object": event.object}
            if self._expired != epoch:
                yield self._gone()
                return
            at = loop.time()
            if deadline is not None and at >= deadline:
                return
            if bookmarks and at >= next_bookmark:
                next_bookmark = at + self.bookmark_seconds
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": self._kind(resource),
                        "apiVersion": f"{resource.group}/{resource.version}".lstrip("/"),
                        "metadata": {"resourceVersion": str(cursor)},
                    },
                }
            wait = min(d for d in (deadline, next_bookmark if bookmarks else None, at + 5.0) if d)
            async with self._changed:
                if (self._history and self._history[-1].version > cursor) or self._expired != epoch:
                    continue  # written since the scan above: no wake-up is lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.0, wait - at))

    def _gone(self) -> dict[str, Any]:
        return {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version",
                "reason": "Expired",
                "code": 410,
            },
        }

    # For the kubelet and the tests, inside the server's loop.

    async def store(self, resource: str, obj: dict[str, Any]) -> None:
        """Store ``obj`` (created or replaced, as a controller of the cluster writes it)."""
        async with self._writes:
            ref = kmock.resource(resource)
            metadata = obj["metadata"]
            exists = self._get(ref, metadata.get("namespace"), metadata["name"]) is not None
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", now())
            self._put(ref, obj, "MODIFIED" if exists else "ADDED")

    async def discard(self, resource: str, namespace: str, name: str) -> None:
        async with self._writes:
            ref = kmock.resource(resource)
            stored = self._get(ref, namespace, name)
            if stored is not None:
                self._put(ref, stored, "DELETED")

    async def expire(self) -> None:
        """Compact the history: every open watch ends with ``410 Gone``, as do watches from
        any version up to now."""
        self._compacted = self._version
        self._expired += 1
        self._notify()

    def live(self, resource: str) -> list[dict[str, Any]]:
        return list(self._everything(kmock.resource(resource)).values())


__all__ = ["ApiServer", "matches", "now"]
