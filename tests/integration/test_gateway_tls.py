"""``bhctl run --gateway-tls-*``: the gateway process it starts serves HTTPS and gRPC over TLS,
asks for client certificates and names callers by them; files it cannot use stop it at once."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from blackhole_sdk.proto import plugin_pb2

from controller import pki
from controller.runtimes import process

from .conftest import BHCTL, PLUGIN_DIR, ControllerProcess, wait_for

HANDLE = "/blackhole.plugin.v1.Plugin/Handle"
TOKEN = "a-token-for-ops-0123456789"
BODY = """\
  process: {{path: {path}}}
  resources: {{memory: 64Mi, cpu: 500m, pids: 64}}
"""


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    where = tmp_path / "certs"
    where.mkdir()
    server_ca, client_ca = pki.Authority.create("test"), pki.Authority.create("clients")
    server = server_ca.issue(pki.Identity.plugin("test", None, "gateway"), hosts=["127.0.0.1"])
    client = client_ca.issue(pki.Identity.role("test", "reader"))
    return {
        "ca": _write(where / "ca.crt", server_ca.cert_pem, 0o644),
        "cert": _write(where / "tls.crt", server.cert_pem, 0o644),
        "key": _write(where / "tls.key", server.key_pem, 0o600),
        "client_ca": _write(where / "clients.crt", client_ca.cert_pem, 0o644),
        "client_cert": _write(where / "reader.crt", client.cert_pem, 0o644),
        "client_key": _write(where / "reader.key", client.key_pem, 0o600),
    }


@pytest.fixture
def controller(tmp_path: Path, certificates: dict[str, Path]) -> Iterator[ControllerProcess]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        f"tokens:\n"
        f"  - {{name: ops, token: {TOKEN}, plugins: ['*']}}\n"
        f"  - {{name: reader, certificates: ['blackhole://test/reader'], plugins: [kept]}}\n"
    )
    tokens.chmod(0o600)
    running = ControllerProcess(
        None,
        tmp_path,
        extra_args=[
            "--plugin-root", str(PLUGIN_DIR.parent), "--gateway-tokens", str(tokens),
            "--gateway-tls-cert", str(certificates["cert"]),
            "--gateway-tls-key", str(certificates["key"]),
            "--gateway-tls-client-ca", str(certificates["client_ca"]),
        ],
    )  # fmt: skip
    try:
        yield running
    finally:
        running.end()
        asyncio.run(_remove_all(running))


async def _remove_all(controller: ControllerProcess) -> None:
    runtime = process.ProcessRuntime(
        process.Settings(data_dir=controller.data, controller_id=controller.controller_id)
    )
    for instance in await runtime.list_owned():
        await runtime.remove(instance.name)


def _https(
    controller: ControllerProcess, certificates: dict[str, Path], plugin: str, **headers: str
) -> tuple[int, object]:
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    context.load_cert_chain(certificates["client_cert"], certificates["client_key"])
    host, port = controller.gateway().rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        connection.request("POST", f"/v1/plugins/{plugin}/call/echo", b'{"n": 1}', headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def test_the_gateway_process_serves_tls_and_names_callers_by_their_certificates(
    controller: ControllerProcess, certificates: dict[str, Path]
) -> None:
    controller.start()
    for name in ("kept", "other"):
        controller.write(name, BODY.format(path=PLUGIN_DIR.name))
    wait_for(lambda: controller.ready("kept", "other"), 60, "the plugins to be Ready")
    wait_for(lambda: _https(controller, certificates, "kept")[0] == 200, 60, "the gateway's route")
    assert _https(controller, certificates, "kept") == (200, {"n": 1})
    assert _https(controller, certificates, "other")[0] == 404  # not on the reader's list
    assert _https(controller, certificates, "other", Authorization=f"Bearer {TOKEN}")[0] == 200

    credentials = grpc.ssl_channel_credentials(
        certificates["ca"].read_bytes(),
        certificates["client_key"].read_bytes(),
        certificates["client_cert"].read_bytes(),
    )
    with grpc.secure_channel(controller.gateway("grpc"), credentials) as channel:
        handle: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(HANDLE)
        request = plugin_pb2.HandleRequest(method="echo", payload=b'{"n": 2}')
        answer = handle(
            request.SerializeToString(), metadata=(("x-blackhole-plugin", "kept"),), timeout=30
        )
        assert json.loads(plugin_pb2.HandleResponse.FromString(answer).payload) == {"n": 2}
    with grpc.insecure_channel(controller.gateway("grpc")) as plain:
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = plain.unary_unary(HANDLE)
        with pytest.raises(grpc.RpcError) as refused:
            raw(b"", metadata=(("x-blackhole-plugin", "kept"),), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_key_readable_by_others_stops_bhctl_run_with_the_reason(
    tmp_path: Path, certificates: dict[str, Path]
) -> None:
    certificates["key"].chmod(0o640)
    result = subprocess.run(
        [str(BHCTL), "run", "--runtime", "process", "--data-dir", str(tmp_path / "data"),
         "--specs", str(tmp_path), "--metrics-addr", "",
         "--gateway-tls-cert", str(certificates["cert"]),
         "--gateway-tls-key", str(certificates["key"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"--gateway-tls-key {certificates['key']} is readable by others (mode 640)" in (
        result.stdout + result.stderr
    )
