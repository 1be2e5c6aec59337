"""The plugin runtime image carries the SDK, installed offline from wheels built on the host."""

from __future__ import annotations

from pathlib import Path

import docker.errors
import pytest

from .conftest import EngineUnderTest

VERSION = (Path(__file__).resolve().parents[2] / "VERSION").read_text().strip()
IMAGE = f"blackhole/plugin-runtime:{VERSION}"


def test_plugin_runtime_image_has_the_sdk_and_runs_unprivileged(engine: EngineUnderTest) -> None:
    try:
        engine.client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{engine.kind} lacks {IMAGE}: build the images with images/build.sh")
    check = (
        "import os, grpc, google.protobuf, blackhole_sdk; "
        "print(os.getuid(), blackhole_sdk.PROTOCOL_VERSION, grpc.__version__ > '1')"
    )
    output = engine.client.containers.run(
        IMAGE,
        ["python3", "-c", check],
        name=engine.name("runtime-image"),
        labels=engine.labels,
        network_mode="none",
        remove=False,
    )
    assert output.decode().split() == ["65532", "1", "True"]
