"""Hostile inputs against a real controller process and real engines: bad spec files and
bundles leave it serving; a bundle whose archive tags another image moves no tag."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import docker.errors
import pytest

from controller.errors import BundleRefusedError
from controller.protocol import client
from controller.registry import bundle, registry
from controller.runtimes import container
from tests import bundles, fuzzing

from .conftest import SESSION, ControllerProcess, EngineUnderTest, bhctl, wait_for

STORAGE = "blackhole/example-storage:1.2.0"
BAD_SPECS = {
    "bad-date": "  config: {when: !!timestamp 2024-13-01}\n",
    "int-tag": "  config: {n: !!int abc}\n",
    "nul": '  config: {s: "a\\0b"}\n',
    "unhashable": "  config: {[1, 2]: x}\n",
    "deep": "  config: " + "[" * 500 + "]" * 500 + "\n",
    "escape": '  config: {s: "\\U99999999"}\n',
}


def test_bad_spec_files_and_bundles_leave_the_controller_serving(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    controller.write("kv", "  state: {version: 2}\n", version="1.2.0", image=STORAGE)
    for name, tail in BAD_SPECS.items():
        controller.write(name, tail)
    (controller.specs / "bomb.yaml").write_text(fuzzing.alias_bomb(7))
    (controller.specs / "huge.yaml").write_text("x: " + "y" * (2 << 20) + "\n")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "garbage.bundle").write_bytes(b"\0garbage" * 100)
    (plugins / "sparse.bundle").write_bytes(fuzzing.sparse_bundle())
    unsigned = bundles.make_bundle(tmp_path / "work", "unsigned", "1.0.0", key=None)
    bundles.replace_member(unsigned, bundle.MANIFEST, b"name: !!int abc\n")
    unsigned.rename(plugins / unsigned.name)
    controller.extra_args = ["--plugins-dir", str(plugins)]
    controller.start()

    wait_for(lambda: controller.ready("kv"), what="kv Ready beside the bad files")
    assert controller.call("kv", "put", {"key": "a", "value": 1})[:2] == (
        200, {"key": "a", "revision": 1},
    )  # fmt: skip
    listed = bhctl(controller, "get")
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stdout + listed.stderr
    for name in BAD_SPECS:
        assert f"{controller.specs / name}.yaml:8" in listed.stderr, (name, listed.stderr)
    assert f"{controller.specs / 'bomb'}.yaml:9 (document 1): spec.config.l1[0]: aliases" in (
        listed.stderr
    )
    assert "over the limit of 1048576 bytes (1 MiB)" in listed.stderr
    log = controller.log_text()
    for name in ("garbage", "sparse", "unsigned-1.0.0"):
        assert f"plugin bundle {plugins / name}.bundle refused" in log, log

    # bhctl apply of each bad spec: the controller's JSON error, exit 1, never a traceback.
    for name in ["int-tag", "bomb", "huge"]:
        applied = bhctl(controller, "apply", "-f", str(controller.specs / f"{name}.yaml"))
        assert applied.returncode == 1
        assert "Traceback" not in applied.stdout + applied.stderr
        assert applied.stderr.startswith("error: "), applied.stderr

    # A bad file written while it runs is seen, and changes nothing that serves.
    controller.write("late", BAD_SPECS["int-tag"])
    wait_for(
        lambda: any(e["origin"].endswith("late.yaml") for e in controller.admin.list()["errors"]),
        what="the late file's error",
    )
    assert controller.process is not None
    assert controller.process.poll() is None
    assert controller.call("kv", "get", {"key": "a"})[0] == 200


@pytest.fixture
async def engine_registry(
    engine: EngineUnderTest, tmp_path: Path
) -> AsyncIterator[tuple[registry.Registry, EngineUnderTest, bundles.Keys]]:
    data = tmp_path / "data"
    keys = bundles.Keys(tmp_path / "keys", trust=data / "registry" / "trusted")
    runtime = container.ContainerRuntime(container.Settings(engine=engine.kind, data_dir=data))
    found = registry.Registry(
        registry.Settings(data, protocols=client.SUPPORTED_PROTOCOL_VERSIONS), runtime
    )
    try:
        yield found, engine, keys
    finally:
        found.close()
        await runtime.close()


def _image_id(engine: EngineUnderTest, reference: str) -> str | None:
    try:
        return str(engine.client.images.get(reference).id)
    except docker.errors.ImageNotFound:
        return None


async def test_a_bundle_that_also_tags_another_image_moves_no_tag(
    engine_registry: tuple[registry.Registry, EngineUnderTest, bundles.Keys], tmp_path: Path
) -> None:
    found, engine, keys = engine_registry
    victim = f"blackhole/someone-else-{SESSION}:1"
    image = f"blackhole/retag-test-{SESSION}:1.0.0"
    work = tmp_path / "work"
    work.mkdir()
    victim_archive = work / "victim.tar"
    bundles.image_archive(victim_archive, victim, f"{SESSION} victim\n".encode())
    engine.client.images.load(victim_archive.read_bytes())
    victim_id = _image_id(engine, victim)
    try:
        content = f"{SESSION} retag\n".encode()
        path = bundles.make_bundle(
            work, "retag", "1.0.0", key=keys.private, image=image, image_content=content
        )
        hostile = work / "hostile.tar"
        bundles.image_archive(hostile, image, content, also=(victim,))
        bundles.replace_member(path, bundle.IMAGE, hostile.read_bytes())  # the signature holds
        with pytest.raises(BundleRefusedError, match=f"must be tagged exactly {image}") as caught:
            await found.install(str(path))
        assert caught.value.reason == "InvalidBundle"
        assert _image_id(engine, victim) == victim_id, "the other image's tag moved"
        assert _image_id(engine, image) is None, "nothing of the bundle was loaded"

        # The same bundle, honest: the engine loads the archive rebuilt from what was checked.
        honest = bundles.make_bundle(
            work / "honest", "retag", "1.0.0", key=keys.private, image=image, image_content=content
        )
        (installed,) = await found.install(str(honest))
        assert installed.loaded
        loaded = engine.client.images.get(image)
        assert loaded.id == installed.entry.image_digest
        assert [t.removeprefix("localhost/") for t in loaded.tags] == [image]
        assert _image_id(engine, victim) == victim_id
    finally:
        for reference in (image, victim):
            with contextlib.suppress(docker.errors.APIError):
                engine.client.images.remove(reference, force=True)
