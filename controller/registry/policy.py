"""The operator's policy: whether unsigned bundles may run, what they may ask for, how much.

Read from a YAML file (``DATA_DIR/registry/policy.yaml`` unless given); with
no file the defaults below hold: signed bundles only, network ``none`` or
``private``, no egress, persistent volumes but no host paths, calls to other
plugins allowed, at most 2 CPUs, 1Gi of memory and 1024 processes.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pydantic import Field

from controller.errors import BundleRefusedError, RegistryError, SpecError
from controller.registry import manifest as manifest_module
from controller.spec import models, safe_yaml
from controller.spec.quantity import Quantity


class Allowed(models.Model):
    """What bundles may ask for."""

    networks: list[models.NetworkMode] = Field(
        default_factory=lambda: [models.NetworkMode.NONE, models.NetworkMode.PRIVATE]
    )
    """Network modes a bundle may ask for. Default: none and private."""
    egress: list[str] = Field(default_factory=list)
    """host:port patterns (fnmatch, e.g. "*.example.com:443") egress may reach. Default: none."""
    volumes: list[manifest_module.VolumeKind] = Field(
        default_factory=lambda: [manifest_module.VolumeKind.PERSISTENT]
    )
    """Volume kinds a bundle may ask for. Default: persistent."""
    call_plugins: bool = Field(default=True, alias="callPlugins")
    """Whether a bundle may ask to call other plugins. Default: true."""


class MaxResources(models.Model):
    """The most a bundle's plugin may be given."""

    cpu: Quantity = Field(default_factory=lambda: Quantity("2"))
    memory: Quantity = Field(default_factory=lambda: Quantity("1Gi"))
    pids: int = Field(default=1024, ge=1)


class Policy(models.Model):
    """The operator's policy file."""

    allow_unsigned: bool = Field(default=False, alias="allowUnsigned")
    """Let bundles without a signature in. Default: false."""
    permissions: Allowed = Field(default_factory=Allowed)
    max_resources: MaxResources = Field(default_factory=MaxResources, alias="maxResources")

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        """The policy in ``path``; the defaults when it is None or does not exist."""
        if path is None or not path.exists():
            return cls()
        try:
            with path.open("rb") as handle:
                data = handle.read(safe_yaml.MAX_BYTES + 1)
        except OSError as e:
            raise RegistryError(f"{path}: {e.strerror}") from None
        try:
            found = safe_yaml.load_all(data, str(path))
            if len(found) > 1:
                raise RegistryError(f"{path}: a policy is one YAML document")
            if not found:
                return cls()
            return safe_yaml.validate(cls, found[0], str(path))
        except SpecError as e:
            raise RegistryError(str(e)) from None

    def check(self, manifest: manifest_module.Manifest, source: str) -> None:
        """Refuse a bundle that asks for more than this policy allows."""
        asked, allowed = manifest.permissions, self.permissions
        denied = []
        if asked.network not in allowed.networks and asked.network is not models.NetworkMode.NONE:
            denied.append(f"network {asked.network.value} (allowed: {_names(allowed.networks)})")
        for destination in asked.egress:
            if not any(fnmatch.fnmatchcase(destination, p) for p in allowed.egress):
                denied.append(f"egress to {destination} (allowed: {allowed.egress or 'none'})")
        for volume in asked.volumes:
            if volume not in allowed.volumes:
                denied.append(f"{volume.value} volumes (allowed: {_names(allowed.volumes)})")
        if asked.call_plugins and not allowed.call_plugins:
            denied.append(f"calls to {', '.join(asked.call_plugins)} (allowed: none)")
        if denied:
            raise BundleRefusedError(
                "PermissionDenied",
                f"{source}: {manifest.ref} asks for {'; '.join(denied)}, beyond the "
                "operator's policy",
            )
        if manifest.resources is not None:
            self.check_resources(manifest.resources, f"{source}: {manifest.ref} needs")

    def check_resources(self, resources: models.Resources, what: str) -> None:
        top = self.max_resources
        over = []
        if resources.cpu.value > top.cpu.value:
            over.append(f"cpu {resources.cpu} > {top.cpu}")
        if resources.memory.value > top.memory.value:
            over.append(f"memory {resources.memory} > {top.memory}")
        if resources.pids > top.pids:
            over.append(f"pids {resources.pids} > {top.pids}")
        if over:
            raise BundleRefusedError(
                "ResourcesExceeded",
                f"{what} {', '.join(over)}: above the policy's maxResources",
            )


def grants(spec: models.PluginSpec, manifest: manifest_module.Manifest) -> list[str]:
    """What ``spec`` grants beyond what ``manifest`` asks for (empty when within it)."""
    asked, given = manifest.permissions, spec.permissions
    beyond = []
    if given.network is not models.NetworkMode.NONE and given.network is not asked.network:
        beyond.append(f"spec.permissions.network {given.network.value} (asks {asked.network})")
    beyond += [f"spec.permissions.egress {e}" for e in given.egress if e not in asked.egress]
    calls = given.call_plugins
    beyond += [f"spec.permissions.callPlugins {p}" for p in calls if p not in asked.call_plugins]
    for index, volume in enumerate(spec.volumes):
        kind = (
            manifest_module.VolumeKind.HOST
            if volume.host_path
            else manifest_module.VolumeKind.PERSISTENT
        )
        if kind not in asked.volumes:
            beyond.append(f"spec.volumes[{index}] ({kind.value}; asks {_names(asked.volumes)})")
    return beyond


def _names(items: list[models.NetworkMode] | list[manifest_module.VolumeKind]) -> str:
    return ", ".join(i.value for i in items) or "none"
