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
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from controller.runtimes import base
from controller.spec import models

from . import kube
from .conftest import (
    BHCTL,
    PLUGIN_IMAGE,
    EngineUnderTest,
    get_engine,
    new_controller_id,
    wait_for,
)
from controller.runtimes import container

CRD = Path(__file__).parents[2] / "charts" / "blackhole" / "crds" / "plugins.blackhole.dev.yaml"
NAMESPACE = "plugins"
SYSTEM = "blackhole-system"
GROUP, VERSION, PLURAL = "blackhole.dev", "v1alpha1", "plugins"


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
            return dict(
                self.objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
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
        }[kind](NAMESPACE, _preload_content=False)
        items = json.loads(listing.data)["items"]
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
        return dict(json.loads(read(name, NAMESPACE, _preload_content=False).data))


@pytest.fixture
def api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    if request.node.get_closest_marker("cluster"):
        if not os.environ.get("KUBECONFIG"):
            pytest.fail("-m cluster needs KUBECONFIG naming a cluster (kind, k3d) to test against")
        k8s_config.load_kube_config()
        with k8s_client.ApiClient() as real:
            yield Api(real, Path(os.environ["KUBECONFIG"]))
        return
    engine = get_engine(container.Engine.DOCKER)
    with kube.Cluster(engine.client, tmp_path) as cluster, cluster.api() as stand_in:
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
            "--lease-seconds", "3", "--renew-seconds", "2", "--retry-seconds", "0.5",
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
    api.apply_plugin(
        "kv", _spec(volumes=[{"name": "data", "mountPath": "/data", "size": "1Gi"}])
    )
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
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
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
