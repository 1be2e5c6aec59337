"""The Kubernetes backend: each instance is a one-pod Deployment in its plugin's namespace.

What it makes is in :mod:`controller.runtimes.kubernetes_manifests`. Writes
are idempotent get-then-create-or-merge-patch, not server-side apply: the
controller is the only writer of these objects (the Lease makes sure there is
one controller acting), a merge patch of the fields it owns converges from any
state, and it needs nothing of the API server beyond what every version has.
Deployments and pods are read from two informers (list, then watch, by the
controller's labels), so inspecting costs no request; the instance's state
comes from its pod: running, or exited with the code and OOM kill of its last
termination (the kubelet restarts a crashed container; the controller's
crash-loop rules see every exit). Plugins are reached over mutual TLS at their
pod's IP: each color's pod serves the certificate of a Secret of its own,
issued by the controller's CA with the plugin's identity in the SAN and renewed
before it expires (:meth:`KubernetesRuntime.renew_due`); the controller and the
gateway present their client certificates and accept only a certificate that
names the plugin expected there, and a pod presenting another's is refused with
the reason (:meth:`KubernetesRuntime.refusal`). The per-plugin token of the
plugin's Secret goes on every call as a second factor.

The kubelet restarts a crashed container itself: its exits are counted from
the pod's ``restartCount`` and ``lastState`` (``Instance.crashes``), and the
Deployment is kept; a pod not running yet says why (``Instance.waiting``:
scheduling, pulling), so the startup deadline counts from when it runs.
Volumes are ReadWriteOnce claims, per color or shared
(:mod:`~controller.runtimes.kubernetes_manifests` says which and why); a
claim grows with its spec, never shrinks.

A plugin of several replicas (``spec.replicas``) has a Deployment of one pod
per replica, named as the other runtimes name their instances
(``bh-<plugin>-<color>-<k>`` after the first), so that the controller checks,
restarts, drains and removes each on its own, and the gateway balances over
their pod IPs; the replicas of a color share its Service and certificate
Secret (the plugin's identity, which each pod proves), which go with the last
of them.

The stable Service ``bh-<plugin>`` follows the active color (:meth:`route`),
so in-cluster callers that hold the token see the flip of a blue/green swap
when the gateway does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller import kubeapi, pki
from controller.errors import (
    IncompatiblePluginError,
    InstanceConflictError,
    InstanceNotFoundError,
    RuntimeBackendError,
    SpecIssue,
)
from controller.runtimes import base
from controller.runtimes import kubernetes_manifests as manifests
from controller.spec import models, quantity
from controller.spec.keys import plugin_key

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
SYNC_SECONDS = 30.0
STALE_REASONS = frozenset({"CertificateExpired", "CertificateUntrusted"})
"""Refusals that a pod still serving its Secret's previous files also gives."""
STALE_GRACE_SECONDS = 180.0
"""How long a pod may present an old certificate after its Secret holds a current one: the
kubelet refreshes a mounted Secret within its sync period plus its cache's TTL (a minute
or so each by default)."""
"""How long the first listing may take before the backend gives up."""


@dataclass(frozen=True)
class Settings:
    controller_id: str = base.DEFAULT_CONTROLLER
    controller_namespace: str = "default"
    """Where the controller's pods run: the only ones a plugin's NetworkPolicy lets in."""
    namespaces: tuple[str, ...] = ()
    """The namespaces whose plugins this controller runs; empty for all."""
    default_namespace: str = "default"
    """Where a plugin declared without a namespace runs."""
    pods: manifests.PodOptions = field(default_factory=manifests.PodOptions)
    """Image pull secrets and the DNS pods, for every plugin pod."""
    network_policy_enforced: bool = False
    """The operator checked that the cluster's network plugin enforces NetworkPolicy (the
    API cannot tell): else every plugin's status says its isolation is unverified."""
    certificate_lifetime: float = pki.INSTANCE_LIFETIME.total_seconds()
    """Seconds an instance's certificate is valid; renewed after two thirds of it."""


PIDS_NOT_ENFORCED = (
    "Kubernetes has no per-pod PID limit to set; the kubelet's podPidsLimit (node "
    "configuration, the same for every pod of a node) is what bounds a plugin's processes"
)
NETWORK_POLICY_UNVERIFIED = (
    "isolation is a NetworkPolicy, which only a network plugin that enforces NetworkPolicy "
    "applies, and the API does not say whether this cluster's does; check it (see the "
    "Kubernetes guide) and run the controller with --network-policy-enforced"
)


