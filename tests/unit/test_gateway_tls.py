"""The gateway's listeners over TLS with an operator's certificate, and client certificates
standing for tokens file entries: real TLS on loopback, certificates from the controller's CA."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from blackhole_sdk.proto import plugin_pb2

from controller import pki
from controller.cli import run
from controller.gateway import auth, connections, tls
from tests.gateway_harness import NARROW, OPS, GatewayThread, raw_handle

READER = "blackhole://test/reader"
"""The URI SAN of the client certificate a tokens file entry lists."""
STRANGER = "blackhole://test/stranger"
"""Another client certificate of the same CA that no entry lists."""


@dataclass(frozen=True)
class Files:
    cert: Path
    key: Path
    ca: Path
    """The CA that issued the server's certificate (what a caller trusts)."""
    client_ca: Path
    clients: dict[str, tuple[Path, Path]]
    """Client certificate and key files, by name: reader, stranger, foreign (another CA)."""


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    where = tmp_path_factory.mktemp("tls")
    server_ca = pki.Authority.create("test")
    issued = server_ca.issue(
        pki.Identity.plugin("test", None, "gateway"), hosts=["127.0.0.1", "localhost"]
    )
    client_ca, foreign_ca = pki.Authority.create("clients"), pki.Authority.create("foreign")
    clients = {}
    for name, authority, role in (
        ("reader", client_ca, "reader"),
        ("stranger", client_ca, "stranger"),
        ("foreign", foreign_ca, "reader"),
    ):
        client = authority.issue(pki.Identity.role("test", role))
        clients[name] = (
            _write(where / f"{name}.crt", client.cert_pem, 0o644),
            _write(where / f"{name}.key", client.key_pem),
        )
    return Files(
        _write(where / "tls.crt", issued.cert_pem, 0o644),
        _write(where / "tls.key", issued.key_pem),
        _write(where / "ca.crt", server_ca.cert_pem, 0o644),
        _write(where / "clients.crt", client_ca.cert_pem, 0o644),
        clients,
    )


def _listener(files: Files, client_ca: bool = False) -> tls.ListenerTLS:
    return tls.ListenerTLS.load(files.cert, files.key, files.client_ca if client_ca else None)


READER_ENTRY = auth.Token("reader", None, frozenset({"kv"}), certificates=frozenset({READER}))


@pytest.fixture
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    yield opened
    for channel in opened:
        channel.close()


