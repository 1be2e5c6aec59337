"""The objects the Kubernetes backend makes for a plugin, as plain manifests.

Pure functions of an :class:`~controller.runtimes.base.InstanceSpec` and the
backend's settings, so that every manifest can be validated offline against
the Kubernetes schemas. Per plugin:

- a **Deployment per replica of each color** (``bh-<plugin>-<color>``, and
  ``bh-<plugin>-<color>-<k>`` for the replicas after the first of
  ``spec.replicas``; each of one pod, ``Recreate``, selecting its own pods
  only by the ``run`` label it was made with): non-root,
  read-only root filesystem, all capabilities dropped, no privilege
  escalation, seccomp ``RuntimeDefault``, no service-account token; requests
  and limits from the spec; gRPC readiness (``grpc.health.v1``, SERVING once
  the controller's handshake is done) and liveness (the ``liveness`` health
  service) probes;
- a **headless Service per color** that publishes its pods (every replica's)
  before they are Ready
  (the controller must reach a pod to shake hands with it), and a **stable
  Service** ``bh-<plugin>`` whose selector follows the active color;
- a **NetworkPolicy** denying everything but the protocol port from the
  controller's pods (where the gateway runs), plus the egress and peers the
  spec grants;
- a **PVC** per volume, and a **Secret** with the plugin's protocol token;
- a **Secret per color**, which every replica of the color mounts, with the
  instance's certificate (its identity
  ``blackhole://<controller-id>/<namespace>/<plugin>`` and server name in the
  SAN), its key and the CA, mounted read-only into the pod (files 0440, the
  pod's group) and named by ``BLACKHOLE_TLS_CERT``/``_KEY``/``_CA``: the
  plugin serves mutual TLS only, to this controller's and its gateway's
  client certificates only (``BLACKHOLE_TLS_CLIENTS``), and the controller renews the Secret before
  the certificate expires (the kubelet refreshes the files, the SDK reads them
  again at the next handshake). The kubelet's gRPC probes speak no TLS: they
  ask a plaintext port (``BLACKHOLE_HEALTH_ADDRESS``) that serves only the
  health service.

Volumes are ReadWriteOnce claims, which one node at a time may mount. A
plugin that declares ``spec.state`` gets a claim per color
(``bh-<plugin>-<volume>-<color>``): the new color of a swap may land on any
node, its claim starts empty, and what must survive the swap moves by the
state export and import; the old color's claim goes with the old color. A
plugin without ``spec.state`` has only its volumes to keep its data in, so
both colors share one claim (``bh-<plugin>-<volume>``) and the new color is
scheduled onto the node of the old one (a required pod affinity), where the
claim is already attached.

Everything carries the controller's ownership labels and an ownerReference
to the Plugin object, so Kubernetes' garbage collector removes what the
controller could not.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from controller import pki
from controller.runtimes import base
from controller.spec import models

Manifest = dict[str, Any]

PROTOCOL_PORT = 7000
"""The port plugins listen on in their pods."""
PORT_NAME = "grpc"
HEALTH_PORT = 7001
"""The port of the plaintext health service the kubelet's gRPC probes ask (no TLS there)."""
TLS_DIR = "/var/run/blackhole/tls"
"""Where a plugin pod's certificate Secret is mounted."""
TLS_VOLUME = "tls"
TLS_MODE = 0o440
"""The files' mode: the kubelet makes them the pod's fsGroup's, which the plugin runs in."""
LABEL_CERTIFICATE = models.LABEL_PREFIX + "certificate"
CERTIFICATE_INSTANCE = "instance"
"""``LABEL_CERTIFICATE`` on an instance's certificate Secret (what renewal lists by)."""
PLUGIN_USER = 65532
"""The user plugins run as (the plugin runtime image's)."""
TOKEN_KEY = "token"
CONTAINER = "plugin"
LABEL_RUN = models.LABEL_PREFIX + "run"
"""Set anew on each Deployment made: tells its pods from a removed predecessor's of the
same name (which may still be terminating)."""
CONTROLLER_POD_LABELS = {
    "app.kubernetes.io/name": "blackhole",
    "app.kubernetes.io/component": "controller",
}
"""Labels of the controller's pods (the Helm chart sets them): let in, with the gateway's."""
GATEWAY_POD_LABELS = {
    "app.kubernetes.io/name": "blackhole",
    "app.kubernetes.io/component": "gateway",
}
"""Labels of the gateway's pods (the Helm chart sets them), which call the plugins."""