class KubernetesRuntime:
    """Plugin instances as Deployments, reached over mutual TLS with a per-plugin token."""

    name = "kubernetes"

    def __init__(
        self,
        settings: Settings,
        api: client.ApiClient,
        authority: pki.Authority,
        credentials: pki.Credentials,
    ) -> None:
        self.settings = settings
        self.authority = authority
        """Issues the instances' certificates; the one their certificates must chain to."""
        self.credentials = credentials
        """The controller's client certificate, kept renewed."""
        self.controller_id = settings.controller_id
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        selector = ",".join(
            [
                f"{base.LABEL_MANAGED_BY}={base.MANAGED_BY}",
                f"{base.LABEL_CONTROLLER}={settings.controller_id}",
            ]
        )
        self._deployments = kubeapi.Informer(
            "deployments",
            self._listers(
                self.apps.list_namespaced_deployment, self.apps.list_deployment_for_all_namespaces
            ),
            self._changed,
            label_selector=selector,
        )
        self._pods = kubeapi.Informer(
            "pods",
            self._listers(self.core.list_namespaced_pod, self.core.list_pod_for_all_namespaces),
            self._changed,
            label_selector=selector,
        )
        self._names: dict[str, kubeapi.ObjectKey] = {}
        """Instance name -> (namespace, Deployment name)."""
        self._run_pods: dict[tuple[str, str], set[kubeapi.ObjectKey]] = {}
        """(namespace, run label) -> the pods of that Deployment: no scan of every pod."""
        self._tokens: dict[str, str] = {}
        """Plugin key -> its protocol token."""
        self._endpoint_keys: dict[str, str] = {}
        self._endpoint_identities: dict[str, pki.Identity] = {}
        """Endpoint -> the identity the pod there must prove."""
        self._refusals: dict[str, IncompatiblePluginError] = {}
        self._stale_since: dict[str, float] = {}
        """Endpoint -> why its pod is refused, as the last probe found."""
        self._renewal: asyncio.Task[None] | None = None
        self._issued = asyncio.Event()
        """Set when a certificate was issued: the renewal's next look is due sooner."""
        self._routed: dict[str, models.Color] = {}
        self._claim_sizes: dict[kubeapi.ObjectKey, str] = {}
        """The size of each claim as last made or read: a shrink is refused up front."""
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._started = False

    def _listers(
        self, namespaced: kubeapi.Lister, everywhere: kubeapi.Lister
    ) -> list[tuple[kubeapi.Lister, dict[str, Any]]]:
        if self.settings.namespaces:
            return [(namespaced, {"namespace": n}) for n in self.settings.namespaces]
        return [(everywhere, {})]

    # What it can do.

    def capabilities(self) -> base.Capabilities:
        not_enforced = {"spec.resources.pids": PIDS_NOT_ENFORCED}
        if not self.settings.network_policy_enforced:
            not_enforced["spec.permissions"] = NETWORK_POLICY_UNVERIFIED
        return base.Capabilities(
            networks=frozenset(models.NetworkMode),
            volumes=True,
            host_paths=False,
            restarts_crashed=True,
            not_enforced=not_enforced,
            replicas=True,  # a Deployment of one pod per replica: each an instance
        )

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        issues = base.host_paths_refused(
            desired,
            "host paths are not available on Kubernetes; give the volume a size "
            "and it becomes a PersistentVolumeClaim",
        )
        if desired.spec.permissions.call_plugins:
            issues.append(
                SpecIssue(
                    "runtime",
                    None,
                    "spec.permissions.callPlugins",
                    "plugin-to-plugin calls go through the gateway's socket beside each "
                    "instance, which only the single-host runtimes provide",
                    value=desired.spec.permissions.call_plugins,
                    has_value=True,
                )
            )
        too_long = manifests.names_too_long(
            desired.plugin, self.settings.controller_id, desired.spec.replicas
        )
        if too_long is not None:
            issues.append(
                SpecIssue(
                    "runtime",
                    None,
                    "metadata.name",
                    too_long,
                    value=desired.plugin,
                    has_value=True,
                )
            )
        namespace = self._namespace(desired.namespace)
        for index, volume in enumerate(desired.spec.volumes):
            have = self._claim_sizes.get((namespace, manifests.claim_of(desired, volume.name)))
            if have is not None and volume.size is not None and _shrinks(str(volume.size), have):
                issues.append(
                    SpecIssue(
                        "runtime",
                        None,
                        f"spec.volumes[{index}].size",
                        _shrink_refused(str(volume.size), have),
                        value=str(volume.size),
                        has_value=True,
                    )
                )
        if self.settings.namespaces and namespace not in self.settings.namespaces:
            issues.append(
                SpecIssue(
                    "runtime",
                    None,
                    "metadata.namespace",
                    f"this controller runs plugins in {', '.join(self.settings.namespaces)} only",
                    value=namespace,
                    has_value=True,
                )
            )
        return issues

    # Observing.

    async def _sync(self) -> None:
        if not self._started:
            self._started = True
            self._deployments.start()
            self._pods.start()
            self._renewal = asyncio.get_running_loop().create_task(
                self._keep_renewed(), name="instance-certificates"
            )
        try:
            async with asyncio.timeout(SYNC_SECONDS):
                await self._deployments.synced.wait()
                await self._pods.synced.wait()
        except TimeoutError:
            raise RuntimeBackendError(
                f"the Kubernetes API did not list deployments and pods within {SYNC_SECONDS:.0f}s"
            ) from None

    def _changed(self, before: kubeapi.Object | None, after: kubeapi.Object | None) -> None:
        for obj in (before, after):
            if obj is None:
                continue
            labels = (obj.get("metadata") or {}).get("labels") or {}
            plugin = labels.get(base.LABEL_PLUGIN)
            if not plugin:
                continue
            namespace = labels.get(base.LABEL_NAMESPACE) or None
            if "template" in (obj.get("spec") or {}):  # a Deployment, not a pod
                color = labels.get(base.LABEL_COLOR)
                if color in {c.value for c in models.Color}:
                    name = base.instance_name(
                        plugin, models.Color(color), namespace, self.controller_id, _replica(labels)
                    )
                    if obj is after:
                        self._names[name] = kubeapi.key_of(obj)
                    elif after is None:
                        self._names.pop(name, None)
            elif run := labels.get(manifests.LABEL_RUN):  # a pod, by the Deployment it is of
                where = kubeapi.key_of(obj)
                pods = self._run_pods.setdefault((where[0], run), set())
                if obj is after:
                    pods.add(where)
                elif after is None:
                    pods.discard(where)
                    if not pods:
                        del self._run_pods[(where[0], run)]
            self._queue.put_nowait(plugin_key(plugin, namespace))

    async def list_owned(self, plugin: str | None = None) -> list[base.Instance]:
        await self._sync()
        found = []
        for deployment in self._deployments.items():
            instance = self._instance(deployment)
            if instance is not None and (plugin is None or instance.plugin == plugin):
                found.append(instance)
        return found

    async def inspect(self, name: str) -> base.Instance:
        await self._sync()
        where = self._names.get(name)
        deployment = self._deployments.get(where) if where else None
        instance = self._instance(deployment) if deployment else None
        if instance is None:
            raise InstanceNotFoundError(f"no instance {name}")
        return instance

    def _instance(self, deployment: kubeapi.Object) -> base.Instance | None:
        metadata = deployment.get("metadata") or {}
        labels = metadata.get("labels") or {}
        try:
            color = models.Color(labels.get(base.LABEL_COLOR, ""))
        except ValueError:
            return None
        plugin = labels.get(base.LABEL_PLUGIN, "")
        namespace = labels.get(base.LABEL_NAMESPACE) or None
        pod = self._pod(deployment)
        seen = _state(deployment, pod)
        address = ((pod or {}).get("status") or {}).get("podIP")
        return base.Instance(
            name=base.instance_name(plugin, color, namespace, self.controller_id, _replica(labels)),
            plugin=plugin,
            color=color,
            version=labels.get(base.LABEL_VERSION, ""),
            spec_hash=labels.get(base.LABEL_SPEC_HASH, ""),
            state=seen.state,
            exit_code=seen.exit_code,
            oom_killed=seen.oom_killed,
            started_at=seen.started_at,
            finished_at=seen.finished_at,
            crashes=seen.crashes,
            restarting=seen.restarting,
            waiting=seen.waiting,
            waiting_message=seen.waiting_message,
            namespace=namespace,
            id=str(metadata.get("uid") or metadata.get("name")),
            labels=dict(labels),
            address=f"{address}:{manifests.PROTOCOL_PORT}" if address else None,
        )

    def _pod(self, deployment: kubeapi.Object) -> kubeapi.Object | None:
        """The Deployment's pod (of this Deployment, not of a removed one of the same name)."""
        namespace = (deployment.get("metadata") or {}).get("namespace")
        template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
        want = template.get("labels") or {}
        candidates = []
        for key in self._run_pods.get((namespace or "", want.get(manifests.LABEL_RUN, "")), ()):
            pod = self._pods.get(key)
            metadata = (pod or {}).get("metadata") or {}
            labels = metadata.get("labels") or {}
            if pod is None or metadata.get("deletionTimestamp"):
                continue
            if all(labels.get(k) == v for k, v in want.items()):
                candidates.append(pod)
        candidates.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp")))
        return candidates[-1] if candidates else None

    # Starting and stopping.

    def _namespace(self, namespace: str | None) -> str:
        return namespace or self.settings.default_namespace

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        await self._sync()
        settings = self.settings
        namespace = self._namespace(desired.namespace)
        owner = manifests.Owner(desired.plugin, desired.owner_uid) if desired.owner_uid else None
        key = plugin_key(desired.plugin, desired.namespace)
        await self._ensure_token(desired.plugin, namespace, key, owner)
        await self._certify(desired, namespace, owner)
        await self._apply(
            "networkpolicy",
            manifests.network_policy(
                desired, namespace, self.settings.controller_namespace, owner, settings.pods.dns
            ),
        )
        for volume in desired.spec.volumes:
            await self._claim(
                manifests.claim(desired, volume, namespace, owner, settings.pods.storage_class)
            )
        await self._apply("service", manifests.color_service(desired, namespace, owner))
        stable = manifests.stable_service(
            desired.plugin, desired.color, namespace, self.controller_id, owner
        )
        if await self._create_if_missing("service", stable):
            self._routed[key] = desired.color
        body = manifests.deployment(
            desired, namespace, owner, secrets.token_hex(6), self.settings.pods
        )
        raw = await self._request(
            f"creating {_describe(body)}", self.apps.create_namespaced_deployment, namespace, body
        )
        self._deployments.put(raw)
        self._changed(None, raw)
        instance = self._instance(raw)
        assert instance is not None  # it carries the labels it was made with
        log.info("created deployment %s/%s", namespace, body["metadata"]["name"])
        return instance

    async def _claim(self, body: dict[str, Any]) -> None:
        """Make a volume's claim, or grow the one there to the spec's size.

        A claim can grow where its StorageClass allows expansion (the API server
        refuses it otherwise, and that refusal is the error); it can never
        shrink, which is refused here with what to do instead.
        """
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        read = self.core.read_namespaced_persistent_volume_claim
        existing = await self._read(read, name, namespace)
        want = body["spec"]["resources"]["requests"]["storage"]
        if existing is None:
            await self._create_if_missing("pvc", body)
            self._claim_sizes[(namespace, name)] = want
            return
        if (existing.get("metadata") or {}).get("deletionTimestamp"):
            raise RuntimeBackendError(
                f"the claim {namespace}/{name} is still being deleted (a pod may still use it)"
            )
        requests = ((existing.get("spec") or {}).get("resources") or {}).get("requests") or {}
        have = requests.get("storage")
        if have is None or quantity.Quantity(have).value == quantity.Quantity(want).value:
            return
        self._claim_sizes[(namespace, name)] = str(have)
        if _shrinks(want, str(have)):
            volume = body["metadata"]["labels"][base.LABEL_VOLUME]
            raise RuntimeBackendError(
                f"spec.volumes[{volume}].size: {_shrink_refused(want, str(have))} "
                f"(claim {namespace}/{name})"
            )
        await self._patch(
            f"growing the claim to {want}:",
            self.core.patch_namespaced_persistent_volume_claim,
            name,
            namespace,
            {"spec": {"resources": {"requests": {"storage": want}}}},
        )
        self._claim_sizes[(namespace, name)] = want
        log.info("claim %s/%s grown from %s to %s", namespace, name, have, want)

    async def stop(self, name: str, timeout: float) -> None:
        """Scale to zero: the pod gets SIGTERM and its grace period, as on any Kubernetes."""
        where = self._names.get(name)
        if where is None:
            return
        namespace, object_name = where
        patch = {"spec": {"replicas": 0}}
        with contextlib.suppress(InstanceNotFoundError):
            raw = await self._patch(
                "stopping", self.apps.patch_namespaced_deployment, object_name, namespace, patch
            )
            self._deployments.put(raw)

    async def remove(self, name: str) -> None:
        """Remove the instance's Deployment; with the last replica of its color, the
        color's Service, certificate Secret and (a swap's end) claims too."""
        where = self._names.get(name)
        if where is None:
            return
        namespace, object_name = where
        deployment = self._deployments.get(where) or {}
        await self._delete(self.apps.delete_namespaced_deployment, object_name, namespace)
        self._names.pop(name, None)
        labels = (deployment.get("metadata") or {}).get("labels") or {}
        plugin, color = labels.get(base.LABEL_PLUGIN), labels.get(base.LABEL_COLOR)
        if plugin and color in {c.value for c in models.Color}:
            scope = labels.get(base.LABEL_NAMESPACE) or None
            if self._replicas_left(plugin, models.Color(color), scope):
                return  # the others of the color go on serving with its Service and Secret
            service = manifests.object_name(plugin, models.Color(color), self.controller_id)
        else:
            service = object_name  # unlabelled: of the first replica, named as its Service
        await self._delete(self.core.delete_namespaced_service, service, namespace)
        await self._delete(self.core.delete_namespaced_secret, f"{service}-tls", namespace)
        await self._remove_color_claims(deployment, namespace)

    def _replicas_left(self, plugin: str, color: models.Color, namespace: str | None) -> bool:
        """Whether a Deployment of any replica of the color is still there."""
        return any(
            base.instance_name(plugin, color, namespace, self.controller_id, replica) in self._names
            for replica in range(models.MAX_REPLICAS)
        )

    async def _remove_color_claims(self, deployment: kubeapi.Object, namespace: str) -> None:
        """The claims of a color that goes while the other one carries on (a swap's end:
        promoted or rolled back); a color restarted alone keeps them."""
        labels = (deployment.get("metadata") or {}).get("labels") or {}
        plugin, color = labels.get(base.LABEL_PLUGIN), labels.get(base.LABEL_COLOR)
        if not plugin or color not in {c.value for c in models.Color}:
            return
        other = models.Color.GREEN if color == models.Color.BLUE.value else models.Color.BLUE
        scope = labels.get(base.LABEL_NAMESPACE) or None
        if not self._replicas_left(plugin, other, scope):
            return
        for claim in await self._list_claims(plugin, namespace, color=models.Color(color)):
            await self._delete(
                self.core.delete_namespaced_persistent_volume_claim, claim, namespace
            )
            self._claim_sizes.pop((namespace, claim), None)
            log.info("removed the claim %s/%s of the %s color that went", namespace, claim, color)

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        """The plugin is deleted: its stable Service, NetworkPolicy, token and volumes go too."""
        where = self._namespace(namespace)
        cid = self.controller_id
        await self._delete(
            self.core.delete_namespaced_service, manifests.stable_name(plugin, cid), where
        )
        await self._delete(
            self.networking.delete_namespaced_network_policy,
            manifests.policy_name(plugin, cid),
            where,
        )
        await self._delete(
            self.core.delete_namespaced_secret, manifests.token_name(plugin, cid), where
        )
        claims = await self._list_claims(plugin, where)
        for claim in claims:
            await self._delete(self.core.delete_namespaced_persistent_volume_claim, claim, where)
            self._claim_sizes.pop((where, claim), None)
        key = plugin_key(plugin, namespace)
        self._tokens.pop(key, None)
        self._routed.pop(key, None)

    async def remove_volumes(self) -> list[str]:
        raise RuntimeBackendError(
            "not supported on Kubernetes: a plugin's PersistentVolumeClaims go when its Plugin "
            "object is deleted (kubectl delete plugin NAME); the controller with helm uninstall"
        )

    async def _list_claims(
        self, plugin: str, namespace: str, color: models.Color | None = None
    ) -> list[str]:
        """The plugin's claims (of ``color`` only, when given: per-color claims)."""
        wanted = manifests.plugin_selector(plugin, self.controller_id)
        if color is not None:
            wanted = {**wanted, base.LABEL_COLOR: color.value}
        selector = ",".join(f"{k}={v}" for k, v in wanted.items())
        listing = await self._request(
            f"listing the volumes of {plugin}",
            self.core.list_namespaced_persistent_volume_claim,
            namespace,
            label_selector=selector,
        )
        names = []
        for item in listing.get("items") or []:
            metadata = item.get("metadata") or {}
            labels = metadata.get("labels") or {}
            if labels.get(base.LABEL_PLUGIN) != plugin or not labels.get(base.LABEL_VOLUME):
                continue
            if color is None or labels.get(base.LABEL_COLOR) == color.value:
                names.append(str(metadata["name"]))
        return names

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        """Point the stable Service at ``color``'s pod."""
        key = plugin_key(plugin, namespace)
        if self._routed.get(key) is color:
            return
        selector = manifests.color_selector(plugin, color, self.controller_id)
        with contextlib.suppress(InstanceNotFoundError):
            await self._patch(
                "routing",
                self.core.patch_namespaced_service,
                manifests.stable_name(plugin, self.controller_id),
                self._namespace(namespace),
                {"spec": {"selector": selector}},
            )
            self._routed[key] = color
            log.info("stable service of %s now selects %s", key, color.value)

    # Reaching instances.

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        """Whether the instance's pod completes a TLS handshake at its address; False while
        nothing answers there (yet).

        A pod that answers with a certificate the controller must not trust (one that
        names another plugin, of another CA, expired) or without TLS counts as there:
        :meth:`refusal` then says why, and the plugin client's handshake refuses it.
        """
        if instance.address is None:
            return False
        await self._ensure_token_loaded(instance)
        endpoint = self.endpoint(instance)
        identity = self._endpoint_identities[endpoint]
        host, _, port = instance.address.rpartition(":")
        self._refusals.pop(endpoint, None)
        try:
            context = await asyncio.to_thread(self._context)
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(
                    host, int(port), ssl=context, server_hostname=identity.server_name
                )
        except ssl.SSLCertVerificationError as e:
            refusal = _refusal(endpoint, identity, e)
            if refusal.reason in STALE_REASONS and await self._renewed_for(instance, refusal):
                return False  # the kubelet serves the renewed files soon: not there yet
            self._refusals[endpoint] = refusal
            return True
        except ssl.SSLError as e:
            self._refusals[endpoint] = _not_tls(endpoint, str(e.reason or e))
            return True
        except (ConnectionResetError, asyncio.IncompleteReadError) as e:
            self._refusals[endpoint] = _not_tls(endpoint, f"closed: {e}")
            return True
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        name = manifests.certificate_name(instance.plugin, instance.color, self.controller_id)
        self._stale_since.pop(f"{self._namespace(instance.namespace)}/{name}", None)
        return True

    async def _renewed_for(self, instance: base.Instance, refusal: IncompatiblePluginError) -> bool:
        """Whether a pod presenting an expired certificate, or one of another CA, is only
        serving files its kubelet has not refreshed yet: its color's Secret holds (or is
        now given) a current certificate of the controller's CA. A controller that was
        down past a certificate's renewal finds it so at start, as one given another CA
        does; the plugin is refused only once its pod goes on presenting the old one for
        :data:`STALE_GRACE_SECONDS` after the Secret holds the new one."""
        namespace = self._namespace(instance.namespace)
        name = manifests.certificate_name(instance.plugin, instance.color, self.controller_id)
        key = f"{namespace}/{name}"
        secret = await self._read(self.core.read_namespaced_secret, name, namespace)
        if secret is None:
            return False
        data = secret.get("data") or {}
        at = _renew_at(data, self.authority.cert_pem)
        if at is None or _expired(data):
            issued = await asyncio.to_thread(
                self._issue, instance.plugin, instance.color, namespace
            )
            await self._patch(
                "renewing the certificate of",
                self.core.patch_namespaced_secret,
                name,
                namespace,
                {"data": manifests.certificate_data(issued, self.authority.cert_pem)},
            )
            log.warning(
                "%s: %s; its certificate is issued again in %s, which its kubelet "
                "mounts within about a minute",
                instance.name,
                refusal,
                key,
            )
            self._stale_since[key] = time.monotonic()
            return True
        since = self._stale_since.setdefault(key, time.monotonic())
        if time.monotonic() - since < STALE_GRACE_SECONDS:
            return True
        del self._stale_since[key]
        return False

    def refusal(self, endpoint: str) -> IncompatiblePluginError | None:
        """Why the plugin client must not handshake with ``endpoint``, as the last probe of
        it found; None when nothing was wrong."""
        return self._refusals.get(endpoint)

    def server_name(self, endpoint: str) -> str | None:
        """The name the certificate of the pod at ``endpoint`` must carry (its plugin's
        identity); None for an endpoint of no instance."""
        identity = self._endpoint_identities.get(endpoint)
        return identity.server_name if identity is not None else None

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=self.authority.cert_pem.decode())
        files = self.credentials.files
        for attempt in (1, 2):  # a renewal between the two reads: read the new pair
            try:
                context.load_cert_chain(files.cert, files.key)
                break
            except (ssl.SSLError, OSError) as e:
                if attempt == 2:
                    raise RuntimeBackendError(
                        f"the controller's client certificate in "
                        f"{self.credentials.directory} cannot be used: {e}"
                    ) from e
        context.set_alpn_protocols(["h2"])
        return context

    def identity(self, plugin: str, namespace: str | None) -> pki.Identity:
        """Who an instance of ``plugin`` must prove to be: its certificate's SAN."""
        return pki.Identity.plugin(self.controller_id, self._namespace(namespace), plugin)

    # Certificates.

    async def _certify(
        self, desired: base.InstanceSpec, namespace: str, owner: manifests.Owner | None
    ) -> None:
        """Issue the color's certificate into its Secret (made, or its data replaced). The
        replicas after the first share the one there while it is current: the first's
        start issues it, renewal keeps it so."""
        name = manifests.certificate_name(desired.plugin, desired.color, self.controller_id)
        existing = await self._read(self.core.read_namespaced_secret, name, namespace)
        if desired.replica and existing is not None:
            at = _renew_at(existing.get("data") or {}, self.authority.cert_pem)
            if at is not None and datetime.now(UTC) < at:
                return
        issued = await asyncio.to_thread(self._issue, desired.plugin, desired.color, namespace)
        self._issued.set()
        body = manifests.certificate_secret(
            desired, namespace, owner, issued, self.authority.cert_pem
        )
        if existing is None:
            with contextlib.suppress(InstanceConflictError):
                await self._request(
                    f"creating {_describe(body)}",
                    self.core.create_namespaced_secret,
                    namespace,
                    body,
                )
                return
        await self._patch(
            "certifying",
            self.core.patch_namespaced_secret,
            name,
            namespace,
            {"metadata": {"labels": body["metadata"]["labels"]}, "data": body["data"]},
        )

    def _issue(self, plugin: str, color: models.Color, namespace: str) -> pki.Issued:
        return self.authority.issue(
            pki.Identity.plugin(self.controller_id, namespace, plugin),
            hosts=manifests.certificate_hosts(plugin, color, namespace, self.controller_id),
            lifetime=timedelta(seconds=self.settings.certificate_lifetime),
        )

    async def renew_due(self, now: datetime | None = None) -> float:
        """Renew each instance certificate that is due (or of another CA) in its Secret;
        the seconds until the next one is due.

        The kubelet refreshes a mounted Secret's files within about a minute, and
        the plugin serves them from its next handshake on, long before the old
        certificate expires (a third of its lifetime later).
        """
        when = now or datetime.now(UTC)
        selector = ",".join(
            f"{k}={v}"
            for k, v in {
                base.LABEL_MANAGED_BY: base.MANAGED_BY,
                base.LABEL_CONTROLLER: self.controller_id,
                manifests.LABEL_CERTIFICATE: manifests.CERTIFICATE_INSTANCE,
            }.items()
        )
        listings = [
            await self._request(
                "listing the instances' certificates", fn, **kwargs, label_selector=selector
            )
            for fn, kwargs in self._listers(
                self.core.list_namespaced_secret, self.core.list_secret_for_all_namespaces
            )
        ]
        wait = pki.RENEW_CHECK_SECONDS
        for item in (item for listing in listings for item in listing.get("items") or []):
            metadata = item.get("metadata") or {}
            labels = metadata.get("labels") or {}
            data = item.get("data") or {}
            try:
                color = models.Color(labels.get(base.LABEL_COLOR, ""))
            except ValueError:
                continue
            at = _renew_at(data, self.authority.cert_pem)
            if at is not None and when < at:
                wait = min(wait, (at - when).total_seconds())
                continue
            plugin, namespace = labels[base.LABEL_PLUGIN], str(metadata["namespace"])
            issued = await asyncio.to_thread(self._issue, plugin, color, namespace)
            await self._patch(
                "renewing the certificate of",
                self.core.patch_namespaced_secret,
                str(metadata["name"]),
                namespace,
                {"data": manifests.certificate_data(issued, self.authority.cert_pem)},
            )
            log.info("renewed the certificate of %s/%s", namespace, metadata["name"])
            wait = min(wait, (issued.renew_after - when).total_seconds())
        return max(wait, 1.0)

    async def _keep_renewed(self) -> None:
        while True:
            self._issued.clear()
            try:
                wait = await self.renew_due()
            except (RuntimeBackendError, InstanceNotFoundError, InstanceConflictError) as e:
                log.error("cannot renew the instances' certificates: %s", e)
                wait = pki.RENEW_CHECK_SECONDS
            # A certificate issued meanwhile may be due before the next look: look again
            # then, once it is listed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._issued.wait(), wait)
            if self._issued.is_set():
                await asyncio.sleep(1.0)

    def endpoint(self, instance: base.Instance) -> str:
        if instance.address is not None:
            endpoint = instance.address
        else:  # no pod IP yet: a name of its own (each replica's), not reached until it has
            namespace, object_name = self._names.get(instance.name) or (
                self._namespace(instance.namespace),
                manifests.deployment_name(
                    instance.plugin, instance.color, self.controller_id, instance.replica
                ),
            )
            endpoint = f"{object_name}.{namespace}.svc:{manifests.PROTOCOL_PORT}"
        self._endpoint_keys[endpoint] = instance.key
        self._endpoint_identities[endpoint] = self.identity(instance.plugin, instance.namespace)
        return endpoint

    def token(self, endpoint: str) -> str | None:
        """The token the instance at ``endpoint`` expects (for the protocol's clients)."""
        key = self._endpoint_keys.get(endpoint)
        return self._tokens.get(key) if key else None

    async def _ensure_token_loaded(self, instance: base.Instance) -> None:
        if instance.key in self._tokens:
            return
        namespace = self._namespace(instance.namespace)
        name = manifests.token_name(instance.plugin, self.controller_id)
        secret = await self._read(self.core.read_namespaced_secret, name, namespace)
        if secret is not None:
            self._tokens[instance.key] = _token_of(secret)

    async def _ensure_token(
        self, plugin: str, namespace: str, key: str, owner: manifests.Owner | None
    ) -> None:
        name = manifests.token_name(plugin, self.controller_id)
        secret = await self._read(self.core.read_namespaced_secret, name, namespace)
        if secret is None:
            token = secrets.token_urlsafe(32)
            body = manifests.token_secret(plugin, token, namespace, self.controller_id, owner)
            await self._request(
                f"creating {_describe(body)}", self.core.create_namespaced_secret, namespace, body
            )
            self._tokens[key] = token
        else:
            self._tokens[key] = _token_of(secret)

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        where = self._names.get(name)
        deployment = self._deployments.get(where) if where else None
        pod = self._pod(deployment) if deployment else None
        if pod is None:
            return []
        namespace = pod["metadata"]["namespace"]
        text = await self._text(
            f"reading the logs of {name}",
            self.core.read_namespaced_pod_log,
            pod["metadata"]["name"],
            namespace,
            container=manifests.CONTAINER,
            tail_lines=tail,
            timestamps=timestamps,
        )
        return text.splitlines()

    async def stats(self, name: str) -> base.Stats:
        raise RuntimeBackendError(
            "on Kubernetes, resource use comes from the kubelet's cAdvisor metrics "
            "(container_* series, label blackhole.dev/plugin); see the Grafana dashboard"
        )

    async def events(self) -> AsyncIterator[str]:
        await self._sync()
        while True:
            yield await self._queue.get()

    async def close(self) -> None:
        self._deployments.stop()
        self._pods.stop()
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal

    # The API, in threads, its errors translated.

    async def _request(
        self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> kubeapi.Object:
        """One API call in a thread and its JSON answer; 404 and 409 become their errors."""
        text = await self._text(doing, fn, *args, **kwargs)
        return dict(json.loads(text)) if text else {}

    async def _text(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        try:
            response = await asyncio.to_thread(fn, *args, _preload_content=False, **kwargs)
        except ApiException as e:
            message = str(kubeapi.error(e, doing))
            if e.status == 404:
                raise InstanceNotFoundError(message) from e
            if e.status == 409:
                raise InstanceConflictError(message) from e
            raise RuntimeBackendError(message) from e
        except urllib3.exceptions.HTTPError as e:
            raise RuntimeBackendError(str(kubeapi.error(e, doing))) from e
        data = response.data
        return data.decode() if isinstance(data, bytes) else str(data or "")

    async def _read(
        self, fn: Callable[..., Any], name: str, namespace: str
    ) -> kubeapi.Object | None:
        try:
            return await self._request(f"reading {namespace}/{name}", fn, name, namespace)
        except InstanceNotFoundError:
            return None

    async def _patch(
        self, doing: str, fn: Callable[..., Any], name: str, namespace: str, patch: dict[str, Any]
    ) -> kubeapi.Object:
        return await self._request(
            f"{doing} {namespace}/{name}", fn, name, namespace, patch, _content_type=MERGE_PATCH
        )

    async def _delete(self, fn: Callable[..., Any], name: str, namespace: str) -> None:
        with contextlib.suppress(InstanceNotFoundError):
            await self._request(
                f"deleting {namespace}/{name}", fn, name, namespace, propagation_policy="Background"
            )

    def _methods(
        self, kind: str
    ) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """(read, create, patch) of a kind."""
        if kind == "service":
            c = self.core
            return (
                c.read_namespaced_service,
                c.create_namespaced_service,
                c.patch_namespaced_service,
            )
        if kind == "pvc":
            c = self.core
            return (
                c.read_namespaced_persistent_volume_claim,
                c.create_namespaced_persistent_volume_claim,
                c.patch_namespaced_persistent_volume_claim,
            )
        n = self.networking
        return (
            n.read_namespaced_network_policy,
            n.create_namespaced_network_policy,
            n.patch_namespaced_network_policy,
        )

    async def _create_if_missing(self, kind: str, body: dict[str, Any]) -> bool:
        """Create ``body`` unless it exists; True when created."""
        read, create, _ = self._methods(kind)
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        if await self._read(read, name, namespace) is not None:
            return False
        try:
            await self._request(f"creating {_describe(body)}", create, namespace, body)
        except InstanceConflictError:
            return False
        return True

    async def _apply(self, kind: str, body: dict[str, Any]) -> None:
        """Create ``body``, or merge-patch its labels and spec over what exists."""
        if await self._create_if_missing(kind, body):
            return
        _, _, patch = self._methods(kind)
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        change = {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]}
        with contextlib.suppress(InstanceNotFoundError):
            await self._patch("updating", patch, name, namespace, change)


def _replica(labels: dict[str, str]) -> int:
    """Which replica of its color a Deployment is (its ``replica`` label; 0 without)."""
    text = labels.get(base.LABEL_REPLICA, "")
    return int(text) if text.isdigit() else 0


def _shrinks(want: str, have: str) -> bool:
    return quantity.Quantity(want).value < quantity.Quantity(have).value


def _shrink_refused(want: str, have: str) -> str:
    return (
        f"{want} is less than the {have} of the volume's claim, and a PersistentVolumeClaim "
        "cannot shrink; keep the size, or declare spec.state, whose swaps give the new color "
        "claims of its own"
    )


def _describe(body: dict[str, Any]) -> str:
    metadata = body.get("metadata") or {}
    return f"{body.get('kind', 'object')} {metadata.get('namespace')}/{metadata.get('name')}"


def _renew_at(data: dict[str, str], ca_pem: bytes) -> datetime | None:
    """When a certificate Secret's certificate is due; None if it must be issued now
    (missing, unreadable, or of another CA than the controller's)."""
    try:
        if base64.b64decode(data.get(pki.CA_CERT, "")) != ca_pem:
            return None
        cert = x509.load_pem_x509_certificate(base64.b64decode(data[pki.CERT]))
    except (KeyError, ValueError):
        return None
    return pki.renew_time(cert.not_valid_before_utc, cert.not_valid_after_utc)


def _expired(data: dict[str, str]) -> bool:
    """Whether a certificate Secret's certificate is past its end (or unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(base64.b64decode(data[pki.CERT]))
    except (KeyError, ValueError):
        return True
    return cert.not_valid_after_utc <= datetime.now(UTC)


def _not_tls(endpoint: str, what: str) -> IncompatiblePluginError:
    return IncompatiblePluginError(
        "NotTLS",
        f"the pod at {endpoint} did not complete a TLS handshake ({what}): plugins are "
        "reached over mutual TLS only (does its SDK serve BLACKHOLE_TLS_CERT, "
        "BLACKHOLE_TLS_KEY and BLACKHOLE_TLS_CA?)",
    )


def _refusal(
    endpoint: str, identity: pki.Identity, e: ssl.SSLCertVerificationError
) -> IncompatiblePluginError:
    kind, why = pki.verification_failure(e)
    if kind == pki.MISMATCH:
        return IncompatiblePluginError(
            kind,
            f"the pod at {endpoint} presented a certificate that does not name "
            f"{identity.uri} ({identity.server_name}: {why}): it is not this plugin's",
        )
    if kind == pki.EXPIRED:
        return IncompatiblePluginError(
            kind, f"the pod at {endpoint} presented an expired certificate ({why})"
        )
    return IncompatiblePluginError(
        kind,
        f"the pod at {endpoint} presented a certificate that does not chain to the "
        f"controller's CA ({why})",
    )


def _token_of(secret: kubeapi.Object) -> str:
    data = secret.get("data") or {}
    return base64.b64decode(data.get(manifests.TOKEN_KEY, "")).decode()


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Observed:
    """What a color's pod says of its container."""

    state: base.InstanceState
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    crashes: int = 0
    restarting: bool = False
    waiting: str = ""
    waiting_message: str = ""


FAILED_WAITS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
"""Container waiting reasons that are failures, not progress: the startup deadline counts
them (from the pod's creation)."""


def _not_running(pod: kubeapi.Object | None, mine: dict[str, Any]) -> _Observed:
    """A pod (or none yet) whose container has not run: why, from its status."""
    if pod is None:
        return _Observed(
            base.InstanceState.RUNNING, waiting="Pending", waiting_message="no pod yet"
        )
    status = pod.get("status") or {}
    scheduled = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
    )
    if scheduled is not None and scheduled.get("status") == "False":
        return _Observed(
            base.InstanceState.RUNNING,
            waiting=str(scheduled.get("reason") or "Unschedulable"),
            waiting_message=str(scheduled.get("message") or ""),
        )
    waiting = (mine.get("state") or {}).get("waiting") or {}
    reason = str(waiting.get("reason") or ("ContainerCreating" if scheduled else "Pending"))
    created = _time((pod.get("metadata") or {}).get("creationTimestamp"))
    return _Observed(
        base.InstanceState.RUNNING,
        started_at=created if reason in FAILED_WAITS else None,
        waiting=reason,
        waiting_message=str(waiting.get("message") or ""),
    )


