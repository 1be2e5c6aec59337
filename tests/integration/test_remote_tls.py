"""A plugin on another host, reached over mutual TLS only.

The other host is a network namespace joined to this one by a veth pair: the
example storage plugin runs there with ``serve()`` as a plugin author ships
it, listening on the namespace's address with the certificate the
controller's CA issued to it; the controller's client calls it from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller import pki
from controller.errors import PluginCallError
from controller.protocol import client
from tests.unit.test_plugin_tls import served_certificate

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER_ID = "c1"
KV = pki.Identity.plugin(CONTROLLER_ID, "ns", "kv")
PORT = 7443


@pytest.fixture(autouse=True, scope="module")
def _network_namespaces() -> None:
    """Hosts are network namespaces here: that needs iproute2's ip (make setup installs it)
    and root, as the README's test command runs."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("network namespaces need iproute2 (scripts/engines.sh netns) and root")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    namespace: str
    address: str


@contextlib.contextmanager
def network_namespace() -> Iterator[Host]:
    """A network namespace with an address this one reaches (names unique to this run)."""
    tag = secrets.token_hex(3)
    namespace, outside, inside = f"bh-tls-{tag}", f"bht{tag}a", f"bht{tag}b"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("addr", "add", f"{subnet}.1/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "addr", "add", f"{subnet}.2/30", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        yield Host(namespace, f"{subnet}.2")
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=30)


@pytest.fixture
def other_host() -> Iterator[Host]:
    with network_namespace() as host:
        yield host


@dataclass
class Remote:
    endpoint: str
    authority: pki.Authority
    renewer: pki.Renewer
    directory: Path

    def tls(self, **changes: object) -> client.ChannelTLS:
        issued = self.authority.issue(pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER))
        found = client.ChannelTLS(
            ca=self.authority.cert_pem,
            cert=issued.cert_pem,
            key=issued.key_pem,
            server_name=KV.server_name,
        )
        return dataclasses.replace(found, **changes)  # type: ignore[arg-type]


@pytest.fixture
def remote(other_host: Host, tmp_path: Path) -> Iterator[Remote]:
    authority = pki.Authority.create(CONTROLLER_ID)
    directory = tmp_path / "kv-tls"
    renewer = pki.Renewer(authority, KV, directory, hosts=[other_host.address])
    renewer.ensure()
    files = pki.Files.in_directory(directory)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "sdk"), str(ROOT)]),
        "BLACKHOLE_ADDRESS": f"{other_host.address}:{PORT}",
        "BLACKHOLE_PLUGIN": "kv",
        "BLACKHOLE_TLS_CERT": str(files.cert),
        "BLACKHOLE_TLS_KEY": str(files.key),
        "BLACKHOLE_TLS_CA": str(files.ca),
    }
    log = (tmp_path / "plugin.log").open("wb")
    plugin = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            other_host.namespace,
            sys.executable,
            "-m",
            "examples.storage.plugin",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"{other_host.address}:{PORT}"
    try:
        deadline = time.monotonic() + 60
        while b"listening on" not in (tmp_path / "plugin.log").read_bytes():
            assert plugin.poll() is None, (tmp_path / "plugin.log").read_text()
            assert time.monotonic() < deadline, "the plugin did not listen within 60 s"
            time.sleep(0.05)
        yield Remote(endpoint, authority, renewer, directory)
    finally:
        plugin.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            plugin.wait(30)
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait(30)
        log.close()


async def _initialize(plugins: client.Clients, endpoint: str) -> None:
    await plugins.get(endpoint).initialize(
        plugin="kv", version="1.0.0", color="blue", config={}, timeout=30
    )


async def test_a_plugin_on_another_host_answers_over_mutual_tls(remote: Remote):
    tls = remote.tls()
    plugins = client.Clients(tls=lambda _: tls)
    try:
        await _initialize(plugins, remote.endpoint)
        assert await plugins.healthy(remote.endpoint, 30)
        put = json.dumps({"key": "a", "value": 1}).encode()
        await plugins.call(remote.endpoint, "put", put, 30)
        got = await plugins.call(remote.endpoint, "get", json.dumps({"key": "a"}).encode(), 30)
        assert json.loads(got)["value"] == 1
    finally:
        await plugins.close()


async def _refused(endpoint: str, tls: client.ChannelTLS | None) -> None:
    plugins = client.Clients(tls=lambda _: tls)
    try:
        with pytest.raises(PluginCallError) as raised:
            await _initialize(plugins, endpoint)
        assert raised.value.code in {"UNAVAILABLE", "PERMISSION_DENIED"}
        with pytest.raises(PluginCallError):
            await plugins.call(endpoint, "get", b'{"key": "a"}', 10)
    finally:
        await plugins.close()


async def test_a_wrong_ca_an_expired_certificate_a_wrong_san_and_plaintext_are_refused(
    remote: Remote,
):
    stranger = pki.Authority.create(CONTROLLER_ID)
    await _refused(remote.endpoint, remote.tls(ca=stranger.cert_pem))  # not our plugin
    theirs = stranger.issue(pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER))
    await _refused(remote.endpoint, remote.tls(cert=theirs.cert_pem, key=theirs.key_pem))
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=3)
    expired = remote.authority.issue(
        pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER),
        not_before=long_ago,
        lifetime=datetime.timedelta(hours=1),
    )
    await _refused(remote.endpoint, remote.tls(cert=expired.cert_pem, key=expired.key_pem))
    other = pki.Identity.plugin(CONTROLLER_ID, "ns", "other")
    await _refused(remote.endpoint, remote.tls(server_name=other.server_name))
    await _refused(remote.endpoint, None)  # plaintext
    # And the right settings still work: the refusals were about the settings alone.
    tls = remote.tls()
    plugins = client.Clients(tls=lambda _: tls)
    try:
        await _initialize(plugins, remote.endpoint)
    finally:
        await plugins.close()


RATE = 200
"""Calls per second during the rotation."""


async def test_a_rotation_under_200_calls_a_second_fails_no_call(remote: Remote):
    current = [remote.tls()]
    plugins = client.Clients(tls=lambda _: current[0])
    failures: list[PluginCallError] = []
    answered = 0
    stop = asyncio.Event()

    async def one(n: int) -> None:
        nonlocal answered
        payload = json.dumps({"key": f"k{n % 50}", "value": n}).encode()
        try:
            await plugins.call(remote.endpoint, "put", payload, 30)
            answered += 1
        except PluginCallError as e:
            failures.append(e)

    async def paced() -> None:
        calls: set[asyncio.Task[None]] = set()
        started, n = time.monotonic(), 0
        while not stop.is_set():
            n += 1
            task = asyncio.create_task(one(n))
            calls.add(task)
            task.add_done_callback(calls.discard)
            await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
        await asyncio.gather(*calls)

    await _initialize(plugins, remote.endpoint)
    load = asyncio.create_task(paced())
    try:
        for _ in range(3):
            await asyncio.sleep(1.0)
            later = datetime.datetime.now(datetime.UTC) + pki.INSTANCE_LIFETIME
            assert remote.renewer.ensure(later)  # the plugin's certificate
            current[0] = remote.tls()  # and the controller's: new connections
            shown = await asyncio.to_thread(
                served_certificate, remote.endpoint, current[0], remote.directory.parent
            )
            renewed = remote.renewer.files.cert.read_bytes().decode()
            assert ssl.PEM_cert_to_DER_cert(shown.decode()) == ssl.PEM_cert_to_DER_cert(renewed)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await load
        await plugins.close()
    assert failures == []
    assert answered >= RATE * 2  # the load really ran at about the rate, through it all
