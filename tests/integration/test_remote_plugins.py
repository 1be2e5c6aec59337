"""Remote plugins through a real controller and its gateway: on other hosts, over mutual TLS only.

Each other host is a network namespace joined to this one by a veth pair
(:func:`tests.integration.test_remote_tls.network_namespace`); the example
storage plugin runs there with ``serve()`` as its author ships it, with a
certificate from the operator's CA that the controller is started with
(``--ca-cert``/``--ca-key``). The controller (``bhctl run``, its gateway a
process of its own) runs nothing of it: its spec names the address.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller import pki
from controller.cli import paths

from .conftest import ControllerProcess, wait_for
from .test_remote_tls import Host, network_namespace

ROOT = Path(__file__).resolve().parents[2]
PORT = 7443
PLUGIN_MODULE = "examples.storage.plugin"


@pytest.fixture(autouse=True, scope="module")
def _network_namespaces() -> None:
    """Hosts are network namespaces here: that needs iproute2's ip (make setup installs it)
    and root, as the README's test command runs."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("network namespaces need iproute2 (scripts/engines.sh netns) and root")


KV_BODY = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
spec:
  version: 2.0.0
  remote:
    address: {address}
  state: {{version: 2, checkpointSeconds: 0}}
  health: {{periodSeconds: 1, timeoutSeconds: 5}}
  hotSwap: {{scaleDownDelaySeconds: 1}}
  gateway: {{maxConcurrentCalls: 512}}
"""


@dataclass
class Operator:
    """An operator's CA, given to the controller as files."""

    authority: pki.Authority
    cert: Path
    key: Path


@pytest.fixture
def operator(tmp_path: Path) -> Operator:
    authority = pki.Authority.create("operator")
    directory = tmp_path / "operator-ca"
    directory.mkdir(mode=0o700)
    cert, key = directory / "ca.crt", directory / "ca.key"
    cert.write_bytes(authority.cert_pem)
    key.write_bytes(authority.key.private_bytes(*_pkcs8()))
    key.chmod(0o600)
    return Operator(authority, cert, key)


