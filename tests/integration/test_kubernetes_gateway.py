"""The gateway as a Deployment of its own on Kubernetes: swaps flip on every replica or on none.

The chart's gateway objects (rendered by helm: its Deployment of two
replicas, the headless control Service, the tokens and control Secrets) run
on the stand-in (``kube.py``), whose kubelet runs each replica as a real
container of an image with this checkout's code, and keeps the Service's
EndpointSlices. The controller runs on the host with ``--gateway-service``,
finds both replicas from the EndpointSlices, and reaches each over TCP with
the control secret. Calls go to each replica's pod IP with a caller token,
as a client behind the gateway's Service would.

A plugin of replicas (a Deployment of one pod each) runs there too: the
gateway pods balance its calls over all of them, one whose container dies is
restarted in its pod while the others serve, a swap replaces them all, and
lowering ``replicas`` removes the Deployments past it; a canary over
replicas splits the calls by its weights on both gateway pods, and one that
fails calls is rolled back by the builtin success-rate analysis.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import yaml
from kubernetes import client as k8s_client

from controller.runtimes import container

from . import kube
from .conftest import BHCTL, TIME_SCALE, get_engine, wait_for
from .test_kubernetes import (  # the fixtures
    NAMESPACE,
    SYSTEM,
    Api,
    KubeController,
    _spec,
    api,
    controllers,
)

__all__ = ["api", "controllers"]

TOP = Path(__file__).parents[2]
CHART = TOP / "charts" / "blackhole"
RELEASE = "bh"
TOKEN = secrets.token_urlsafe(24)


def _source_tag() -> str:
    digest = hashlib.sha256()
    sources = [*(TOP / "controller").rglob("*.py"), *(TOP / "sdk" / "blackhole_sdk").rglob("*.py")]
    for path in sorted([*sources, TOP / "pyproject.toml", TOP / "sdk" / "pyproject.toml"]):
        digest.update(str(path.relative_to(TOP)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


GATEWAY_IMAGE = f"blackhole/controller-test:{_source_tag()}"
"""The controller image of this checkout (``images/controller/Dockerfile``, built when missing)."""
BASE_IMAGE = "blackhole/base:bookworm"


def _ensure_gateway_image(client: docker.DockerClient, work: Path) -> None:
    """Build the controller image from this checkout's wheels, as images/build.sh does, under
    a tag of the test's own (the shared ``blackhole/controller`` may be of another checkout)."""
    try:
        client.images.get(GATEWAY_IMAGE)
        return
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{BASE_IMAGE} is missing: run images/base/build.sh")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(wheels), "--find-links", str(wheels), str(TOP / "sdk"), str(TOP),
         "pip"],
        check=True,
    )  # fmt: skip
    client.images.build(
        path=str(wheels),
        dockerfile=str(TOP / "images" / "controller" / "Dockerfile"),
        buildargs={"BASE_IMAGE": BASE_IMAGE},
        tag=GATEWAY_IMAGE,
        rm=True,
    )


