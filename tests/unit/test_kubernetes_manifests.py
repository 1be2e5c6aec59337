"""Every object the Kubernetes runtime makes validates, strictly, against Kubernetes' schemas.

Strict: an unknown or misplaced field is an error, as a server with field
validation would refuse it. Against 1.29 (the oldest the chart supports)
and the newest version kubernetes-validate bundles.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cryptography import x509

from controller import pki
from controller.runtimes import base
from controller.runtimes import kubernetes_manifests as manifests
from controller.spec import models

VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
OWNER = manifests.Owner("kv", "6f1c1c2e-8a3b-4a52-9d1e-3f0c2b1a0e55")


def _desired(**spec: Any) -> base.InstanceSpec:
    plugin_spec = models.PluginSpec.model_validate(
        {"image": "blackhole/example-storage:1.2.0", "version": "1.2.0", **spec}
    )
    labels = {
        base.LABEL_PLUGIN: "kv",
        base.LABEL_COLOR: "green",
        base.LABEL_VERSION: "1.2.0",
        base.LABEL_SPEC_HASH: base.instance_hash(plugin_spec),
        base.LABEL_NAMESPACE: "team-a",
    }
    return base.InstanceSpec(
        plugin="kv",
        color=models.Color.GREEN,
        spec=plugin_spec,
        labels=labels,
        namespace="team-a",
        controller_id="default",
        owner_uid=OWNER.uid,
    )


SPECS: dict[str, dict[str, Any]] = {
    "minimal": {},
    "everything": {
        "resources": {"cpu": "250m", "memory": "96Mi", "pids": 32},
        "volumes": [
            {"name": "data", "mountPath": "/data", "size": "2Gi"},
            {"name": "cache", "mountPath": "/cache", "readOnly": True},
        ],
        "env": {"LOG_LEVEL": "debug"},
        "permissions": {"network": "egress", "egress": ["10.1.2.3:5432", "api.example.com:443"]},
        "health": {"periodSeconds": 2, "timeoutSeconds": 1, "failureThreshold": 5},
    },
    "private": {"permissions": {"network": "private", "peers": ["analytics", "search"]}},
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_manifest_validates_strictly(case: str, version: str):
    made = manifests.all_for(_desired(**SPECS[case]), "team-a", "blackhole-system", OWNER)
    kinds = [m["kind"] for m in made]
    assert {"Deployment", "Service", "NetworkPolicy", "Secret"} <= set(kinds)
    for manifest in made:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_validation_would_catch_a_misplaced_field():
    deployment = manifests.deployment(_desired(), "team-a", OWNER)
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_pod_is_locked_down_and_probed_over_grpc():
    pod = manifests.deployment(_desired(**SPECS["everything"]), "team-a", OWNER)["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "96Mi"},
        "limits": {"cpu": "250m", "memory": "96Mi"},
    }
    assert container["readinessProbe"]["grpc"] == {"port": manifests.HEALTH_PORT}
    assert container["livenessProbe"]["grpc"] == {
        "port": manifests.HEALTH_PORT,
        "service": "liveness",
    }
    token = next(e for e in container["env"] if e["name"] == "BLACKHOLE_PLUGIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "bh-kv-token"
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["bh-kv-data", "bh-kv-cache"]


def test_the_network_policy_lets_in_only_the_controller_and_gateway_and_out_what_the_spec_says():
    policy = manifests.network_policy(
        _desired(**SPECS["everything"]), "team-a", "blackhole-system", OWNER
    )["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    controller, gateway = ingress["from"]
    for source in (controller, gateway):
        assert source["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "blackhole-system"
        }
    assert controller["podSelector"]["matchLabels"] == manifests.CONTROLLER_POD_LABELS
    assert gateway["podSelector"]["matchLabels"] == manifests.GATEWAY_POD_LABELS
    assert ingress["ports"] == [{"protocol": "TCP", "port": manifests.PROTOCOL_PORT}]
    by_ip, by_name, dns = policy["egress"]
    assert by_ip["to"] == [{"ipBlock": {"cidr": "10.1.2.3/32"}}]
    assert by_ip["ports"] == [{"protocol": "TCP", "port": 5432}]
    assert by_name["ports"] == [{"protocol": "TCP", "port": 443}]
    excluded = by_name["to"][0]["ipBlock"]["except"]
    assert "169.254.0.0/16" in excluded  # the cloud metadata endpoint
    assert "10.0.0.0/8" in excluded
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_no_network_means_no_egress_at_all():
    policy = manifests.network_policy(_desired(), "team-a", "blackhole-system", OWNER)["spec"]
    assert policy["egress"] == []


def test_the_color_service_publishes_its_pod_before_it_is_ready():
    service = manifests.color_service(_desired(), "team-a", OWNER)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    stable = manifests.stable_service("kv", models.Color.BLUE, "team-a", "default", OWNER)
    assert stable["spec"]["selector"][base.LABEL_COLOR] == "blue"
    assert stable["metadata"]["ownerReferences"] == [OWNER.reference()]


def test_a_name_whose_service_would_pass_63_characters_is_refused_before_anything_is_made(
    tmp_path: Path,
):
    from kubernetes import client

    from controller.runtimes import kubernetes

    runtime = kubernetes.KubernetesRuntime(
        kubernetes.Settings(controller_id="blue-team"),
        client.ApiClient(),
        pki.Authority.create("blue-team"),
        pki.Credentials(tmp_path),
    )
    longest = "p" * (63 - len("bh-blue-team--green"))
    fits = dataclasses.replace(_desired(), plugin=longest, controller_id="blue-team")
    assert not [i for i in runtime.validate(fits) if i.path == "metadata.name"]
    over = dataclasses.replace(fits, plugin=longest + "x")
    [issue] = [i for i in runtime.validate(over) if i.path == "metadata.name"]
    assert "would be 64 characters, over Kubernetes' 63" in issue.message
    assert f"at most {len(longest)} characters" in issue.message
    assert manifests.names_too_long(longest, "blue-team") is None


OPTIONS = manifests.PodOptions(
    image_pull_secrets=("registry-a", "registry-b"),
    dns=manifests.Dns("openshift-dns", (("dns.operator.openshift.io/daemonset-dns", "default"),)),
)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_controllers_pod_options_validate_strictly(version: str):
    for manifest in manifests.all_for(
        _desired(**SPECS["everything"]), "team-a", "blackhole-system", OWNER, OPTIONS
    ):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_plugin_pods_get_the_image_pull_secrets_and_none_without():
    pod = manifests.deployment(_desired(), "team-a", OWNER, options=OPTIONS)["spec"]["template"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
    bare = manifests.deployment(_desired(), "team-a", OWNER)["spec"]["template"]
    assert "imagePullSecrets" not in bare["spec"]


def test_named_egress_may_query_the_configured_dns_pods_only():
    desired = _desired(permissions={"network": "egress", "egress": ["api.example.com:443"]})
    policy = manifests.network_policy(desired, "team-a", "blackhole-system", OWNER, OPTIONS.dns)
    [dns] = [r for r in policy["spec"]["egress"] if {"protocol": "UDP", "port": 53} in r["ports"]]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}},
            "podSelector": {"matchLabels": {"dns.operator.openshift.io/daemonset-dns": "default"}},
        }
    ]
    default = manifests.network_policy(desired, "team-a", "blackhole-system", OWNER)
    [dns] = [r for r in default["spec"]["egress"] if {"protocol": "UDP", "port": 53} in r["ports"]]
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }


VOLUME = {"volumes": [{"name": "data", "mountPath": "/data", "size": "2Gi"}]}


def _claims_of(deployment: dict[str, Any]) -> list[str]:
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    return [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]


def test_a_plugin_with_state_has_claims_per_color_and_no_affinity():
    desired = _desired(state={"version": 1}, **VOLUME)
    made = manifests.deployment(desired, "team-a", OWNER)
    assert _claims_of(made) == ["bh-kv-data-green"]
    assert "affinity" not in made["spec"]["template"]["spec"]
    claim = manifests.claim(desired, desired.spec.volumes[0], "team-a", OWNER, "fast-ssd")
    assert claim["metadata"]["name"] == "bh-kv-data-green"
    assert claim["metadata"]["labels"][base.LABEL_COLOR] == "green"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"


def test_a_plugin_without_state_shares_its_claims_and_runs_beside_its_other_color():
    desired = _desired(**VOLUME)
    made = manifests.deployment(desired, "team-a", OWNER)
    assert _claims_of(made) == ["bh-kv-data"]
    [term] = made["spec"]["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    # Every color of the plugin, its own pod's labels included (so a lone pod schedules).
    pod_labels = made["spec"]["template"]["metadata"]["labels"]
    assert base.LABEL_COLOR not in term["labelSelector"]["matchLabels"]
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    claim = manifests.claim(desired, desired.spec.volumes[0], "team-a", OWNER)
    assert base.LABEL_COLOR not in claim["metadata"]["labels"]
    assert "storageClassName" not in claim["spec"]
    assert (
        "affinity"
        not in manifests.deployment(_desired(), "team-a", OWNER)["spec"]["template"]["spec"]
    )


def test_each_color_serves_mutual_tls_from_its_own_certificate_secret():
    spec = manifests.deployment(_desired(), "team-a", OWNER)["spec"]["template"]["spec"]
    [container] = spec["containers"]
    [volume] = [v for v in spec["volumes"] if v["name"] == manifests.TLS_VOLUME]
    assert volume["secret"] == {"secretName": "bh-kv-green-tls", "defaultMode": 0o440}
    [mount] = [m for m in container["volumeMounts"] if m["name"] == manifests.TLS_VOLUME]
    assert mount == {"name": "tls", "mountPath": manifests.TLS_DIR, "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BLACKHOLE_TLS_CERT"] == f"{manifests.TLS_DIR}/tls.crt"
    assert env["BLACKHOLE_TLS_KEY"] == f"{manifests.TLS_DIR}/tls.key"
    assert env["BLACKHOLE_TLS_CA"] == f"{manifests.TLS_DIR}/ca.crt"
    # Only this controller's own clients are let in, not another's of the same CA.
    assert (
        env["BLACKHOLE_TLS_CLIENTS"] == "blackhole://default/controller,blackhole://default/gateway"
    )
    # The kubelet's gRPC probes speak no TLS: a plaintext port with the health service only.
    assert env["BLACKHOLE_HEALTH_ADDRESS"] == f"0.0.0.0:{manifests.HEALTH_PORT}"
    assert "BLACKHOLE_PLUGIN_TOKEN" in env  # the token stays, a second factor
    # The files are the pod's fsGroup's, which the plugin's user is in: it can read its key.
    assert spec["securityContext"]["fsGroup"] == container["securityContext"]["runAsGroup"]


def test_the_certificate_secret_certifies_the_plugins_identity_and_nothing_else():
    authority = pki.Authority.create("default")
    identity = pki.Identity.plugin("default", "team-a", "kv")
    hosts = manifests.certificate_hosts("kv", models.Color.GREEN, "team-a", "default")
    issued = authority.issue(identity, hosts=hosts)
    secret = manifests.certificate_secret(_desired(), "team-a", OWNER, issued, authority.cert_pem)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == "bh-kv-green-tls"
    assert secret["metadata"]["ownerReferences"] == [OWNER.reference()]
    labels = secret["metadata"]["labels"]
    assert labels[manifests.LABEL_CERTIFICATE] == manifests.CERTIFICATE_INSTANCE
    assert labels[base.LABEL_COLOR] == "green"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert data["ca.crt"] == authority.cert_pem
    assert data["tls.key"] == issued.key_pem
    assert pki.identities_of(data["tls.crt"]) == [identity]

    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert dns[0] == identity.server_name == "kv.team-a.default.plugin.blackhole"
    assert "bh-kv-green.team-a.svc" in dns
    assert "bh-kv.team-a.svc" in dns


def _replica(replica: int, **spec: Any) -> base.InstanceSpec:
    """Replica ``replica`` of kv's green color, with the labels the reconciler gives it."""
    desired = _desired(replicas=3, **spec)
    labels = dict(desired.labels)
    if replica:
        labels[base.LABEL_REPLICA] = str(replica)
    return dataclasses.replace(desired, labels=labels, replica=replica)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