def _state(deployment: kubeapi.Object, pod: kubeapi.Object | None) -> _Observed:
    """A color's state from its pod's container status.

    A Deployment whose pod is not running yet counts as running but not ready,
    with why it waits (scheduling, pulling: the startup deadline counts from
    when its container runs; a failed pull counts from the pod's creation). The
    kubelet restarts
    a container that exits, after a back-off: meanwhile it is exited and
    ``restarting``, with the code of its last termination; its exits are
    counted from ``restartCount`` (restarts made) and the termination it waits
    out, so that an exit the status coalesced into a restart is counted too.
    One scaled to zero (stopped) counts as exited, not restarting.
    """
    replicas = (deployment.get("spec") or {}).get("replicas", 1)
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    mine = next((s for s in statuses if s.get("name") == manifests.CONTAINER), None) or {}
    state = mine.get("state") or {}
    last = (mine.get("lastState") or {}).get("terminated")
    now = state.get("terminated")
    terminated = now or last
    restarts = int(mine.get("restartCount") or 0)
    crashes = restarts + (1 if "running" not in state and terminated else 0)
    exit_code = terminated.get("exitCode") if terminated else None
    oom = (terminated or {}).get("reason") == "OOMKilled"
    finished = _time(terminated.get("finishedAt")) if terminated else None
    if "running" in state and replicas:
        started = _time(state["running"].get("startedAt"))
        return _Observed(base.InstanceState.RUNNING, exit_code, oom, started, finished, crashes)
    if terminated:
        return _Observed(
            base.InstanceState.EXITED,
            exit_code,
            oom,
            _time(terminated.get("startedAt")),
            finished,
            crashes,
            restarting=bool(replicas),
        )
    if not replicas:
        return _Observed(base.InstanceState.EXITED)
    return _not_running(pod, mine)