def _render(tmp_path: Path) -> list[dict[str, Any]]:
    helm = Path(sys.executable).parent / "helm"
    if not helm.exists():
        pytest.fail(f"helm is not installed at {helm}: run `make setup` (scripts/helm.sh tools)")
    repository, tag = GATEWAY_IMAGE.split(":")
    values = {
        "fullnameOverride": RELEASE,
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "gateway": {
            "tokens": {
                "items": [
                    {
                        "name": "test",
                        "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        "plugins": ["*"],
                    }
                ]
            }
        },
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    homes = {
        f"HELM_{kind}_HOME": str(tmp_path / f"helm-{kind.lower()}")
        for kind in ("CACHE", "CONFIG", "DATA")
    }
    result = subprocess.run(
        [
            str(helm),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            SYSTEM,
            "--values",
            str(tmp_path / "values.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **homes},
    )
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


class Gateways:
    """The chart's gateway, deployed on the stand-in: its pods, their containers and calls."""

    def __init__(self, api: Api, tmp_path: Path) -> None:
        assert api.cluster is not None
        self.api = api
        self.cluster = api.cluster
        documents = _render(tmp_path)
        control = _find(documents, "Secret", f"{RELEASE}-gateway-control")
        self.secret = tmp_path / "control-secret"
        self.secret.write_bytes(base64.b64decode(control["data"]["secret"]))
        self.secret.chmod(0o600)
        body: Any
        for secret in ("gateway-tokens", "gateway-control"):
            body = _find(documents, "Secret", f"{RELEASE}-{secret}")
            self.api.core.create_namespaced_secret(SYSTEM, body)
        body = _find(documents, "Service", f"{RELEASE}-gateway-control")
        self.api.core.create_namespaced_service(SYSTEM, body)
        body = _find(documents, "Deployment", f"{RELEASE}-gateway")
        self.api.apps.create_namespaced_deployment(SYSTEM, body)
        self.docker = get_engine(container.Engine.DOCKER).client

    def pods(self) -> dict[str, str]:
        """Pod name to pod IP, of the gateway's running pods."""
        listing: Any = self.api.core.list_namespaced_pod(
            SYSTEM, label_selector="app.kubernetes.io/component=gateway", _preload_content=False
        )
        return {
            p["metadata"]["name"]: p["status"]["podIP"]
            for p in json.loads(listing.data)["items"]
            if (p.get("status") or {}).get("podIP")
        }

    def container(self, pod: str) -> str:
        return f"bhk-{self.cluster.session}-{SYSTEM}-{pod}"

    def status(self, pod: str) -> dict[str, Any]:
        """``bhctl gateway --status`` inside the replica."""
        found = self.docker.containers.get(self.container(pod))
        code, output = found.exec_run(
            ["bhctl", "gateway", "--status", "--data-dir", "/var/lib/blackhole"]
        )
        assert code == 0, output
        assert isinstance(output, bytes)
        return dict(json.loads(output))

    def route(self, pod: str, name: str) -> str | None:
        plugin = self.status(pod)["plugins"].get(f"{NAMESPACE}/{name}") or {}
        return plugin.get("endpoint")

    def slice_endpoints(self) -> list[dict[str, Any]]:
        listing: Any = k8s_client.DiscoveryV1Api(self.api.client).list_namespaced_endpoint_slice(
            SYSTEM,
            label_selector=f"{kube.SERVICE_NAME_LABEL}={RELEASE}-gateway-control",
            _preload_content=False,
        )
        return [e for s in json.loads(listing.data)["items"] for e in s.get("endpoints") or []]


def call(
    address: str, name: str, payload: Any, timeout: float = 30, method: str = "echo"
) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://{address}:8080/v1/namespaces/{NAMESPACE}/plugins/{name}/call/{method}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Caller:
    """Calls through one replica, one after the other, until stopped: each answer's status."""

    def __init__(self, address: str, name: str, method: str = "echo", payload: Any = None) -> None:
        self.address, self.name = address, name
        self.method, self.payload = method, payload
        self.answers: list[tuple[int, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                payload = {"n": n} if self.payload is None else self.payload
                self.answers.append(
                    call(self.address, self.name, payload, timeout=150, method=self.method)
                )
            except OSError as e:
                self.answers.append((0, str(e)))
            n += 1
            time.sleep(0.02)

    def failed(self) -> list[tuple[int, Any]]:
        return [a for a in self.answers if a[0] != 200]


@pytest.fixture
def gateways(api: Api, tmp_path: Path) -> Gateways:
    assert api.cluster is not None  # the stand-in runs the image built here
    _ensure_gateway_image(get_engine(container.Engine.DOCKER).client, tmp_path)
    return Gateways(api, tmp_path)


SWAP: dict[str, Any] = {"hotSwap": {"maxPauseMilliseconds": 60000, "drainTimeoutSeconds": 10}}
LONG_DRAIN: dict[str, Any] = {
    "hotSwap": {"maxPauseMilliseconds": 60000, "drainTimeoutSeconds": 120},
    "gateway": {"timeoutSeconds": 120},
}


def _start(controller: KubeController, gateways: Gateways) -> None:
    controller.start(
        "--gateway-service", f"{RELEASE}-gateway-control",
        "--gateway-control-secret", str(gateways.secret),
        "--gateway-client-secret", f"{RELEASE}-gateway-client",
        "--gateway-ack-timeout", "3",
    )  # fmt: skip


def _ready_everywhere(api: Api, gateways: Gateways, controller: KubeController) -> dict[str, str]:
    wait_for(lambda: len(gateways.pods()) == 2, 120, "two gateway pods")
    wait_for(lambda: api.ready("echo"), 120, f"echo Ready ({controller.log})")
    pods = gateways.pods()
    wait_for(
        lambda: all(gateways.route(p, "echo") for p in pods),
        120,
        f"both replicas routing echo ({controller.log})",
    )
    return pods


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_swap_across_two_gateway_replicas_flips_both(
    api: Api,
    controllers: list[KubeController],
    gateways: Gateways,
) -> None:
    controller = controllers[0]
    _start(controller, gateways)
    api.apply_plugin("echo", _spec(**SWAP))
    pods = _ready_everywhere(api, gateways, controller)
    blue = {gateways.route(p, "echo") for p in pods}
    assert len(blue) == 1
    # Ready once routed: both are ready endpoints of the control Service now.
    wait_for(
        lambda: (
            sorted(e["conditions"]["ready"] for e in gateways.slice_endpoints()) == [True, True]
        ),
        60,
        "both replicas ready in the EndpointSlice",
    )
    with (
        Caller(pods[sorted(pods)[0]], "echo") as first,
        Caller(pods[sorted(pods)[1]], "echo") as second,
    ):
        wait_for(lambda: len(first.answers) > 5 and len(second.answers) > 5, 60, "calls")
        api.apply_plugin("echo", _spec("1.1.0", **SWAP))
        wait_for(
            lambda: api.status("echo").get("activeColor") == "green",
            120,
            f"the swap ({controller.log})",
        )
        wait_for(
            lambda: (
                len({gateways.route(p, "echo") for p in pods} - blue) == 1
                and len({gateways.route(p, "echo") for p in pods}) == 1
            ),
            60,
            "both replicas on the new color",
        )
        time.sleep(0.5)  # calls after the flip, too
    assert first.failed() == []
    assert second.failed() == []
    assert len(first.answers) > 10
    assert len(second.answers) > 10


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_frozen_replica_rolls_the_swap_back_and_the_other_keeps_answering(
    api: Api,
    controllers: list[KubeController],
    gateways: Gateways,
) -> None:
    controller = controllers[0]
    _start(controller, gateways)
    api.apply_plugin("echo", _spec(**SWAP))
    pods = _ready_everywhere(api, gateways, controller)
    answering, frozen = sorted(pods)
    blue = gateways.route(answering, "echo")
    assert gateways.route(frozen, "echo") == blue
    paused = gateways.docker.containers.get(gateways.container(frozen))
    paused.pause()
    try:
        with Caller(pods[answering], "echo") as caller:
            wait_for(lambda: len(caller.answers) > 5, 60, "calls")
            api.apply_plugin("echo", _spec("1.1.0", **SWAP))
            wait_for(
                lambda: (api.status("echo").get("lastSwap") or {}).get("result") == "RolledBack",
                120,
                f"the swap rolled back ({controller.log})",
            )
            last = api.status("echo")["lastSwap"]
            assert last["reason"] == "SwapFailedHold", last
            assert api.status("echo")["activeColor"] == "blue"
            assert gateways.route(answering, "echo") == blue
            time.sleep(0.5)
        assert caller.failed() == []
    finally:
        paused.unpause()
    # Thawed, it applies what was sent meanwhile, in order: still the old color, nothing held.
    wait_for(
        lambda: gateways.status(frozen)["plugins"][f"{NAMESPACE}/echo"]["holds"] == 0,
        60,
        "the thawed replica released",
    )
    assert gateways.route(frozen, "echo") == blue
    events: Any = api.core.list_namespaced_event(NAMESPACE, _preload_content=False)
    reasons = {e.get("reason") for e in json.loads(events.data)["items"]}
    assert "SwapFailedHold" in reasons
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda a: call(a, "echo", {"after": True}), pods.values()))
    assert answers == [(200, {"after": True})] * 2


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_replica_frozen_after_holding_rolls_the_flip_back_on_every_replica(
    api: Api,
    controllers: list[KubeController],
    gateways: Gateways,
) -> None:
    """Both replicas hold; one freezes while the swap drains; its flip is never acknowledged:
    the swap rolls back (SwapFailedFlip) and the other replica never sends a call to green."""
    controller = controllers[0]
    _start(controller, gateways)
    api.apply_plugin("echo", _spec(env={"MARK": "old"}, **LONG_DRAIN))
    pods = _ready_everywhere(api, gateways, controller)
    answering, frozen = sorted(pods)
    blue = gateways.route(answering, "echo")
    paused = gateways.docker.containers.get(gateways.container(frozen))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A call in flight on blue keeps the drain waiting, with both replicas holding: long
        # enough to outlast the new color's start on a loaded machine.
        slow = pool.submit(
            lambda: call(pods[answering], "echo", {"seconds": 45}, timeout=150, method="sleep")
        )
        wait_for(
            lambda: gateways.status(answering)["plugins"][f"{NAMESPACE}/echo"]["inFlight"] == 1,
            30,
            "the slow call",
        )
        api.apply_plugin("echo", _spec("1.1.0", env={"MARK": "new"}, **LONG_DRAIN))
        wait_for(
            lambda: all(
                gateways.status(p)["plugins"][f"{NAMESPACE}/echo"]["holds"] == 1 for p in pods
            ),
            120,
            f"both replicas holding ({controller.log})",
        )
        paused.pause()
        try:
            mark = {"argv": ["printenv", "MARK"]}  # which color answered
            with Caller(pods[answering], "echo", "run", mark) as caller:
                wait_for(
                    lambda: (
                        (api.status("echo").get("lastSwap") or {}).get("result") == "RolledBack"
                    ),
                    120,
                    f"the swap rolled back ({controller.log})",
                )
                assert api.status("echo")["lastSwap"]["reason"] == "SwapFailedFlip"
                assert api.status("echo")["activeColor"] == "blue"
                assert gateways.route(answering, "echo") == blue
                time.sleep(0.5)
            assert caller.answers
            assert caller.failed() == []
            assert {a[1]["output"] for a in caller.answers} == {"old\n"}  # never green
            assert slow.result()[0] == 200
        finally:
            paused.unpause()
    wait_for(
        lambda: gateways.status(frozen)["plugins"][f"{NAMESPACE}/echo"]["holds"] == 0,
        60,
        "the thawed replica released",
    )
    assert gateways.route(frozen, "echo") == blue


@dataclass
class Load:
    """Calls ``who`` through both gateway replicas from a few threads until stopped: who
    answered each call (its version and host: one host per plugin pod), and what failed."""

    addresses: list[str]
    name: str = "echo"
    threads: int = 6
    answers: list[tuple[float, str, str]] = field(default_factory=list)
    """(start, version, host) of each call answered."""
    failures: list[tuple[float, int, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            began = time.monotonic()
            address = self.addresses[n % len(self.addresses)]
            try:
                status, answer = call(address, self.name, {}, timeout=150, method="who")
            except OSError as e:
                status, answer = 0, str(e)
            with self._lock:
                if status == 200:
                    self.answers.append((began, answer["version"], answer["host"]))
                else:
                    self.failures.append((began, status, answer))
            n += 1
            time.sleep(0.005)

    def since(self, start: float) -> list[tuple[str, str]]:
        with self._lock:
            return [(v, h) for at, v, h in self.answers if at >= start]

    def window(self, calls: int, timeout: float = 120) -> list[tuple[str, str]]:
        """(version, host) of the next ``calls`` answered calls."""
        start = time.monotonic()
        wait_for(
            lambda: len(self.since(start)) >= calls,
            timeout,
            f"{calls} calls (failed: {self.failures[-3:]})",
        )
        return self.since(start)

    @classmethod
    @contextlib.contextmanager
    def running(cls, addresses: list[str], threads: int = 6) -> Iterator[Load]:
        load = cls(addresses, threads=threads)
        workers = [threading.Thread(target=load._run, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        try:
            yield load
        finally:
            load._stop.set()
            for worker in workers:
                worker.join(200)


def _deployments(api: Api) -> dict[str, str]:
    """Name to uid of the controller's Deployments in the plugins' namespace."""
    listing: Any = api.apps.list_namespaced_deployment(NAMESPACE, _preload_content=False)
    return {d["metadata"]["name"]: d["metadata"]["uid"] for d in json.loads(listing.data)["items"]}


def _pods(api: Api, deployment: str) -> list[dict[str, Any]]:
    """The live pods of one Deployment (by owner: ``bh-x-blue-`` is a prefix of ``-blue-1``)."""
    listing: Any = api.core.list_namespaced_pod(NAMESPACE, _preload_content=False)
    return [
        p
        for p in json.loads(listing.data)["items"]
        if any(o.get("name") == deployment for o in p["metadata"].get("ownerReferences") or [])
        and not p["metadata"].get("deletionTimestamp")
    ]


def _records(api: Api, name: str) -> list[dict[str, Any]]:
    """The status records of the active color's replicas, by replica."""
    status = api.status(name)
    records = [i for i in status.get("instances", []) if i["color"] == status.get("activeColor")]
    return sorted(records, key=lambda i: int(i.get("replica", 0)))


def _all_ready(api: Api, name: str, version: str, replicas: int) -> bool:
    status = api.status(name)
    records = _records(api, name)
    return (
        status.get("swap") is None
        and status.get("activeVersion") == version
        and len(records) == replicas
        and all(i["ready"] for i in records)
    )


def _replica_names(cid: str, color: str, replicas: int) -> list[str]:
    return [f"bh-{cid}-echo-{color}" + (f"-{k}" if k else "") for k in range(replicas)]


def _pooled(gateways: Gateways, pods: dict[str, str], replicas: int) -> bool:
    """Whether every gateway replica balances echo over ``replicas`` endpoints."""
    for pod in pods:
        plugin = gateways.status(pod)["plugins"].get(f"{NAMESPACE}/echo") or {}
        if len(plugin.get("endpoints") or [plugin.get("endpoint")]) != replicas:
            return False
    return True


STARTUP = {"startupDeadlineSeconds": 180}
"""Pods of several replicas start one after the other on a loaded machine."""
REPLICAS: dict[str, Any] = {
    "replicas": 3,
    "gateway": {"maxConcurrentCalls": 1000},
    "health": STARTUP,
    "restart": {"backoffSeconds": 1},
    "hotSwap": {"scaleDownDelaySeconds": 2, **SWAP["hotSwap"]},
}


@pytest.mark.timeout(900)  # a swap of several pods, on a loaded machine
@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_replicas_are_deployments_of_their_own_balanced_restarted_swapped_and_scaled_down(
    api: Api,
    controllers: list[KubeController],
    gateways: Gateways,
) -> None:
    controller = controllers[0]
    cid = controller.controller_id
    _start(controller, gateways)
    api.apply_plugin("echo", _spec(**REPLICAS))
    wait_for(lambda: len(gateways.pods()) == 2, 120, "two gateway pods")
    wait_for(
        lambda: _all_ready(api, "echo", "1.0.0", 3),
        180,
        f"3 replicas Ready ({controller.log})",
    )
    blue = _replica_names(cid, "blue", 3)
    assert sorted(_deployments(api)) == sorted(blue)
    assert [len(_pods(api, d)) for d in blue] == [1, 1, 1]
    assert {f"bh-{cid}-echo-blue", f"bh-{cid}-echo"} == api.names("services")
    assert f"bh-{cid}-echo-blue-tls" in api.names("secrets")
    assert [api.read("deployments", d)["spec"]["replicas"] for d in blue] == [1, 1, 1]
    pods = gateways.pods()
    wait_for(lambda: _pooled(gateways, pods, 3), 120, f"both gateways pooling 3 ({controller.log})")
    before = _deployments(api)
    with Load.running(list(pods.values())) as load:
        spread = collections.Counter(host for _, host in load.window(600))
        assert len(spread) == 3, spread
        assert min(spread.values()) > 600 / 3 * 0.5, f"calls spread over all 3: {spread}"

        # One replica's container dies: the kubelet restarts it in its pod (or, if its
        # health checks fail first, the controller replaces its Deployment); the others serve.
        [crashed] = _pods(api, blue[1])
        others = {d: [p["metadata"]["uid"] for p in _pods(api, d)] for d in (blue[0], blue[2])}
        assert api.cluster is not None
        session, pod = api.cluster.session, crashed["metadata"]["name"]
        gateways.docker.containers.get(f"bhk-{session}-{NAMESPACE}-{pod}").kill()

        def restarted() -> bool:
            restarts = [i.get("restarts", 0) for i in _records(api, "echo")]
            return (
                len(restarts) == 3
                and restarts[0] == restarts[2] == 0
                and restarts[1] >= 1
                and _all_ready(api, "echo", "1.0.0", 3)
            )

        wait_for(restarted, 180, f"{blue[1]} restarted and Ready ({controller.log})")
        after = _deployments(api)
        assert sorted(after) == sorted(blue)
        assert [after[d] for d in others] == [before[d] for d in others], "the others untouched"
        assert {d: [p["metadata"]["uid"] for p in _pods(api, d)] for d in others} == others
        wait_for(lambda: _pooled(gateways, pods, 3), 60, "the restarted replica pooled again")
        assert len({host for _, host in load.window(300)}) == 3, "it takes calls again"
        assert load.failures == [], "no call failed while a replica was down"

        # A swap starts three of the new version and removes the old three once promoted.
        api.apply_plugin("echo", _spec("1.1.0", **REPLICAS))
        wait_for(
            lambda: _all_ready(api, "echo", "1.1.0", 3),
            240,
            f"3 replicas of 1.1.0 ({controller.log})",
        )
        green = _replica_names(cid, "green", 3)
        wait_for(
            lambda: sorted(_deployments(api)) == sorted(green),
            60,
            f"blue removed after the scale-down delay ({controller.log})",
        )
        wait_for(
            lambda: api.names("services") == {f"bh-{cid}-echo-green", f"bh-{cid}-echo"},
            60,
            "blue's Service removed",
        )
        secrets = api.names("secrets")
        assert f"bh-{cid}-echo-green-tls" in secrets
        assert f"bh-{cid}-echo-blue-tls" not in secrets
        wait_for(lambda: _pooled(gateways, pods, 3), 60, "both gateways pooling green's 3")
        served = load.window(600)
        assert {version for version, _ in served} == {"1.1.0"}
        assert len({host for _, host in served}) == 3
        assert load.failures == [], "no call failed in the swap"

        # Lowered to one: the two past it go, and nothing else of the color.
        kept = _deployments(api)[green[0]]
        api.apply_plugin("echo", _spec("1.1.0", **{**REPLICAS, "replicas": 1}))
        wait_for(
            lambda: list(_deployments(api)) == [green[0]],
            120,
            f"replicas 1 and 2 removed ({controller.log})",
        )
        assert _deployments(api)[green[0]] == kept
        wait_for(lambda: _all_ready(api, "echo", "1.1.0", 1), 60, "one replica Ready")
        assert api.names("services") == {f"bh-{cid}-echo-green", f"bh-{cid}-echo"}
        assert f"bh-{cid}-echo-green-tls" in api.names("secrets")
        wait_for(lambda: _pooled(gateways, pods, 1), 60, "both gateways on the one left")
        served = load.window(300)
        assert len({host for _, host in served}) == 1
    assert load.failures == [], "no call failed"


def _canary(more: dict[str, Any], fail: float = 0) -> dict[str, Any]:
    """echo of two replicas a color, swapped by a canary: ``more`` its hotSwap's own."""
    return {
        "replicas": 2,
        "env": {"FAIL_RATE": str(fail)},
        "gateway": {"maxConcurrentCalls": 1000},
        "health": STARTUP,
        "hotSwap": {"strategy": "Canary", "scaleDownDelaySeconds": 0, **SWAP["hotSwap"], **more},
    }


STEPS: dict[str, Any] = {
    "canary": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]}
}
ANALYZED: dict[str, Any] = {
    "analysis": [
        {"name": "success", "builtin": "SuccessRate", "min": 0.95, "intervalSeconds": 2, "count": 5}
    ],
    "canary": {"steps": [{"setWeight": 50}, {"analysis": {"metrics": ["success"]}}]},
}


def _weights(gateways: Gateways, pods: dict[str, str]) -> list[float]:
    """The weight each gateway replica itself applies to echo's new color."""
    return [
        float((gateways.status(p)["plugins"].get(f"{NAMESPACE}/echo") or {}).get("weight", 0))
        for p in sorted(pods)
    ]


def _canary_at(api: Api, gateways: Gateways, pods: dict[str, str], step: int, weight: int) -> bool:
    swap = api.status("echo").get("swap") or {}
    return (
        swap.get("canaryStep") == step
        and swap.get("weight") == weight
        and _weights(gateways, pods) == [weight] * len(pods)
    )


def _promote(controller: KubeController) -> None:
    done = subprocess.run(
        [str(BHCTL), "swap", "promote", f"{NAMESPACE}/echo", "--wait",
         "--data-dir", str(controller.data)],
        capture_output=True, text=True, timeout=300 * TIME_SCALE,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)


def _share(served: list[tuple[str, str]], version: str) -> float:
    return sum(1 for v, _ in served if v == version) / len(served)


@pytest.mark.timeout(900)  # a swap of several pods, on a loaded machine
@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_canary_of_replicas_splits_calls_through_the_gateway_pods_by_its_weights(
    api: Api,
    controllers: list[KubeController],
    gateways: Gateways,
) -> None:
    controller = controllers[0]
    _start(controller, gateways)
    api.apply_plugin("echo", _spec(**_canary(STEPS)))
    wait_for(lambda: len(gateways.pods()) == 2, 120, "two gateway pods")
    wait_for(
        lambda: _all_ready(api, "echo", "1.0.0", 2),
        180,
        f"2 replicas Ready ({controller.log})",
    )
    pods = gateways.pods()
    wait_for(lambda: _pooled(gateways, pods, 2), 120, f"both gateways pooling 2 ({controller.log})")
    with Load.running(list(pods.values()), threads=8) as load:
        load.window(200)
        api.apply_plugin("echo", _spec("1.1.0", **_canary(STEPS)))
        wait_for(
            lambda: _canary_at(api, gateways, pods, 1, 10),
            180,
            f"the canary at 10% ({controller.log})",
        )
        at_10 = load.window(2000)
        assert abs(_share(at_10, "1.1.0") - 0.10) < 0.03, _share(at_10, "1.1.0")
        assert len({h for v, h in at_10 if v == "1.1.0"}) == 2, "the canary's replicas share"
        assert len({h for v, h in at_10 if v == "1.0.0"}) == 2

        _promote(controller)
        wait_for(
            lambda: _canary_at(api, gateways, pods, 3, 50),
            120,
            f"the canary at 50% ({controller.log})",
        )
        at_50 = load.window(2000)
        assert abs(_share(at_50, "1.1.0") - 0.50) < 0.05, _share(at_50, "1.1.0")

        _promote(controller)
        wait_for(
            lambda: _all_ready(api, "echo", "1.1.0", 2),
            120,
            f"the canary promoted ({controller.log})",
        )
        wait_for(lambda: _weights(gateways, pods) == [0, 0], 60, "no canary left on the gateways")
        at_100 = load.window(1000)
        assert _share(at_100, "1.1.0") == 1.0
        assert len({h for _, h in at_100}) == 2
    assert load.failures == [], "no call failed"


@pytest.mark.timeout(900)  # a swap of several pods, on a loaded machine
@pytest.mark.parametrize("api", ["kmock"], indirect=True)
def test_a_canary_of_replicas_that_fails_calls_is_rolled_back_by_its_success_rate(
    api: Api,
    controllers: list[KubeController],
    gateways: Gateways,
) -> None:
    controller = controllers[0]
    _start(controller, gateways)
    api.apply_plugin("echo", _spec(**_canary(ANALYZED)))
    wait_for(lambda: len(gateways.pods()) == 2, 120, "two gateway pods")
    wait_for(
        lambda: _all_ready(api, "echo", "1.0.0", 2),
        180,
        f"2 replicas Ready ({controller.log})",
    )
    pods = gateways.pods()
    wait_for(lambda: _pooled(gateways, pods, 2), 120, f"both gateways pooling 2 ({controller.log})")
    with Load.running(list(pods.values())) as load:
        load.window(100)
        api.apply_plugin("echo", _spec("1.1.0", **_canary(ANALYZED, fail=0.2)))

        def rolled_back() -> dict[str, Any]:
            last = api.status("echo").get("lastSwap") or {}
            return last if last.get("reason") == "SwapFailedAnalysis" else {}

        last = wait_for(rolled_back, 240, f"the analysis to roll back ({controller.log})")
        after = time.monotonic()
        wait_for(lambda: _weights(gateways, pods) == [0, 0], 60, "the gateways back on 1.0.0")
        versions = {v for v, _ in load.window(1000)}
        assert versions == {"1.0.0"}
    assert "success (SuccessRate) failed" in last["message"]
    assert "wanted >= 0.95" in last["message"]
    late = [f for f in load.failures if f[0] >= after]
    assert late == [], "no call failed after the rollback"
    assert load.failures, "the new version failed some calls while it was a canary"
    assert {status for _, status, _ in load.failures} == {500}
    assert api.status("echo")["activeVersion"] == "1.0.0"
