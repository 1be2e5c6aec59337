"""Ed25519 keys, detached signatures over a manifest, and the trust directory of public keys.

A private key is a PEM (PKCS#8) file readable by its owner only; a public
key is a PEM (SubjectPublicKeyInfo) file. A key's id is the first 16 hex
digits of the sha256 of its 32 raw public bytes. A signature is a small JSON
document, ``{"algorithm": "ed25519", "keyId": ..., "signature": base64}``,
over the exact bytes of ``plugin.yaml``. The trust directory holds the
public keys (``*.pub``) whose signatures the operator accepts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from controller.errors import BundleRefusedError, RegistryError

ALGORITHM = "ed25519"
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate(directory: Path, name: str) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (mode 0600) and ``NAME.pub`` into ``directory``; refuse to overwrite.

    ``name`` is a file name, not a path: one with a separator, ``..`` or a
    leading dot is refused, so both files stay in ``directory``.
    """
    if not _KEY_NAME.fullmatch(name):
        raise RegistryError(
            f"key name {name!r}: use a file name of letters, digits, '.', '_' and '-' that "
            "does not start with '.' (e.g. author), not a path; choose the directory with --dir"
        )
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise RegistryError(f"{path} exists; remove it or choose another name")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, key_id(public)


def load_private(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise RegistryError(f"{path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise RegistryError(f"{path}: not a PEM private key without passphrase: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise RegistryError(f"{path}: not an Ed25519 key; create one with bhctl plugin keygen")
    return key


def load_public(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise RegistryError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise RegistryError(f"{path}: not a PEM public key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise RegistryError(f"{path}: not an Ed25519 public key")
    return key


def sign(manifest: bytes, private: ed25519.Ed25519PrivateKey) -> bytes:
    """The detached signature document of ``manifest``'s bytes."""
    document = {
        "algorithm": ALGORITHM,
        "keyId": key_id(private.public_key()),
        "signature": base64.b64encode(private.sign(manifest)).decode(),
    }
    return (json.dumps(document, indent=2) + "\n").encode()


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes


def parse_signature(data: bytes, source: str = "plugin.yaml.sig") -> Signature:
    try:
        document = json.loads(data)
        if document.get("algorithm") != ALGORITHM:
            raise BundleRefusedError(
                "BadSignature",
                f"{source}: algorithm {document.get('algorithm')!r} is not supported; "
                f"use {ALGORITHM}",
            )
        return Signature(str(document["keyId"]), base64.b64decode(document["signature"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error):
        raise BundleRefusedError(
            "BadSignature", f"{source}: not a signature document (JSON with keyId, signature)"
        ) from None


class TrustStore:
    """The public keys of a trust directory, by key id."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.keys: dict[str, tuple[ed25519.Ed25519PublicKey, Path]] = {}
        if directory is not None and directory.is_dir():
            for path in sorted(directory.glob("*.pub")):
                public = load_public(path)
                self.keys[key_id(public)] = (public, path)

    def verify(self, manifest: bytes, signature: bytes, source: str) -> str:
        """The key id that signed ``manifest``; raises :class:`BundleRefusedError`."""
        parsed = parse_signature(signature, f"{source}: plugin.yaml.sig")
        found = self.keys.get(parsed.key_id)
        if found is None:
            where = self.directory or "(no trust directory)"
            raise BundleRefusedError(
                "UntrustedKey",
                f"{source}: signed by key {parsed.key_id}, which is not in the trust "
                f"directory {where}; add its .pub there if you trust its author",
            )
        public, path = found
        try:
            public.verify(parsed.signature, manifest)
        except InvalidSignature:
            raise BundleRefusedError(
                "BadSignature",
                f"{source}: the signature by key {parsed.key_id} ({path.name}) does not match "
                "plugin.yaml: the manifest was changed after signing",
            ) from None
        return parsed.key_id
