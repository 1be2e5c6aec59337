"""Remote plugins: the spec, the runtime that starts nothing and checks the plugin's certificate,
the controller's client certificates kept renewed, and the gateway's table carrying TLS."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
from blackhole_sdk import server
from cryptography import x509

from controller import pki
from controller.gateway import control, router
from controller.metrics import telemetry
from controller.protocol import client
from controller.runtimes import base, memory, remote
from controller.spec import models
from tests.unit.test_plugin_tls import Echo

CONTROLLER_ID = "c1"


def _spec(**remote_fields: Any) -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {"version": "1.0.0", "remote": {"address": "127.0.0.1:1", **remote_fields}}
    )


def _want(spec: models.PluginSpec, color: models.Color = models.Color.BLUE) -> base.InstanceSpec:
    labels = {
        base.LABEL_PLUGIN: "kv",
        base.LABEL_COLOR: color.value,
        base.LABEL_VERSION: str(spec.version),
        base.LABEL_SPEC_HASH: base.instance_hash(spec),
        base.LABEL_NAMESPACE: "ns",
    }
    return base.InstanceSpec("kv", color, spec, labels, "ns", CONTROLLER_ID)


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ({"image": "kv:1"}, "has no image; remove it"),
        ({"bundle": "kv"}, "has no bundle"),
        ({"env": {"A": "1"}}, "has no env"),
        ({"volumes": [{"name": "d", "mountPath": "/d"}]}, "has no volumes"),
        ({"process": {"path": "kv"}}, "has no process"),
        ({"permissions": {"callPlugins": ["b"]}}, "permissions do not apply"),
    ],
)
def test_a_remote_spec_has_nothing_the_controller_would_run(document: dict[str, Any], says: str):
    with pytest.raises(pydantic.ValidationError, match=says):
        models.PluginSpec.model_validate(
            {"version": "1.0.0", "remote": {"address": "10.0.0.2:7443"}, **document}
        )


@pytest.mark.parametrize(
    ("remote_fields", "says"),
    [
        ({"address": "10.0.0.2"}, "is not HOST:PORT"),
        ({"address": "10.0.0.2:70000"}, "port 1-65535"),
        ({"address": "a_b:7443"}, "is not a host name"),
        ({"address": "[nope]:7443"}, "is not an IPv6 address"),
        ({"address": "h:1", "serverName": "not a name"}, "is not a DNS name"),
        ({"address": "h:1", "caFile": "ca.crt"}, "must be an absolute path"),
        ({"address": "h:1", "caFile": "/etc/../ca.crt"}, 'must not contain ".."'),
        ({"address": "h:1", "port": 1}, "Extra inputs are not permitted"),
    ],
)
def test_a_remote_address_and_its_trust_are_checked(remote_fields: dict[str, Any], says: str):
    with pytest.raises(pydantic.ValidationError, match=says):
        models.PluginSpec.model_validate({"version": "1.0.0", "remote": remote_fields})


def test_a_remote_spec_needs_its_version_and_a_new_address_is_a_new_instance():
    with pytest.raises(pydantic.ValidationError, match="version required"):
        models.PluginSpec.model_validate({"remote": {"address": "h:1"}})
    one, other = _spec(address="10.0.0.2:7443"), _spec(address="10.0.0.3:7443")
    assert base.instance_hash(one) != base.instance_hash(other)  # a swap moves the state
    assert models.PluginSpec.model_validate(
        {"version": "1.0.0", "remote": {"address": "[fd00::2]:7443"}}
    ).remote == models.Remote(address="[fd00::2]:7443")


@dataclass
class Remote:
    address: str
    authority: pki.Authority


async def _listen(
    tmp_path: Path, issue: Callable[[pki.Authority], pki.Issued] | None, plaintext: bool = False
) -> AsyncIterator[Remote]:
    """An SDK server on loopback: over TLS with what ``issue`` gives, or plaintext."""
    authority = pki.Authority.create(CONTROLLER_ID)
    grpc_server, _ = server.server_for(Echo(), clients=None if plaintext else server.ClientCheck())
    if plaintext:
        port = grpc_server.add_insecure_port("127.0.0.1:0")
    else:
        directory = tmp_path / "served"
        assert issue is not None
        issue(authority).write(directory, authority.cert_pem)
        files = pki.Files.in_directory(directory)
        tls = server.TLSFiles(str(files.cert), str(files.key), str(files.ca))
        port = grpc_server.add_secure_port("127.0.0.1:0", tls.credentials())
    await grpc_server.start()
    try:
        yield Remote(f"127.0.0.1:{port}", authority)
    finally:
        await grpc_server.stop(0)


def _as_kv(authority: pki.Authority) -> pki.Issued:
    return authority.issue(pki.Identity.plugin(CONTROLLER_ID, "ns", "kv"), hosts=["127.0.0.1"])


@pytest.fixture
async def kv(tmp_path: Path) -> AsyncIterator[Remote]:
    async for found in _listen(tmp_path, _as_kv):
        yield found


def _runtime(tmp_path: Path, authority: pki.Authority) -> remote.RemoteRuntime:
    directory = tmp_path / "clients" / pki.CONTROLLER
    pki.Renewer(authority, pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER), directory).ensure()
    return remote.RemoteRuntime(
        CONTROLLER_ID, tmp_path / "remote", authority.cert_pem, pki.Credentials(directory)
    )


def _channel(remotes: remote.RemoteRuntime, endpoint: str) -> client.ChannelTLS | None:
    found = remotes.reach(endpoint)
    if found is None:
        return None
    target, key, cert = found
    return client.ChannelTLS(ca=target.ca, cert=cert, key=key, server_name=target.server_name)


async def test_a_remote_plugin_is_bound_checked_and_called_and_its_binding_outlives_us(
    kv: Remote, tmp_path: Path
):
    remotes = _runtime(tmp_path, kv.authority)
    started = await remotes.start(_want(_spec(address=kv.address)))
    assert started.state is base.InstanceState.RUNNING
    assert started.address == kv.address
    assert remotes.endpoint(started) == kv.address
    assert await remotes.ready(started, 10)
    assert remotes.refusal(kv.address) is None
    status = remote.status_of(started)
    assert status is not None
    assert status.server_name == "kv.ns.c1.plugin.blackhole"
    assert "cgroupMetrics" in status.not_applicable
    assert "processRestart" in status.not_applicable
    plugins = client.Clients(tls=lambda endpoint: _channel(remotes, endpoint))
    try:
        await plugins.get(kv.address).initialize(
            plugin="kv", version="1.0.0", color="blue", config={}, timeout=10
        )
        answer = await plugins.call(kv.address, "get", b'{"k": 1}', 10)
        assert json.loads(answer)["method"] == "get"
    finally:
        await plugins.close()
    again = remote.RemoteRuntime(
        CONTROLLER_ID, tmp_path / "remote", kv.authority.cert_pem, remotes.credentials
    )  # a controller started again finds the binding, as it finds its containers
    (found,) = await again.list_owned("kv")
    assert found.name == started.name
    assert found.id == started.id
    assert again.reach(kv.address) is not None
    other = remote.RemoteRuntime("c2", tmp_path / "remote", b"", remotes.credentials)
    assert await other.list_owned() == []  # another controller's records are not its own
    await again.stop(started.name, 1)
    assert (await again.inspect(started.name)).state is base.InstanceState.EXITED
    await again.remove(started.name)
    assert await again.list_owned() == []
    assert again.reach(kv.address) is not None  # a channel left open stays on mutual TLS


async def test_nothing_listening_is_not_ready_yet(tmp_path: Path):
    remotes = _runtime(tmp_path, pki.Authority.create(CONTROLLER_ID))
    started = await remotes.start(_want(_spec(address="127.0.0.1:1")))
    assert not await remotes.ready(started, 5)


async def _refusal(tmp_path: Path, remote_plugin: Remote, trusted: pki.Authority) -> str:
    """What answers is there (its handshake is what is refused), and why it is refused."""
    remotes = _runtime(tmp_path, trusted)
    started = await remotes.start(_want(_spec(address=remote_plugin.address)))
    assert await remotes.ready(started, 10)
    refused = remotes.refusal(remote_plugin.address)
    assert refused is not None
    return f"{refused.reason}: {refused}"


async def test_a_certificate_from_another_ca_is_refused_with_why(kv: Remote, tmp_path: Path):
    said = await _refusal(tmp_path, kv, pki.Authority.create(CONTROLLER_ID))
    assert said.startswith("RemoteUntrusted: ")
    assert "does not chain to the CA" in said


async def test_a_certificate_naming_another_plugin_is_refused_with_why(tmp_path: Path):
    def as_other(authority: pki.Authority) -> pki.Issued:
        return authority.issue(pki.Identity.plugin(CONTROLLER_ID, "ns", "other"))

    async for other in _listen(tmp_path, as_other):
        said = await _refusal(tmp_path, other, other.authority)
        assert said.startswith("RemoteIdentityMismatch: ")
        assert "does not name kv.ns.c1.plugin.blackhole" in said


async def test_an_expired_certificate_is_refused_with_why(tmp_path: Path):
    def expired(authority: pki.Authority) -> pki.Issued:
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=3)
        identity = pki.Identity.plugin(CONTROLLER_ID, "ns", "kv")
        return authority.issue(identity, not_before=long_ago, lifetime=datetime.timedelta(hours=1))

    async for old in _listen(tmp_path, expired):
        said = await _refusal(tmp_path, old, old.authority)
        assert said.startswith("RemoteCertificateExpired: ")


async def test_a_plaintext_plugin_is_refused_with_why(tmp_path: Path):
    async for plain in _listen(tmp_path, None, plaintext=True):
        said = await _refusal(tmp_path, plain, plain.authority)
        assert said.startswith("RemoteNotTLS: ")
        assert "mutual TLS only" in said


async def test_a_ca_file_and_a_server_name_of_the_spec_are_what_is_checked(tmp_path: Path):
    def as_named(authority: pki.Authority) -> pki.Issued:
        return authority.issue(pki.Identity.plugin("elsewhere", "x", "y"), hosts=["kv.example"])

    async for named in _listen(tmp_path, as_named):
        ca_file = tmp_path / "their-ca.crt"
        ca_file.write_bytes(named.authority.cert_pem)
        remotes = _runtime(tmp_path, pki.Authority.create(CONTROLLER_ID))  # not our CA
        want = _want(_spec(address=named.address, caFile=str(ca_file), serverName="kv.example"))
        assert remotes.validate(want) == []
        assert await remotes.ready(await remotes.start(want), 10)
        missing = _want(_spec(address=named.address, caFile=str(tmp_path / "none.crt")))
        (issue,) = remotes.validate(missing)
        assert issue.path == "spec.remote.caFile"
        assert "cannot read" in issue.message


async def test_remote_plugins_sit_beside_the_hosts_instances(kv: Remote, tmp_path: Path):
    host = memory.MemoryRuntime(CONTROLLER_ID)
    both = remote.WithRemotes(host, _runtime(tmp_path, kv.authority))
    local = models.PluginSpec.model_validate({"image": "kv:1", "version": "1.0.0"})
    on_host = await both.start(_want(local, models.Color.BLUE))
    away = await both.start(_want(_spec(address=kv.address), models.Color.GREEN))
    assert {i.name for i in await both.list_owned("kv")} == {on_host.name, away.name}
    assert both.endpoint(away) == kv.address
    assert both.endpoint(on_host) == host.endpoint(on_host)
    assert (await both.inspect(away.name)).address == kv.address
    await both.remove(away.name)
    assert [i.name for i in await both.list_owned("kv")] == [on_host.name]
    refusing = remote.WithRemotes(host, None)
    (issue,) = refusing.validate(_want(_spec(address=kv.address)))
    assert issue.path == "spec.remote"
    assert "not supported" in issue.message


async def test_the_gateways_table_carries_how_a_remote_endpoint_is_checked():
    declared = router.Declared(models.Gateway(), frozenset())
    routes = control.RemoteRoutes(
        None, lambda: {"kv": declared, "local": declared, "plain": declared}
    )
    spec = _spec(address="10.0.0.2:7443")
    routes.set_route("kv", "10.0.0.2:7443", "bh-kv-blue", spec)
    routes.set_route("local", "unix:/x/plugin.sock", "bh-local-blue", spec)
    routes.set_route("plain", "unix:/x/plain.sock", "bh-plain-blue", spec)
    checked: control.EndpointTLS = {"serverName": "kv.ns.c1.plugin.blackhole", "ca": "PEM"}
    routes.set_preview("kv", "10.0.0.3:7443")  # a swap's new color, also remote
    other: control.EndpointTLS = {"serverName": "kv.ns.c1.plugin.blackhole", "ca": "PEM2"}
    known = {"10.0.0.2:7443": checked, "10.0.0.3:7443": other}
    routes.carry_tls(known.get)
    routes.set_canary("local", "10.0.0.3:7443", 10)  # a canary on a remote address
    table = routes.table()
    assert table["kv"]["tls"] == known
    assert table["local"]["tls"] == {"10.0.0.3:7443": other}
    assert "tls" not in table["plain"]
    gateway = control.ControlServer(router.Router(telemetry.Metrics()))
    gateway.apply_table(table)
    assert gateway.tls == known


async def test_the_client_certificates_are_renewed_before_they_expire_and_read_again(
    tmp_path: Path,
):
    authority = pki.Authority.create(CONTROLLER_ID)
    directory = tmp_path / "gateway"
    lifetime = datetime.timedelta(seconds=3)
    renewer = pki.Renewer(
        authority, pki.Identity.role(CONTROLLER_ID, pki.GATEWAY), directory, lifetime=lifetime
    )
    credentials = pki.Credentials(directory)
    assert credentials.current() is None  # nothing issued yet
    stop = asyncio.Event()
    renewing = asyncio.create_task(pki.keep_renewed([renewer], stop))
    try:
        async with asyncio.timeout(30):
            while (first := credentials.current()) is None:
                await asyncio.sleep(0.05)
            issued = x509.load_pem_x509_certificate(first[2])
            # Not due at once (a short lifetime is backdated by a quarter of it at most).
            span = issued.not_valid_after_utc - issued.not_valid_before_utc
            assert span <= lifetime * 1.25 + datetime.timedelta(seconds=1)  # whole seconds
            assert not pki.due(renewer.files.cert)
            while (now := credentials.current()) == first:
                await asyncio.sleep(0.05)
        seen = datetime.datetime.now(datetime.UTC)
        assert now is not None
        assert seen < issued.not_valid_after_utc  # renewed, and read, before it expired
        pki.read_pair(renewer.files)  # the key is the new certificate's
    finally:
        stop.set()
        await renewing


def test_bhctl_certificate_issue_certifies_a_remote_plugin_from_the_controllers_ca(
    tmp_path: Path,
):
    from typer.testing import CliRunner

    from controller.cli import main

    data = tmp_path / "data"
    missing = CliRunner().invoke(
        main.app,
        ["certificate", "issue", "kv", "--out", str(tmp_path / "x"), "--data-dir", str(data)],
    )
    assert missing.exit_code == 1
    assert "no CA in" in missing.output
    authority = pki.Authority.load_or_create(data / "pki", CONTROLLER_ID)  # as bhctl run makes it
    out = tmp_path / "kv-tls"
    done = CliRunner().invoke(
        main.app,
        [
            "certificate", "issue", "kv", "--out", str(out), "--host", "10.0.3.2",
            "--controller-id", CONTROLLER_ID, "--namespace", "ns", "--data-dir", str(data),
        ],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    ca, _, cert = pki.read_pair(pki.Files.in_directory(out))
    assert ca == authority.cert_pem
    assert pki.identities_of(cert) == [pki.Identity.plugin(CONTROLLER_ID, "ns", "kv")]
    issued = x509.load_pem_x509_certificate(cert)
    issued.verify_directly_issued_by(authority.cert)
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kv.ns.c1.plugin.blackhole" in san.get_values_for_type(x509.DNSName)
    assert (out / pki.KEY).stat().st_mode & 0o077 == 0


def test_a_client_certificate_of_another_ca_is_issued_again_at_once(tmp_path: Path):
    identity = pki.Identity.role(CONTROLLER_ID, pki.CONTROLLER)
    before = pki.Renewer(pki.Authority.create(CONTROLLER_ID), identity, tmp_path / "c")
    assert before.ensure()
    assert not before.ensure()  # not due yet
    operators = pki.Authority.create("operator")  # the controller now runs with --ca-cert
    after = pki.Renewer(operators, identity, tmp_path / "c")
    assert after.ensure()
    ca, _, cert = pki.read_pair(after.files)
    assert ca == operators.cert_pem
    x509.load_pem_x509_certificate(cert).verify_directly_issued_by(operators.cert)


def test_bhctl_get_shows_where_a_remote_plugin_is_reached():
    from controller.admin import columns

    item = {"metadata": {"name": "kv"}, "spec": {"version": "1.0.0", "remote": {"address": "h:1"}}}
    assert columns.row(item, ["NAME", "IMAGE"]) == ["kv", "remote h:1"]


def test_a_following_renewer_renews_only_a_certificate_of_its_own_ca(tmp_path: Path):
    identity = pki.Identity.role(CONTROLLER_ID, pki.GATEWAY)
    ours, theirs = pki.Authority.create(CONTROLLER_ID), pki.Authority.create("operator")
    short = datetime.timedelta(seconds=30)
    gateway = pki.Renewer(ours, identity, tmp_path / "g", lifetime=short, follow=True)
    assert not gateway.ensure()  # the controller issues the first
    pki.Renewer(theirs, identity, tmp_path / "g").ensure()  # ... from the operator's CA
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2)
    assert not gateway.ensure(later)  # due, but another CA's: the controller decides
    pki.Renewer(ours, identity, tmp_path / "g", lifetime=short).ensure()
    assert not gateway.ensure()  # ours, not due
    assert gateway.ensure(later)  # ours and due: renewed without the controller
    ca, _, _ = pki.read_pair(gateway.files)
    assert ca == ours.cert_pem


def test_the_gateway_process_is_started_with_what_renews_its_certificate(tmp_path: Path):
    from controller.cli import gateway, run

    options = run.Options(
        specs=None, runtime=run.RuntimeChoice.PROCESS, data_dir=tmp_path, workers=1,
        resync_seconds=5, host_path_root=None, controller_id="c9",
        ca=(tmp_path / "ca.crt", tmp_path / "ca.key"), client_cert_lifetime=60.0,
    )  # fmt: skip
    args = options.gateway_options().arguments()
    assert args[args.index("--controller-id") + 1] == "c9"
    assert args[args.index("--ca-cert") + 1] == str(tmp_path / "ca.crt")
    assert args[args.index("--ca-key") + 1] == str(tmp_path / "ca.key")
    assert float(args[args.index("--client-cert-lifetime") + 1]) == 60.0
    authority = pki.Authority.load_or_create(tmp_path / "pki", "c9")  # the controller's own
    (renewer,) = gateway._renewers(gateway.GatewayOptions(data_dir=tmp_path, controller_id="c9"))
    assert renewer.authority.cert_pem == authority.cert_pem
    assert renewer.identity == pki.Identity.role("c9", pki.GATEWAY)
    assert renewer.follow
    assert gateway._renewers(gateway.GatewayOptions(data_dir=tmp_path / "none")) == []
