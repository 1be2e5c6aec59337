"""The volumes behind a container's spec volumes: labelled named volumes, or host directories.

A named volume is created once per plugin and volume (named like the
instances, so controllers sharing an engine never collide), labelled with
its owner, and its directory handed to the plugin's user when the engine
runs on this host. A host path is mounted as the directory it resolves to,
once :func:`controller.runtimes.base.check_host_paths` has passed it. Blocks:
the backend runs it on its engine threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import docker
import docker.errors

from controller.runtimes import base


def ensure_volume(
    client: docker.DockerClient,
    desired: base.InstanceSpec,
    volume: str,
    owner: Mapping[str, str],
    user: str,
) -> str:
    """The engine volume behind a spec volume: created once, owned by the plugin's user."""
    name = base.volume_name(desired.plugin, volume, desired.namespace, desired.controller_id)
    try:
        client.api.inspect_volume(name)
    except docker.errors.NotFound:
        labels = {**owner, base.LABEL_PLUGIN: desired.plugin, base.LABEL_VOLUME: volume}
        attrs = client.api.create_volume(name, labels=labels)
        mountpoint = Path(attrs.get("Mountpoint") or "")
        if mountpoint.is_dir():  # an engine on this host: hand the directory to the plugin
            base.hand_over(mountpoint, user)
    return name


def remove_owned(client: docker.DockerClient, owner: Mapping[str, str]) -> list[str]:
    """Remove every volume carrying ``owner``'s labels; the names removed, sorted."""
    selector = {"label": [f"{k}={v}" for k, v in owner.items()]}
    found = client.api.volumes(filters=selector).get("Volumes") or []
    removed = []
    for volume in found:
        try:
            client.api.remove_volume(volume["Name"])
        except docker.errors.NotFound:
            continue  # removed in between
        removed.append(str(volume["Name"]))
    return sorted(removed)


def sources(
    client: docker.DockerClient, desired: base.InstanceSpec, owner: Mapping[str, str], user: str
) -> dict[str, str]:
    """Each spec volume's name to what is mounted for it: an engine volume or a host directory."""
    found = {}
    for volume in desired.spec.volumes:
        if volume.host_path is not None:
            found[volume.name] = str(base.host_path_source(volume))
        else:
            found[volume.name] = ensure_volume(client, desired, volume.name, owner, user)
    return found
