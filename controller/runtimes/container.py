"""Docker and Podman: one backend, with an engine setting where their APIs agree.

Both engines speak the Docker Engine API (Podman through ``podman system
service``), so one docker-py client drives either. This module owns the
connection to an engine and the translation of a :class:`PluginSpec` into
the isolation settings of a container: no network, read-only root, tmpfs
``/tmp``, a non-root user, no capabilities, ``no-new-privileges``, and CPU,
memory (swap included) and pids limits. ``docker`` is imported here only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import docker
import docker.errors

from controller.errors import EngineUnavailableError
from controller.spec import models

CPU_PERIOD_US = 100_000
"""The CFS period the CPU quota is expressed in (the kernel's default, 100 ms)."""

DEFAULT_USER = "65532:65532"
"""The unprivileged uid:gid plugins run as unless configured otherwise."""

TMP_SIZE = "64m"


class Engine(StrEnum):
    """The container engines this backend drives."""

    DOCKER = "docker"
    PODMAN = "podman"


def default_run_dir() -> Path:
    """Where sockets and engine settings live; the same rule as ``scripts/lib.sh``."""
    if configured := os.environ.get("BLACKHOLE_RUN_DIR"):
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/blackhole")
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "blackhole"
    return Path(f"/tmp/blackhole-{os.geteuid()}")


def engine_url(engine: Engine) -> str:
    """The API endpoint of ``engine``: ``BLACKHOLE_<ENGINE>_HOST`` or the default socket."""
    if configured := os.environ.get(f"BLACKHOLE_{engine.name}_HOST"):
        return configured
    if engine is Engine.DOCKER:
        return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return f"unix://{default_run_dir() / 'podman' / 'podman.sock'}"


def connect(engine: Engine, url: str | None = None, timeout: int = 60) -> docker.DockerClient:
    """A client of ``engine``, checked to answer; raises :class:`EngineUnavailableError`."""
    url = url or engine_url(engine)
    try:
        client = docker.DockerClient(base_url=url, version="auto", timeout=timeout)
        client.ping()
    except docker.errors.DockerException as e:
        raise EngineUnavailableError(
            f"{engine} does not answer at {url}: {e}. Start it with scripts/engines.sh "
            f"{engine}, or point BLACKHOLE_{engine.name}_HOST at its API socket."
        ) from e
    return client


@dataclass(frozen=True)
class EngineInfo:
    """What an engine says about itself."""

    engine: Engine
    version: str
    api_version: str


def describe(engine: Engine, url: str | None = None) -> EngineInfo:
    """Connect to ``engine`` and report its version; raises :class:`EngineUnavailableError`."""
    client = connect(engine, url, timeout=10)
    try:
        info = client.version()
    except docker.errors.DockerException as e:
        raise EngineUnavailableError(f"{engine} at {url}: {e}") from e
    finally:
        client.close()
    return EngineInfo(engine, str(info.get("Version", "?")), str(info.get("ApiVersion", "?")))


@dataclass(frozen=True)
class Isolation:
    """Operator-wide isolation settings that specs cannot override."""

    user: str = DEFAULT_USER
    """uid:gid the plugin's processes run as; never root."""
    tmp_size: str = TMP_SIZE
    """Size of the private tmpfs on /tmp."""


def container_options(
    spec: models.PluginSpec,
    *,
    name: str,
    labels: dict[str, str],
    isolation: Isolation = Isolation(),
) -> dict[str, Any]:
    """The docker-py ``containers.create`` arguments that run ``spec`` isolated.

    The same arguments work on Docker and on Podman's Docker-compatible API:
    CPU is set as a CFS quota (Podman's API ignores ``nano_cpus``) and swap
    is pinned to the memory limit, so a plugin gets no swap at all.
    """
    uid = isolation.user.split(":", 1)[0]
    if uid in {"0", "root"}:
        raise ValueError("plugins never run as root; configure an unprivileged uid:gid")
    memory = spec.resources.memory.as_int()
    return {
        "image": spec.image,
        "name": name,
        "labels": labels,
        "user": isolation.user,
        "environment": dict(spec.env),
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={isolation.tmp_size}"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": spec.resources.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "cpu_period": CPU_PERIOD_US,
        "cpu_quota": spec.resources.cpu.as_millis() * CPU_PERIOD_US // 1000,
        "detach": True,
    }
