"""The Helm chart, linted and rendered by the real helm for every ci/*-values.yaml.

What it renders is validated as the API server would (kubernetes-validate,
strict: unknown fields are errors) against Kubernetes 1.29 and the newest
version kubernetes-validate bundles. The ServiceMonitor and PrometheusRule are
prometheus-operator CRDs that it does not know: they are checked against
MONITORING_SCHEMAS below. The plain manifests in deploy/kubernetes/ must be
what `make manifests` renders now. helm and kubectl come from `make setup`
(scripts/helm.sh tools).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.gateway import auth

TOP = Path(__file__).resolve().parents[2]
CHART = TOP / "charts" / "blackhole"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
PLAIN = TOP / "deploy" / "kubernetes"
BIN = Path(sys.prefix) / "bin"
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
RELEASE, NAMESPACE = "blackhole", "blackhole-system"

SELECTOR = {
    "app.kubernetes.io/name": "blackhole",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/component": "controller",
}
LEADER = {"blackhole.dev/leader": "true"}
GATEWAY_SELECTOR = {
    "app.kubernetes.io/name": "blackhole",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/component": "gateway",
}

# Go durations as prometheus-operator's v1 CRDs declare them (monitoring.coreos.com_*.yaml).
DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
    "(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}

# The part of prometheus-operator's monitoring.coreos.com/v1 ServiceMonitor
# and PrometheusRule schemas that this chart uses: the same field names,
# types, required fields and duration pattern as its CRDs, and every other
# field refused, so that a misspelt or misplaced field fails here instead of
# being dropped by the API server. metadata is validated separately, as the
# ObjectMeta of a built-in kind.
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["selector"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": STRINGS},
                    },
                    "endpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": DURATION,
                                "scrapeTimeout": DURATION,
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": DURATION,
                                            "keep_firing_for": DURATION,
                                            "labels": STRINGS,
                                            "annotations": STRINGS,
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


class Helm:
    """The real helm, with its cache, config and data in a directory of the test session."""

    def __init__(self, homes: Path) -> None:
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(homes / "cache"),
            "HELM_CONFIG_HOME": str(homes / "config"),
            "HELM_DATA_HOME": str(homes / "data"),
        }
        self.rendered: dict[tuple[str, ...], tuple[dict[str, Any], ...]] = {}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "helm"), *args], env=self.env, capture_output=True, text=True, check=False
        )

    def render(self, *args: str) -> tuple[dict[str, Any], ...]:
        """The documents `helm template` renders with these arguments."""
        if args not in self.rendered:
            result = self("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
            assert result.returncode == 0, result.stderr
            self.rendered[args] = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
        return self.rendered[args]


def installed(tool: str) -> Path:
    path = BIN / tool
    if not os.access(path, os.X_OK):
        pytest.fail(f"{tool} is not installed at {path}: run `make setup` (scripts/helm.sh tools)")
    return path


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    installed("helm")
    return Helm(tmp_path_factory.mktemp("helm"))


def values(path: Path) -> tuple[str, ...]:
    return ("--values", str(path))


def ci(name: str) -> tuple[str, ...]:
    return values(CHART / "ci" / f"{name}-values.yaml")


def find(documents: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return copy.deepcopy(found[0])


def kinds(documents: tuple[dict[str, Any], ...]) -> list[str]:
    return sorted(d["kind"] for d in documents)


def validate(document: dict[str, Any], version: str) -> None:
    """Strict validation as the API server of `version` would do it."""
    if document["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(document, MONITORING_SCHEMAS[document["kind"]])
        carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]}
        kubernetes_validate.validate(carrier, version, strict=True)
    else:
        kubernetes_validate.validate(document, version, strict=True)


def controller(documents: tuple[dict[str, Any], ...], name: str = RELEASE) -> dict[str, Any]:
    return find(documents, "Deployment", name)


def gateway(documents: tuple[dict[str, Any], ...], name: str = RELEASE) -> dict[str, Any]:
    return find(documents, "Deployment", f"{name}-gateway")


def test_chart_version_follows_the_project_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = (TOP / "VERSION").read_text().strip()
    assert chart["apiVersion"] == "v2"
    assert (chart["version"], chart["appVersion"]) == (version, version)


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict_is_clean(helm, path):
    result = helm("lint", "--strict", str(CHART), *values(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output, output
    assert "[ERROR]" not in output, output


def test_bare_helm_lint_strict_is_clean_with_the_default_values(helm):
    result = helm("lint", "--strict", str(CHART))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output, output


def test_an_install_with_the_default_values_asks_for_tokens(helm):
    result = helm("template", RELEASE, str(CHART))
    assert result.returncode != 0
    assert "gateway.tokens" in result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", CI_VALUES, ids=lambda p: p.name)
def test_rendered_documents_validate_strict(helm, path, version):
    documents = helm.render(*values(path))
    assert "Deployment" in kinds(documents)
    for document in documents:
        validate(document, version)


def test_ci_values_cover_every_optional_object(helm):
    rendered = {kind for path in CI_VALUES for kind in kinds(helm.render(*values(path)))}
    assert rendered == {
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_validation_is_strict(helm, version):
    """A misspelt field fails, so the validation above can fail."""
    documents = helm.render(*ci("all"))
    deployment = controller(documents, "bh")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, version)
    for kind in ("ServiceMonitor", "PrometheusRule"):
        document = find(documents, kind, "bh")
        document["spec"]["selectr"] = {}
        with pytest.raises(jsonschema.ValidationError):
            validate(document, version)


@pytest.mark.parametrize("deployment", [controller, gateway])
def test_controller_and_gateway_pod_security(helm, deployment):
    pod = deployment(helm.render(*ci("default")))["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod["initContainers"] + pod["containers"]:
        assert container["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }, container["name"]


def test_controller_image_user_is_the_pods():
    dockerfile = (TOP / "images" / "controller" / "Dockerfile").read_text()
    assert "\nUSER 65532:65532\n" in dockerfile


BASE_ARGS = [
    "run",
    "--kubernetes",
    "--data-dir",
    "/var/lib/blackhole",
    "--log-format",
    "json",
    "--gateway-service",
    "{release}-gateway-control",
    "--gateway-control-secret",
    "/etc/blackhole/control/secret",
    "{pki}",
    "--gateway-client-secret",
    "{release}-gateway-client",
    "--client-cert-lifetime",
    "{lifetime}",
    "--instance-cert-lifetime",
    "{lifetime}",
    "--metrics-addr",
    "0.0.0.0:9100",
    "--lease-name",
]
OWN_CA = ["--ca-secret", "{release}-ca"]
"""The CA the controller makes in a Secret at its first start."""


@pytest.mark.parametrize(
    ("name", "deployment", "extra"),
    [
        ("default", RELEASE, [RELEASE]),
        ("single-replica", RELEASE, [RELEASE, "--no-leader-elect"]),
        (
            "all",
            "bh",
            [
                "bh",
                "--prometheus-url",
                "http://prometheus-operated.monitoring:9090",
                "--dashboard-addr",
                "0.0.0.0:9300",
                "--watch-namespace",
                "team-a",
                "--watch-namespace",
                "team-b",
            ],
        ),
    ],
)
def test_controller_command_line(helm, name, deployment, extra):
    (container,) = controller(helm.render(*ci(name)), deployment)["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["command"] == ["bhctl"]
    ca = ["--ca-existing-secret", "blackhole-ca-from-cert-manager"] if name == "all" else OWN_CA
    lifetime = "7200" if name == "all" else "3600"
    expected = [
        part.format(release=deployment, lifetime=lifetime)
        for a in BASE_ARGS
        for part in (ca if a == "{pki}" else [a])
    ]
    assert container["args"] == expected + extra


GATEWAY_ARGS = [
    "gateway", "--data-dir", "/var/lib/blackhole", "--log-format", "json",
    "--addr", "0.0.0.0:8080", "--grpc-addr", "0.0.0.0:8081",
    "--tokens", "/etc/blackhole/gateway/tokens.yaml", "--metrics-addr", "0.0.0.0:9100",
    "--control-addr", "0.0.0.0:9200", "--control-secret", "/etc/blackhole/control/secret",
]  # fmt: skip


def test_the_gateway_mounts_the_client_certificate_the_controller_keeps_renewed(helm):
    """Where the gateway reads its client certificate from, the Secret the controller's
    --gateway-client-secret names, mounted whole (the kubelet's ..data link included)."""
    from controller.cli import paths

    documents = helm.render(*ci("default"))
    pod = gateway(documents)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "client-certificate"]
    data = next(m for m in container["volumeMounts"] if m["name"] == "data")["mountPath"]
    assert mount["mountPath"] == str(paths.client_certificates(Path(data), "gateway"))
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == "client-certificate"]
    assert "items" not in volume["secret"]
    assert volume["secret"]["optional"] is True  # the leader makes it; the gateway may be first
    args = controller(documents, RELEASE)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--gateway-client-secret") + 1] == volume["secret"]["secretName"]


