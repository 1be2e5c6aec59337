"""Kubernetes mode, end to end: ``bhctl run --kubernetes`` against an API server.

By default the API server is kmock, extended (``kube.py`` says with what, and
what it does not do), with pods run on the real Docker engine by a stand-in
kubelet, so the plugins, their tokens, the handshake, the state transfer and
the gateway are all real. With ``-m cluster`` and ``KUBECONFIG``, the same
scenarios run against a real cluster instead (kind, k3d), where the images
must be loadable by the cluster's nodes (``kind load docker-image ...``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from controller import __version__ as controller_version
from controller import kubeapi, pki
from controller.cli import paths
from controller.runtimes import base, container
from controller.runtimes import kubernetes_manifests as manifests
from controller.state.snapshots import CHECKPOINT_REASONS

from . import kube
from .conftest import (
    BHCTL,
    PLUGIN_IMAGE,
    TIME_SCALE,
    EngineUnderTest,
    get_engine,
    new_controller_id,
    wait_for,
)

CRD = Path(__file__).parents[2] / "deploy" / "kubernetes" / "crd-plugins.blackhole.dev.yaml"
NAMESPACE = "plugins"
SYSTEM = "blackhole-system"
GROUP, VERSION, PLURAL = "blackhole.dev", "v1alpha1", "plugins"


def _json(response: Any) -> dict[str, Any]:
    """The JSON of a response read with ``_preload_content=False`` (no client models)."""
    return dict(json.loads(response.data))


@dataclass
class Api:
    """Where the scenarios talk to Kubernetes: the official client, over HTTP."""

    client: k8s_client.ApiClient
    kubeconfig: Path
    cluster: kube.Cluster | None = None
    """The stand-in, when not on a real cluster."""

    @property
    def objects(self) -> k8s_client.CustomObjectsApi:
        return k8s_client.CustomObjectsApi(self.client)

    @property
    def apps(self) -> k8s_client.AppsV1Api:
        return k8s_client.AppsV1Api(self.client)

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.client)

    @property
    def networking(self) -> k8s_client.NetworkingV1Api:
        return k8s_client.NetworkingV1Api(self.client)

    def apply_plugin(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Plugin",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }
        try:
            self.objects.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.objects.patch_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": spec},
                _content_type="application/merge-patch+json",
            )  # fmt: skip

    def plugin(self, name: str) -> dict[str, Any] | None:
        try:
            return _json(
                self.objects.get_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL, name, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.plugin(name) or {}).get("status") or {})

    def ready(self, name: str) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in self.status(name).get("conditions", [])
        )

    def names(self, kind: str) -> set[str]:
        listing = {
            "deployments": self.apps.list_namespaced_deployment,
            "services": self.core.list_namespaced_service,
            "networkpolicies": self.networking.list_namespaced_network_policy,
            "persistentvolumeclaims": self.core.list_namespaced_persistent_volume_claim,
            "secrets": self.core.list_namespaced_secret,
            "pods": self.core.list_namespaced_pod,
        }[kind](NAMESPACE, _preload_content=False)
        items = _json(listing)["items"]
        return {
            i["metadata"]["name"]
            for i in items
            if (i["metadata"].get("labels") or {}).get(base.LABEL_MANAGED_BY) == base.MANAGED_BY
        }

    def read(self, kind: str, name: str) -> dict[str, Any]:
        read = {
            "deployments": self.apps.read_namespaced_deployment,
            "services": self.core.read_namespaced_service,
            "networkpolicies": self.networking.read_namespaced_network_policy,
            "persistentvolumeclaims": self.core.read_namespaced_persistent_volume_claim,
            "secrets": self.core.read_namespaced_secret,
        }[kind]
        return _json(read(name, NAMESPACE, _preload_content=False))


def _namespaces(client: k8s_client.ApiClient) -> None:
    core = k8s_client.CoreV1Api(client)
    for namespace in (NAMESPACE, SYSTEM):
        body: Any = {"metadata": {"name": namespace}}
        try:
            core.create_namespace(body)
        except ApiException as e:
            if e.status != 409:
                raise


def install_crd(client: k8s_client.ApiClient, path: Path = CRD) -> None:
    """Create or replace the CRD from ``path``, as ``kubectl apply`` (or Helm) would."""
    extensions = k8s_client.ApiextensionsV1Api(client)
    body = yaml.safe_load(path.read_text())
    try:
        extensions.create_custom_resource_definition(body, _preload_content=False)
    except ApiException as e:
        if e.status != 409:
            raise
        name = body["metadata"]["name"]
        current = _json(extensions.read_custom_resource_definition(name, _preload_content=False))
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        extensions.replace_custom_resource_definition(name, body, _preload_content=False)


@pytest.fixture(params=["kmock", pytest.param("cluster", marks=pytest.mark.cluster)])
def api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    if request.param == "cluster":
        if not os.environ.get("KUBECONFIG"):
            pytest.fail("-m cluster needs KUBECONFIG naming a cluster (kind, k3d) to test against")
        with kubeapi.connect(os.environ["KUBECONFIG"]) as real:
            _namespaces(real)
            yield Api(real, Path(os.environ["KUBECONFIG"]))
        return
    engine = get_engine(container.Engine.DOCKER)
    with kube.Cluster(engine.client, tmp_path) as cluster, cluster.api() as stand_in:
        _namespaces(stand_in)
        install_crd(stand_in)  # as the chart installs it
        yield Api(stand_in, cluster.kubeconfig(), cluster)


@dataclass
class KubeController:
    """``bhctl run --kubernetes`` as a real process."""

    api: Api
    root: Path
    engine: EngineUnderTest
    name: str = "one"
    controller_id: str = field(default_factory=new_controller_id)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.data = self.root / f"data-{self.name}"
        self.log = self.root / f"controller-{self.name}.log"

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        command = [
            str(BHCTL), "run", "--kubernetes", "--kubeconfig", str(self.api.kubeconfig),
            "--data-dir", str(self.data), "--controller-id", self.controller_id,
            "--lease-namespace", SYSTEM, "--lease-name", f"bh-{self.controller_id}",
            # Lease times shorter than the defaults (15/10/2 s) for quicker take-overs, scaled
            # for a loaded machine: a renewal that misses its deadline makes the leader exit 1,
            # as it must, and the stand-in API server (Python, beside the whole suite) can take
            # a second to answer where a real one takes milliseconds.
            "--lease-seconds", f"{9 * TIME_SCALE:g}", "--renew-seconds", f"{6 * TIME_SCALE:g}",
            "--retry-seconds", f"{1 * TIME_SCALE:g}",
            "--resync-seconds", "5", "--gateway-addr", "127.0.0.1:0",
            "--gateway-grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
            *extra,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "POD_NAME": "", **(env or {})},
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def call(self, name: str, method: str, payload: Any = None) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        address = json.loads((self.data / "addresses.json").read_text())["http"]
        request = urllib.request.Request(
            f"http://{address}/v1/namespaces/{NAMESPACE}/plugins/{name}/call/{method}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def controllers(api: Api, tmp_path: Path) -> Iterator[list[KubeController]]:
    started: list[KubeController] = []
    engine = get_engine(container.Engine.DOCKER)

    def make(name: str, controller_id: str | None = None) -> KubeController:
        made = KubeController(api, tmp_path, engine, name)
        if controller_id:
            made.controller_id = controller_id
        started.append(made)
        return made

    started.append(KubeController(api, tmp_path, engine))
    yield started
    for c in started:
        c.stop()
    if api.cluster is not None and api.cluster.server is not None:
        # A real server would have refused these: the controller must send none.
        invalid = [
            r
            for r in api.cluster.server.refused
            if r.agent.startswith("blackhole-controller/") and r.status in (400, 422)
        ]
        assert invalid == [], "the API server refused the controller's writes"
        lost = [p for p in api.cluster.server.pruned if p[0].startswith("blackhole-controller/")]
        assert lost == [], "the CRD's schema dropped fields the controller wrote"


def _spec(version: str = "1.0.0", **more: Any) -> dict[str, Any]:
    return {
        "image": PLUGIN_IMAGE,
        "version": version,
        "resources": {"cpu": "250m", "memory": "64Mi"},
        **more,
    }


def test_a_plugin_object_becomes_a_deployment_services_policy_and_volumes(
    api: Api, controllers: list[KubeController]
):
    controller = controllers[0]
    controller.start()
    api.apply_plugin("kv", _spec(volumes=[{"name": "data", "mountPath": "/data", "size": "1Gi"}]))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    cid = controller.controller_id
    blue = f"bh-{cid}-kv-blue"
    assert blue in api.names("deployments")
    assert {blue, f"bh-{cid}-kv"} <= api.names("services")
    assert f"bh-{cid}-kv" in api.names("networkpolicies")
    assert f"bh-{cid}-kv-data" in api.names("persistentvolumeclaims")
    deployment = api.read("deployments", blue)
    pod = deployment["spec"]["template"]["spec"]
    security = pod["containers"][0]["securityContext"]
    assert security["runAsNonRoot"]
    assert security["readOnlyRootFilesystem"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "250m", "memory": "64Mi"}
    plugin = api.plugin("kv")
    assert plugin is not None
    uid = plugin["metadata"]["uid"]
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == uid
    assert "blackhole.dev/cleanup" in plugin["metadata"]["finalizers"]
    # The printer columns kubectl shows are all filled.
    for column in kube.printer_columns(CRD):
        assert kube.json_path(plugin, column["jsonPath"]) not in (None, ""), column
    status, answer = controller.call("kv", "echo", {"hello": "kubernetes"})
    assert (status, answer) == (200, {"hello": "kubernetes"})
    # The plugin protocol refuses a caller without the plugin's token.
    token = base64.b64decode(api.read("secrets", f"bh-{cid}-kv-token")["data"]["token"]).decode()
    assert len(token) > 30


def test_deleting_the_plugin_removes_everything_then_the_object(
    api: Api, controllers: list[KubeController]
):
    controller = controllers[0]
    controller.start()
    api.apply_plugin("gone", _spec(volumes=[{"name": "data", "mountPath": "/data", "size": "1Gi"}]))
    wait_for(lambda: api.ready("gone"), timeout=90, what=f"gone Ready ({controller.log})")
    api.objects.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "gone")
    wait_for(lambda: api.plugin("gone") is None, timeout=60, what="the Plugin object deleted")
    for kind in ("deployments", "services", "networkpolicies", "persistentvolumeclaims", "secrets"):
        assert api.names(kind) == set(), kind


def _stable_color(api: Api, controller: KubeController, name: str) -> str:
    service = api.read("services", f"bh-{controller.controller_id}-{name}")
    return str(service["spec"]["selector"][base.LABEL_COLOR])


def test_a_version_change_swaps_blue_green_and_flips_the_stable_service_after_the_import(
    api: Api, controllers: list[KubeController]
):
    controller = controllers[0]
    controller.start()
    api.apply_plugin("kv", _spec(env={"STATE_VERSION": "1"}, state={"version": 1}))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    for key in range(20):
        assert controller.call("kv", "put", {"key": key, "value": f"v{key}"})[0] == 200
    assert _stable_color(api, controller, "kv") == "blue"
    api.apply_plugin("kv", _spec("1.1.0", env={"STATE_VERSION": "1"}, state={"version": 1}))

    def promoted() -> bool:
        last = api.status("kv").get("lastSwap") or {}
        return last.get("result") == "Promoted" and last.get("to") == "1.1.0"

    wait_for(promoted, timeout=120, what=f"the swap to 1.1.0 ({controller.log})")
    assert api.status("kv")["activeColor"] == "green"
    wait_for(lambda: _stable_color(api, controller, "kv") == "green", what="the stable Service")
    for key in range(20):
        assert controller.call("kv", "get", {"key": key}) == (200, {"value": f"v{key}"})
    wait_for(
        lambda: api.names("deployments") == {f"bh-{controller.controller_id}-kv-green"},
        timeout=60,
        what="blue scaled down",
    )
    if api.cluster is not None:
        # In the order the API server saw them: the status write that flipped to
        # green (the swap promoted: state imported) came before the Service's flip.
        requests = api.cluster.writes()
        flip = next(
            i
            for i, (path, body) in enumerate(requests)
            if path.endswith("/plugins/kv/status") and '"activeColor": "green"' in body
        )
        moved = next(
            i
            for i, (path, body) in enumerate(requests)
            if path.endswith(f"/services/bh-{controller.controller_id}-kv") and '"green"' in body
        )
        assert flip < moved


def test_a_failed_import_rolls_back_to_the_old_color(api: Api, controllers: list[KubeController]):
    controller = controllers[0]
    controller.start()
    api.apply_plugin("kv", _spec(env={"STATE_VERSION": "1"}, state={"version": 1}))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    assert controller.call("kv", "put", {"key": "a", "value": 1})[0] == 200
    failing = {"STATE_VERSION": "1", "FAIL": "import"}
    api.apply_plugin("kv", _spec("1.1.0", env=failing, state={"version": 1}))

    def rolled_back() -> bool:
        return (api.status("kv").get("lastSwap") or {}).get("result") == "RolledBack"

    wait_for(rolled_back, timeout=120, what=f"the rollback ({controller.log})")
    status = api.status("kv")
    assert status["lastSwap"]["reason"] == "SwapFailedImport"
    assert status["activeColor"] == "blue"
    assert _stable_color(api, controller, "kv") == "blue"
    assert controller.call("kv", "get", {"key": "a"}) == (200, {"value": 1})
    wait_for(
        lambda: api.names("deployments") == {f"bh-{controller.controller_id}-kv-blue"},
        timeout=60,
        what="green removed",
    )


def _leader(api: Api, controller: KubeController) -> str:
    """Who holds the controllers' Lease ("" for nobody)."""
    try:
        response = k8s_client.CoordinationV1Api(api.client).read_namespaced_lease(
            f"bh-{controller.controller_id}", SYSTEM, _preload_content=False
        )
    except ApiException as e:
        if e.status == 404:
            return ""
        raise
    return str(_json(response)["spec"].get("holderIdentity") or "")


