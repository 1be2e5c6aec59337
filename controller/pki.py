"""The controller's small certificate authority: who is who when plugins are reached over TCP.

Below the protocol client, the gateway and the CLI, which all use it: the
authority (a key kept 0600 in the data directory, or an operator's CA given as
files), the identities it certifies, the instance certificates it issues
(short-lived, renewed before they expire) and the files a server or a client
reads them from. Built on ``cryptography``; nothing here is hand-rolled.

An identity is a URI in the certificate's SAN, ``blackhole://<controller-id>/
<namespace>/<plugin>`` for a plugin and ``blackhole://<controller-id>/<role>``
for the controller's own clients (``controller``, ``gateway``). A plugin's
certificate also carries a DNS name made of the same parts
(:attr:`Identity.server_name`): the name gRPC's TLS check compares, so that a
channel opened for one plugin refuses a certificate issued to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.errors import ControllerError

log = logging.getLogger(__name__)

SCHEME = "blackhole"
"""The scheme of identity URIs."""
SERVER_NAME_SUFFIX = "plugin.blackhole"
"""The DNS suffix of plugins' server names (never resolved: only compared)."""
DEFAULT_NAMESPACE = "default"
"""The namespace of plugins that have none (one host)."""
CA_LIFETIME = datetime.timedelta(days=3650)
"""Lifetime of a CA the controller makes for itself."""
INSTANCE_LIFETIME = datetime.timedelta(hours=1)
"""Default lifetime of an instance certificate."""
RENEW_AT = 2 / 3
"""Fraction of a certificate's lifetime after which it is renewed."""
BACKDATE = datetime.timedelta(minutes=5)
"""How far before now a certificate is made valid (clocks across hosts differ); a quarter of
the lifetime at most, so that a short-lived certificate is not due the moment it is made."""

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CERT = "tls.crt"
KEY = "tls.key"
"""File names: the CA's in the authority's directory, an instance's beside a ``ca.crt``."""


class PKIError(ControllerError):
    """A CA or certificate that cannot be read, made or used."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is."""

    controller_id: str
    name: str
    namespace: str | None = None
    """None for the controller's own clients (roles), a namespace for plugins."""

    @classmethod
    def plugin(cls, controller_id: str, namespace: str | None, name: str) -> Identity:
        return cls(controller_id, name, namespace or DEFAULT_NAMESPACE)

    @classmethod
    def role(cls, controller_id: str, role: str) -> Identity:
        return cls(controller_id, role, None)

    @property
    def uri(self) -> str:
        if self.namespace is None:
            return f"{SCHEME}://{self.controller_id}/{self.name}"
        return f"{SCHEME}://{self.controller_id}/{self.namespace}/{self.name}"

    @property
    def server_name(self) -> str:
        """The DNS name a client checks a plugin's certificate against."""
        return f"{self.name}.{self.namespace or '-'}.{self.controller_id}.{SERVER_NAME_SUFFIX}"

    @classmethod
    def parse(cls, uri: str) -> Identity | None:
        """The identity of ``uri``; None if it is not one of ours."""
        prefix = f"{SCHEME}://"
        if not uri.startswith(prefix):
            return None
        parts = uri.removeprefix(prefix).split("/")
        if len(parts) == 2 and all(parts):
            return cls(parts[0], parts[1], None)
        if len(parts) == 3 and all(parts):
            return cls(parts[0], parts[2], parts[1])
        return None


CONTROLLER = "controller"
GATEWAY = "gateway"
"""The roles of the controller's clients."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM."""

    cert_pem: bytes
    key_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def renew_after(self) -> datetime.datetime:
        return renew_time(self.not_before, self.not_after)

    def write(self, directory: Path, ca_pem: bytes) -> None:
        """Make ``tls.crt``, ``tls.key`` (0600) and ``ca.crt`` in ``directory`` these.

        As Kubernetes does for a mounted Secret: the three files are written
        into a new directory beside the old one, a ``..data`` link is swapped
        to it in one rename, and the names readers open are links through
        ``..data``. A reader sees the old set or the new one, never a key with
        another certificate; the old set is removed after the swap.
        """
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            version = directory / f"..{time.time_ns()}"
            version.mkdir(mode=0o700)
            _write(version / CA_CERT, ca_pem, 0o644)
            _write(version / KEY, self.key_pem, 0o600)
            _write(version / CERT, self.cert_pem, 0o644)
            link = directory / DATA_LINK
            previous = os.readlink(link) if link.is_symlink() else None
            temporary = directory / f"{DATA_LINK}.tmp"
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            temporary.symlink_to(version.name)
            temporary.replace(link)
            for name in (CA_CERT, KEY, CERT):
                entry = directory / name
                if not entry.is_symlink():
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                    entry.symlink_to(f"{DATA_LINK}/{name}")
            if previous is not None and previous != version.name:
                shutil.rmtree(directory / previous, ignore_errors=True)
        except OSError as e:
            raise PKIError(f"cannot write the certificate into {directory}: {e.strerror}") from e