def https(
    gateway: GatewayThread,
    files: Files,
    plugin: str,
    client: str | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(files.ca))
    if client is not None:
        context.load_cert_chain(*files.clients[client])
    host, port = gateway.http.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request("POST", f"/v1/plugins/{plugin}/call/echo", b'{"a": 1}', headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def grpc_tls(
    gateway: GatewayThread,
    files: Files,
    channels: list[grpc.Channel],
    plugin: str,
    client: str | None = None,
    token: str | None = None,
) -> bytes:
    key = cert = None
    if client is not None:
        cert, key = (path.read_bytes() for path in files.clients[client])
    credentials = grpc.ssl_channel_credentials(files.ca.read_bytes(), key, cert)
    channel = grpc.secure_channel(gateway.grpc, credentials)
    channels.append(channel)
    metadata: tuple[tuple[str, str | bytes], ...] = (("x-blackhole-plugin", plugin),)
    if token:
        metadata += (("authorization", f"Bearer {token}"),)
    request = plugin_pb2.HandleRequest(method="echo", payload=b"hello").SerializeToString()
    answer = raw_handle(channel)(request, metadata=metadata, timeout=30)
    return bytes(plugin_pb2.HandleResponse.FromString(answer).payload)


def test_https_and_grpc_over_tls_answer_and_plaintext_is_refused(files, channels) -> None:
    with GatewayThread(listener_tls=_listener(files)) as gateway:
        assert https(gateway, files, "kv", token=OPS) == (200, {"a": 1})
        assert https(gateway, files, "secret", token=NARROW)[0] == 404
        assert grpc_tls(gateway, files, channels, "kv", token=OPS) == b"hello"

        host, port = gateway.http.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as plain:
            plain.sendall(b"POST /v1/plugins/kv/call/echo HTTP/1.1\r\nHost: x\r\n\r\n{}")
            received = b""
            with contextlib.suppress(OSError):  # closed, or reset
                while chunk := plain.recv(4096):
                    received += chunk
        assert not received.startswith(b"HTTP/")  # no answer in the clear; closed

        channel = grpc.insecure_channel(gateway.grpc)
        channels.append(channel)
        with pytest.raises(grpc.RpcError) as refused:
            raw_handle(channel)(b"", metadata=(("x-blackhole-plugin", "kv"),), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_tls_handshake_that_does_not_come_is_closed_at_the_header_timeout(files) -> None:
    limits = connections.Limits(header_timeout=0.5)
    with GatewayThread(limits, listener_tls=_listener(files)) as gateway:
        host, port = gateway.http.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=60) as silent:
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                assert silent.recv(1) == b""  # closed, with nothing sent
            assert time.monotonic() - started < 30  # not asyncio's 60 s


def test_client_certificates_are_required_from_the_client_ca(files, channels) -> None:
    listener = _listener(files, client_ca=True)
    with GatewayThread(listener_tls=listener, more_tokens=(READER_ENTRY,)) as gateway:
        for client in (None, "foreign"):  # none at all; one from another CA
            with pytest.raises((ssl.SSLError, ConnectionError)):  # or reset after the alert
                https(gateway, files, "kv", client=client, token=OPS)
            with pytest.raises(grpc.RpcError) as refused:
                grpc_tls(gateway, files, channels, "kv", client=client, token=OPS)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_stands_for_the_entry_that_lists_it(files, channels) -> None:
    listener = _listener(files, client_ca=True)
    with GatewayThread(listener_tls=listener, more_tokens=(READER_ENTRY,)) as gateway:
        # No token: the certificate's entry, and its allow list.
        assert https(gateway, files, "kv", client="reader") == (200, {"a": 1})
        assert https(gateway, files, "secret", client="reader")[0] == 404
        assert grpc_tls(gateway, files, channels, "kv", client="reader") == b"hello"
        with pytest.raises(grpc.RpcError) as forbidden:
            grpc_tls(gateway, files, channels, "secret", client="reader")
        assert forbidden.value.code() is grpc.StatusCode.NOT_FOUND
        # A certificate of the right CA that no entry lists: nobody.
        status, body = https(gateway, files, "kv", client="stranger")
        assert (status, body["reason"]) == (401, "Unauthenticated")
        with pytest.raises(grpc.RpcError) as unknown:
            grpc_tls(gateway, files, channels, "kv", client="stranger")
        assert unknown.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # A token, when sent, names the caller: its own allow list, whatever the certificate.
        assert https(gateway, files, "secret", client="stranger", token=OPS)[0] == 200
        assert https(gateway, files, "secret", client="reader", token=NARROW)[0] == 404
        assert https(gateway, files, "kv", client="reader", token="wrong-token")[0] == 401


def test_the_files_are_checked_with_what_is_wrong(files, tmp_path) -> None:
    def refused(*paths: Path | None) -> str:
        with pytest.raises(tls.TLSFileError) as e:
            tls.ListenerTLS.load(*paths)  # type: ignore[arg-type]
        return str(e.value)

    missing = tmp_path / "nothing.crt"
    assert refused(missing, files.key) == f"--gateway-tls-cert {missing}: no such file"
    open_key = _write(tmp_path / "open.key", files.key.read_bytes(), 0o644)
    assert "readable by others (mode 644); make it private: chmod 600" in refused(
        files.cert, open_key
    )
    other = pki.Authority.create("other").issue(pki.Identity.plugin("test", None, "x"))
    other_key = _write(tmp_path / "other.key", other.key_pem)
    assert "is not the key of --gateway-tls-cert" in refused(files.cert, other_key)
    ca = pki.Authority.create("old")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    expired = ca.issue(
        pki.Identity.plugin("test", None, "x"),
        not_before=past,
        lifetime=datetime.timedelta(days=1),
    )
    expired_cert = _write(tmp_path / "expired.crt", expired.cert_pem, 0o644)
    expired_key = _write(tmp_path / "expired.key", expired.key_pem)
    assert "expired on" in refused(expired_cert, expired_key)
    garbage = _write(tmp_path / "garbage.pem", b"not a certificate", 0o644)
    assert "is not a PEM certificate" in refused(garbage, files.key)
    assert "--gateway-tls-client-ca" in refused(files.cert, files.key, garbage)
    flags = tls.GATEWAY_FLAGS
    with pytest.raises(tls.TLSFileError, match=r"^--tls-cert "):
        tls.ListenerTLS.load(missing, files.key, None, flags)


def test_a_client_ca_needs_the_tokens_file(files) -> None:
    options = run.Options(
        specs=None,
        runtime=run.RuntimeChoice.PROCESS,
        data_dir=files.cert.parent,
        workers=1,
        resync_seconds=300,
        host_path_root=None,
        controller_id="test",
        gateway_tls=(files.cert, files.key, files.client_ca),
    )
    with pytest.raises(run.GatewayConfigError, match="give the tokens file too"):
        run.gateway_tls(options)


def test_tokens_file_entries_may_name_certificates(tmp_path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        "tokens:\n"
        "  - {name: reader, certificates: [reader.example.com], plugins: [kv]}\n"
        "  - {name: both, token: a-token-of-16-chars, certificates: [spiffe://x/y],"
        " plugins: ['*']}\n"
    )
    path.chmod(0o600)
    tokens = auth.Tokens.load(path)
    names = [
        getattr(tokens.by_certificate(frozenset({"reader.example.com", "other"})), "name", None),
        getattr(tokens.by_certificate(frozenset({"spiffe://x/y"})), "name", None),
        getattr(tokens.find("a-token-of-16-chars"), "name", None),
    ]
    assert names == ["reader", "both", "both"]
    assert tokens.by_certificate(frozenset({"nobody"})) is None
    path.write_text(
        "tokens:\n"
        "  - {name: a, certificates: [same], plugins: [kv]}\n"
        "  - {name: b, certificates: [same], plugins: ['*']}\n"
    )
    with pytest.raises(auth.TokensFileError, match="'same' is listed by a too"):
        auth.Tokens.load(path)
    path.write_text("tokens:\n  - {name: a, plugins: [kv]}\n")
    with pytest.raises(auth.TokensFileError, match="or certificates"):
        auth.Tokens.load(path)


def test_bhctl_gateway_says_which_flag_is_missing(tmp_path) -> None:
    answer = subprocess.run(
        [sys.executable, "-m", "controller.cli", "gateway", "--data-dir", str(tmp_path),
         "--tls-cert", str(tmp_path / "x.crt")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert answer.returncode != 0
    assert "give both --tls-cert and --tls-key" in answer.stderr