def test_only_the_lease_holder_acts_and_the_other_takes_over(
    api: Api, controllers: list[KubeController]
):
    first = controllers[0]
    second = KubeController(api, first.root, first.engine, "two", first.controller_id)
    controllers.append(second)
    first.start()
    wait_for(lambda: _leader(api, first) != "", timeout=30, what="a leader")
    leader = _leader(api, first)
    second.start()
    api.apply_plugin("one", _spec())
    wait_for(lambda: api.ready("one"), timeout=90, what=f"one Ready ({first.log})")
    assert _leader(api, first) == leader
    assert first.process is not None
    assert second.process is not None
    assert leader.endswith(f"-{first.process.pid}")
    if api.cluster is not None:
        # Every write but the Lease's came from the leader (by its User-Agent).
        writers = {
            agent
            for agent, path in api.cluster.writers()
            if "/leases" not in path and agent.startswith("blackhole-controller/")
        }
        assert writers == {f"blackhole-controller/{controller_version} ({leader})"}
    assert "Created" not in second.log_text()
    # The leader stops renewing (frozen): the other takes over and acts.
    os.kill(first.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _leader(api, first) not in ("", leader), timeout=30, what="a takeover")
        api.apply_plugin("two", _spec())
        wait_for(lambda: api.ready("two"), timeout=90, what=f"two Ready ({second.log})")
        assert "Created" in second.log_text()
    finally:
        os.kill(first.process.pid, signal.SIGCONT)
    # The old leader sees it lost the Lease and steps down: it exits 1, to be restarted.
    assert first.process.wait(timeout=30) == 1
    assert "lost" in first.log_text()
    if api.cluster is not None:
        # Woken up, it wrote nothing more: after the new leader's first write, every
        # write but the Lease's is the new leader's.
        new = f"blackhole-controller/{controller_version} ({_leader(api, first)})"
        writes = [(a, p) for a, p in api.cluster.writers() if "/leases" not in p]
        first_of_new = next(i for i, (agent, _) in enumerate(writes) if agent == new)
        late = {a for a, _ in writes[first_of_new:] if a.startswith("blackhole-controller/")}
        assert late == {new}