@dataclass(frozen=True)
class Dns:
    """The cluster's DNS pods, which a plugin with named egress destinations may reach."""

    namespace: str = "kube-system"
    labels: tuple[tuple[str, str], ...] = (("k8s-app", "kube-dns"),)
    """The DNS pods' labels (CoreDNS keeps kube-dns's ``k8s-app=kube-dns``; OpenShift's
    are ``dns.operator.openshift.io/daemonset-dns=default`` in ``openshift-dns``)."""


@dataclass(frozen=True)
class PodOptions:
    """What every plugin pod of this controller gets, from the controller's settings."""

    image_pull_secrets: tuple[str, ...] = ()
    """Secrets (in each plugin's namespace) the kubelet pulls plugin images with."""
    dns: Dns = field(default_factory=Dns)
    storage_class: str | None = None
    """The StorageClass of the plugins' claims; None: the cluster's default class."""


@dataclass(frozen=True)
class Owner:
    """The Plugin object everything of a plugin belongs to."""

    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": models.API_VERSION,
            "kind": models.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def object_name(plugin: str, color: models.Color, controller_id: str) -> str:
    """The name of a color's Service (and of its first replica's Deployment), unique within
    the plugin's namespace."""
    return base.instance_name(plugin, color, None, controller_id)


def deployment_name(plugin: str, color: models.Color, controller_id: str, replica: int = 0) -> str:
    """The name of the Deployment of one replica of a color: the color's Service's name, and
    ``-<replica>`` after it for the replicas after the first."""
    return base.instance_name(plugin, color, None, controller_id, replica)


NAME_MAX = 63
"""Service names are DNS-1035 labels, at most 63 characters; the Deployments, named as the
Service with a replica's suffix, are kept to a DNS label too."""


def names_too_long(plugin: str, controller_id: str, replicas: int = 1) -> str | None:
    """Why the objects of ``plugin`` with ``replicas`` replicas a color could not be made
    under these names (each at most 63 characters), or None. Checked before anything is
    created: the API server would refuse the Service with a 422 after a Deployment was made."""
    names = [
        (kind, name)
        for color in models.Color
        for kind, name in (
            ("Service", object_name(plugin, color, controller_id)),
            ("Deployment", deployment_name(plugin, color, controller_id, replicas - 1)),
        )
    ]
    kind, longest = max(names, key=lambda n: len(n[1]))
    if len(longest) <= NAME_MAX:
        return None
    room = NAME_MAX - (len(longest) - len(plugin))
    of = f" and {replicas} replicas" if replicas > 1 else ""
    return (
        f"the {kind} {longest!r} would be {len(longest)} characters, over Kubernetes' "
        f"{NAME_MAX}: with controller id {controller_id!r}{of} a plugin's name may be at "
        f"most {room} characters here"
    )


def stable_name(plugin: str, controller_id: str) -> str:
    scope = [] if controller_id == base.DEFAULT_CONTROLLER else [controller_id]
    return "-".join(["bh", *scope, plugin])


def token_name(plugin: str, controller_id: str) -> str:
    return f"{stable_name(plugin, controller_id)}-token"


def certificate_name(plugin: str, color: models.Color, controller_id: str) -> str:
    """The Secret of a color's certificate."""
    return f"{object_name(plugin, color, controller_id)}-tls"


def policy_name(plugin: str, controller_id: str) -> str:
    return stable_name(plugin, controller_id)


def per_color_claims(spec: models.PluginSpec) -> bool:
    """Whether each color has claims of its own (its state moves by export and import)."""
    return spec.state is not None


def claim_name(
    plugin: str, volume: str, controller_id: str, color: models.Color | None = None
) -> str:
    """The claim of a volume: of one color, or (``color`` None) shared by both."""
    shared = base.volume_name(plugin, volume, None, controller_id)
    return shared if color is None else f"{shared}-{color.value}"


def claim_of(desired: base.InstanceSpec, volume: str) -> str:
    color = desired.color if per_color_claims(desired.spec) else None
    return claim_name(desired.plugin, volume, desired.controller_id, color)


