"""The images: the plugin runtime carries the SDK, the controller bhctl; both installed offline."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import docker.errors
import pytest

from controller.runtimes import container

from .conftest import SESSION, EngineUnderTest, get_engine

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


DEPENDENCY = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "bh-wordcount"
version = "1.0.0"
"""

PLUGIN_USING_IT = """\
from blackhole_sdk import Plugin, serve
import bh_wordcount


class Words(Plugin):
    def handle(self, method, payload):
        return {"words": bh_wordcount.count(payload["text"])}


if __name__ == "__main__":
    serve(Words())
"""


def test_a_plugin_image_adds_its_dependencies_from_wheels_built_on_the_host(
    tmp_path: Path,
) -> None:
    """The documented way (images/plugin-runtime/plugin-with-dependencies.Dockerfile) as an
    author follows it: wheels built on the host, then an image FROM the runtime image."""
    engine = get_engine(container.Engine.DOCKER)  # the build runs on Docker
    top = Path(__file__).resolve().parents[2]
    dockerfile = top / "images" / "plugin-runtime" / "plugin-with-dependencies.Dockerfile"
    dependency = tmp_path / "bh-wordcount"
    (dependency / "bh_wordcount").mkdir(parents=True)
    (dependency / "pyproject.toml").write_text(DEPENDENCY)
    (dependency / "bh_wordcount" / "__init__.py").write_text(
        "def count(text):\n    return len(text.split())\n"
    )
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "plugin.py").write_text(PLUGIN_USING_IT)
    (plugin / "requirements.txt").write_text("bh-wordcount==1.0.0\n")
    # The host step, as the Dockerfile's comment gives it (with the dependency's source
    # standing in for an index).
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(plugin / "wheels"), "-r", str(plugin / "requirements.txt"),
         str(dependency), "pip"],
        check=True, timeout=300,
    )  # fmt: skip
    tag = f"blackhole-test/plugin-with-dependencies:{SESSION}"
    try:
        engine.client.images.build(
            path=str(plugin),
            dockerfile=str(dockerfile),
            tag=tag,
            buildargs={"RUNTIME_IMAGE": IMAGE},
            labels=engine.labels,
            rm=True,
            forcerm=True,
        )
        check = (
            "import importlib.util, os, sys, bh_wordcount; sys.path.insert(0, '/app'); "
            "import plugin; "
            "print(os.getuid(), plugin.Words().handle('count', {'text': 'one two three'}), "
            "os.path.exists(importlib.util.cache_from_source(bh_wordcount.__file__)), "
            "importlib.util.find_spec('pip') is None, os.path.exists('/wheels'))"
        )
        output = engine.client.containers.run(
            tag,
            ["python3", "-c", check],
            name=engine.name("with-dependencies"),
            labels=engine.labels,
            network_mode="none",
            read_only=True,
            remove=False,
        )
        # Unprivileged, the dependency works, with its bytecode; no pip or wheels left.
        assert output.decode().split("\n")[0] == "65532 {'words': 3} True True False"
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.client.images.remove(tag, force=True)