RULES = Path(__file__).parents[2] / "charts" / "blackhole" / "files" / "rbac-rules.yaml"
REQUIRED_WITHOUT_A_CALL = {("blackhole.dev", "plugins/finalizers", "update")}
"""Granted though never called: ownerReferences with blockOwnerDeletion need it (the
OwnerReferencesPermissionEnforcement admission plugin checks it on every create)."""


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _slice_endpoints(api: Api, service: str) -> list[dict[str, Any]]:
    listing = k8s_client.DiscoveryV1Api(api.client).list_namespaced_endpoint_slice(
        NAMESPACE, label_selector=f"kubernetes.io/service-name={service}", _preload_content=False
    )
    return [e for s in _json(listing)["items"] for e in s.get("endpoints") or []]


def test_endpoint_slices_list_every_pod_a_service_selects(api: Api):
    """What the controller relies on to find the gateway's replicas, on the stand-in and on a
    real cluster alike: one endpoint per running pod, with its IP, its pod, its readiness,
    and the Service's named target port resolved to the container's."""
    name = f"slices-{new_controller_id()}"
    labels = {"app.kubernetes.io/name": name}
    deployment: Any = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "plugin",
                            "image": PLUGIN_IMAGE,
                            "imagePullPolicy": "Never",
                            # It serves (and stays running) only with an address to serve on.
                            "env": [{"name": "BLACKHOLE_ADDRESS", "value": "0.0.0.0:50051"}],
                            "ports": [{"name": "proto", "containerPort": 50051}],
                        }
                    ]
                },
            },
        },
    }
    service: Any = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [{"name": "control", "port": 9200, "targetPort": "proto"}],
        },
    }
    api.core.create_namespaced_service(NAMESPACE, service)
    api.apps.create_namespaced_deployment(NAMESPACE, deployment)
    try:
        wait_for(
            lambda: (
                len([e for e in _slice_endpoints(api, name) if e["conditions"].get("ready")]) == 2
            ),
            120,
            "two ready endpoints",
        )
        listing = k8s_client.DiscoveryV1Api(api.client).list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={name}", _preload_content=False
        )
        slices = _json(listing)["items"]
        assert {p["port"] for s in slices for p in s["ports"] if p["name"] == "control"} == {50051}
        pods = _json(
            api.core.list_namespaced_pod(
                NAMESPACE, label_selector=f"app.kubernetes.io/name={name}", _preload_content=False
            )
        )["items"]
        by_pod = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
        endpoints = _slice_endpoints(api, name)
        assert {e["targetRef"]["name"]: e["addresses"][0] for e in endpoints} == by_pod
        assert {e["targetRef"]["kind"] for e in endpoints} == {"Pod"}
        api.apps.patch_namespaced_deployment(name, NAMESPACE, {"spec": {"replicas": 1}})
        wait_for(lambda: len(_slice_endpoints(api, name)) == 1, 120, "one endpoint left")
    finally:
        api.apps.delete_namespaced_deployment(name, NAMESPACE)
        api.core.delete_namespaced_service(name, NAMESPACE)
    wait_for(lambda: _slice_endpoints(api, name) == [], 120, "the slices gone with the Service")


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_the_charts_rbac_grants_exactly_what_the_controller_calls(
    api: Api, controllers: list[KubeController]
):
    """Everything the controller does, on the stand-in that records every request.

    Plugins with volumes and state, a blue/green swap, a crash loop (its logs
    read), deletion, a leader labelling its pod then giving the Lease up, and
    the gateway's replicas looked for (none runs here: the swap holds none).
    """
    assert api.cluster is not None
    pod: Any = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "blackhole-0", "namespace": SYSTEM},
        "spec": {"containers": [{"name": "controller", "image": "blackhole/controller"}]},
    }
    api.core.create_namespaced_pod(SYSTEM, pod)
    controller = controllers[0]
    secret = controller.root / "control-secret"
    secret.write_text("a-control-secret-of-some-length")
    controller.start(
        "--gateway-service",
        "bh-gateway-control",
        "--gateway-control-secret",
        str(secret),
        # The CA's and the gateways' Secrets made, and every certificate renewed once.
        "--ca-secret", "bh-ca", "--gateway-client-secret", "bh-gateway-client",
        "--client-cert-lifetime", "15", "--instance-cert-lifetime", "15",
        env={"POD_NAME": "blackhole-0", "POD_NAMESPACE": SYSTEM},
    )  # fmt: skip
    stateful: dict[str, Any] = {"env": {"STATE_VERSION": "1"}, "state": {"version": 1}}
    volume: dict[str, Any] = {"volumes": [{"name": "data", "mountPath": "/data", "size": "1Gi"}]}
    api.apply_plugin("kv", _spec(**stateful, **volume))
    api.apply_plugin("crashy", _spec(env={"MODE": "crash"}, restart={"maxRestarts": 0}))
    recreate: dict[str, Any] = {"hotSwap": {"strategy": "Recreate"}}
    small = [{"name": "data", "mountPath": "/data", "size": "1Gi"}]
    api.apply_plugin("plain", _spec(**recreate, volumes=small))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    wait_for(lambda: api.ready("plain"), timeout=90, what=f"plain Ready ({controller.log})")
    grown = [{**small[0], "size": "2Gi"}]
    api.apply_plugin("plain", _spec("1.0.1", **recreate, volumes=grown))  # replaced, claim grown
    api.apply_plugin("kv", _spec("1.1.0", **stateful, **volume))
    wait_for(
        lambda: (api.status("kv").get("lastSwap") or {}).get("result") == "Promoted",
        timeout=120,
        what=lambda: f"the swap: {json.dumps(api.status('kv'))}\n{controller.log_text()[-8000:]}",
    )
    wait_for(
        lambda: api.status("crashy").get("phase") == "Degraded", timeout=90, what="a crash loop"
    )
    leader = api.core.read_namespaced_pod("blackhole-0", SYSTEM).metadata
    assert leader is not None
    assert (leader.labels or {}).get("blackhole.dev/leader") == "true"
    wait_for(
        lambda: api.ready("plain") and api.status("plain").get("activeVersion") == "1.0.1",
        timeout=90,
        what="plain replaced",
    )
    for name in ("kv", "crashy", "plain"):
        api.objects.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    wait_for(lambda: all(api.plugin(n) is None for n in ("kv", "crashy", "plain")), timeout=60)
    controller.stop()

    calls = api.cluster.requests(agent_prefix="blackhole-controller/")
    used_watched = {(c.group, c.resource, c.verb) for c in calls if c.namespace != SYSTEM}
    used_release = {(c.group, c.resource, c.verb) for c in calls if c.namespace == SYSTEM}
    rules = yaml.safe_load(RULES.read_text())
    watched = _granted(rules["watched"])
    release = _granted(rules["release"])
    differences = {
        "granted in the watched namespaces, never used": watched
        - used_watched
        - REQUIRED_WITHOUT_A_CALL,
        "used in the watched namespaces, not granted": used_watched - watched,
        "granted in the release namespace, never used": release - used_release,
        "used in the release namespace, not granted": used_release - release,
    }
    wrong = {k: sorted(v) for k, v in differences.items() if v}
    if wrong:
        pytest.fail("the chart's RBAC rules and the calls made differ:\n" + yaml.safe_dump(wrong))


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_watch_that_expires_is_listed_again(api: Api, controllers: list[KubeController]):
    """410 Gone on every watch: the informers list again, and keep following changes."""
    assert api.cluster is not None
    controller = controllers[0]
    controller.start()
    api.apply_plugin("before", _spec())
    wait_for(lambda: api.ready("before"), timeout=90, what=f"before Ready ({controller.log})")
    api.cluster.expire_watches()
    wait_for(
        lambda: controller.log_text().count("410 Gone") >= 3,
        what="plugins, deployments and pods listed again",
    )
    api.apply_plugin("after", _spec())
    wait_for(lambda: api.ready("after"), timeout=90, what=f"after Ready ({controller.log})")