DATA_LINK = "..data"
"""The link, in a certificate's directory, to the set of files in use."""


def renew_time(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    return not_before + (not_after - not_before) * RENEW_AT


def _write(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # O_EXCL below: never write through a file or link left there
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A CA certificate and its key: issues the certificates of plugins and clients."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @classmethod
    def create(cls, controller_id: str, lifetime: datetime.timedelta = CA_LIFETIME) -> Authority:
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Blackhole"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"blackhole controller {controller_id} CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: Path, controller_id: str) -> Authority:
        """The CA kept in ``directory`` (0700, its key 0600), made there on first use."""
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
        if cert_path.exists() or key_path.exists():
            return cls.from_files(cert_path, key_path)
        authority = cls.create(controller_id)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write(key_path, _key_pem(authority.key), 0o600)
            _write(cert_path, authority.cert_pem, 0o644)
        except OSError as e:
            raise PKIError(f"cannot keep the CA in {directory}: {e.strerror}") from e
        return authority

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path) -> Authority:
        """An operator's CA (``--ca-cert``/``--ca-key``): checked to be a CA and a pair."""
        try:
            mode = stat.S_IMODE(key_path.stat().st_mode)
            cert_data, key_data = cert_path.read_bytes(), key_path.read_bytes()
        except OSError as e:
            raise PKIError(f"cannot read the CA: {e.filename}: {e.strerror}") from e
        if mode & 0o077:
            raise PKIError(
                f"--ca-key {key_path} is readable by others (mode {mode:o}); "
                f"make it private: chmod 600 {key_path}"
            )
        return cls.from_pem(cert_data, key_data, f"--ca-cert {cert_path}", f"--ca-key {key_path}")

    @classmethod
    def from_pem(
        cls, cert_data: bytes, key_data: bytes, cert_name: str, key_name: str
    ) -> Authority:
        """A CA from PEM, checked to be a CA and a pair (named as given in errors)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except ValueError as e:
            raise PKIError(f"{cert_name} is not a PEM certificate: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError) as e:
            raise PKIError(f"{key_name} is not an unencrypted PEM private key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{key_name} is not an EC key; give an ECDSA (P-256) CA key")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise PKIError(f"{cert_name} is not a CA certificate (basicConstraints)")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise PKIError(f"{key_name} is not the key of {cert_name}")
        if cert.not_valid_after_utc <= _now():
            raise PKIError(f"{cert_name} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        return cls(cert, key)

    def issue(
        self,
        identity: Identity,
        *,
        hosts: Sequence[str] = (),
        lifetime: datetime.timedelta = INSTANCE_LIFETIME,
        not_before: datetime.datetime | None = None,
    ) -> Issued:
        """A certificate for ``identity``: a server's for a plugin (its server name and
        ``hosts``, names or addresses, in the SAN), a client's for a role."""
        key = _new_key()
        backdate = min(BACKDATE, lifetime / 4) if not_before is None else datetime.timedelta()
        start = not_before if not_before is not None else _now() - backdate
        end = min(start + lifetime + backdate, self.cert.not_valid_after_utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        if identity.namespace is not None:
            names.append(x509.DNSName(identity.server_name))
            names.extend(_host_names(hosts))
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.uri)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            _key_pem(key),
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


MISMATCH = "IdentityMismatch"
"""A verification failure: the peer's certificate does not name the identity expected."""
EXPIRED = "CertificateExpired"
"""A verification failure: the peer's certificate is past its end."""
UNTRUSTED = "CertificateUntrusted"
"""A verification failure: the peer's certificate does not chain to the CA trusted."""


def verification_failure(e: ssl.SSLCertVerificationError) -> tuple[str, str]:
    """Why a peer's certificate was refused: one of :data:`MISMATCH`, :data:`EXPIRED` and
    :data:`UNTRUSTED`, and OpenSSL's words for it."""
    why = e.verify_message or str(e)
    lowered = why.lower()
    if "hostname mismatch" in lowered or "ip address mismatch" in lowered:
        return MISMATCH, why
    if "expired" in lowered:
        return EXPIRED, why
    return UNTRUSTED, why


def identities_of(cert_pem: bytes) -> list[Identity]:
    """The identities in a certificate's SAN URIs."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    found = (Identity.parse(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier))
    return [identity for identity in found if identity is not None]


def due(cert_path: Path, now: datetime.datetime | None = None) -> bool:
    """Whether the certificate at ``cert_path`` is missing, unreadable or due for renewal."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    when = now if now is not None else _now()
    return when >= renew_time(cert.not_valid_before_utc, cert.not_valid_after_utc)