def test_gateway_is_a_deployment_of_its_own_with_the_control_port(helm):
    """`bhctl gateway` replicas, ready once routed; the controller finds them from a
    headless Service and proves the control secret both mount."""
    documents = helm.render(*ci("default"))
    deployment = gateway(documents)
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "gateway"
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "blackhole/controller:0.1.0"  # the same image
    assert container["command"] == ["bhctl"]
    assert container["args"] == GATEWAY_ARGS
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "grpc": 8081, "metrics": 9100, "control": 9200}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["automountServiceAccountToken"] is False  # it calls no Kubernetes API
    control = find(documents, "Service", f"{RELEASE}-gateway-control")
    assert control["spec"]["clusterIP"] == "None"
    assert control["spec"]["selector"].items() <= labels.items()
    assert "publishNotReadyAddresses" not in control["spec"]  # not-ready listed as such
    assert control["spec"]["ports"] == [
        {"name": "control", "port": 9200, "targetPort": "control", "protocol": "TCP"}
    ]
    secret = find(documents, "Secret", f"{RELEASE}-gateway-control")
    assert len(base64.b64decode(secret["data"]["secret"])) >= 16
    for deployed in (deployment, controller(documents)):
        spec = deployed["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "control-secret")
        assert volume["secret"]["secretName"] == f"{RELEASE}-gateway-control"
        mount = next(
            m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "control-secret"
        )
        assert mount["mountPath"] == "/etc/blackhole/control"
    budget = find(documents, "PodDisruptionBudget", f"{RELEASE}-gateway")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    single = helm.render(*ci("default"), "--set", "gateway.replicas=1")
    assert gateway(single)["spec"]["replicas"] == 1
    assert f"{RELEASE}-gateway" not in {
        d["metadata"]["name"] for d in single if d["kind"] == "PodDisruptionBudget"
    }
    mine = helm.render(*ci("default"), "--set", "gateway.controlSecret.existingSecret=mine")
    assert f"{RELEASE}-gateway-control" not in {
        d["metadata"]["name"] for d in mine if d["kind"] == "Secret"
    }
    spec = gateway(mine)["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "control-secret")
    assert volume["secret"]["secretName"] == "mine"


def test_controller_pod(helm):
    template = controller(helm.render(*ci("default")))["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert SELECTOR.items() <= template["metadata"]["labels"].items()
    assert "blackhole.dev/leader" not in template["metadata"]["labels"]
    assert container["image"] == "blackhole/controller:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]} == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9100}  # calls go to the gateway's own pods
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/lib/blackhole"]["name"]]["emptyDir"] == {}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {}
    assert controller(helm.render(*ci("default")))["spec"]["replicas"] == 2


def test_image_pinned_by_digest(helm):
    (container,) = controller(helm.render(*ci("all")), "bh")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == (
        "registry.example.com/blackhole/controller@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert container["imagePullPolicy"] == "Always"


def test_gateway_tokens_reach_the_gateway_as_a_file_it_accepts(helm, tmp_path):
    """The chart's Secret holds a tokens file the gateway loads; the pod hands it over 0600."""
    documents = helm.render(*ci("all"))
    secret = find(documents, "Secret", "bh-gateway-tokens")
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_bytes(base64.b64decode(secret["data"]["tokens.yaml"]))
    tokens_file.chmod(0o600)
    loaded = auth.Tokens.load(tokens_file)
    assert [(t.name, sorted(t.plugins), sorted(t.certificates)) for t in loaded.tokens] == [
        ("ops", ["*"], []),
        ("billing", ["analytics", "kv-store"], []),
        ("reports", ["analytics"], ["reports.example.com"]),
    ]

    pod = gateway(documents, "bh")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (prepare,) = pod["initContainers"]
    (container,) = pod["containers"]
    prepare_mounts = {m["name"]: m["mountPath"] for m in prepare["volumeMounts"]}
    secret_volume = volumes["gateway-tokens-secret"]["secret"]
    assert secret_volume["secretName"] == "bh-gateway-tokens"
    assert secret_volume["defaultMode"] == 0o400
    # The init container copies it, as the gateway's user, mode 0600, into
    # the memory volume the gateway reads it from.
    script = prepare["command"][-1]
    source = f"{prepare_mounts['gateway-tokens-secret']}/tokens.yaml"
    copied = f"{prepare_mounts['gateway-tokens']}/tokens.yaml"
    assert f"install -m 0600 {source} {copied}" in script
    assert volumes["gateway-tokens"]["emptyDir"]["medium"] == "Memory"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "gateway-tokens")
    assert mount == {
        "name": "gateway-tokens",
        "mountPath": "/etc/blackhole/gateway",
        "readOnly": True,
    }
    # ... and makes the data directory the gateway's own (an emptyDir's root is root's).
    assert f"install -d -m 0700 {prepare_mounts['data']}/blackhole" in script
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/blackhole")
    assert (data["name"], data["subPath"]) == ("data", "blackhole")
    # A change of tokens rolls the pods: the gateway reads the file once.
    annotations = gateway(documents, "bh")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/gateway-tokens" in annotations


def test_gateway_tls_reaches_the_gateway_as_files_it_accepts(helm):
    """gateway.tls: the certificate and key copied 0600 as the gateway's user, the client CA
    beside them, the flags that name them, and a readiness probe the kubelet can pass."""
    pod = gateway(helm.render(*ci("all")), "bh")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (prepare,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert volumes["gateway-tls-secret"]["secret"]["secretName"] == "gateway-tls"
    assert volumes["gateway-client-ca-secret"]["secret"]["secretName"] == "gateway-client-ca"
    assert volumes["gateway-tls"]["emptyDir"]["medium"] == "Memory"
    script = prepare["command"][-1]
    assert "install -m 0600 /prepare/tls-secret/tls.key /prepare/tls/tls.key" in script
    assert "install -m 0644 /prepare/client-ca-secret/ca.crt /prepare/tls/client-ca.crt" in script
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    args = container["args"]
    for flag, name in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        assert args[args.index(flag) + 1] == f"{mounts['gateway-tls']}/{name}"
    assert args[args.index("--tls-client-ca") + 1] == f"{mounts['gateway-tls']}/client-ca.crt"
    # Client certificates required: the kubelet, which has none, checks the port only.
    assert container["readinessProbe"]["tcpSocket"] == {"port": "http"}

    tls_only = helm.render(*ci("default"), "--set", "gateway.tls.secretName=gateway-tls")
    (container,) = gateway(tls_only)["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert "--tls-client-ca" not in container["args"]
    plaintext = gateway(helm.render(*ci("default")))["spec"]["template"]["spec"]
    assert "--tls-cert" not in plaintext["containers"][0]["args"]
    assert "gateway-tls" not in {v["name"] for v in plaintext["volumes"]}


def test_existing_tokens_secret_is_used_as_it_is(helm):
    documents = helm.render(*ci("single-replica"))
    secrets = [d["metadata"]["name"] for d in documents if d["kind"] == "Secret"]
    assert secrets == [f"{RELEASE}-gateway-control"]  # no tokens Secret of the chart's
    pod = gateway(documents)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "gateway-tokens-secret")
    assert volume["secret"]["secretName"] == "blackhole-gateway-tokens"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "gateway.tokens: the gateway listens on the pod network, so it needs tokens"),
        (
            (*ci("default"), "--set", "gateway.tokens.existingSecret=mine"),
            "gateway.tokens: give either existingSecret or items, not both",
        ),
        (
            (*ci("default"), "--set", "leaderElection.enabled=false"),
            "leaderElection.enabled: false runs every replica as the leader; set replicas: 1",
        ),
        (
            (*ci("default"), "--set", "gateway.tls.clientCASecretName=ca"),
            "gateway.tls.clientCASecretName: client certificates are asked for over TLS",
        ),
    ],
    ids=["no-tokens", "both-tokens", "several-leaders", "client-ca-without-tls"],
)
def test_template_refuses_an_unusable_release(helm, args, message):
    result = helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("replicas=0", "/replicas"),
        ("image.tag=latest", "/image/tag"),
        ("image.digest=sha256:abc", "/image/digest"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("gateway.service.type=Public", "/gateway/service/type"),
        ("gateway.service.httpPort=70000", "/gateway/service/httpPort"),
        ("gateway.tokens.items[0].sha256=secret", "/gateway/tokens/items/0/sha256"),
        ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
        ("resources.requests.memory=12XB", "/resources/requests/memory"),
        ("podLabels.blackhole\\.dev/leader=true", "/podLabels"),
        ("serviceMonitor.interval=often", "/serviceMonitor/interval"),
        ("grafanaDashboard.enabld=true", "/grafanaDashboard"),
        ("replica=3", "'replica' not allowed"),
    ],
)
def test_schema_refuses_bad_values(helm, setting, path):
    result = helm("template", RELEASE, str(CHART), *ci("default"), "--set", setting)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert path in result.stderr, result.stderr