def test_each_replica_is_a_deployment_sharing_its_colors_service_and_secret(version: str):
    made = [
        manifests.deployment(_replica(k), "team-a", OWNER, run=f"run{k}", options=OPTIONS)
        for k in range(3)
    ]
    for manifest in made:
        kubernetes_validate.validate(manifest, version, strict=True)
    assert [m["metadata"]["name"] for m in made] == [
        "bh-kv-green",
        "bh-kv-green-1",
        "bh-kv-green-2",
    ]
    assert [m["spec"]["replicas"] for m in made] == [1, 1, 1]
    assert [m["metadata"]["labels"].get(base.LABEL_REPLICA) for m in made] == [None, "1", "2"]
    pods = [m["spec"]["template"]["metadata"]["labels"] for m in made]
    assert [p.get(base.LABEL_REPLICA) for p in pods] == [None, "1", "2"]
    for k, manifest in enumerate(made):
        selector = manifest["spec"]["selector"]["matchLabels"]
        assert [_selects(selector, p) for p in pods] == [j == k for j in range(3)], (
            "a Deployment's selector overlaps another replica's pods"
        )
    service = manifests.color_service(_replica(0), "team-a", OWNER)
    assert all(_selects(service["spec"]["selector"], p) for p in pods), "one Service, every pod"
    stable = manifests.stable_service("kv", models.Color.GREEN, "team-a", "default", OWNER)
    assert all(_selects(stable["spec"]["selector"], p) for p in pods)
    mounted = {
        v["secret"]["secretName"]
        for m in made
        for v in m["spec"]["template"]["spec"]["volumes"]
        if v["name"] == manifests.TLS_VOLUME
    }
    assert mounted == {manifests.certificate_name("kv", models.Color.GREEN, "default")}


