"""The images: the plugin runtime carries the SDK, the controller bhctl; both installed offline."""

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


BYTECODE_MISSING = (
    "import importlib.util, os, sys, grpc, google.protobuf, blackhole_sdk, blackhole_sdk.server; "
    "sources = [m.__file__ for m in list(sys.modules.values()) "
    "if (getattr(m, '__file__', None) or '').endswith('.py')]; "
    "print(len(sources)); "
    "[print(s) for s in sources if not os.path.exists(importlib.util.cache_from_source(s))]"
)
"""Prints how many modules the SDK's import loaded from source files, then each one that has
no bytecode beside it (which a plugin, on its read-only root, would compile at every start)."""


def test_plugin_runtime_image_carries_bytecode_for_what_plugins_import(
    engine: EngineUnderTest,
) -> None:
    output = engine.client.containers.run(
        IMAGE,
        ["python3", "-c", BYTECODE_MISSING],
        name=engine.name("runtime-bytecode"),
        labels=engine.labels,
        network_mode="none",
        read_only=True,
        environment={"PYTHONDONTWRITEBYTECODE": "1"},
        remove=False,
    )
    loaded, *missing = output.decode().split()
    assert int(loaded) > 100  # grpc, protobuf, the SDK and the standard library's modules
    assert missing == []


def test_controller_image_runs_bhctl_unprivileged(engine: EngineUnderTest) -> None:
    image = f"blackhole/controller:{VERSION}"
    try:
        engine.client.images.get(image)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{engine.kind} lacks {image}: build the images with images/build.sh")
    output = engine.client.containers.run(
        image,
        ["version"],
        name=engine.name("controller-image"),
        labels=engine.labels,
        network_mode="none",
        remove=False,
    )
    assert output.decode().startswith(f"bhctl {VERSION} ")
    probe = (
        "import os, uvloop, grpc, controller.gateway.server; "
        "print(os.getuid(), os.environ['BLACKHOLE_DATA_DIR'])"
    )
    output = engine.client.containers.run(
        image,
        [probe],
        entrypoint=["python3", "-c"],
        name=engine.name("controller-image-imports"),
        labels=engine.labels,
        network_mode="none",
        remove=False,
    )
    assert output.decode().split() == ["65532", "/var/lib/blackhole"]
