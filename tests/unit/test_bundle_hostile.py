"""Hostile bundles: extra tags, sparse and oversized members, lying tar headers, unverified
manifests. Each is refused before anything is allocated for it or handed to an engine."""

from __future__ import annotations

import json
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from controller.errors import BundleRefusedError, RegistryError
from controller.registry import bundle, registry, signing
from controller.runtimes.memory import MemoryRuntime
from tests import bundles, fuzzing

from .test_registry import Setup

T = TypeVar("T")


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def peak_bytes(action: Callable[[], T]) -> tuple[T | BaseException, int]:
    """What ``action`` returned or raised, and the most memory it had allocated at once."""
    tracemalloc.start()
    try:
        try:
            result: T | BaseException = action()
        except BaseException as e:  # noqa: BLE001 (handed back to the caller to check)
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def retagged(setup: Setup, *, also: tuple[str, ...] = (), extra: dict[str, bytes] | None = None):
    """A signed bundle whose image archive, replaced after signing, has the same image (so the
    same digest) with other tags or members too."""
    path = setup.bundle()
    with bundle.Bundle(path) as opened:
        image = opened.parse_manifest().image
    archive = setup.root / "retagged.tar"
    bundles.image_archive(archive, image, b"kv 1.0.0\n", also=also, extra=extra)
    bundles.replace_member(path, bundle.IMAGE, archive.read_bytes())
    return path, image


async def test_an_archive_that_also_tags_another_image_is_refused(setup: Setup) -> None:
    setup.images.images["someone/else:1"] = "sha256:" + "e" * 64
    path, image = retagged(setup, also=("someone/else:1",))
    with pytest.raises(BundleRefusedError) as caught:
        await setup.registry.install(str(path))
    assert caught.value.reason == "InvalidBundle"
    assert f"must be tagged exactly {image}" in str(caught.value)
    assert setup.images.images == {"someone/else:1": "sha256:" + "e" * 64}, "nothing loaded"


async def test_an_untagged_archive_is_refused(setup: Setup) -> None:
    path = setup.bundle()
    with bundle.Bundle(path) as opened:
        image = opened.parse_manifest().image
    archive = setup.root / "untagged.tar"
    bundles.image_archive(archive, image, b"kv 1.0.0\n")
    with tarfile.open(archive) as saved:
        members = {m.name: saved.extractfile(m).read() for m in saved.getmembers()}  # type: ignore[union-attr]
    document = json.loads(members["manifest.json"])
    document[0]["RepoTags"] = None
    members["manifest.json"] = json.dumps(document).encode()
    with tarfile.open(archive, mode="w") as saved:
        for name, data in members.items():
            bundles._add(saved, name, data)
    bundles.replace_member(path, bundle.IMAGE, archive.read_bytes())
    await setup.refused(path, "InvalidBundle")


class Recording(MemoryRuntime):
    """The in-memory engine, keeping what each archive it loaded held."""

    def __init__(self) -> None:
        super().__init__()
        self.archives: list[dict[str, bytes]] = []

    async def load_image(self, archive: Path) -> str:
        with tarfile.open(archive) as saved:
            self.archives.append(
                {m.name: saved.extractfile(m).read() for m in saved.getmembers() if m.isfile()}  # type: ignore[union-attr]
            )
        return await super().load_image(archive)


async def test_the_engine_gets_only_the_checked_members_tagged_as_signed(setup: Setup) -> None:
    oci_index = {
        "schemaVersion": 2,
        "manifests": [{"annotations": {"io.containerd.image.name": "someone/else:1"}}],
    }
    path, image = retagged(
        setup,
        extra={"index.json": json.dumps(oci_index).encode(), "oci-layout": b"{}"},
    )
    setup.registry.images = engine = Recording()
    (installed,) = await setup.registry.install(str(path))
    assert installed.loaded
    (loaded,) = engine.archives
    document = json.loads(loaded["manifest.json"])
    assert [entry["RepoTags"] for entry in document] == [[image]]
    layers = document[0]["Layers"]
    assert sorted(loaded) == sorted(["manifest.json", document[0]["Config"], *layers])
    assert "someone/else:1" not in engine.images


def sparse(setup: Setup, size: int, member: str = bundle.MANIFEST) -> Path:
    path = setup.work / "sparse.bundle"
    setup.work.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fuzzing.sparse_bundle(size, member))
    return path