def test_gateway_service_selects_the_gateway_replicas(helm):
    documents = helm.render(*ci("default"))
    service = find(documents, "Service", f"{RELEASE}-gateway")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == GATEWAY_SELECTOR
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"},
        {
            "name": "grpc",
            "port": 8081,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        },
    ]
    # The gateway's pods, and not the controller's, leader or not.
    assert (
        GATEWAY_SELECTOR.items()
        <= gateway(documents)["spec"]["template"]["metadata"]["labels"].items()
    )
    labels = controller(documents)["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= (labels | LEADER).items()


def test_one_deployment_each_for_the_controller_and_the_gateway(helm):
    for path in CI_VALUES:
        components = sorted(
            d["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in helm.render(*values(path))
            if d["kind"] == "Deployment"
        )
        assert components == ["controller", "gateway"]


def test_metrics_service_and_service_monitor(helm):
    documents = helm.render(*ci("all"))
    metrics = find(documents, "Service", "bh-metrics")
    # Every controller and gateway pod of the release: both serve /metrics on that port.
    assert metrics["spec"]["selector"] == {
        "app.kubernetes.io/name": "blackhole",
        "app.kubernetes.io/instance": "blackhole",
    }
    assert metrics["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]
    monitor = find(documents, "ServiceMonitor", "bh")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in documents if d["kind"] == "Service"]
    selected = [
        s["metadata"]["name"]
        for s in services
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert selected == ["bh-metrics"]
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    ]


def test_prometheus_rule_holds_the_alert_rules(helm):
    rule = find(helm.render(*ci("all")), "PrometheusRule", "bh")
    source = yaml.safe_load((TOP / "deploy" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"] == source
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_config_map_holds_the_dashboard(helm):
    config_map = find(helm.render(*ci("all")), "ConfigMap", "bh-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Blackhole"}
    source = json.loads((TOP / "deploy" / "grafana" / "blackhole-dashboard.json").read_text())
    assert json.loads(config_map["data"]["blackhole-dashboard.json"]) == source


@pytest.mark.parametrize(
    ("copy_", "source"),
    [
        ("files/rules.yml", "deploy/prometheus/rules.yml"),
        ("files/blackhole-dashboard.json", "deploy/grafana/blackhole-dashboard.json"),
    ],
)
def test_chart_copies_equal_their_sources(copy_, source):
    assert (CHART / copy_).read_bytes() == (TOP / source).read_bytes(), (
        f"charts/blackhole/{copy_} differs from {source}: run `make manifests`"
    )


def test_monitoring_objects_are_off_by_default(helm):
    documents = helm.render(*ci("default"))
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap"} & set(kinds(documents))


def rbac_rules() -> dict[str, list[dict[str, Any]]]:
    rules: dict[str, list[dict[str, Any]]] = yaml.safe_load(
        (CHART / "files" / "rbac-rules.yaml").read_text()
    )
    return rules


def test_rbac_for_every_namespace(helm):
    documents = helm.render(*ci("default"))
    rules = rbac_rules()
    assert find(documents, "ClusterRole", RELEASE)["rules"] == rules["watched"]
    binding = find(documents, "ClusterRoleBinding", RELEASE)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": RELEASE,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    ]
    role = find(documents, "Role", f"{RELEASE}-leader")
    assert "namespace" not in role["metadata"]
    assert role["rules"] == rules["release"]
    leader_binding = find(documents, "RoleBinding", f"{RELEASE}-leader")
    assert leader_binding["roleRef"]["name"] == f"{RELEASE}-leader"
    assert leader_binding["subjects"] == binding["subjects"]
    assert [d["kind"] for d in documents].count("Role") == 1
    pod = controller(documents)["spec"]["template"]["spec"]
    assert (
        pod["serviceAccountName"] == find(documents, "ServiceAccount", RELEASE)["metadata"]["name"]
    )


def test_rbac_for_watched_namespaces(helm):
    documents = helm.render(*ci("all"))
    rules = rbac_rules()
    assert not {"ClusterRole", "ClusterRoleBinding"} & set(kinds(documents))
    subject = {"kind": "ServiceAccount", "name": "blackhole-controller", "namespace": NAMESPACE}
    roles = [d for d in documents if d["kind"] == "Role" and d["metadata"]["name"] == "bh-watch"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == rules["watched"] for r in roles)
    bindings = [
        d for d in documents if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "bh-watch"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"] == [subject] for b in bindings)
    assert all(b["roleRef"]["name"] == "bh-watch" for b in bindings)
    assert find(documents, "Role", "bh-leader")["rules"] == rules["release"]
    pod = controller(documents, "bh")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "blackhole-controller"


def test_rbac_can_be_left_out(helm):
    documents = helm.render(
        *ci("default"),
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=theirs",
    )
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"} & set(
        kinds(documents)
    )
    assert controller(documents)["spec"]["template"]["spec"]["serviceAccountName"] == "theirs"


def test_pod_disruption_budget_only_with_several_replicas(helm):
    budget = find(helm.render(*ci("default")), "PodDisruptionBudget", RELEASE)
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": SELECTOR}}
    single = helm.render(*ci("single-replica"), "--set", "gateway.replicas=1")
    assert "PodDisruptionBudget" not in kinds(single)


@pytest.mark.parametrize(
    ("name", "gateway"),
    [
        ("default", "svc/blackhole-gateway 8080:8080"),
        ("single-replica", "svc/blackhole-gateway 8080:8080"),
        ("all", "svc/bh-gateway 8080:80"),
    ],
)
def test_notes_say_how_to_use_it(helm, name, gateway):
    result = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *ci(name))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:\n", 1)[1]
    assert "kind: Plugin" in notes
    assert "kubectl get plugins" in notes
    assert f"kubectl -n {NAMESPACE} port-forward {gateway}" in notes


def test_plain_manifests_are_what_make_manifests_renders(helm, tmp_path):
    """`make manifests` in a copy of the repository changes nothing that is committed."""
    for part in ("scripts", "charts", "deploy"):
        shutil.copytree(TOP / part, tmp_path / part)
    result = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "helm.sh"), "manifests"],
        env={**helm.env, "BIN_DIR": str(BIN)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for generated in (
        "deploy/kubernetes/blackhole.yaml",
        "charts/blackhole/files/rules.yml",
        "charts/blackhole/files/blackhole-dashboard.json",
    ):
        assert (tmp_path / generated).read_text() == (TOP / generated).read_text(), (
            f"{generated} is stale: run `make manifests`"
        )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_plain_manifests_apply_in_their_namespace(helm, version):
    kubectl = installed("kubectl")
    result = subprocess.run(
        [str(kubectl), "kustomize", str(PLAIN)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for document in documents:
        validate(document, version)
        namespace = document["metadata"].get("namespace")
        assert namespace == (None if document["kind"] in cluster_scoped else NAMESPACE), document[
            "kind"
        ]
    assert "Secret" not in {d["kind"] for d in documents}  # both are the operator's
    for document in documents:
        if document["kind"] == "Deployment":
            pod = document["spec"]["template"]["spec"]
            secrets = {
                v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v
            }
            assert secrets["control-secret"] == "blackhole-gateway-control"
            if document["metadata"]["name"] == "blackhole-gateway":
                assert secrets["gateway-tokens-secret"] == "blackhole-gateway-tokens"


def test_the_dashboard_service_selects_the_leader_only(helm):
    """The dashboard runs where the controller acts: the pod holding the Lease."""
    documents = helm.render(*ci("all"))
    [service] = [
        d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "bh-dashboard"
    ]
    assert service["spec"]["selector"]["blackhole.dev/leader"] == "true"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "controller"
    assert service["spec"]["ports"][0]["targetPort"] == "dashboard"
    default = helm.render(*ci("default"))
    assert not [d for d in default if d["metadata"]["name"].endswith("-dashboard")]


def test_plugin_pod_options_reach_the_controllers_command_line(helm):
    """plugins.*: image pull secrets, the DNS pods and NetworkPolicy enforcement, as flags
    (the DNS ones only when they differ from the controller's own defaults)."""
    values = [
        "--set", "plugins.imagePullSecrets={registry-a,registry-b}",
        "--set", "plugins.dns.namespace=openshift-dns",
        "--set", "plugins.dns.podLabels.k8s-app=null",
        "--set", "plugins.dns.podLabels.dns\\.operator\\.openshift\\.io/daemonset-dns=default",
        "--set", "plugins.networkPolicyEnforced=true",
        "--set", "plugins.storageClass=fast-ssd",
    ]  # fmt: skip
    (container,) = controller(helm.render(*ci("default"), *values))["spec"]["template"]["spec"][
        "containers"
    ]
    args = container["args"]
    assert args[args.index("--lease-name") + 2 :] == [
        "--image-pull-secret", "registry-a", "--image-pull-secret", "registry-b",
        "--dns-namespace", "openshift-dns",
        "--dns-selector", "dns.operator.openshift.io/daemonset-dns=default",
        "--storage-class", "fast-ssd",
        "--network-policy-enforced",
    ]  # fmt: skip


# The Plugin CRD: a template (Helm never upgrades crds/), kept on uninstall.

CRD_NAME = "plugins.blackhole.dev"
CRD_FILE = CHART / "files" / "crds" / f"{CRD_NAME}.yaml"


def _rendered_crd(documents: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return find(documents, "CustomResourceDefinition", CRD_NAME)


def test_the_crd_is_a_template_kept_on_uninstall(helm):
    assert not (CHART / "crds").exists(), "helm installs crds/ once and never upgrades it"
    crd = _rendered_crd(helm.render(*ci("default")))
    generated = yaml.safe_load(CRD_FILE.read_text())
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "blackhole"
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    off = helm.render(*ci("default"), "--set", "crds.install=false")
    assert "CustomResourceDefinition" not in kinds(off)
    unkept = _rendered_crd(helm.render(*ci("default"), "--set", "crds.keep=false"))
    assert "annotations" not in unkept["metadata"]


def older_chart(directory: Path) -> Path:
    """The chart as a previous release: version 0.0.1, and its CRD without spec.dependsOn."""
    old = directory / "blackhole"
    shutil.copytree(CHART, old)
    chart = yaml.safe_load((old / "Chart.yaml").read_text())
    (old / "Chart.yaml").write_text(yaml.safe_dump({**chart, "version": "0.0.1"}))
    crd = yaml.safe_load(CRD_FILE.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del spec["properties"]["dependsOn"]
    (old / "files" / "crds" / CRD_FILE.name).write_text(yaml.safe_dump(crd))
    return old


def test_an_upgrade_renders_the_newer_charts_crd_over_the_older_one(helm, tmp_path):
    """Both versions render the CRD as a release object of the same name, so `helm upgrade`
    replaces the old schema with the new one (the stand-in test of test_kubernetes.py
    applies both and writes the new field)."""
    old = older_chart(tmp_path)
    result = helm("template", RELEASE, str(old), "--namespace", NAMESPACE, *ci("default"))
    assert result.returncode == 0, result.stderr
    before = _rendered_crd(tuple(d for d in yaml.safe_load_all(result.stdout) if d))
    after = _rendered_crd(helm.render(*ci("default")))
    schema = [
        "spec",
        "versions",
        "0",
        "schema",
        "openAPIV3Schema",
        "properties",
        "spec",
        "properties",
    ]

    def fields(crd: dict[str, Any]) -> set[str]:
        node: Any = crd
        for part in schema:
            node = node[int(part)] if part.isdigit() else node[part]
        return set(node)

    assert fields(after) - fields(before) == {"dependsOn"}
    assert before["metadata"]["labels"]["helm.sh/chart"] == "blackhole-0.0.1"
    for crd in (before, after):
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


# NetworkPolicies of the controller and gateway pods.


def _policy(documents: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    return find(documents, "NetworkPolicy", name)


def _ports(deployment: dict[str, Any]) -> set[str]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return {p["name"] for c in containers for p in c.get("ports") or []}


def test_network_policies_select_the_pods_and_open_only_their_ports(helm):
    documents = helm.render(*ci("default"))
    for policy_name, deployment in (
        (RELEASE, controller(documents)),
        (f"{RELEASE}-gateway", gateway(documents)),
    ):
        policy = _policy(documents, policy_name)["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
        opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        assert opened <= _ports(deployment), f"{policy_name} opens a port its pods lack"
    gateway_policy = _policy(documents, f"{RELEASE}-gateway")["spec"]
    (control,) = [r for r in gateway_policy["ingress"] if r["ports"][0]["port"] == "control"]
    assert control["from"] == [{"podSelector": {"matchLabels": SELECTOR}}]
    callers = [r for r in gateway_policy["ingress"] if r["ports"][0]["port"] == "http"]
    assert "from" not in callers[0]  # default: every pod may call the gateway


def test_network_policies_admit_only_the_configured_peers(helm):
    apps = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    monitoring = [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
    documents = helm.render(
        *ci("default"),
        "--set-json", f"networkPolicy.gatewayFrom={json.dumps(apps)}",
        "--set-json", f"networkPolicy.metricsFrom={json.dumps(monitoring)}",
        "--set", "dashboard.enabled=true",
    )  # fmt: skip
    by_port = {
        (name, rule["ports"][0]["port"]): rule.get("from")
        for name in (RELEASE, f"{RELEASE}-gateway")
        for rule in _policy(documents, name)["spec"]["ingress"]
    }
    assert by_port[(f"{RELEASE}-gateway", "http")] == apps
    assert by_port[(f"{RELEASE}-gateway", "metrics")] == monitoring
    assert by_port[(RELEASE, "metrics")] == monitoring
    assert by_port[(RELEASE, "dashboard")] is None
    off = helm.render(*ci("default"), "--set", "networkPolicy.enabled=false")
    assert "NetworkPolicy" not in kinds(off)