@dataclass(frozen=True)
class Files:
    """Where a TLS endpoint reads its certificate, key and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def in_directory(cls, directory: Path) -> Files:
        return cls(directory / CERT, directory / KEY, directory / CA_CERT)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(ca, key, cert)`` as PEM; raises :class:`PKIError` naming the file that fails."""
        return read_pair(self)


def read_pair(files: Files) -> tuple[bytes, bytes, bytes]:
    """The CA, key and certificate of ``files``, the key checked to be the certificate's."""
    try:
        ca, key, cert = files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
    except OSError as e:
        raise PKIError(f"cannot read {e.filename}: {e.strerror}") from e
    try:
        private = serialization.load_pem_private_key(key, password=None)
        public = x509.load_pem_x509_certificate(cert).public_key()
    except (ValueError, TypeError) as e:
        raise PKIError(f"{files.cert} or {files.key} is not PEM: {e}") from e
    if private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PKIError(f"{files.key} is not the key of {files.cert} (being replaced?)")
    return ca, key, cert


class Renewer:
    """Keeps one certificate's files renewed: issues again once the current one is due."""

    def __init__(
        self,
        authority: Authority,
        identity: Identity,
        directory: Path,
        *,
        hosts: Sequence[str] = (),
        lifetime: datetime.timedelta = INSTANCE_LIFETIME,
        follow: bool = False,
    ) -> None:
        self.authority = authority
        self.identity = identity
        self.files = Files.in_directory(directory)
        self.directory = directory
        self.hosts = tuple(hosts)
        self.lifetime = lifetime
        self.follow = follow
        """Renew only a certificate there of this same CA, never issue the first nor replace
        another CA's (a gateway behind its controller, which decides the CA)."""

    def ensure(self, now: datetime.datetime | None = None) -> bool:
        """Issue and write a new certificate if the one there is due, or is another CA's (the
        controller started with another ``--ca-cert``); whether it did."""
        if self.follow and not self._same_ca():
            return False
        if not due(self.files.cert, now) and self._same_ca():
            return False
        issued = self.authority.issue(self.identity, hosts=self.hosts, lifetime=self.lifetime)
        issued.write(self.directory, self.authority.cert_pem)
        return True

    def _same_ca(self) -> bool:
        try:
            return self.files.ca.read_bytes() == self.authority.cert_pem
        except OSError:
            return False

    def next_check(self) -> float:
        """Seconds until the current certificate is due (0 if it is)."""
        try:
            cert = x509.load_pem_x509_certificate(self.files.cert.read_bytes())
        except (OSError, ValueError):
            return 0.0
        at = renew_time(cert.not_valid_before_utc, cert.not_valid_after_utc)
        return max(0.0, (at - _now()).total_seconds())


RENEW_CHECK_SECONDS = 60.0
"""Longest sleep between two looks at the certificates kept renewed (a clock jump, a file
someone removed)."""


async def keep_renewed(renewers: Sequence[Renewer], stop: asyncio.Event) -> None:
    """Renew each of ``renewers``' certificates when it is due, until ``stop``.

    Issued at once where missing or due, then each time the first is due.
    A renewal that fails (a full disk) is logged and tried again at the
    next look; the certificate in place serves meanwhile.
    """
    while not stop.is_set():
        wait = RENEW_CHECK_SECONDS
        for renewer in renewers:
            try:
                if await asyncio.to_thread(renewer.ensure):
                    log.info("renewed the certificate of %s", renewer.identity.uri)
            except PKIError as e:
                log.error("cannot renew the certificate of %s: %s", renewer.identity.uri, e)
            wait = min(wait, await asyncio.to_thread(renewer.next_check))
        # Not before the due time: a certificate due now was just renewed (or failed).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(wait, 1.0))


class Credentials:
    """A client certificate and key kept renewed in a directory, read again when renewed.

    :meth:`current` is cheap enough for every call: it looks at the
    directory's ``..data`` link at most every :data:`LOOK_SECONDS` and
    reads the files only when it points elsewhere (a renewal swapped it).
    """

    LOOK_SECONDS = 0.5

    def __init__(self, directory: Path) -> None:
        self.files = Files.in_directory(directory)
        self.directory = directory
        self._seen: str | None = None
        self._looked = -1e9
        self._current: tuple[bytes, bytes, bytes] | None = None

    def current(self) -> tuple[bytes, bytes, bytes] | None:
        """``(ca, key, cert)`` as PEM; None while there is none (not issued yet)."""
        now = time.monotonic()
        if now - self._looked < self.LOOK_SECONDS and self._current is not None:
            return self._current
        self._looked = now
        try:
            version = os.readlink(self.directory / DATA_LINK)
        except OSError:
            return self._current
        if version != self._seen or self._current is None:
            try:
                self._current = read_pair(self.files)
                self._seen = version
            except PKIError as e:  # being replaced: the set read last goes on
                log.debug("client certificate in %s not read: %s", self.directory, e)
        return self._current
