"""Private networks between plugins that name each other in ``peers``.

Each pair of peers shares one internal bridge network (no way out of the
host), named from the pair and the controller, labelled with both plugins;
an instance joins one network per peer. A network is removed once neither
peer has an instance left on it. The functions here block: the backend runs
them on its engine threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Mapping

import docker
import docker.errors

from controller.runtimes import base
from controller.spec import models

LABEL_LINK = models.LABEL_PREFIX + "link"
"""On a private network: the two plugins it links, as ``a.b``."""


def link_network(a: str, b: str, controller_id: str = base.DEFAULT_CONTROLLER) -> str:
    """The network two plugins share when each names the other in ``peers``."""
    first, second = sorted((a, b))
    digest = hashlib.sha256(f"{controller_id}/{first}/{second}".encode()).hexdigest()[:12]
    return f"bh-link-{digest}"


def links(desired: base.InstanceSpec, controller_id: str) -> list[str]:
    """The networks ``desired`` joins, one per peer, in the order of its ``peers``."""
    if desired.spec.permissions.network is not models.NetworkMode.PRIVATE:
        return []
    return [
        link_network(desired.plugin, peer, controller_id) for peer in desired.spec.permissions.peers
    ]


def ensure_link(
    client: docker.DockerClient,
    lock: threading.Lock,
    network: str,
    plugin: str,
    peer: str,
    owner: Mapping[str, str],
) -> None:
    """Create the network ``plugin`` and ``peer`` share, unless it is there already.

    Engines allow two networks of one name: ``lock`` (one per backend) keeps the
    two peers' passes from both creating it.
    """
    with lock:
        try:
            client.api.inspect_network(network)
            return
        except docker.errors.NotFound:
            pass
        first, second = sorted((plugin, peer))
        client.api.create_network(
            network,
            driver="bridge",
            internal=True,
            check_duplicate=True,
            labels={**owner, LABEL_LINK: f"{first}.{second}"},
        )


def remove_unused(client: docker.DockerClient, owner: Mapping[str, str], plugin: str) -> None:
    """Remove the networks of ``plugin`` that no container uses any more.

    A network its peer still uses is kept: the peer's own release removes it.
    """
    selector = {"label": [f"{k}={v}" for k, v in owner.items()]}
    for network in client.api.networks(filters=selector):
        members = (network.get("Labels") or {}).get(LABEL_LINK, "").split(".")
        if plugin not in members:
            continue
        if client.api.inspect_network(network["Id"]).get("Containers"):
            continue
        with contextlib.suppress(docker.errors.APIError):  # removed in between, or joined
            client.api.remove_network(network["Id"])