def plugin_selector(plugin: str, controller_id: str) -> dict[str, str]:
    """Labels every pod of the plugin carries, whatever its color."""
    return {
        base.LABEL_MANAGED_BY: base.MANAGED_BY,
        base.LABEL_CONTROLLER: controller_id,
        base.LABEL_PLUGIN: plugin,
    }


def color_selector(plugin: str, color: models.Color, controller_id: str) -> dict[str, str]:
    return {**plugin_selector(plugin, controller_id), base.LABEL_COLOR: color.value}


def _metadata(
    name: str, namespace: str, labels: dict[str, str], owner: Owner | None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [owner.reference()]
    return metadata


def _owned_labels(plugin: str, controller_id: str) -> dict[str, str]:
    return plugin_selector(plugin, controller_id)


def deployment(
    desired: base.InstanceSpec,
    namespace: str,
    owner: Owner | None,
    run: str = "0",
    options: PodOptions | None = None,
) -> Manifest:
    spec = desired.spec
    cid = desired.controller_id
    labels = {**desired.labels, **color_selector(desired.plugin, desired.color, cid)}
    # What the Deployment selects: its own pods, not another replica's of the color.
    own = {**color_selector(desired.plugin, desired.color, cid), LABEL_RUN: run}
    pod_labels = {**labels, **own}
    env = [
        {"name": "BLACKHOLE_ADDRESS", "value": f"0.0.0.0:{PROTOCOL_PORT}"},
        {"name": "BLACKHOLE_PLUGIN", "value": desired.plugin},
        {"name": "BLACKHOLE_VERSION", "value": str(spec.version)},
        {"name": "BLACKHOLE_COLOR", "value": desired.color.value},
        {
            "name": "BLACKHOLE_PLUGIN_TOKEN",
            "valueFrom": {
                "secretKeyRef": {"name": token_name(desired.plugin, cid), "key": TOKEN_KEY}
            },
        },
        {"name": "BLACKHOLE_TLS_CERT", "value": f"{TLS_DIR}/{pki.CERT}"},
        {"name": "BLACKHOLE_TLS_KEY", "value": f"{TLS_DIR}/{pki.KEY}"},
        {"name": "BLACKHOLE_TLS_CA", "value": f"{TLS_DIR}/{pki.CA_CERT}"},
        {
            # This controller's clients only, not another's certified by the same CA.
            "name": "BLACKHOLE_TLS_CLIENTS",
            "value": ",".join(
                pki.Identity.role(cid, role).uri for role in (pki.CONTROLLER, pki.GATEWAY)
            ),
        },
        {"name": "BLACKHOLE_HEALTH_ADDRESS", "value": f"0.0.0.0:{HEALTH_PORT}"},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    health = spec.health
    probe_timing = {
        "periodSeconds": health.period_seconds,
        "timeoutSeconds": health.timeout_seconds,
        "failureThreshold": health.failure_threshold,
    }
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        {
            "name": TLS_VOLUME,
            "secret": {
                "secretName": certificate_name(desired.plugin, desired.color, cid),
                "defaultMode": TLS_MODE,
            },
        },
    ]
    for volume in spec.volumes:
        mounts.append(
            {
                "name": f"v-{volume.name}",
                "mountPath": volume.mount_path,
                "readOnly": volume.read_only,
            }
        )
        volumes.append(
            {
                "name": f"v-{volume.name}",
                "persistentVolumeClaim": {"claimName": claim_of(desired, volume.name)},
            }
        )
    resources = {"cpu": str(spec.resources.cpu), "memory": str(spec.resources.memory)}
    pull_secrets = (options or PodOptions()).image_pull_secrets
    container = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": PROTOCOL_PORT, "protocol": "TCP"}],
        "resources": {"requests": resources, "limits": resources},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": PLUGIN_USER,
            "runAsGroup": PLUGIN_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "readinessProbe": {"grpc": {"port": HEALTH_PORT}, **probe_timing},
        "livenessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "liveness"},
            "initialDelaySeconds": health.startup_deadline_seconds,
            **probe_timing,
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(
            deployment_name(desired.plugin, desired.color, cid, desired.replica),
            namespace,
            labels,
            owner,
        ),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 1,
            "selector": {"matchLabels": own},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": PLUGIN_USER,
                        "runAsGroup": PLUGIN_USER,
                        "fsGroup": PLUGIN_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                    **_beside_the_other_color(desired),
                    **(
                        {"imagePullSecrets": [{"name": n} for n in pull_secrets]}
                        if pull_secrets
                        else {}
                    ),
                },
            },
        },
    }


