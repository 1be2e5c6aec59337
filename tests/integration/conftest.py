"""Fixtures for the real engines: Docker and Podman, each through its own API socket.

Everything a test creates carries the session label ``blackhole.dev/test-session``
and is removed by that label when the session ends, whether the tests passed
or not. An engine that does not answer is an error, never a skip: start the
engines with ``scripts/engines.sh``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import docker.errors
import pytest

from controller.runtimes import container

SESSION = uuid.uuid4().hex[:12]
SESSION_LABEL = "blackhole.dev/test-session"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "blackhole/base:bookworm")


@dataclass
class EngineUnderTest:
    """A connected engine and the labels that mark what this session creates on it."""

    kind: container.Engine
    client: docker.DockerClient

    @property
    def labels(self) -> dict[str, str]:
        return {SESSION_LABEL: SESSION}

    def name(self, suffix: str) -> str:
        return f"bh-test-{SESSION}-{suffix}"


def remove_session_resources(client: docker.DockerClient) -> None:
    selector: dict[str, str | list[str] | bool] = {"label": f"{SESSION_LABEL}={SESSION}"}
    for item in client.containers.list(all=True, filters=selector):
        with contextlib.suppress(docker.errors.NotFound):
            item.remove(force=True, v=True)
    for network in client.networks.list(filters=selector):
        network.remove()
    for volume in client.volumes.list(filters=selector):
        volume.remove(force=True)


@pytest.fixture(scope="session", params=list(container.Engine), ids=str)
def engine(request: pytest.FixtureRequest) -> Iterator[EngineUnderTest]:
    kind: container.Engine = request.param
    client = container.connect(kind)
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{kind} lacks {BASE_IMAGE}: build it with images/base/build.sh")
    try:
        yield EngineUnderTest(kind, client)
    finally:
        remove_session_resources(client)
        client.close()