def test_an_invalid_plugin_changes_nothing_that_runs(api: Api, controllers: list[KubeController]):
    """An invalid spec, even seen first after a restart, deletes nothing: pods and volumes stay."""
    controller = controllers[0]
    controller.start()
    api.apply_plugin("kv", _spec(volumes=[{"name": "data", "mountPath": "/data", "size": "1Gi"}]))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    controller.stop()
    api.objects.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "kv",
        {"metadata": {"labels": {"blackhole.dev/owner": "me"}}},  # reserved for the controller
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    restarted = KubeController(api, controller.root, controller.engine, "again")
    restarted.controller_id = controller.controller_id
    controllers.append(restarted)
    restarted.start()

    def invalid() -> bool:
        ready = [c for c in api.status("kv").get("conditions", []) if c["type"] == "Ready"]
        return bool(ready) and ready[0]["reason"] == "InvalidSpec"

    wait_for(invalid, timeout=30, what=f"InvalidSpec in the status ({restarted.log})")
    time.sleep(7)  # past a resync and an orphan sweep (--resync-seconds 5)
    cid = controller.controller_id
    assert f"bh-{cid}-kv-blue" in api.names("deployments")
    assert f"bh-{cid}-kv-data" in api.names("persistentvolumeclaims")
    assert "blackhole.dev/owner" in next(
        c["message"] for c in api.status("kv")["conditions"] if c["type"] == "Ready"
    )


