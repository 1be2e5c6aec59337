"""Fixtures for the real engines: Docker and Podman, each through its own API socket.

Everything a test creates carries the session label ``blackhole.dev/test-session``,
or belongs to a controller id of this session, and is removed by label when the
session ends, whether the tests passed or not. An engine that does not answer
is an error, never a skip: start the engines with ``scripts/engines.sh``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import pytest

from controller import __version__ as controller_version
from controller.admin import client as admin_client
from controller.cli import gateway as gateway_process
from controller.runtimes import base, container

SESSION = uuid.uuid4().hex[:12]
SESSION_LABEL = "blackhole.dev/test-session"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "blackhole/base:bookworm")
RUNTIME_IMAGE = f"blackhole/plugin-runtime:{controller_version}"
"""The plugin runtime image (``images/build.sh``), which the test plugin builds on."""
PLUGIN_DIR = Path(__file__).parent / "plugin"


SDK_DIR = Path(__file__).parents[2] / "sdk" / "blackhole_sdk"
"""The SDK the plugin runtime image installs: a change to it is a new test plugin too."""


def _plugin_tag() -> str:
    """The test plugin's tag: a digest of its files and of the SDK's the runtime image
    installs, so checkouts never run each other's (nor an image of an older SDK)."""
    digest = hashlib.sha256(RUNTIME_IMAGE.encode())
    files = [p for p in PLUGIN_DIR.iterdir() if p.is_file()]
    files += [p for p in SDK_DIR.rglob("*") if p.is_file() and p.suffix in {".py", ".proto"}]
    for path in sorted(files):
        digest.update(str(path.relative_to(PLUGIN_DIR.parents[2])).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


PLUGIN_IMAGE = f"blackhole/test-plugin:{_plugin_tag()}"
"""The plugin the tests run (``tests/integration/plugin``); its behaviour is set by env MODE."""
BHCTL = Path(sys.executable).parent / "bhctl"

_controller_ids = itertools.count(1)
CONTROLLER_IDS: list[str] = []
"""Every controller id this session used; their resources are removed at the end."""

T = TypeVar("T")


def new_controller_id() -> str:
    ident = f"test-{SESSION}-{next(_controller_ids)}"
    CONTROLLER_IDS.append(ident)
    return ident


@dataclass
class EngineUnderTest:
    """A connected engine and the labels that mark what this session creates on it."""

    kind: container.Engine
    client: docker.DockerClient

    @property
    def labels(self) -> dict[str, str]:
        return {SESSION_LABEL: SESSION}

    def name(self, suffix: str) -> str:
        return f"bh-test-{SESSION}-{suffix}"

    def owned_by(self, controller_id: str) -> dict[str, str]:
        """Names and states of the containers of one controller, in one list call."""
        selector = {"label": f"{base.LABEL_CONTROLLER}={controller_id}"}
        rows = self.client.api.containers(all=True, filters=selector)
        return {row["Names"][0].lstrip("/"): row["State"] for row in rows}

    def kill_main_process(self, name: str) -> None:
        """``kill -9`` of the instance's main process, as seen from the host."""
        pid = self.client.api.inspect_container(name)["State"]["Pid"]
        os.kill(pid, signal.SIGKILL)


def _remove(client: docker.DockerClient, label: str) -> None:
    selector: dict[str, Any] = {"label": label}
    for item in client.containers.list(all=True, filters=selector):
        try:
            item.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: its removal is already in progress (its owner's)
                raise
    for network in client.networks.list(filters=selector):
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()
    for volume in client.volumes.list(filters=selector):
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove(force=True)


def remove_session_resources(client: docker.DockerClient) -> None:
    _remove(client, f"{SESSION_LABEL}={SESSION}")
    for ident in CONTROLLER_IDS:
        _remove(client, f"{base.LABEL_CONTROLLER}={ident}")


def _ensure_plugin_image(kind: container.Engine, client: docker.DockerClient) -> None:
    if kind is container.Engine.DOCKER:
        client.images.build(
            path=str(PLUGIN_DIR),
            tag=PLUGIN_IMAGE,
            buildargs={"RUNTIME_IMAGE": RUNTIME_IMAGE},
            rm=True,
        )
        return
    builder = container.connect(container.Engine.DOCKER)
    try:
        _ensure_plugin_image(container.Engine.DOCKER, builder)
        data = io.BytesIO()
        for chunk in builder.images.get(PLUGIN_IMAGE).save(named=True):
            data.write(chunk)
        client.images.load(data.getvalue())
    finally:
        builder.close()


_ENGINES: dict[container.Engine, EngineUnderTest] = {}


def get_engine(kind: container.Engine) -> EngineUnderTest:
    """The session's connection to ``kind``, with the test plugin image loaded."""
    if kind not in _ENGINES:
        client = container.connect(kind)
        try:
            client.images.get(RUNTIME_IMAGE)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{kind} lacks {RUNTIME_IMAGE}: build the images with images/build.sh")
        _ensure_plugin_image(kind, client)
        _ENGINES[kind] = EngineUnderTest(kind, client)
    return _ENGINES[kind]


@pytest.fixture(scope="session", autouse=True)
def _clean_engines_at_the_end() -> Iterator[None]:
    try:
        yield
    finally:
        for engine in _ENGINES.values():
            remove_session_resources(engine.client)
            engine.client.close()


@pytest.fixture(scope="session", params=list(container.Engine), ids=str)
def engine(request: pytest.FixtureRequest) -> EngineUnderTest:
    return get_engine(request.param)


TIME_SCALE = float(os.environ.get("BLACKHOLE_TEST_TIME_SCALE", "1") or "1")
"""How much longer waits may take on a loaded machine (scripts/loaded.sh sets it)."""


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds
    (times :data:`TIME_SCALE`). ``what`` may be a function, called only on failure, to say
    what was seen then."""
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout}s waiting for {said} (last: {last!r})")
        time.sleep(0.05)
        last = condition()
    return last


SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
spec:
  image: {image}
  version: {version}
"""


_STARTED: list[ControllerProcess] = []
"""Every controller a test made: their gateways outlive them, and are stopped after it."""


@pytest.fixture(autouse=True)
def _stop_gateways() -> Iterator[None]:
    yield
    while _STARTED:
        gateway_process.stop_running(_STARTED.pop().data)


@dataclass
class ControllerProcess:
    """``bhctl run`` as a real process on one engine (None: processes), with its own folders."""

    engine: EngineUnderTest | None
    root: Path
    controller_id: str = field(default_factory=new_controller_id)
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        _STARTED.append(self)
        self.specs = self.root / "specs"
        self.data = self.root / "data"
        self.specs.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "controller.log"
        self.admin = admin_client.AdminClient(self.data / "admin.sock", timeout=30)

    def start(self, env: dict[str, str] | None = None) -> None:
        command = [
            str(BHCTL), "run", "--specs", str(self.specs), "--runtime", self.runtime,
            "--data-dir", str(self.data), "--controller-id", self.controller_id,
            "--resync-seconds", "5", "--gateway-addr", "127.0.0.1:0",
            "--gateway-grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
            *self.extra_args,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        wait_for(self._answers, what=f"the controller to answer (log: {self.log})")

    @property
    def runtime(self) -> str:
        return str(self.engine.kind) if self.engine is not None else "process"

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"controller exited with {self.process.returncode}:\n{self.log_text()}")
        try:
            self.admin.list()
        except admin_client.ControllerNotRunningError:
            return False
        return True

    def gateway(self, kind: str = "http") -> str:
        """The address the controller's gateway listens on."""
        return str(json.loads((self.data / "addresses.json").read_text())[kind])

    def call(
        self,
        name: str,
        method: str,
        payload: Any = None,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any, dict[str, str]]:
        """A call through the gateway: HTTP status, decoded JSON answer, response headers."""
        data = body if body is not None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"http://{self.gateway()}/v1/plugins/{name}/call/{method}",
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, answer, got = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as e:
            status, answer, got = e.code, e.read(), dict(e.headers)
        return status, (json.loads(answer) if answer else None), got

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def end(self) -> None:
        """At a test's end: the controller killed if it runs, and the gateway process a
        killed controller leaves serving (as it must, for the next controller to adopt)
        with it, so that no test's gateway outlives the test."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
        pid = self.gateway_pid() if self.data.exists() else None
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def gateway_pid(self) -> int | None:
        """The pid of the gateway process on this controller's data directory."""
        return gateway_process.running(self.data)

    def gateway_status(self) -> dict[str, Any]:
        return gateway_process.status(self.data)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=60)

    def write(
        self, name: str, body: str = "", version: str = "1.0.0", image: str = PLUGIN_IMAGE
    ) -> Path:
        text = SPEC.format(name=name, image=image, version=version) + body
        path = self.specs / f"{name}.yaml"
        staged = path.with_suffix(".tmp")
        staged.write_text(text)
        staged.rename(path)  # atomically, so no half-written file is ever read
        return path

    def plugins(self) -> dict[str, dict[str, Any]]:
        return {i["metadata"]["name"]: i for i in self.admin.list()["items"]}

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.plugins().get(name, {}).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for item in self.status(name).get("conditions", []):
            if item["type"] == type_:
                return dict(item)
        return {}

    def ready(self, *names: str) -> bool:
        return all(self.condition(n, "Ready").get("status") == "True" for n in names)

    def containers(self) -> dict[str, str]:
        assert self.engine is not None, "a controller on processes has no containers"
        return self.engine.owned_by(self.controller_id)


def bhctl(
    controller: ControllerProcess, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``bhctl ARGS --data-dir`` of ``controller``; its exit status is the caller's to check."""
    return subprocess.run(
        [str(BHCTL), *args, "--data-dir", str(controller.data)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def controller(engine: EngineUnderTest, tmp_path: Path) -> Iterator[ControllerProcess]:
    process = ControllerProcess(engine, tmp_path)
    try:
        yield process
    finally:
        process.end()
        _remove(engine.client, f"{base.LABEL_CONTROLLER}={process.controller_id}")