@pytest.mark.parametrize("size", [64 << 20, 20 << 30], ids=["64MiB", "20GiB"])
@pytest.mark.parametrize("member", [bundle.MANIFEST, bundle.IMAGE])
def test_a_sparse_member_is_refused_before_anything_is_allocated(
    setup: Setup, size: int, member: str
) -> None:
    path = sparse(setup, size, member)
    assert path.stat().st_size < 16 << 10

    def check() -> None:
        with bundle.Bundle(path) as opened:
            setup.registry.check(opened)

    raised, peak = peak_bytes(check)
    assert isinstance(raised, BundleRefusedError), raised
    assert raised.reason == "InvalidBundle"
    assert "(a sparse file)" in str(raised)
    assert peak < 1 << 20, f"{peak} bytes allocated for a {path.stat().st_size}-byte bundle"


def test_a_tar_header_claiming_gigabytes_is_refused_before_reading_them(setup: Setup) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 20 << 30
    data = header.tobuf(tarfile.GNU_FORMAT) + b"\0" * 2048
    path = setup.work / "lying.bundle"
    setup.work.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    raised, peak = peak_bytes(lambda: bundle.Bundle(path))
    assert isinstance(raised, BundleRefusedError), raised
    assert "claims 21474836480 bytes" in str(raised)
    assert peak < 1 << 20


def test_a_member_past_the_end_of_the_file_is_refused(setup: Setup) -> None:
    path = setup.bundle()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleRefusedError, match="not in the archive"):
        bundle.Bundle(path)


def test_a_manifest_over_its_limit_is_refused_before_it_is_read(setup: Setup) -> None:
    path = setup.bundle()
    bundles.replace_member(path, bundle.MANIFEST, b"a: b\n" * (1 << 19))
    raised, peak = peak_bytes(lambda: bundle.Bundle(path))
    assert isinstance(raised, BundleRefusedError)
    assert "over the limit of 1048576 bytes" in str(raised)
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "manifest_bytes",
    [fuzzing.alias_bomb(9).encode(), b"name: !!int abc\n", b"\xff\xfe", b"[" * 100_000],
    ids=["alias-bomb", "int-tag", "not-utf8", "deep"],
)
async def test_the_signature_is_checked_before_the_manifest_is_parsed(
    setup: Setup, tmp_path: Path, manifest_bytes: bytes
) -> None:
    stranger = bundles.Keys(tmp_path / "stranger", name="stranger")
    path = setup.bundle()
    bundles.replace_member(path, bundle.MANIFEST, manifest_bytes)
    bundles.replace_member(path, bundle.SIGNATURE, b"{}")
    await setup.refused(path, "BadSignature")
    signed = signing.sign(manifest_bytes, signing.load_private(stranger.private))
    bundles.replace_member(path, bundle.SIGNATURE, signed)
    await setup.refused(path, "UntrustedKey")
    trusted = signing.sign(manifest_bytes, signing.load_private(setup.keys.private))
    bundles.replace_member(path, bundle.SIGNATURE, trusted)
    await setup.refused(path, "InvalidBundle")  # signed by a trusted key: parsed, and refused


async def test_an_unsigned_bundle_is_refused_before_its_manifest_is_parsed(setup: Setup) -> None:
    path = setup.bundle(key=None)
    bundles.replace_member(path, bundle.MANIFEST, fuzzing.alias_bomb(9).encode())
    await setup.refused(path, "Unsigned")


@pytest.mark.parametrize("name", ["../../x", "a/b", "/etc/x", ".hidden", "..", ""])
def test_keygen_keeps_the_files_in_its_directory(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "keys" / "deep"
    with pytest.raises(RegistryError, match="not a path"):
        signing.generate(directory, name)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_a_new_data_directory_is_the_owners_only(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    registry.Registry(registry.Settings(data)).close()
    for directory in (data, data / "registry", data / "registry" / "bundles"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_a_bundle_opened_reads_no_yaml(setup: Setup) -> None:
    path = setup.bundle()
    bundles.replace_member(path, bundle.MANIFEST, b"name: !!int abc\n")
    with bundle.Bundle(path) as opened:  # opening parses nothing
        assert opened.manifest_bytes == b"name: !!int abc\n"
        with pytest.raises(RegistryError, match="only once it is verified"):
            _ = opened.manifest


def test_a_file_of_garbage_is_an_invalid_bundle(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bundle"
    path.write_bytes(b"\x00" * 10 + b"garbage" * 100)
    with pytest.raises(BundleRefusedError):
        bundle.Bundle(path)


async def test_a_copy_into_the_cache_that_fails_leaves_nothing_behind(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = setup.bundle()

    def copy_half(source: Path, target: Path) -> None:
        Path(target).write_bytes(Path(source).read_bytes()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("controller.registry.registry.shutil.copyfile", copy_half)
    with pytest.raises(RegistryError, match="No space left on device"):
        await setup.registry.install(str(path))
    assert [p.name for p in setup.registry.cache.rglob("*")] == []