def test_the_replicas_suffix_counts_against_the_name_limit(tmp_path: Path):
    from kubernetes import client

    from controller.runtimes import kubernetes

    runtime = kubernetes.KubernetesRuntime(
        kubernetes.Settings(controller_id="blue-team"),
        client.ApiClient(),
        pki.Authority.create("blue-team"),
        pki.Credentials(tmp_path),
    )
    assert runtime.capabilities().replicas
    longest = "p" * (63 - len("bh-blue-team--green"))
    assert manifests.names_too_long(longest, "blue-team", 1) is None
    # 10 replicas: the last Deployment is ...-green-9, two characters past the Service.
    said = manifests.names_too_long(longest, "blue-team", 10)
    assert said is not None
    assert "the Deployment 'bh-blue-team-" in said
    assert "-green-9' would be 65 characters" in said
    assert "with controller id 'blue-team' and 10 replicas" in said
    assert f"at most {len(longest) - 2} characters" in said
    shorter = longest[:-2]
    assert manifests.names_too_long(shorter, "blue-team", 10) is None
    assert manifests.names_too_long(shorter, "blue-team", 11) is not None  # ...-green-10
    fits = dataclasses.replace(_desired(replicas=10), plugin=shorter, controller_id="blue-team")
    assert not [i for i in runtime.validate(fits) if i.path == "metadata.name"]
    over = dataclasses.replace(fits, plugin=longest)
    [issue] = [i for i in runtime.validate(over) if i.path == "metadata.name"]
    assert "-green-9' would be 65 characters" in issue.message