def _pods_of(api: Api, deployment: str) -> list[dict[str, Any]]:
    listing = _json(api.core.list_namespaced_pod(NAMESPACE, _preload_content=False))
    return [
        p
        for p in listing["items"]
        if p["metadata"]["name"].startswith(f"{deployment}-")
        and not p["metadata"].get("deletionTimestamp")
    ]


def _record(api: Api, name: str, color: str) -> dict[str, Any]:
    return next((i for i in api.status(name).get("instances", []) if i["color"] == color), {})


def test_a_crash_is_counted_from_restart_count_and_the_deployment_kept(
    api: Api, controllers: list[KubeController]
):
    """The kubelet restarts a crashed container itself (after its back-off): the controller
    counts the exit from restartCount and lastState, leaves the Deployment (same uid, same
    pod), and its crash-loop limit counts these restarts."""
    controller = controllers[0]
    controller.start()
    api.apply_plugin("kv", _spec(restart={"maxRestarts": 1, "windowSeconds": 600}))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    name = f"bh-{controller.controller_id}-kv-blue"
    uid = api.read("deployments", name)["metadata"]["uid"]
    [pod] = _pods_of(api, name)
    assert controller.call("kv", "crash", {})[0] != 200

    def restarted() -> bool:
        return _record(api, "kv", "blue").get("restarts") == 1 and api.ready("kv")

    wait_for(restarted, timeout=120 * TIME_SCALE, what=f"kv restarted ({controller.log})")
    assert api.read("deployments", name)["metadata"]["uid"] == uid
    [same] = _pods_of(api, name)
    assert same["metadata"]["uid"] == pod["metadata"]["uid"]
    [container_status] = same["status"]["containerStatuses"]
    assert container_status["restartCount"] == 1
    assert container_status["lastState"]["terminated"]["exitCode"] == 3
    assert _record(api, "kv", "blue")["lastExitCode"] == 3
    assert controller.call("kv", "echo", {"again": True}) == (200, {"again": True})
    # The second crash is past maxRestarts 1: a crash loop, the Deployment scaled to zero.
    assert controller.call("kv", "crash", {})[0] != 200
    wait_for(
        lambda: api.status("kv").get("phase") == "Degraded",
        timeout=60,
        what=f"a crash loop ({controller.log})",
    )
    degraded = next(c for c in api.status("kv")["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "CrashLoop"
    assert "crashed 2 times" in degraded["message"]
    deployment = api.read("deployments", name)
    assert deployment["metadata"]["uid"] == uid
    wait_for(lambda: api.read("deployments", name)["spec"]["replicas"] == 0, what="scaled down")


def _node_of(api: Api, deployment: str) -> str:
    pods = _pods_of(api, deployment)
    return str(pods[0]["spec"].get("nodeName") or "") if pods else ""


def _claims_mounted(api: Api, deployment: str) -> list[str]:
    volumes = api.read("deployments", deployment)["spec"]["template"]["spec"]["volumes"]
    return [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_second_color_runs_on_another_node_with_its_own_claim(
    api: Api, controllers: list[KubeController]
):
    """Two nodes, ReadWriteOnce claims: a plugin with state gets a claim per color, so the
    new color may land on the other node (it does here: the scheduler spreads), starts with
    an empty claim of its own, and gets the state by the import; the old color's claim goes
    with it. (One claim shared by both would leave the new color in ContainerCreating with
    the Multi-Attach error until the startup deadline rolled it back.)"""
    assert api.cluster is not None
    controller = controllers[0]
    controller.start()
    cid = controller.controller_id
    spec: dict[str, Any] = {
        "env": {"STATE_VERSION": "1"},
        "state": {"version": 1},
        "volumes": [{"name": "data", "mountPath": "/data", "size": "1Gi"}],
    }
    api.apply_plugin("kv", _spec(**spec))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    blue, green = f"bh-{cid}-kv-blue", f"bh-{cid}-kv-green"
    assert _claims_mounted(api, blue) == [f"bh-{cid}-kv-data-blue"]
    assert controller.call("kv", "put", {"key": "k", "value": "kept"})[0] == 200
    wrote = controller.call("kv", "run", {"argv": ["sh", "-c", "echo blue > /data/mine"]})
    assert wrote == (200, {"code": 0, "output": ""})
    blue_node = _node_of(api, blue)
    assert blue_node in {"node-a", "node-b"}
    api.apply_plugin("kv", _spec("1.1.0", **spec))

    def promoted() -> bool:
        last = api.status("kv").get("lastSwap") or {}
        return last.get("result") == "Promoted" and last.get("to") == "1.1.0"

    wait_for(promoted, timeout=120 * TIME_SCALE, what=f"the swap ({controller.log})")
    green_node = _node_of(api, green)
    assert green_node
    assert green_node != blue_node
    assert _claims_mounted(api, green) == [f"bh-{cid}-kv-data-green"]
    assert controller.call("kv", "get", {"key": "k"}) == (200, {"value": "kept"})
    # Its own claim: what blue wrote on blue's claim is not there.
    looked = controller.call("kv", "run", {"argv": ["sh", "-c", "ls /data"]})
    assert looked == (200, {"code": 0, "output": ""})
    wait_for(
        lambda: api.names("persistentvolumeclaims") == {f"bh-{cid}-kv-data-green"},
        timeout=90 * TIME_SCALE,
        what="blue's claim removed with blue",
    )


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_plugin_without_state_keeps_one_claim_and_both_colors_on_its_node(
    api: Api, controllers: list[KubeController]
):
    """Without spec.state the data is only on the volume: both colors mount the one claim,
    so the new color is scheduled onto the old one's node (pod affinity), and sees its data."""
    assert api.cluster is not None
    controller = controllers[0]
    controller.start()
    cid = controller.controller_id
    volumes: dict[str, Any] = {"volumes": [{"name": "data", "mountPath": "/data", "size": "1Gi"}]}
    api.apply_plugin("files", _spec(**volumes))
    wait_for(lambda: api.ready("files"), timeout=90, what=f"files Ready ({controller.log})")
    wrote = controller.call("files", "run", {"argv": ["sh", "-c", "echo kept > /data/mine"]})
    assert wrote == (200, {"code": 0, "output": ""})
    blue_node = _node_of(api, f"bh-{cid}-files-blue")
    api.apply_plugin("files", _spec("1.1.0", **volumes))
    wait_for(
        lambda: (api.status("files").get("lastSwap") or {}).get("result") == "Promoted",
        timeout=120 * TIME_SCALE,
        what=f"the swap ({controller.log})",
    )
    assert _node_of(api, f"bh-{cid}-files-green") == blue_node
    assert _claims_mounted(api, f"bh-{cid}-files-green") == [f"bh-{cid}-files-data"]
    read = controller.call("files", "run", {"argv": ["cat", "/data/mine"]})
    assert read == (200, {"code": 0, "output": "kept\n"})
    assert api.names("persistentvolumeclaims") == {f"bh-{cid}-files-data"}


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_scheduling_and_pulls_are_reported_and_not_counted_against_the_startup_deadline(
    api: Api, controllers: list[KubeController]
):
    """A pod that waits for its image (ContainerCreating, longer than the startup deadline)
    is reported so, then Ready, in a swap too; an image that cannot be pulled is Degraded
    with the kubelet's reason. The pods get the controller's imagePullSecrets, and the
    status says what Kubernetes cannot enforce."""
    assert api.cluster is not None
    assert api.cluster.kubelet is not None
    api.cluster.kubelet.pull_seconds = 12.0
    controller = controllers[0]
    controller.start("--image-pull-secret", "registry-a")
    cid = controller.controller_id
    health: dict[str, Any] = {"health": {"startupDeadlineSeconds": 4}}
    stateful: dict[str, Any] = {"env": {"STATE_VERSION": "1"}, "state": {"version": 1}}

    def reason(name: str) -> str:
        ready = [c for c in api.status(name).get("conditions", []) if c["type"] == "Ready"]
        return str(ready[0]["reason"]) if ready else ""

    api.apply_plugin("slow", _spec(**health, **stateful))
    wait_for(lambda: reason("slow") == "ContainerCreating", timeout=60, what="a pull reported")
    wait_for(lambda: api.ready("slow"), timeout=90, what=f"slow Ready ({controller.log})")
    blue = api.read("deployments", f"bh-{cid}-slow-blue")
    assert blue["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-a"}]
    assert _record(api, "slow", "blue").get("restarts", 0) == 0
    # The new color lands on the other node, where the image is pulled again: no rollback.
    api.apply_plugin("slow", _spec("1.1.0", **health, **stateful))
    wait_for(
        lambda: (api.status("slow").get("lastSwap") or {}).get("result") == "Promoted",
        timeout=120 * TIME_SCALE,
        what=f"the swap past a pull longer than the deadline ({controller.log})",
    )
    unenforced = next(c for c in api.status("slow")["conditions"] if c["type"] == "Unenforced")
    assert unenforced["status"] == "True"
    assert "spec.resources.pids" in unenforced["message"]
    assert "NetworkPolicy" in unenforced["message"]
    # An image that is not there: the kubelet's reason, Degraded.
    missing = {**_spec(**health), "image": "blackhole/not-there:0.0.1"}
    api.apply_plugin("nowhere", missing)

    def pull_failed() -> bool:
        degraded = [
            c for c in api.status("nowhere").get("conditions", []) if c["type"] == "Degraded"
        ]
        return (
            bool(degraded)
            and degraded[0]["status"] == "True"
            and degraded[0]["reason"]
            in (
                "ErrImagePull",
                "ImagePullBackOff",
            )
        )

    wait_for(pull_failed, timeout=60, what=f"the failed pull reported ({controller.log})")


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_larger_volume_grows_its_claim_and_a_smaller_one_is_refused(
    api: Api, controllers: list[KubeController]
):
    """(Stand-in only: whether a real cluster grows a claim is its StorageClass's choice.)"""
    controller = controllers[0]
    controller.start()
    cid = controller.controller_id
    recreate: dict[str, Any] = {"hotSwap": {"strategy": "Recreate"}}

    def volumes(size: str) -> list[dict[str, Any]]:
        return [{"name": "data", "mountPath": "/data", "size": size}]

    api.apply_plugin("files", _spec(**recreate, volumes=volumes("1Gi")))
    wait_for(lambda: api.ready("files"), timeout=90, what=f"files Ready ({controller.log})")
    claim = api.read("persistentvolumeclaims", f"bh-{cid}-files-data")
    api.apply_plugin("files", _spec("1.0.1", **recreate, volumes=volumes("2Gi")))
    wait_for(
        lambda: api.ready("files") and api.status("files").get("activeVersion") == "1.0.1",
        timeout=90,
        what=f"files replaced ({controller.log})",
    )
    grown = api.read("persistentvolumeclaims", f"bh-{cid}-files-data")
    assert grown["metadata"]["uid"] == claim["metadata"]["uid"]
    assert grown["spec"]["resources"]["requests"]["storage"] == "2Gi"
    # Smaller: refused before anything is stopped, naming the field and why.
    api.apply_plugin("files", _spec("1.0.2", **recreate, volumes=volumes("1Gi")))

    def refused() -> str:
        ready = [c for c in api.status("files").get("conditions", []) if c["type"] == "Ready"]
        return str(ready[0]["message"]) if ready and ready[0]["reason"] == "InvalidSpec" else ""

    wait_for(
        lambda: "cannot shrink" in refused(), timeout=60, what=f"the refusal ({controller.log})"
    )
    assert "spec.volumes[0].size" in refused()
    assert api.status("files").get("activeVersion") == "1.0.1"
    assert api.read("deployments", f"bh-{cid}-files-blue")["spec"]["replicas"] == 1


def _pod_address(api: Api, deployment: str) -> str:
    listing = _json(api.core.list_namespaced_pod(NAMESPACE, _preload_content=False))
    for pod in listing["items"]:
        if pod["metadata"]["name"].startswith(f"{deployment}-") and pod["status"].get("podIP"):
            return f"{pod['status']['podIP']}:7000"
    raise AssertionError(f"no pod of {deployment} has an address")


def _health(address: str, credentials: grpc.ChannelCredentials | None, name: str = "") -> Any:
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = (
        grpc.secure_channel(address, credentials, options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10 * TIME_SCALE)


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_pods_serve_mutual_tls_only_and_one_naming_another_plugin_is_refused(
    api: Api, controllers: list[KubeController]
):
    """Each pod serves the certificate of its own Secret, naming its plugin; calls go over
    mutual TLS only; a pod serving another plugin's certificate (the two plugins' Secrets
    swapped, the pod restarted) is refused with the reason."""
    assert api.cluster is not None
    kubelet = api.cluster.kubelet
    assert kubelet is not None
    controller = controllers[0]
    controller.start()
    cid = controller.controller_id
    for name in ("alpha", "beta"):
        api.apply_plugin(name, _spec())
    for name in ("alpha", "beta"):
        wait_for(
            functools.partial(api.ready, name), timeout=90, what=f"{name} Ready ({controller.log})"
        )
    assert controller.call("alpha", "echo", {"over": "tls"}) == (200, {"over": "tls"})

    secrets_of = {n: api.read("secrets", f"bh-{cid}-{n}-blue-tls") for n in ("alpha", "beta")}
    for name, secret in secrets_of.items():
        assert secret["type"] == "kubernetes.io/tls"
        cert = base64.b64decode(secret["data"]["tls.crt"])
        assert pki.identities_of(cert) == [pki.Identity.plugin(cid, NAMESPACE, name)]
    ca = base64.b64decode(secrets_of["alpha"]["data"]["ca.crt"])

    # Only mutual TLS is served: plaintext fails, and so does TLS without a client certificate.
    address = _pod_address(api, f"bh-{cid}-alpha-blue")
    server_name = pki.Identity.plugin(cid, NAMESPACE, "alpha").server_name
    with pytest.raises(grpc.RpcError):
        _health(address, None)
    with pytest.raises(grpc.RpcError):
        _health(address, grpc.ssl_channel_credentials(ca), server_name)
    files = pki.Files.in_directory(paths.client_certificates(controller.data, pki.CONTROLLER))
    ca_pem, key, cert = files.read()
    mutual = grpc.ssl_channel_credentials(ca_pem, key, cert)
    assert _health(address, mutual, server_name).status == health_pb2.HealthCheckResponse.SERVING

    # alpha's pod gets beta's certificate: the kubelet refreshes its files, and once it
    # restarts, the controller's check of who answers there refuses it.
    api.core.patch_namespaced_secret(
        f"bh-{cid}-alpha-blue-tls", NAMESPACE, {"data": secrets_of["beta"]["data"]}
    )
    [pod] = [p for p in kubelet._all_pods() if p.name.startswith(f"bh-{cid}-alpha-")]
    get_engine(container.Engine.DOCKER).client.containers.get(pod.container).kill()

    def refused() -> bool:
        ready: dict[str, Any] = next(
            (c for c in api.status("alpha").get("conditions", []) if c["type"] == "Ready"), {}
        )
        return ready.get("status") == "False" and ready.get("reason") == "IdentityMismatch"

    wait_for(refused, timeout=120, what=f"alpha refused ({controller.log})")
    ready = next(c for c in api.status("alpha")["conditions"] if c["type"] == "Ready")
    assert f"blackhole://{cid}/{NAMESPACE}/alpha" in ready["message"]
    assert api.ready("beta")  # the other plugin is untouched
    assert controller.call("beta", "echo", {"still": "here"}) == (200, {"still": "here"})


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_certificate_that_expired_while_no_controller_ran_is_issued_again_not_refused(
    api: Api, controllers: list[KubeController]
):
    """A controller down past its pods' certificates' end finds them expired at start: it
    issues each again into its Secret and waits for the kubelet to serve it, rather than
    refusing the plugin as it refuses a pod of another CA (which would hold it Failed until
    its spec changes)."""
    controller = controllers[0]
    controller.start()
    cid = controller.controller_id
    api.apply_plugin("gamma", _spec())
    wait_for(
        functools.partial(api.ready, "gamma"), timeout=90, what=f"gamma Ready ({controller.log})"
    )
    controller.stop()

    authority = pki.Authority.load_or_create(controller.data / paths.PKI_DIR, cid)
    now = datetime.datetime.now(datetime.UTC)
    expired = authority.issue(
        pki.Identity.plugin(cid, NAMESPACE, "gamma"),
        hosts=[f"bh-{cid}-gamma-blue"],
        lifetime=datetime.timedelta(hours=1),
        not_before=now - datetime.timedelta(hours=2),
    )
    name = f"bh-{cid}-gamma-blue-tls"
    api.core.patch_namespaced_secret(
        name, NAMESPACE, {"data": manifests.certificate_data(expired, authority.cert_pem)}
    )
    address = _pod_address(api, f"bh-{cid}-gamma-blue")
    server_name = pki.Identity.plugin(cid, NAMESPACE, "gamma").server_name
    ca_pem, key, cert = pki.Files.in_directory(
        paths.client_certificates(controller.data, pki.CONTROLLER)
    ).read()

    def serves_expired() -> bool:
        try:
            _health(address, grpc.ssl_channel_credentials(ca_pem, key, cert), server_name)
        except grpc.RpcError:
            return True
        return False

    wait_for(serves_expired, timeout=60, what="the pod serving the expired certificate")

    controller.start()

    def answers() -> bool:
        try:
            answer = controller.call("gamma", "echo", {"after": "renewal"})
        except OSError:  # the gateway is not listening yet
            return False
        return answer == (200, {"after": "renewal"})

    wait_for(
        answers,
        timeout=120,
        what=f"gamma answering after its certificate is issued again ({controller.log})",
    )
    ready = next(c for c in api.status("gamma")["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    renewed = base64.b64decode(api.read("secrets", name)["data"]["tls.crt"])
    assert renewed != expired.cert_pem
    assert "CertificateExpired" not in json.dumps(api.status("gamma"))


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_pod_replaced_while_no_controller_ran_gets_the_plugins_checkpoint(
    api: Api, controllers: list[KubeController]
):
    """A pod the Deployment replaced while the controller was down (an eviction, a drain)
    is a new process with none of the state: the next controller tells it by its first
    handshake and restores the checkpoint into it before it is Ready."""
    controller = controllers[0]
    controller.start()
    cid = controller.controller_id
    state = {"version": 1, "checkpointSeconds": 1}
    api.apply_plugin("kv", _spec(env={"STATE_VERSION": "1"}, state=state))
    wait_for(lambda: api.ready("kv"), timeout=90, what=f"kv Ready ({controller.log})")
    kept = controller.data / "snapshots.db"

    def newest_checkpoint() -> int:
        if not kept.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{kept}?mode=ro", uri=True)) as db:
            (newest,) = db.execute(
                "SELECT max(id) FROM snapshots WHERE key = ? AND reason IN (?, ?) AND complete = 1",
                (f"{NAMESPACE}/kv", *CHECKPOINT_REASONS),
            ).fetchone()
        return int(newest or 0)

    before = newest_checkpoint()
    assert controller.call("kv", "put", {"key": "a", "value": "kept"})[0] == 200
    wait_for(
        lambda: newest_checkpoint() > before,
        timeout=60,
        what=f"a checkpoint of kv after the write ({controller.log})",
    )
    controller.stop()

    blue = f"bh-{cid}-kv-blue"

    def pods() -> set[str]:
        return {p for p in api.names("pods") if p.startswith(f"{blue}-")}

    [old] = pods()
    api.core.delete_namespaced_pod(old, NAMESPACE)

    def replaced() -> bool:
        new = pods() - {old}
        return bool(new) and _address_of(api, new.pop()) is not None

    wait_for(replaced, timeout=90, what="the Deployment's new pod")
    controller.start()

    def restored() -> bool:
        try:
            return controller.call("kv", "get", {"key": "a"}) == (200, {"value": "kept"})
        except OSError:  # the gateway is not listening yet
            return False

    wait_for(restored, timeout=120, what=f"kv's state in its new pod ({controller.log})")
    assert (api.status("kv").get("lastRestore") or {}).get("checkpoint") is not None


def _address_of(api: Api, pod: str) -> str | None:
    try:
        found = _json(api.core.read_namespaced_pod(pod, NAMESPACE, _preload_content=False))
    except ApiException:
        return None
    return (found.get("status") or {}).get("podIP")
