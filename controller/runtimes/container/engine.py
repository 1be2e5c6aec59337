"""The connection to a container engine: which one, where its API is, and what its errors mean.

Docker and Podman both speak the Docker Engine API (Podman through ``podman
system service``), so one docker-py client drives either. Engine errors are
turned into the controller's own here (:func:`translated`), so that no
``docker.errors`` reach the reconciler.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import docker
import docker.errors
import requests.exceptions

from controller.errors import (
    EngineUnavailableError,
    InstanceConflictError,
    InstanceNotFoundError,
    RuntimeBackendError,
)


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


@contextlib.contextmanager
def translated(name: str) -> Iterator[None]:
    """Engine errors inside as the controller's: not found, conflict, failure, unreachable."""
    try:
        yield
    except docker.errors.NotFound as e:
        raise InstanceNotFoundError(f"{name}: {e.explanation or e}") from e
    except docker.errors.APIError as e:
        if e.status_code == 409 or "already in use" in str(e.explanation):  # Podman: 500
            raise InstanceConflictError(f"{name}: {e.explanation or e}") from e
        raise RuntimeBackendError(f"{name}: {e.explanation or e}") from e
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        raise EngineUnavailableError(f"{name} does not answer: {e}") from e
