"""The registry without engines: bundles, signatures, policy, dependencies, catalog and search.

Images are loaded into the in-memory runtime, which takes ``docker save``
archives by their config digest as engines do; the same refusals against
the real Docker engine are in ``tests/integration/test_registry.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from controller.errors import BundleRefusedError, RegistryError
from controller.registry import bundle, catalog, dependencies, manifest, registry
from controller.runtimes.memory import MemoryRuntime
from controller.spec import models
from controller.spec.semver import Version, VersionRange
from tests import bundles

EXAMPLES = Path(__file__).parents[2] / "examples"


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.data = tmp_path / "data"
        self.trust = self.data / "registry" / "trusted"
        self.keys = bundles.Keys(tmp_path / "keys", trust=self.trust)
        self.images = MemoryRuntime()
        self.registry = registry.Registry(registry.Settings(self.data), self.images)
        self.work = tmp_path / "work"

    def bundle(self, name: str = "kv", version: str = "1.0.0", **fields: object) -> Path:
        fields.setdefault("key", self.keys.private)
        return bundles.make_bundle(self.work, name, version, **fields)  # type: ignore[arg-type]

    def policy(self, text: str) -> None:
        (self.data / "registry" / "policy.yaml").write_text(text)

    async def refused(self, path: Path | str, reason: str) -> BundleRefusedError:
        with pytest.raises(BundleRefusedError) as caught:
            await self.registry.install(str(path))
        assert caught.value.reason == reason, str(caught.value)
        assert self.images.images == {}, "nothing may be loaded"
        assert self.registry.catalog.entries() == []
        assert list(self.registry.cache.glob("*.bundle")) == []
        return caught.value


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_the_examples_manifests_are_valid_manifests() -> None:
    for path in sorted(EXAMPLES.glob("*/plugin.yaml")):
        found = manifest.parse(path.read_bytes(), str(path))
        assert found.name
        assert found.protocol_version == 1


def test_a_manifest_error_names_the_field(tmp_path: Path) -> None:
    text = bundles.manifest_text("kv", "1.0", "blackhole/kv:1")
    with pytest.raises(
        BundleRefusedError, match=r"plugin.yaml:2: version: .*not a semantic version"
    ):
        manifest.parse(text.encode())


async def test_a_signed_bundle_installs_and_its_image_is_loaded(setup: Setup) -> None:
    path = setup.bundle(provides=["storage.kv"])
    [done] = await setup.registry.install(str(path))
    assert done.loaded
    assert not done.downloaded
    assert done.entry.key_id == setup.keys.key_id
    found = done.entry.manifest
    assert setup.images.images[found.image] == found.image_digest
    assert [e.manifest.ref for e in setup.registry.catalog.entries()] == ["kv@1.0.0"]
    assert (setup.registry.cache / f"{bundle.sha256_file(path)}.bundle").exists()


async def test_a_second_install_loads_nothing(setup: Setup) -> None:
    path = setup.bundle()
    await setup.registry.install(str(path))
    [again] = await setup.registry.install(str(path))
    assert not again.loaded
    assert setup.images.calls["load_image"] == 1


async def test_an_unpacked_bundle_directory_installs_like_the_file(setup: Setup) -> None:
    path = setup.bundle()
    unpacked = setup.root / "unpacked"
    unpacked.mkdir()
    for member in (bundle.MANIFEST, bundle.SIGNATURE, bundle.IMAGE):
        (unpacked / member).write_bytes(bundles.read_member(path, member))
    [done] = await setup.registry.install(str(unpacked))
    assert done.entry.manifest.ref == "kv@1.0.0"
    assert done.loaded


async def test_a_manifest_changed_after_signing_is_refused(setup: Setup) -> None:
    path = setup.bundle()
    text = bundles.read_member(path, bundle.MANIFEST).replace(b"testing", b"storage")
    bundles.replace_member(path, bundle.MANIFEST, text)
    error = await setup.refused(path, "BadSignature")
    assert "changed after signing" in str(error)


async def test_an_image_other_than_the_signed_one_is_refused(setup: Setup) -> None:
    path = setup.bundle()
    other = setup.root / "other.tar"
    with bundle.Bundle(path) as opened:
        tag = opened.parse_manifest().image
    bundles.image_archive(other, tag, b"something else\n")
    bundles.replace_member(path, bundle.IMAGE, other.read_bytes())
    error = await setup.refused(path, "ImageDigestMismatch")
    assert "not the one that was signed" in str(error)


async def test_a_layer_changed_under_its_config_is_refused(setup: Setup) -> None:
    path = setup.bundle(image_content=b"original!\n")
    image = bundles.read_member(path, bundle.IMAGE).replace(b"original!", b"tampered!")
    bundles.replace_member(path, bundle.IMAGE, image)
    error = await setup.refused(path, "ImageDigestMismatch")
    assert "layer 0" in str(error)


async def test_a_signature_by_an_untrusted_key_is_refused(setup: Setup) -> None:
    stranger = bundles.Keys(setup.root / "stranger", name="stranger")
    path = setup.bundle(key=stranger.private)
    error = await setup.refused(path, "UntrustedKey")
    assert stranger.key_id in str(error)


async def test_an_unsigned_bundle_is_refused_unless_the_policy_allows_it(setup: Setup) -> None:
    path = setup.bundle(key=None)
    error = await setup.refused(path, "Unsigned")
    assert "refuses unsigned bundles: sign it with bhctl plugin sign" in str(error)
    assert "accept unsigned bundles with allowUnsigned: true in the policy" in str(error)
    setup.policy("allowUnsigned: true\n")
    [done] = await setup.registry.install(str(path))
    assert done.entry.key_id is None


async def test_what_the_policy_forbids_is_refused(setup: Setup) -> None:
    egress = setup.bundle(
        "fetcher", permissions={"network": "egress", "egress": ["api.example.com:443"]}
    )
    error = await setup.refused(egress, "PermissionDenied")
    assert "egress to api.example.com:443" in str(error)
    hungry = setup.bundle("hungry", resources={"memory": "4Gi"})
    error = await setup.refused(hungry, "ResourcesExceeded")
    assert "memory 4Gi > 1Gi" in str(error)
    future = setup.bundle("future", protocolVersion=2)
    await setup.refused(future, "ProtocolUnsupported")
    setup.policy(
        "permissions: {networks: [none, egress], egress: ['*.example.com:443']}\n"
        "maxResources: {memory: 8Gi}\n"
    )
    assert len(await setup.registry.install(str(egress))) == 1
    assert len(await setup.registry.install(str(hungry))) == 1


async def test_a_bundle_with_an_unresolvable_dependency_is_refused(setup: Setup) -> None:
    path = setup.bundle("app", requires=[{"name": "auth", "version": "^2"}])
    error = await setup.refused(path, "DependencyUnsatisfiable")
    assert "no version of auth satisfies ^2 (wanted by app@1.0.0)" in str(error)


async def test_bundles_that_require_each_other_are_refused_with_the_cycle(setup: Setup) -> None:
    setup.bundle("a", requires=[{"name": "b"}])
    setup.bundle("b", requires=[{"name": "c"}])
    setup.bundle("c", requires=[{"name": "a"}])
    for leftover in setup.work.glob("*.tar"):
        leftover.unlink()
    error = await setup.refused(setup.work, "DependencyCycle")
    assert "a -> b -> c -> a" in str(error)


async def test_a_directory_of_bundles_installs_in_dependency_order(setup: Setup) -> None:
    setup.bundle("app", requires=[{"name": "db", "version": ">=1.0,<2"}])
    setup.bundle("db", "1.4.0")
    done = await setup.registry.install(str(setup.work))
    assert [d.entry.manifest.ref for d in done] == ["db@1.4.0", "app@1.0.0"]


def test_resolution_picks_the_highest_version_in_every_range() -> None:
    def entry(name: str, version: str, *requires: tuple[str, str]) -> manifest.Manifest:
        return manifest.Manifest.model_validate(
            {"name": name, "version": version, "protocolVersion": 1, "image": f"x/{name}:1",
             "requires": [{"name": n, "version": r} for n, r in requires]}
        )  # fmt: skip

    offered = {
        "a": [entry("a", "1.0.0", ("b", "^1"), ("c", ">=1.1"))],
        "b": [entry("b", "1.0.0"), entry("b", "1.5.0", ("c", "<1.3")), entry("b", "2.0.0")],
        "c": [entry("c", "1.0.0"), entry("c", "1.2.0"), entry("c", "1.4.0")],
    }
    chosen = dependencies.resolve([("a", VersionRange.parse("*"))], lambda n: offered.get(n, []))
    assert {n: str(c.version) for n, c in chosen.items()} == {
        "a": "1.0.0",
        "b": "1.5.0",
        "c": "1.2.0",
    }
    graph = {n: [d.name for d in c.requires] for n, c in chosen.items()}
    assert dependencies.start_order(graph) == ["c", "b", "a"]


def test_a_conflict_names_both_chains() -> None:
    def entry(name: str, version: str, *requires: tuple[str, str]) -> manifest.Manifest:
        return manifest.Manifest.model_validate(
            {"name": name, "version": version, "protocolVersion": 1, "image": f"x/{name}:1",
             "requires": [{"name": n, "version": r} for n, r in requires]}
        )  # fmt: skip

    offered = {
        "a": [entry("a", "1.0.0", ("b", "^1"), ("c", "^1"))],
        "b": [entry("b", "1.0.0", ("c", "^2"))],
        "c": [entry("c", "1.0.0"), entry("c", "2.0.0")],
    }
    with pytest.raises(BundleRefusedError) as caught:
        dependencies.resolve([("a", VersionRange.parse("*"))], lambda n: offered.get(n, []))
    assert caught.value.reason == "DependencyConflict"
    message = str(caught.value)
    assert "^1 (wanted by a@1.0.0)" in message
    assert "^2 (wanted by a@1.0.0 -> b@1.0.0)" in message


def test_a_cycle_has_no_start_order() -> None:
    with pytest.raises(BundleRefusedError, match=r"x -> y -> z -> x"):
        dependencies.start_order({"x": ["y"], "y": ["z"], "z": ["x"], "w": []})


async def test_search_ranks_by_capability_author_category_and_text(setup: Setup) -> None:
    setup.bundle(
        "kv-store",
        "1.2.0",
        provides=["storage.kv"],
        author="Storage Team",
        category="storage",
        description="A key-value store.",
    )
    setup.bundle(
        "kv-store",
        "1.3.0",
        provides=["storage.kv"],
        author="Storage Team",
        category="storage",
        description="A key-value store, faster.",
    )
    setup.bundle(
        "metrics",
        provides=["analytics.events"],
        author="Data Team",
        category="analytics",
        description="Counts events; no key-value store.",
    )
    await setup.registry.install(str(setup.work))

    def names(found: list[tuple[int, catalog.Entry]]) -> list[tuple[str, str]]:
        return [(e.name, str(e.version)) for _, e in found]

    assert names(setup.registry.search(provides="storage")) == [("kv-store", "1.3.0")]
    assert names(setup.registry.search(provides="storage.kv")) == [("kv-store", "1.3.0")]
    assert names(setup.registry.search(author="data")) == [("metrics", "1.0.0")]
    assert names(setup.registry.search(category="Analytics")) == [("metrics", "1.0.0")]
    # The name and capability match outweighs a mention in a description.
    assert names(setup.registry.search("kv")) == [("kv-store", "1.3.0")]
    assert names(setup.registry.search("store")) == [("kv-store", "1.3.0"), ("metrics", "1.0.0")]
    assert names(setup.registry.search("store", category="storage")) == [("kv-store", "1.3.0")]
    assert setup.registry.search("nothing-like-it") == []
    ranked = catalog.rank(setup.registry.catalog.entries(), "kv", all_versions=True)
    assert names(ranked) == [("kv-store", "1.3.0"), ("kv-store", "1.2.0")]


async def test_remove_forgets_the_bundle_its_cache_and_its_image(setup: Setup) -> None:
    path = setup.bundle()
    [done] = await setup.registry.install(str(path))
    await setup.registry.remove("kv")
    assert setup.registry.catalog.entries() == []
    assert list(setup.registry.cache.glob("*.bundle")) == []
    assert done.entry.manifest.image not in setup.images.images
    with pytest.raises(RegistryError, match="kv is not installed"):
        await setup.registry.remove("kv")


async def test_remove_leaves_an_image_the_engine_had_before_the_install(setup: Setup) -> None:
    path = setup.bundle()
    [first] = await setup.registry.install(str(path))
    assert first.loaded
    await setup.registry.remove("kv")
    [again] = await setup.registry.install(str(path))  # loaded again: the remove took it
    assert again.loaded
    image = again.entry.manifest.image
    kept = setup.images.images[image]
    setup.registry.catalog.remove("kv")  # forgotten, image left: as if brought in otherwise
    [found] = await setup.registry.install(str(path))
    assert not found.loaded, "the engine had it: nothing loaded"
    assert not found.entry.loaded
    await setup.registry.remove("kv")
    assert setup.images.images.get(image) == kept, "not the registry's image to remove"


async def test_a_spec_naming_a_bundle_gets_its_image_version_and_state(setup: Setup) -> None:
    await setup.registry.install(str(setup.bundle("kv", "1.2.0", stateVersion=2)))
    await setup.registry.install(str(setup.bundle("kv", "1.3.0", stateVersion=2)))
    await setup.registry.install(str(setup.bundle("kv", "2.0.0", stateVersion=3)))
    spec = models.PluginSpec.model_validate({"bundle": "kv@^1.2"})
    resolved = await setup.registry.resolve(spec)
    assert resolved.version == Version.parse("1.3.0")
    assert resolved.image == "blackhole/registry-test-kv:1.3.0"
    assert resolved.state == models.State(version=2)
    assert resolved.provides == ["test.kv"]


async def test_a_spec_naming_a_bundle_is_refused_when_a_check_fails(setup: Setup) -> None:
    await setup.registry.install(str(setup.bundle("kv", "1.2.0")))

    async def reason(document: Mapping[str, object]) -> str:
        with pytest.raises(BundleRefusedError) as caught:
            await setup.registry.resolve(models.PluginSpec.model_validate(document))
        return caught.value.reason

    assert await reason({"bundle": "kv@^2"}) == "BundleNotFound"
    assert await reason({"bundle": "kv", "version": "1.3.0"}) == "BundleMismatch"
    assert await reason({"bundle": "kv", "resources": {"cpu": "4"}}) == "ResourcesExceeded"
    granted = {"bundle": "kv", "permissions": {"callPlugins": ["auth"]}}
    assert await reason(granted) == "PermissionDenied"
    setup.images.images["blackhole/registry-test-kv:1.2.0"] = "sha256:" + "0" * 64
    assert await reason({"bundle": "kv"}) == "ImageDigestMismatch"
    for key in setup.trust.iterdir():  # the operator no longer trusts its author
        key.unlink()
    assert await reason({"bundle": "kv"}) == "UntrustedKey"


def test_a_spec_needs_an_image_and_version_or_a_bundle() -> None:
    with pytest.raises(ValueError, match="image and version required"):
        models.PluginSpec.model_validate({})
    with pytest.raises(ValueError, match="not a bundle reference"):
        models.PluginSpec.model_validate({"bundle": "Not A Name@1"})
    with pytest.raises(ValueError, match="not a version range"):
        models.PluginSpec.model_validate({"bundle": "kv@>>1"})
    assert models.PluginSpec.model_validate({"bundle": "kv@^1.2"}).image is None


def test_pack_refuses_an_archive_of_another_image(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    bundles.image_archive(archive, "blackhole/other:1")
    source = tmp_path / "plugin.yaml"
    source.write_text(bundles.manifest_text("kv", "1.0.0", "blackhole/kv:1"))
    with pytest.raises(RegistryError, match="holds blackhole/other:1, not blackhole/kv:1"):
        bundle.pack(source, archive, tmp_path / "kv.bundle")


def test_pack_pins_the_image_digest_in_the_signed_manifest(tmp_path: Path) -> None:
    keys = bundles.Keys(tmp_path / "keys")
    path = bundles.make_bundle(tmp_path, "kv", "1.0.0", key=keys.private)
    document = yaml.safe_load(bundles.read_member(path, bundle.MANIFEST))
    with bundle.Bundle(path) as opened:
        opened.parse_manifest()
        assert document["imageDigest"] == opened.check_image().digest
    signature = bundles.read_member(path, bundle.SIGNATURE)
    assert keys.key_id in signature.decode()


async def test_a_bundle_signed_after_packing_installs(setup: Setup) -> None:
    path = setup.bundle(key=None)
    assert bundle.sign_in_place(path, setup.keys.private) == setup.keys.key_id
    [done] = await setup.registry.install(str(path))
    assert done.entry.key_id == setup.keys.key_id


async def test_an_unknown_source_says_what_would_be_right(setup: Setup) -> None:
    with pytest.raises(RegistryError, match=r"kv@\^1: no such file or directory.*--index"):
        await setup.registry.install("kv@^1")


async def test_a_bundle_spec_is_refused_where_no_image_is_loaded(setup: Setup) -> None:
    """On Kubernetes (nodes pull) or processes, the signed digest could not be enforced."""
    await setup.registry.install(str(setup.bundle("kv", "1.2.0")))
    pulling = registry.Registry(registry.Settings(setup.data), None)
    spec = models.PluginSpec.model_validate({"bundle": "kv@^1.2"})
    with pytest.raises(BundleRefusedError) as caught:
        await pulling.resolve(spec)
    assert caught.value.reason == "NoImageStore"
    pulling.close()