def _beside_the_other_color(desired: base.InstanceSpec) -> dict[str, Any]:
    """Where both colors share claims: a required pod affinity to the plugin's pods, on
    the node (``kubernetes.io/hostname``). One node may mount a ReadWriteOnce claim, so the
    new color must run where the old one does. The term selects every color, the pod's
    own included: with no other pod of the plugin (a first start, a pod rescheduled after
    the old color went) the scheduler lets it go to any node, as it does for the first
    pod of a group that matches its own affinity."""
    if not desired.spec.volumes or per_color_claims(desired.spec):
        return {}
    selector = plugin_selector(desired.plugin, desired.controller_id)
    return {
        "affinity": {
            "podAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": selector},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    }


def color_service(desired: base.InstanceSpec, namespace: str, owner: Owner | None) -> Manifest:
    cid = desired.controller_id
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(
            object_name(desired.plugin, desired.color, cid),
            namespace,
            color_selector(desired.plugin, desired.color, cid),
            owner,
        ),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": color_selector(desired.plugin, desired.color, cid),
            "ports": [_port()],
        },
    }


def stable_service(
    plugin: str, color: models.Color, namespace: str, controller_id: str, owner: Owner | None
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(
            stable_name(plugin, controller_id),
            namespace,
            _owned_labels(plugin, controller_id),
            owner,
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": color_selector(plugin, color, controller_id),
            "ports": [_port()],
        },
    }


def _port() -> dict[str, Any]:
    return {
        "name": PORT_NAME,
        "port": PROTOCOL_PORT,
        "targetPort": PORT_NAME,
        "protocol": "TCP",
        "appProtocol": "grpc",
    }


