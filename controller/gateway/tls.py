"""TLS on the gateway's listeners, with an operator's certificate.

``bhctl run --gateway-tls-cert FILE --gateway-tls-key FILE`` (``bhctl gateway
--tls-cert/--tls-key``) makes the HTTP listener HTTPS and the gRPC listener
gRPC over TLS, both with the same certificate (PEM, the chain after the
leaf) and key (PEM, unencrypted, mode 0600). ``--gateway-tls-client-ca FILE``
(``--tls-client-ca``) also requires every caller to present a client
certificate issued by that CA (PEM, one or more); a call then names its
caller by its certificate when it sends no bearer token: the tokens file's
entries may list the certificate names they stand for
(:mod:`controller.gateway.auth`, ``certificates:``). A plugin's own
``gateway.sock`` stays plaintext: it is a Unix socket only the plugin reaches.

The files are checked when the gateway starts, each failure said with the
flag and the file: missing or unreadable, a key readable by others, a key
that is not the certificate's, a certificate expired or not yet valid, a
client CA that is not a PEM certificate.
"""

from __future__ import annotations

import datetime
import ssl
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.errors import ControllerError


class TLSFileError(ControllerError):
    """A certificate, key or client CA the gateway cannot serve TLS with."""


@dataclass(frozen=True)
class Flags:
    """The names of the three flags, as the command that got them spells them."""

    cert: str = "--gateway-tls-cert"
    key: str = "--gateway-tls-key"
    client_ca: str = "--gateway-tls-client-ca"


RUN_FLAGS = Flags()
"""As ``bhctl run`` spells them."""
GATEWAY_FLAGS = Flags("--tls-cert", "--tls-key", "--tls-client-ca")
"""As ``bhctl gateway`` spells them."""


@dataclass(frozen=True)
class ListenerTLS:
    """A checked certificate chain and key for the listeners, and the CA of client certs."""

    paths: tuple[Path, Path, Path | None]
    """The files they were read from: certificate, key, client CA."""
    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    """PEM; when set, callers must present a certificate it issued."""

    @classmethod
    def load(
        cls,
        cert_path: Path,
        key_path: Path,
        client_ca_path: Path | None = None,
        flags: Flags = RUN_FLAGS,
        now: datetime.datetime | None = None,
    ) -> ListenerTLS:
        cert_pem = _read(cert_path, flags.cert)
        key_pem = _read(key_path, flags.key)
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise TLSFileError(
                f"{flags.key} {key_path} is readable by others (mode {mode:o}); "
                f"make it private: chmod 600 {key_path}"
            )
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as e:
            raise TLSFileError(f"{flags.cert} {cert_path} is not a PEM certificate: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise TLSFileError(
                f"{flags.key} {key_path} is not an unencrypted PEM private key: {e}"
            ) from e
        leaf = chain[0]
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(
            serialization.Encoding.DER, public
        ) != leaf.public_key().public_bytes(serialization.Encoding.DER, public):
            raise TLSFileError(
                f"{flags.key} {key_path} is not the key of {flags.cert} {cert_path} "
                "(its first certificate)"
            )
        now = now or datetime.datetime.now(datetime.UTC)
        if leaf.not_valid_after_utc <= now:
            raise TLSFileError(
                f"{flags.cert} {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        if leaf.not_valid_before_utc > now:
            raise TLSFileError(
                f"{flags.cert} {cert_path} is not valid before "
                f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
        client_ca = None
        if client_ca_path is not None:
            client_ca = _read(client_ca_path, flags.client_ca)
            try:
                x509.load_pem_x509_certificates(client_ca)
            except ValueError as e:
                raise TLSFileError(
                    f"{flags.client_ca} {client_ca_path} is not a PEM certificate: {e}"
                ) from e
        return cls((cert_path, key_path, client_ca_path), cert_pem, key_pem, client_ca)

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTPS listener's context (TLS 1.2 and up)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # ssl loads a key only from a file: the checked ones, read again.
        context.load_cert_chain(self.paths[0], self.paths[1])
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode())
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSFileError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise TLSFileError(f"{flag} {path}: {e.strerror}") from None


def names_of_peercert(peer: dict[str, object] | None) -> frozenset[str]:
    """The names a verified client certificate (as :meth:`ssl.SSLSocket.getpeercert` gives
    it) carries: its SAN values and its subject's common name."""
    if not peer:
        return frozenset()
    names = {str(value) for _kind, value in peer.get("subjectAltName", ())}  # type: ignore[attr-defined]
    for rdn in peer.get("subject", ()):  # type: ignore[attr-defined]
        names.update(str(value) for key, value in rdn if key == "commonName")
    return frozenset(names)


def names_of_auth_context(context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """The same names, from a gRPC call's auth context (empty without a client cert)."""
    found = [
        *context.get("x509_subject_alternative_name", ()),
        *context.get("x509_common_name", ()),
    ]
    return frozenset(value.decode(errors="replace") for value in found)
