"""The plugin registry on the real Docker engine, with a marketplace served over loopback HTTP.

Each bundle's image is made for this session (its content names the
session), so the engine never has it before a test: "nothing loaded" is
checked on the engine's own image list. The images this file loads are
removed at the end by their session-named repository.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
import pytest
from aiohttp import web

from controller.errors import BundleRefusedError, RegistryError
from controller.protocol import client
from controller.registry import bundle, catalog, registry, remote
from controller.runtimes import base, container
from tests import bundles

from .conftest import (
    BHCTL,
    PLUGIN_IMAGE,
    SESSION,
    SESSION_LABEL,
    ControllerProcess,
    EngineUnderTest,
    bhctl,
    get_engine,
    wait_for,
)

REPOSITORY = f"blackhole/registry-test-{SESSION}"


def image(name: str, version: str) -> str:
    return f"{REPOSITORY}-{name}:{version}"


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[EngineUnderTest]:
    engine = get_engine(container.Engine.DOCKER)
    yield engine
    for found in engine.client.images.list():
        for tag in found.tags:
            if tag.startswith(REPOSITORY):
                with contextlib.suppress(docker.errors.APIError):
                    engine.client.images.remove(tag, force=True)


def image_ids(engine: EngineUnderTest) -> set[str]:
    return {str(i.id) for i in engine.client.images.list(all=True)}


@dataclass
class Market:
    """A marketplace on loopback: the index, the bundles, and routes that misbehave."""

    root: Path
    files: dict[str, bytes] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    url: str = ""

    async def serve(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.hits[path] = self.hits[path] + 1
        if path not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[path])

    async def drop(self, request: web.Request) -> web.StreamResponse:
        """Promise the whole bundle, send half of it, and hang up."""
        path = request.match_info["path"]
        self.hits["drop/" + path] += 1
        data = self.files[path]
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()
        return response

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        """The bundle with no Content-Length: its size is known only as it arrives."""
        data = self.files[request.match_info["path"]]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 4096):
            await response.write(data[start : start + 4096])
        await response.write_eof()
        return response

    def publish(self, *paths: Path) -> None:
        entries = []
        for path in paths:
            self.files[f"bundles/{path.name}"] = path.read_bytes()
            entries.append(bundles.index_entry(path, f"bundles/{path.name}"))
        self.files["index.json"] = bundles.index(entries)

    @property
    def index(self) -> str:
        return f"{self.url}/index.json"


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[Market]:
    found = Market(tmp_path / "market")
    app = web.Application()
    app.add_routes(
        [
            web.get("/drop/{path:.+}", found.drop),
            web.get("/chunked/{path:.+}", found.chunked),
            web.get("/{path:.+}", found.serve),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


class Setup:
    def __init__(self, root: Path, engine: EngineUnderTest) -> None:
        self.root = root
        self.engine = engine
        self.data = root / "data"
        self.keys = bundles.Keys(root / "keys", trust=self.data / "registry" / "trusted")
        self.work = root / "work"
        self.runtime = container.ContainerRuntime(
            container.Settings(engine=engine.kind, data_dir=self.data)
        )
        self.limits = remote.Limits(attempts=3, backoff=0.05, read_timeout=5)
        self.registry = registry.Registry(
            registry.Settings(
                self.data, protocols=client.SUPPORTED_PROTOCOL_VERSIONS, limits=self.limits
            ),
            self.runtime,
        )

    def bundle(self, name: str, version: str = "1.0.0", **fields: object) -> Path:
        fields.setdefault("key", self.keys.private)
        fields.setdefault("image", image(name, version))
        fields.setdefault("image_content", f"{SESSION} {name} {version}\n".encode())
        return bundles.make_bundle(self.work, name, version, **fields)  # type: ignore[arg-type]

    async def refused(self, what: str, reason: str, **options: str) -> str:
        before = image_ids(self.engine)
        with pytest.raises(RegistryError) as caught:
            await self.registry.install(what, **options)
        error = caught.value
        if reason:
            assert isinstance(error, BundleRefusedError), str(error)
            assert error.reason == reason, str(error)
        assert image_ids(self.engine) == before, "an image was loaded"
        assert self.registry.catalog.entries() == []
        assert [p.name for p in self.registry.cache.iterdir() if p.is_file()] == []
        return str(error)


@pytest.fixture
async def setup(tmp_path: Path, docker_engine: EngineUnderTest) -> AsyncIterator[Setup]:
    found = Setup(tmp_path, docker_engine)
    try:
        yield found
    finally:
        found.registry.close()
        await found.runtime.close()


async def test_install_from_a_marketplace_by_name_and_range_then_search(
    setup: Setup, market: Market
) -> None:
    kv = {"provides": ["storage.kv"], "author": "Storage Team", "category": "storage",
          "requires": [{"name": "auth", "version": "^1"}]}  # fmt: skip
    market.publish(
        setup.bundle("kv-store", "1.2.0", **kv),
        setup.bundle("kv-store", "1.3.0", **kv),
        setup.bundle("kv-store", "2.0.0", **kv),
        setup.bundle(
            "auth", "1.0.0", provides=["auth.tokens"], author="Security Team", category="security"
        ),
    )
    done = await setup.registry.install("kv-store@^1.2", index=market.index)
    assert [d.entry.manifest.ref for d in done] == ["auth@1.0.0", "kv-store@1.3.0"]
    assert all(d.downloaded and d.loaded for d in done)
    for item in done:  # the engine holds each image under its tag, by the signed digest
        found = item.entry.manifest
        assert setup.engine.client.images.get(found.image).id == found.image_digest
    with pytest.raises(docker.errors.ImageNotFound):
        setup.engine.client.images.get(image("kv-store", "2.0.0"))

    def names(found: list[tuple[int, catalog.Entry]]) -> list[str]:
        return [e.manifest.ref for _, e in found]

    assert names(setup.registry.search(provides="storage.kv")) == ["kv-store@1.3.0"]
    assert names(setup.registry.search(author="security team")) == ["auth@1.0.0"]
    assert names(setup.registry.search(category="storage")) == ["kv-store@1.3.0"]
    assert names(setup.registry.search("kv")) == ["kv-store@1.3.0"]

    # Again: nothing downloaded, nothing loaded.
    fetched, ids = (
        sum(v for k, v in market.hits.items() if k.startswith("bundles/")),
        image_ids(setup.engine),
    )
    assert await setup.registry.install("kv-store@^1.2", index=market.index) == []
    # Even with the catalog lost, the cache (by sha256) and the engine (by digest) serve it.
    setup.registry.catalog.remove("kv-store")
    [again] = await setup.registry.install("kv-store@~1.3", index=market.index)
    assert (again.downloaded, again.loaded) == (False, False)
    assert sum(v for k, v in market.hits.items() if k.startswith("bundles/")) == fetched
    assert image_ids(setup.engine) == ids


async def test_a_manifest_changed_after_signing_is_refused(setup: Setup) -> None:
    path = setup.bundle("tampered")
    text = bundles.read_member(path, bundle.MANIFEST).replace(b"testing", b"storage")
    bundles.replace_member(path, bundle.MANIFEST, text)
    message = await setup.refused(str(path), "BadSignature")
    assert "changed after signing" in message


async def test_an_image_whose_digest_differs_from_the_manifest_is_refused(setup: Setup) -> None:
    path = setup.bundle("swapped")
    other = setup.root / "other.tar"
    bundles.image_archive(other, image("swapped", "1.0.0"), f"{SESSION} evil\n".encode())
    bundles.replace_member(path, bundle.IMAGE, other.read_bytes())
    message = await setup.refused(str(path), "ImageDigestMismatch")
    assert "not the one that was signed" in message


async def test_a_signature_by_an_untrusted_key_is_refused(setup: Setup) -> None:
    stranger = bundles.Keys(setup.root / "stranger", name="stranger")
    message = await setup.refused(
        str(setup.bundle("foreign", key=stranger.private)), "UntrustedKey"
    )
    assert f"signed by key {stranger.key_id}, which is not in the trust directory" in message


async def test_an_unsigned_bundle_is_refused_under_the_default_policy(setup: Setup) -> None:
    message = await setup.refused(str(setup.bundle("unsigned", key=None)), "Unsigned")
    assert "is not signed" in message


async def test_a_dependency_cycle_is_refused_with_the_cycle(setup: Setup, market: Market) -> None:
    market.publish(
        setup.bundle("ring-a", requires=[{"name": "ring-b"}]),
        setup.bundle("ring-b", requires=[{"name": "ring-c"}]),
        setup.bundle("ring-c", requires=[{"name": "ring-a"}]),
    )
    message = await setup.refused("ring-a", "DependencyCycle", index=market.index)
    assert "ring-a -> ring-b -> ring-c -> ring-a" in message
    assert not any(k.startswith("bundles/") for k in market.hits), "nothing was even downloaded"


async def test_an_unsatisfiable_range_is_refused(setup: Setup, market: Market) -> None:
    market.publish(
        setup.bundle("app", requires=[{"name": "db", "version": ">=2,<3"}]),
        setup.bundle("db", "1.4.0"),
    )
    message = await setup.refused("app@^1", "DependencyUnsatisfiable", index=market.index)
    assert "no version of db satisfies >=2,<3 (wanted by app@1.0.0); versions available: 1.4.0" in (
        message
    )


async def test_a_download_over_the_size_limit_is_refused(setup: Setup, market: Market) -> None:
    path = setup.bundle("large")
    market.publish(path)
    size = path.stat().st_size
    setup.registry.settings = registry.Settings(
        setup.data, limits=remote.Limits(max_bytes=size - 1, attempts=3, backoff=0.05)
    )
    url = f"{market.url}/bundles/{path.name}"
    message = await setup.refused(url, "")
    assert f"is {size} bytes, over the size limit of {size - 1} bytes" in message
    assert market.hits[f"bundles/{path.name}"] == 1, "a size refusal is not retried"
    # Without a Content-Length it is cut off as soon as the limit is passed.
    message = await setup.refused(f"{market.url}/chunked/bundles/{path.name}", "")
    assert f"over the size limit of {size - 1} bytes" in message


async def test_a_server_that_drops_the_connection_mid_download_is_retried_then_refused(
    setup: Setup, market: Market
) -> None:
    path = setup.bundle("flaky")
    market.publish(path)
    url = f"{market.url}/drop/bundles/{path.name}"
    message = await setup.refused(url, "")
    assert "failed after 3 attempts" in message
    assert "the connection dropped after" in message
    assert market.hits[f"drop/bundles/{path.name}"] == 3
    # A checksum that does not match is refused too.
    good = f"{market.url}/bundles/{path.name}"
    await setup.refused(good, "ChecksumMismatch", sha256="0" * 64)


def test_a_spec_naming_a_bundle_runs_it_and_a_refused_one_says_why(
    docker_engine: EngineUnderTest, tmp_path: Path
) -> None:
    """End to end: bhctl plugin install into a controller's data directory, then specs."""
    client_ = docker_engine.client
    tag = image("runnable", "1.4.0")
    dockerfile = f"FROM {PLUGIN_IMAGE}\nLABEL {SESSION_LABEL}={SESSION}\n"
    client_.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "plugin.yaml").write_text(bundles.manifest_text("runnable", "1.4.0", tag))
    process = ControllerProcess(docker_engine, tmp_path / "controller")
    keys = tmp_path / "keys"

    def run(*args: str, data_dir: bool = True) -> str:
        if data_dir:
            done = bhctl(process, "plugin", *args)
        else:
            command = [str(BHCTL), "plugin", *args]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "key id" in run("keygen", "author", "--dir", str(keys), data_dir=False)
    path = tmp_path / "runnable.bundle"
    # pack saves the image from the engine (docker save) and pins its digest
    key = str(keys / "author.key")
    assert "signed by" in run(
        "pack", str(work), "--key", key, "--output-file", str(path), data_dir=False
    )
    refused = bhctl(process, "plugin", "verify", str(path))
    assert refused.returncode == 1
    assert "(UntrustedKey)" in refused.stderr
    assert (process.data / "registry" / "trusted").is_dir(), "made by default"
    assert "trusted" in run("trust", str(keys / "author.pub"))
    assert "verified runnable@1.4.0" in run("verify", str(path))
    assert "installed runnable@1.4.0" in run("install", str(path))
    (process.specs / "runnable.yaml").write_text(
        "apiVersion: blackhole.dev/v1alpha1\nkind: Plugin\nmetadata: {name: runnable}\n"
        'spec:\n  bundle: "runnable@^1.2"\n'
    )
    (process.specs / "missing.yaml").write_text(
        "apiVersion: blackhole.dev/v1alpha1\nkind: Plugin\nmetadata: {name: missing}\n"
        'spec:\n  bundle: "runnable@^2"\n'
    )
    process.start()
    try:
        wait_for(lambda: process.ready("runnable"), timeout=60, what="the bundle's plugin Ready")
        assert process.status("runnable")["activeVersion"] == "1.4.0"
        ready = wait_for(lambda: process.condition("missing", "Ready"), what="missing's status")
        assert ready["reason"] == "BundleNotFound"
        assert "no installed version of runnable is in ^2 (installed: 1.4.0)" in ready["message"]
        assert process.status("missing")["phase"] == "Failed"
        containers = process.containers()
        assert not any("missing" in name for name in containers), containers
        table = bhctl(process, "get", "-o", "wide")
        assert table.returncode == 0, table.stderr
        assert "1.4.0" in table.stdout
        assert "runnable@^2" in table.stdout
        listed = bhctl(process, "plugin", "search", "--provides", "test.runnable", "-o", "json")
        assert [r["name"] for r in json.loads(listed.stdout)] == ["runnable"]
    finally:
        process.kill()
        selector: dict[str, str | list[str] | bool] = {
            "label": f"{base.LABEL_CONTROLLER}={process.controller_id}"
        }
        for item in client_.containers.list(all=True, filters=selector):
            item.remove(force=True, v=True)