def _pkcs8() -> tuple[Any, Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return (
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


CLIENT_LIFETIME = 12
"""Seconds the controller's and the gateway's client certificates live here (renewed at 2/3)."""


@pytest.fixture
def controller(tmp_path: Path, operator: Operator) -> Iterator[ControllerProcess]:
    running = ControllerProcess(
        None,
        tmp_path,
        extra_args=[
            "--ca-cert", str(operator.cert), "--ca-key", str(operator.key),
            "--client-cert-lifetime", str(CLIENT_LIFETIME),
        ],
    )  # fmt: skip
    running.start()
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.terminate()
        running.end()


@contextlib.contextmanager
def serving(
    host: Host, port: int, directory: Path | None, log: Path, name: str = "kv"
) -> Iterator[str]:
    """The example storage plugin on ``host``: over TLS with the files in ``directory``
    (plaintext when None); its address."""
    address = f"{host.address}:{port}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "sdk"), str(ROOT)]),
        "BLACKHOLE_ADDRESS": address,
        "BLACKHOLE_PLUGIN": name,
    }
    if directory is not None:
        files = pki.Files.in_directory(directory)
        env |= {
            "BLACKHOLE_TLS_CERT": str(files.cert),
            "BLACKHOLE_TLS_KEY": str(files.key),
            "BLACKHOLE_TLS_CA": str(files.ca),
        }
    with log.open("wb") as out:
        plugin = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.namespace,
                sys.executable,
                "-m",
                "examples.storage.plugin",
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b"listening on" not in log.read_bytes():
            assert plugin.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the plugin did not listen within 60 s"
            time.sleep(0.05)
        yield address
    finally:
        plugin.terminate()
        try:
            plugin.wait(30)
        except subprocess.TimeoutExpired:
            plugin.kill()
            plugin.wait(30)


def certify(
    authority: pki.Authority, controller: ControllerProcess, name: str, host: Host, into: Path
) -> Path:
    """Issue the certificate of plugin ``name`` (as this controller expects it) for ``host``."""
    identity = pki.Identity.plugin(controller.controller_id, None, name)
    authority.issue(identity, hosts=[host.address]).write(into, authority.cert_pem)
    return into


def put(controller: ControllerProcess, key: str, value: Any) -> int:
    status, _, _ = controller.call("kv", "put", {"key": key, "value": value})
    return status


def get(controller: ControllerProcess, key: str) -> tuple[int, Any]:
    status, answer, _ = controller.call("kv", "get", {"key": key})
    return status, answer


def answered_calls(controller: ControllerProcess) -> float:
    """``blackhole_gateway_requests_total`` of kv answered 200, from the controller's /metrics."""
    address = json.loads((controller.data / "addresses.json").read_text())["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        counted = line.startswith("blackhole_gateway_requests_total{") and 'plugin="kv"' in line
        if counted and 'code="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class Load:
    """Calls through the gateway from a few threads until stopped; every answer counted."""

    def __init__(self, controller: ControllerProcess, threads: int = 8) -> None:
        self.controller = controller
        self.failures: list[str] = []
        self.answered = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._runs = [self._pool.submit(self._run, n) for n in range(threads)]

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            key = f"load-{worker}-{n % 20}"
            try:
                status = put(self.controller, key, n)
                why = "" if status == 200 else f"put {key}: {status}"
            except OSError as e:
                why = f"put {key}: {e}"
            with self._lock:
                if why:
                    self.failures.append(why)
                else:
                    self.answered += 1

    def stop(self) -> None:
        self._stop.set()
        for run in self._runs:
            run.result()
        self._pool.shutdown()


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _instance(controller: ControllerProcess, name: str) -> dict[str, Any]:
    active = controller.status(name).get("activeColor")
    for record in controller.status(name).get("instances") or []:
        if record["color"] == active:
            return dict(record)
    return {}


def test_a_remote_plugin_is_reached_only_over_mutual_tls_through_controller_and_gateway(
    controller: ControllerProcess, operator: Operator, tmp_path: Path
):
    with (
        network_namespace() as host,
        serving(
            host,
            PORT,
            certify(operator.authority, controller, "kv", host, tmp_path / "kv-tls"),
            tmp_path / "kv.log",
        ) as address,
    ):
        controller.specs.joinpath("kv.yaml").write_text(KV_BODY.format(name="kv", address=address))
        wait_for(lambda: controller.ready("kv"), 90, "kv (remote) to be Ready")
        record = _instance(controller, "kv")
        assert record["remote"]["address"] == address
        assert record["remote"]["serverName"] == (
            f"kv.default.{controller.controller_id}.plugin.blackhole"
        )
        assert set(record["remote"]["notApplicable"]) >= {"cgroupMetrics", "processRestart"}
        for n in range(20):
            assert put(controller, f"k{n}", n) == 200
        assert get(controller, "k7") == (200, {"key": "k7", "value": 7, "revision": 1})
        assert answered_calls(controller) >= 21  # the gateway counts them as any plugin's

        # The client certificates of the controller (health checks) and of the gateway
        # (calls) are renewed twice under calls, and no call fails.
        clients = {
            role: pki.Files.in_directory(paths.client_certificates(controller.data, role)).cert
            for role in (pki.CONTROLLER, pki.GATEWAY)
        }
        first = {role: _serial(path) for role, path in clients.items()}
        load = Load(controller)
        try:
            for _ in range(2):
                before = {role: _serial(path) for role, path in clients.items()}
                wait_for(
                    lambda before=before: all(  # type: ignore[misc]
                        _serial(path) != before[role] for role, path in clients.items()
                    ),
                    CLIENT_LIFETIME * 3,
                    "the client certificates to be renewed",
                )
            time.sleep(1.0)  # calls on the renewed certificates' channels too
        finally:
            load.stop()
        assert load.failures == []
        assert load.answered > 100
        assert all(_serial(path) != first[role] for role, path in clients.items())
        assert controller.ready("kv")
        key = paths.client_certificates(controller.data, pki.GATEWAY) / pki.KEY
        assert key.stat().st_mode & 0o077 == 0

        # A controller started again finds the binding (nothing to start) and goes on.
        bindings = sorted(p.name for p in (controller.data / "remote").iterdir())
        assert controller.terminate() == 0
        controller.start()
        wait_for(lambda: controller.ready("kv"), 90, "kv Ready under the new controller")
        assert sorted(p.name for p in (controller.data / "remote").iterdir()) == bindings
        assert _instance(controller, "kv")["remote"]["address"] == address
        assert put(controller, "after", 1) == 200


@pytest.mark.parametrize(
    ("case", "reason", "says"),
    [
        ("wrongca", "RemoteUntrusted", "does not chain to the CA"),
        ("wrongsan", "RemoteIdentityMismatch", "does not name wrongsan.default."),
        ("plaintext", "RemoteNotTLS", "mutual TLS only"),
    ],
)
def test_a_wrong_ca_a_wrong_san_and_plaintext_are_refused_and_the_status_says_why(
    controller: ControllerProcess,
    operator: Operator,
    tmp_path: Path,
    case: str,
    reason: str,
    says: str,
):
    with network_namespace() as host:
        directory: Path | None = tmp_path / "served"
        if case == "wrongca":  # a certificate for the right name, from another CA
            identity = pki.Identity.plugin(controller.controller_id, None, case)
            issued = pki.Authority.create("stranger").issue(identity, hosts=[host.address])
            issued.write(tmp_path / "served", operator.authority.cert_pem)
        elif case == "wrongsan":  # from the right CA, for another plugin
            certify(operator.authority, controller, "other", host, tmp_path / "served")
        else:
            directory = None
        _refused(controller, host, directory, tmp_path, case, reason, says)


def _refused(
    controller: ControllerProcess,
    host: Host,
    directory: Path | None,
    tmp_path: Path,
    case: str,
    reason: str,
    says: str,
) -> None:
    with serving(host, PORT, directory, tmp_path / f"{case}.log", name=case) as address:
        body = KV_BODY.format(name=case, address=address)
        controller.specs.joinpath(f"{case}.yaml").write_text(body)
        wait_for(
            lambda: controller.condition(case, "Ready").get("reason") == reason,
            90,
            f"{case} to be refused with {reason}",
        )
        ready = controller.condition(case, "Ready")
        assert ready["status"] == "False"
        assert says in ready["message"]
        assert address in ready["message"]
        status, answer, _ = controller.call(case, "get", {"key": "a"})
        assert status == 503, answer  # declared, never routed: no call reached it


def test_a_swap_between_two_remote_plugins_keeps_every_key_under_calls(
    controller: ControllerProcess, operator: Operator, tmp_path: Path
):
    with contextlib.ExitStack() as hosts, contextlib.ExitStack() as first_plugin:
        first_host = hosts.enter_context(network_namespace())
        second_host = hosts.enter_context(network_namespace())
        first = first_plugin.enter_context(
            serving(
                first_host,
                PORT,
                certify(operator.authority, controller, "kv", first_host, tmp_path / "first-tls"),
                tmp_path / "first.log",
            )
        )
        second = hosts.enter_context(
            serving(
                second_host,
                PORT,
                certify(operator.authority, controller, "kv", second_host, tmp_path / "second-tls"),
                tmp_path / "second.log",
            )
        )
        spec = controller.specs / "kv.yaml"
        spec.write_text(KV_BODY.format(name="kv", address=first))
        wait_for(lambda: controller.ready("kv"), 90, "kv at the first address to be Ready")
        keys = {f"key-{n}": {"n": n, "text": "x" * (n % 50)} for n in range(300)}
        for key, value in keys.items():
            assert put(controller, key, value) == 200
        load = Load(controller)
        try:
            time.sleep(1.0)
            spec.write_text(KV_BODY.format(name="kv", address=second))
            wait_for(
                lambda: (
                    (controller.status("kv").get("lastSwap") or {}).get("result")
                    in ("Promoted", "RolledBack")
                ),
                120,
                "the swap to the second address to end",
            )
            time.sleep(1.0)  # calls after the flip, on the second plugin
        finally:
            load.stop()
        swap = controller.status("kv")["lastSwap"]
        assert swap["result"] == "Promoted", f"{json.dumps(swap)}\n{controller.log_text()[-6000:]}"
        assert swap["stateBytes"] > 0
        assert _instance(controller, "kv")["remote"]["address"] == second
        assert load.failures == []
        assert load.answered > 50
        wait_for(
            lambda: len(controller.status("kv").get("instances") or []) == 1,
            60,
            "the first address to be let go of",
        )
        first_plugin.close()  # the first plugin is gone: what answers now is the second
        for key, value in keys.items():
            status, answer = get(controller, key)
            assert status == 200, (key, answer)
            assert answer["value"] == value
        assert controller.ready("kv")


def test_a_swap_to_an_address_whose_certificate_names_another_plugin_rolls_back(
    controller: ControllerProcess, operator: Operator, tmp_path: Path
):
    with contextlib.ExitStack() as stack:
        first_host = stack.enter_context(network_namespace())
        other_host = stack.enter_context(network_namespace())
        first = stack.enter_context(
            serving(
                first_host,
                PORT,
                certify(operator.authority, controller, "kv", first_host, tmp_path / "first-tls"),
                tmp_path / "first.log",
            )
        )
        impostor = stack.enter_context(
            serving(
                other_host,
                PORT,
                certify(operator.authority, controller, "other", other_host, tmp_path / "other"),
                tmp_path / "other.log",
            )
        )
        spec = controller.specs / "kv.yaml"
        spec.write_text(KV_BODY.format(name="kv", address=first))
        wait_for(lambda: controller.ready("kv"), 90, "kv at the first address to be Ready")
        assert put(controller, "kept", 1) == 200
        spec.write_text(KV_BODY.format(name="kv", address=impostor))
        wait_for(
            lambda: (controller.status("kv").get("lastSwap") or {}).get("result") == "RolledBack",
            120,
            "the swap to the impostor to roll back",
        )
        swap = controller.status("kv")["lastSwap"]
        assert swap["reason"] == "SwapFailedHandshake", swap
        assert f"does not name kv.default.{controller.controller_id}" in swap["message"]
        assert get(controller, "kept") == (200, {"key": "kept", "value": 1, "revision": 1})
        assert _instance(controller, "kv")["remote"]["address"] == first
        assert controller.ready("kv")


def test_a_gateway_left_without_its_controller_renews_its_own_certificate_and_serves_on(
    controller: ControllerProcess, operator: Operator, tmp_path: Path
):
    with (
        network_namespace() as host,
        serving(
            host,
            PORT,
            certify(operator.authority, controller, "kv", host, tmp_path / "kv-tls"),
            tmp_path / "kv.log",
        ) as address,
    ):
        controller.specs.joinpath("kv.yaml").write_text(KV_BODY.format(name="kv", address=address))
        wait_for(lambda: controller.ready("kv"), 90, "kv (remote) to be Ready")
        assert put(controller, "before", 1) == 200
        controller.kill()  # SIGKILL: nothing renews the gateway's certificate but itself now
        cert = pki.Files.in_directory(paths.client_certificates(controller.data, pki.GATEWAY)).cert
        before = _serial(cert)
        load = Load(controller, threads=2)
        try:
            wait_for(lambda: _serial(cert) != before, CLIENT_LIFETIME * 3, "a renewal")
            time.sleep(1.0)  # calls on the renewed certificate's channel
        finally:
            load.stop()
        assert load.failures == []
        assert load.answered > 10
        renewed = x509.load_pem_x509_certificate(cert.read_bytes())
        renewed.verify_directly_issued_by(operator.authority.cert)
        assert get(controller, "before") == (200, {"key": "before", "value": 1, "revision": 1})
