"""The controller's CA: its key kept private, identities in the SAN, renewal, an operator's CA."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller import pki


def test_the_ca_is_made_once_and_its_key_kept_0600(tmp_path: Path):
    directory = tmp_path / "pki"
    made = pki.Authority.load_or_create(directory, "c1")
    assert stat.S_IMODE((directory / pki.CA_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    again = pki.Authority.load_or_create(directory, "c1")
    assert again.cert_pem == made.cert_pem
    constraints = made.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca


def test_a_plugin_certificate_names_its_identity_and_is_short_lived():
    authority = pki.Authority.create("c1")
    identity = pki.Identity.plugin("c1", None, "kv")
    issued = authority.issue(identity, hosts=["10.0.0.2", "kv.example"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["blackhole://c1/default/kv"]
    assert san.get_values_for_type(x509.DNSName) == ["kv.default.c1.plugin.blackhole", "kv.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= pki.INSTANCE_LIFETIME + 2 * pki.BACKDATE
    assert pki.identities_of(issued.cert_pem) == [identity]
    # Signed by the CA.
    cert.verify_directly_issued_by(authority.cert)


def test_a_client_certificate_is_a_role_for_client_auth_only():
    authority = pki.Authority.create("c1")
    issued = authority.issue(pki.Identity.role("c1", pki.CONTROLLER))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert pki.identities_of(issued.cert_pem) == [pki.Identity("c1", "controller")]


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("blackhole://c1/ns/kv", pki.Identity("c1", "kv", "ns")),
        ("blackhole://c1/gateway", pki.Identity("c1", "gateway")),
        ("spiffe://c1/ns/kv", None),
        ("blackhole://c1//kv", None),
        ("blackhole://c1/a/b/c", None),
    ],
)
def test_identity_uris_parse(uri: str, parsed: pki.Identity | None):
    assert pki.Identity.parse(uri) == parsed
    if parsed is not None:
        assert parsed.uri == uri


def test_renewal_comes_before_expiry(tmp_path: Path):
    authority = pki.Authority.create("c1")
    renewer = pki.Renewer(
        authority,
        pki.Identity.plugin("c1", "ns", "kv"),
        tmp_path / "kv",
        lifetime=datetime.timedelta(minutes=30),
    )
    assert renewer.ensure()  # nothing there yet
    first = renewer.files.cert.read_bytes()
    assert not renewer.ensure()
    cert = x509.load_pem_x509_certificate(first)
    before_due = cert.not_valid_before_utc + datetime.timedelta(minutes=20)
    after_due = cert.not_valid_before_utc + datetime.timedelta(minutes=26)
    assert after_due < cert.not_valid_after_utc  # due while still valid
    assert not renewer.ensure(before_due)
    assert renewer.ensure(after_due)
    assert renewer.files.cert.read_bytes() != first
    ca, _, cert_pem = renewer.files.read()  # a matching pair after the swap
    assert ca == authority.cert_pem
    assert cert_pem == renewer.files.cert.read_bytes()
    assert stat.S_IMODE(renewer.files.key.stat().st_mode) == 0o600
    # The old set is gone: only the one in use is kept.
    assert len([p for p in (tmp_path / "kv").iterdir() if p.is_dir() and not p.is_symlink()]) == 1


def _write_ca(tmp_path: Path, authority: pki.Authority, key_mode: int = 0o600) -> tuple[Path, Path]:
    cert, key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    cert.write_bytes(authority.cert_pem)
    key.write_bytes(
        authority.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(key_mode)
    return cert, key


def test_an_operators_ca_is_used_as_given(tmp_path: Path):
    theirs = pki.Authority.create("elsewhere")
    cert, key = _write_ca(tmp_path, theirs)
    loaded = pki.Authority.from_files(cert, key)
    issued = loaded.issue(pki.Identity.plugin("c1", None, "kv"))
    x509.load_pem_x509_certificate(issued.cert_pem).verify_directly_issued_by(theirs.cert)


def test_an_operators_ca_is_refused_when_unfit(tmp_path: Path):
    theirs = pki.Authority.create("elsewhere")
    cert, key = _write_ca(tmp_path, theirs, key_mode=0o644)
    with pytest.raises(pki.PKIError, match="readable by others"):
        pki.Authority.from_files(cert, key)
    key.chmod(0o600)
    other = pki.Authority.create("other")
    cert.write_bytes(other.cert_pem)
    with pytest.raises(pki.PKIError, match="is not the key of"):
        pki.Authority.from_files(cert, key)
    # A leaf certificate is no CA.
    leaf = theirs.issue(pki.Identity.plugin("c1", None, "kv"))
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    with pytest.raises(pki.PKIError, match="not a CA"):
        pki.Authority.from_files(cert, key)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(pki.PKIError, match="not an EC key"):
        pki.Authority.from_files(cert, key)
    assert isinstance(theirs.key, ec.EllipticCurvePrivateKey)