@dataclass(frozen=True)
class GatewayEndpoint:
    """One gateway replica, as its headless Service's EndpointSlices list it."""

    host: str
    port: int
    ready: bool


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class GatewayReplicas:
    """The gateway's replicas: the endpoints of its headless Service, kept current.

    Watches the Service's EndpointSlices (``discovery.k8s.io/v1``, selected by
    the ``kubernetes.io/service-name`` label) with an informer, and tells
    ``changed`` the whole set, by pod name, at each change: not-ready pods
    included (a gateway is ready only once a controller sent it a table, so
    waiting for ready ones would wait forever), terminating ones left out.
    The port is the slice's port named ``port_name``.
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        service: str,
        changed: Callable[[dict[str, GatewayEndpoint]], None],
        *,
        port_name: str = "control",
    ) -> None:
        self.service = service
        self.port_name = port_name
        self.changed = changed
        discovery = client.DiscoveryV1Api(api)
        self._informer = kubeapi.Informer(
            "gateway-endpoints",
            [(discovery.list_namespaced_endpoint_slice, {"namespace": namespace})],
            lambda before, after: self.changed(self.replicas()),
            label_selector=f"{SERVICE_NAME_LABEL}={service}",
        )

    @property
    def synced(self) -> asyncio.Event:
        return self._informer.synced

    def start(self) -> None:
        self._informer.start()

    def stop(self) -> None:
        self._informer.stop()

    def replicas(self) -> dict[str, GatewayEndpoint]:
        found: dict[str, GatewayEndpoint] = {}
        for piece in self._informer.items():
            port = next(
                (
                    int(p["port"])
                    for p in piece.get("ports") or []
                    if p.get("name") == self.port_name and p.get("port")
                ),
                None,
            )
            if port is None:
                continue
            for endpoint in piece.get("endpoints") or []:
                conditions = endpoint.get("conditions") or {}
                addresses = endpoint.get("addresses") or []
                if conditions.get("terminating") or not addresses:
                    continue
                name = (endpoint.get("targetRef") or {}).get("name") or addresses[0]
                # A condition left out means ready (discovery.k8s.io/v1).
                ready = conditions.get("ready") is not False
                found[str(name)] = GatewayEndpoint(str(addresses[0]), port, ready)
        return found


def authority_in_secret(
    api: client.ApiClient, namespace: str, name: str, controller_id: str, *, make: bool
) -> pki.Authority:
    """The CA kept in the ``kubernetes.io/tls`` Secret ``namespace/name`` (``tls.crt``,
    ``tls.key``: what cert-manager writes for a CA too); with ``make``, made there on first
    start (by whichever controller creates the Secret first: the others read it)."""
    core = client.CoreV1Api(api)
    where = f"the CA Secret {namespace}/{name}"
    for _ in range(2):
        try:
            response: Any = core.read_namespaced_secret(name, namespace, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise pki.PKIError(str(kubeapi.error(e, f"reading {where}"))) from e
            if not make:
                raise pki.PKIError(
                    f"{where} does not exist: create it (tls.crt and tls.key of an ECDSA CA, "
                    "e.g. a cert-manager CA Certificate's Secret) or let the controller make one"
                ) from e
            authority = pki.Authority.create(controller_id)
            body: Any = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": base.owner_labels(controller_id),
                },
                "type": "kubernetes.io/tls",
                "data": {
                    pki.CERT: base64.b64encode(authority.cert_pem).decode(),
                    pki.KEY: base64.b64encode(authority.key_pem).decode(),
                },
            }
            try:
                core.create_namespaced_secret(namespace, body, _preload_content=False)
            except ApiException as created:
                if created.status == 409:
                    continue  # another controller made it first: read that one
                raise pki.PKIError(str(kubeapi.error(created, f"creating {where}"))) from created
            log.info("made the CA in %s", where)
            return authority
        data = json.loads(response.data).get("data") or {}
        try:
            cert, key = (base64.b64decode(data[k]) for k in (pki.CERT, pki.KEY))
        except KeyError as e:
            raise pki.PKIError(f"{where} has no {e.args[0]}") from e
        return pki.Authority.from_pem(cert, key, f"{where} ({pki.CERT})", f"{where} ({pki.KEY})")
    raise pki.PKIError(f"{where} was neither readable nor made")


async def keep_client_secret(
    api: client.ApiClient,
    namespace: str,
    name: str,
    authority: pki.Authority,
    identity: pki.Identity,
    lifetime: timedelta,
    stop: asyncio.Event,
) -> None:
    """Keep a client certificate of ``identity`` (the gateway's) current in the Secret
    ``namespace/name``, which its pods mount: issued when missing, due, or of another CA,
    until ``stop``. The kubelet refreshes the mounted files; the gateway reads them again
    once their ``..data`` link moves."""
    core = client.CoreV1Api(api)
    where = f"{namespace}/{name}"
    while not stop.is_set():
        wait = pki.RENEW_CHECK_SECONDS
        try:
            wait = await asyncio.to_thread(
                _ensure_client_secret, core, namespace, name, authority, identity, lifetime
            )
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            log.error("cannot keep the client certificate in %s: %s", where, kubeapi.error(e, ""))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(wait, 1.0))


def _ensure_client_secret(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    authority: pki.Authority,
    identity: pki.Identity,
    lifetime: timedelta,
) -> float:
    """Issue into the Secret if due; the seconds until the one there is due."""
    now = datetime.now(UTC)
    try:
        response: Any = core.read_namespaced_secret(name, namespace, _preload_content=False)
        existing = json.loads(response.data)
    except ApiException as e:
        if e.status != 404:
            raise
        existing = None
    at = _renew_at((existing or {}).get("data") or {}, authority.cert_pem)
    if at is not None and now < at:
        return min(pki.RENEW_CHECK_SECONDS, (at - now).total_seconds())
    issued = authority.issue(identity, lifetime=lifetime)
    data = manifests.certificate_data(issued, authority.cert_pem)
    if existing is None:
        body: Any = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": base.owner_labels(identity.controller_id),
            },
            "type": "kubernetes.io/tls",
            "data": data,
        }
        core.create_namespaced_secret(namespace, body, _preload_content=False)
    else:
        core.patch_namespaced_secret(
            name, namespace, {"data": data}, _preload_content=False, _content_type=MERGE_PATCH
        )
    log.info("issued the client certificate of %s into %s/%s", identity.uri, namespace, name)
    return min(pki.RENEW_CHECK_SECONDS, (issued.renew_after - now).total_seconds())
