"""A plugin's manifest (``plugin.yaml``): what the plugin is, provides, needs and asks for.

The manifest is the signed part of a bundle (:mod:`controller.registry.bundle`):
its ``imageDigest`` pins the image, so the signature covers both. Its
neighbours: :mod:`controller.registry.policy` checks what it asks for, and
:mod:`controller.registry.dependencies` resolves what it requires.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

import yaml
from pydantic import Field, field_validator

from controller.errors import BundleRefusedError, SpecError, SpecIssue
from controller.spec import models, safe_yaml
from controller.spec.semver import Version

DIGEST = r"^sha256:[a-f0-9]{64}$"
_DIGEST_RE = re.compile(DIGEST)


class VolumeKind(StrEnum):
    """The kinds of volume a plugin may ask for."""

    PERSISTENT = "persistent"
    """Named volumes kept across restarts and versions."""
    HOST = "host"
    """Directories of the host (under the controller's host-path root)."""


class Permissions(models.Model):
    """The most the plugin asks to be granted; a spec may grant less, never more."""

    network: models.NetworkMode = models.NetworkMode.NONE
    """none, egress or private."""
    egress: list[Annotated[str, Field(pattern=models.HOST_PORT)]] = Field(default_factory=list)
    """host:port destinations it needs, with network: egress."""
    volumes: list[VolumeKind] = Field(default_factory=list)
    """persistent and/or host volumes."""
    call_plugins: list[models.DnsLabel] = Field(default_factory=list, alias="callPlugins")
    """Plugins it calls through the gateway."""


class Manifest(models.Model):
    """The contents of ``plugin.yaml``."""

    name: models.DnsLabel
    """The plugin's name."""
    version: Version
    """Its semantic version."""
    description: str = Field(default="", max_length=4096)
    """One or two sentences on what it does; searched as free text."""
    author: str = Field(default="", max_length=256)
    """Who wrote it; searchable."""
    category: str = Field(default="", max_length=64)
    """One word, e.g. storage or analytics; searchable."""
    provides: list[Annotated[str, Field(pattern=models.CAPABILITY)]] = Field(default_factory=list)
    """Capabilities it offers, e.g. storage.kv."""
    requires: list[models.Dependency] = Field(default_factory=list)
    """Other plugins it needs, each with the versions that will do."""
    permissions: Permissions = Field(default_factory=Permissions)
    """What it asks to be granted."""
    resources: models.Resources | None = None
    """What it needs to run (default: the spec's defaults)."""
    state_version: int = Field(default=0, ge=0, alias="stateVersion")
    """The state schema version it reads and writes; 0 for a stateless plugin."""
    protocol_version: int = Field(ge=1, alias="protocolVersion")
    """The plugin protocol version it speaks."""
    image: str = Field(pattern=models.IMAGE_REFERENCE, max_length=512)
    """The image reference it is run as, e.g. blackhole/example-storage:1.2.0."""
    image_digest: str | None = Field(default=None, pattern=DIGEST, alias="imageDigest")
    """sha256 of the image's config (the engine's image id), written by bhctl plugin pack."""

    @field_validator("requires")
    @classmethod
    def _check_requires(cls, requires: list[models.Dependency]) -> list[models.Dependency]:
        names = [r.name for r in requires]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} required more than once")
        return requires

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


MAX_BYTES = safe_yaml.MAX_BYTES
"""Largest manifest accepted, in bytes."""


def parse(data: bytes, source: str = "plugin.yaml") -> Manifest:
    """The manifest in ``data``; raises :class:`BundleRefusedError` naming the line and field.

    Read by :mod:`controller.spec.safe_yaml`: at most 1 MiB, no aliases,
    duplicate keys refused.
    """
    try:
        return safe_yaml.validate(Manifest, _one(data, source), source)
    except SpecError as e:
        raise BundleRefusedError("InvalidBundle", str(e)) from None


def _one(data: bytes, source: str) -> safe_yaml.Document | None:
    found = safe_yaml.load_all(data, source)
    if len(found) > 1:
        raise SpecError([SpecIssue(source, found[1].index, "", "a manifest is one YAML document")])
    return found[0] if found else None


def render(manifest: Manifest, header: str = "") -> bytes:
    """The manifest as YAML, fields in their declared order."""
    text = yaml.safe_dump(manifest.to_document(), sort_keys=False)
    return (header + text).encode()


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.match(text))