def network_policy(
    desired: base.InstanceSpec,
    namespace: str,
    controller_namespace: str,
    owner: Owner | None,
    dns: Dns | None = None,
) -> Manifest:
    """Default deny; in: the controller's and the gateway's pods on the protocol port (and
    peers); out: the spec's."""
    cid = desired.controller_id
    permissions = desired.spec.permissions
    ingress: list[dict[str, Any]] = [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": controller_namespace}
                    },
                    "podSelector": {"matchLabels": dict(labels)},
                }
                for labels in (CONTROLLER_POD_LABELS, GATEWAY_POD_LABELS)
            ],
            "ports": [{"protocol": "TCP", "port": PROTOCOL_PORT}],
        }
    ]
    egress: list[dict[str, Any]] = []
    if permissions.network is models.NetworkMode.EGRESS:
        egress += _egress(permissions.egress, dns or Dns())
    if permissions.network is models.NetworkMode.PRIVATE:
        peers = {
            "podSelector": {
                "matchLabels": {base.LABEL_MANAGED_BY: base.MANAGED_BY, base.LABEL_CONTROLLER: cid},
                "matchExpressions": [
                    {
                        "key": base.LABEL_PLUGIN,
                        "operator": "In",
                        "values": sorted(permissions.peers),
                    }
                ],
            }
        }
        ingress.append({"from": [peers]})
        egress.append({"to": [peers]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(
            policy_name(desired.plugin, cid), namespace, _owned_labels(desired.plugin, cid), owner
        ),
        "spec": {
            "podSelector": {"matchLabels": plugin_selector(desired.plugin, cid)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def _egress(destinations: list[str], dns: Dns) -> list[dict[str, Any]]:
    """``host:port`` destinations as egress rules.

    An IP address becomes that address alone; a name cannot be written in a
    NetworkPolicy, so it becomes its port to any public address (not the
    private, carrier-grade NAT or link-local ranges: no cluster addresses, no
    cloud metadata endpoint), plus DNS to the cluster's DNS pods (``dns``) to resolve it.
    """
    rules: list[dict[str, Any]] = []
    named_ports: set[int] = set()
    for destination in destinations:
        host, _, port = destination.rpartition(":")
        host = host.strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            named_ports.add(int(port))
            continue
        prefix = 32 if address.version == 4 else 128
        rules.append(
            {
                "to": [{"ipBlock": {"cidr": f"{address}/{prefix}"}}],
                "ports": [{"protocol": "TCP", "port": int(port)}],
            }
        )
    if named_ports:
        rules.append(
            {
                "to": [
                    {
                        "ipBlock": {
                            "cidr": "0.0.0.0/0",
                            "except": [
                                "10.0.0.0/8",
                                "172.16.0.0/12",
                                "192.168.0.0/16",
                                "100.64.0.0/10",
                                "169.254.0.0/16",
                                "127.0.0.0/8",
                            ],
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": p} for p in sorted(named_ports)],
            }
        )
        rules.append(
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": dns.namespace}
                        },
                        "podSelector": {"matchLabels": dict(dns.labels)},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }
        )
    return rules


DEFAULT_CLAIM_SIZE = "1Gi"
"""The size of a volume's claim when the spec gives none."""


def claim(
    desired: base.InstanceSpec,
    volume: models.Volume,
    namespace: str,
    owner: Owner | None,
    storage_class: str | None = None,
) -> Manifest:
    cid = desired.controller_id
    labels = {**_owned_labels(desired.plugin, cid), base.LABEL_VOLUME: volume.name}
    if per_color_claims(desired.spec):
        labels[base.LABEL_COLOR] = desired.color.value
    size = str(volume.size) if volume.size is not None else DEFAULT_CLAIM_SIZE
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(claim_of(desired, volume.name), namespace, labels, owner),
        "spec": spec,
    }


def token_secret(
    plugin: str, token: str, namespace: str, controller_id: str, owner: Owner | None
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(
            token_name(plugin, controller_id),
            namespace,
            _owned_labels(plugin, controller_id),
            owner,
        ),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def certificate_secret(
    desired: base.InstanceSpec,
    namespace: str,
    owner: Owner | None,
    issued: pki.Issued,
    ca_pem: bytes,
) -> Manifest:
    """A color's certificate, key and CA, as the pod mounts them (``kubernetes.io/tls``)."""
    cid = desired.controller_id
    labels = {
        **_owned_labels(desired.plugin, cid),
        base.LABEL_COLOR: desired.color.value,
        LABEL_CERTIFICATE: CERTIFICATE_INSTANCE,
    }
    if desired.namespace:
        labels[base.LABEL_NAMESPACE] = desired.namespace
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(
            certificate_name(desired.plugin, desired.color, cid), namespace, labels, owner
        ),
        "type": "kubernetes.io/tls",
        "data": certificate_data(issued, ca_pem),
    }


def certificate_data(issued: pki.Issued, ca_pem: bytes) -> dict[str, str]:
    """A certificate Secret's ``data``: ``tls.crt``, ``tls.key`` and ``ca.crt``, base64."""
    return {
        pki.CERT: base64.b64encode(issued.cert_pem).decode(),
        pki.KEY: base64.b64encode(issued.key_pem).decode(),
        pki.CA_CERT: base64.b64encode(ca_pem).decode(),
    }


def certificate_hosts(plugin: str, color: models.Color, namespace: str, cid: str) -> list[str]:
    """The names, besides its identity's, a color's certificate carries: its Services'."""
    names = []
    for service in (object_name(plugin, color, cid), stable_name(plugin, cid)):
        names += [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    return names


def all_for(
    desired: base.InstanceSpec,
    namespace: str,
    controller_namespace: str,
    owner: Owner | None,
    options: PodOptions | None = None,
) -> list[Manifest]:
    """Every object ``desired`` needs, in the order they are made (for validation and docs)."""
    options = options or PodOptions()
    ca = pki.Authority.create(desired.controller_id)
    identity = pki.Identity.plugin(desired.controller_id, namespace, desired.plugin)
    return [
        certificate_secret(desired, namespace, owner, ca.issue(identity), ca.cert_pem),
        token_secret(desired.plugin, "example-token", namespace, desired.controller_id, owner),
        network_policy(desired, namespace, controller_namespace, owner, options.dns),
        *[claim(desired, v, namespace, owner, options.storage_class) for v in desired.spec.volumes],
        color_service(desired, namespace, owner),
        stable_service(desired.plugin, desired.color, namespace, desired.controller_id, owner),
        deployment(desired, namespace, owner, options=options),
    ]
