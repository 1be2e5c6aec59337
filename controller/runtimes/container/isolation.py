"""What isolates a container: the docker-py create arguments a :class:`PluginSpec` becomes.

No network, a read-only root, a private tmpfs ``/tmp``, a non-root user, no
capabilities, ``no-new-privileges``, and CPU, memory (swap included) and
pids limits. The operator's settings that specs cannot override are an
:class:`Isolation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.types

from controller import cgroups
from controller.runtimes import base
from controller.spec import models

TMP_SIZE = "64m"


@dataclass(frozen=True)
class Isolation:
    """Operator-wide isolation settings that specs cannot override."""

    user: str = base.DEFAULT_USER
    """uid:gid the plugin's processes run as; never root."""
    tmp_size: str = TMP_SIZE
    """Size of the private tmpfs on /tmp."""


def container_options(
    spec: models.PluginSpec,
    *,
    name: str,
    labels: Mapping[str, str],
    isolation: Isolation = Isolation(),
    socket_dir: Path | None = None,
    volumes: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The docker-py ``containers.create`` arguments that run ``spec`` isolated.

    The same arguments work on Docker and on Podman's Docker-compatible API:
    CPU is set as a CFS quota (Podman's API ignores ``nano_cpus``) and swap
    is pinned to the memory limit, so a plugin gets no swap at all.
    ``socket_dir`` is mounted at ``/run/blackhole``; ``volumes`` maps each
    spec volume's name to the engine volume (or checked host path) behind it.
    """
    base.user_ids(isolation.user)  # never root
    memory = spec.resources.memory.as_int()
    mounts = []
    if socket_dir is not None:
        mounts.append(docker.types.Mount(base.SOCKET_DIR_IN_INSTANCE, str(socket_dir), type="bind"))
    for volume in spec.volumes:
        source = (volumes or {})[volume.name]
        mounts.append(
            docker.types.Mount(
                volume.mount_path,
                source,
                type="bind" if volume.host_path else "volume",
                read_only=volume.read_only,
            )
        )
    return {
        "image": spec.image,
        "name": name,
        "labels": dict(labels),
        "user": isolation.user,
        "environment": {**spec.env, **(env or {})},
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={isolation.tmp_size}"},
        "mounts": mounts,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": spec.resources.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "cpu_period": cgroups.CPU_PERIOD_US,
        "cpu_quota": cgroups.cpu_quota(spec.resources.cpu.as_millis()),
        "detach": True,
    }
