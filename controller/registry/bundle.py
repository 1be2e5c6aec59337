"""The bundle format: a manifest, its detached signature and the image, in one tar file.

A bundle (``NAME-VERSION.bundle``) is an uncompressed POSIX tar of exactly
these regular files: ``plugin.yaml`` (the manifest), ``plugin.yaml.sig``
(the Ed25519 signature over it; absent in an unsigned bundle) and
``image.tar`` (the image as ``docker save`` writes it). A directory holding
the same three files is an unpacked bundle and is read the same way.

The image digest is the engine's image id: ``sha256:`` and the sha256 of
the image's config blob, the file the archive's ``manifest.json`` names as
``Config``. The config lists the sha256 of every uncompressed layer
(``rootfs.diff_ids``), and those are checked against the archive's layers
too, so the digest pins every byte an engine loads. Nothing is extracted to
be checked: members are read in place.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from controller.errors import BundleRefusedError, RegistryError
from controller.registry import manifest as manifest_module
from controller.registry import signing

MANIFEST = "plugin.yaml"
SIGNATURE = "plugin.yaml.sig"
IMAGE = "image.tar"
SUFFIX = ".bundle"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageArchive:
    """What a ``docker save`` archive holds, checked."""

    digest: str
    """``sha256:<hex>`` of the config blob: the image id an engine gives it."""
    tags: tuple[str, ...]


def _sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    head = handle.read(2)
    stream: IO[bytes] = handle
    handle.seek(-len(head), io.SEEK_CUR)
    if head == b"\x1f\x8b":  # a compressed layer: diff ids are of the uncompressed tar
        stream = gzip.GzipFile(fileobj=handle)  # type: ignore[assignment]
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _member(archive: tarfile.TarFile, name: str, source: str) -> IO[bytes]:
    name = posixpath.normpath(name)
    for _ in range(8):  # docker writes repeated layers as symlinks to the first
        try:
            info = archive.getmember(name)
        except KeyError:
            raise BundleRefusedError(
                "InvalidBundle", f"{source}: the image archive lacks {name}"
            ) from None
        if info.issym():
            name = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
            continue
        handle = archive.extractfile(info) if info.isfile() else None
        if handle is None:
            break
        return handle
    raise BundleRefusedError("InvalidBundle", f"{source}: {name} is not a file in the image")


def inspect_image(handle: IO[bytes], source: str) -> ImageArchive:
    """Check a ``docker save`` archive and compute its digest; raises BundleRefusedError."""
    try:
        archive = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 (closed just below)
    except tarfile.TarError as e:
        raise BundleRefusedError("InvalidBundle", f"{source}: not a tar archive: {e}") from None
    with archive:
        try:
            entries = json.load(_member(archive, "manifest.json", source))
            (entry,) = entries
            config_name, layers = str(entry["Config"]), [str(x) for x in entry["Layers"]]
            tags = tuple(str(t) for t in entry.get("RepoTags") or ())
        except (ValueError, KeyError, TypeError):
            raise BundleRefusedError(
                "InvalidBundle",
                f"{source}: manifest.json must list exactly one image with Config and Layers "
                "(the format of docker save IMAGE)",
            ) from None
        config_bytes = _member(archive, config_name, source).read()
        digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        try:
            diff_ids = [str(d) for d in json.loads(config_bytes)["rootfs"]["diff_ids"]]
        except (ValueError, KeyError, TypeError):
            raise BundleRefusedError(
                "InvalidBundle", f"{source}: the image config has no rootfs.diff_ids"
            ) from None
        if len(diff_ids) != len(layers):
            raise BundleRefusedError(
                "ImageDigestMismatch",
                f"{source}: the image has {len(layers)} layers, its config lists {len(diff_ids)}",
            )
        for index, (layer, expected) in enumerate(zip(layers, diff_ids, strict=True)):
            found = "sha256:" + _sha256(_member(archive, layer, source))
            if found != expected:
                raise BundleRefusedError(
                    "ImageDigestMismatch",
                    f"{source}: layer {index} ({layer}) is {found}, but the image config "
                    f"(digest {digest}) says {expected}",
                )
    return ImageArchive(digest, tags)


class Bundle:
    """An opened bundle, file or directory; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = str(path)
        self._archive: tarfile.TarFile | None = None
        self._stack = contextlib.ExitStack()
        files: dict[str, bytes | None] = {}
        if path.is_dir():
            for name in (MANIFEST, SIGNATURE):
                member = path / name
                files[name] = member.read_bytes() if member.is_file() else None
            if not (path / IMAGE).is_file():
                raise BundleRefusedError("InvalidBundle", f"{path}: no {IMAGE} in the directory")
        else:
            try:
                archive = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by close())
            except (OSError, tarfile.TarError) as e:
                raise BundleRefusedError(
                    "InvalidBundle", f"{path}: not a bundle (an uncompressed tar): {e}"
                ) from None
            self._archive = self._stack.enter_context(archive)
            names = set()
            for info in archive.getmembers():
                if info.name not in (MANIFEST, SIGNATURE, IMAGE) or not info.isfile():
                    self.close()
                    raise BundleRefusedError(
                        "InvalidBundle",
                        f"{path}: unexpected member {info.name!r}; a bundle holds only the "
                        f"regular files {MANIFEST}, {SIGNATURE} and {IMAGE}",
                    )
                names.add(info.name)
            if MANIFEST not in names or IMAGE not in names:
                self.close()
                raise BundleRefusedError(
                    "InvalidBundle", f"{path}: a bundle needs {MANIFEST} and {IMAGE}"
                )
            for name in (MANIFEST, SIGNATURE):
                handle = archive.extractfile(name) if name in names else None
                files[name] = handle.read() if handle is not None else None
        manifest_bytes = files[MANIFEST]
        if manifest_bytes is None:
            self.close()
            raise BundleRefusedError("InvalidBundle", f"{path}: no {MANIFEST}")
        self.manifest_bytes: bytes = manifest_bytes
        self.signature: bytes | None = files[SIGNATURE]
        try:
            self.manifest = manifest_module.parse(manifest_bytes, f"{path}: {MANIFEST}")
        except BundleRefusedError:
            self.close()
            raise

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def image(self) -> Iterator[IO[bytes]]:
        """The image archive, read in place."""
        if self._archive is None:
            with (self.path / IMAGE).open("rb") as handle:
                yield handle
            return
        member = self._archive.extractfile(IMAGE)
        assert member is not None
        yield member

    def check_image(self) -> ImageArchive:
        """The image's digest, checked against the manifest's; raises BundleRefusedError."""
        wanted = self.manifest.image_digest
        if wanted is None:
            raise BundleRefusedError(
                "InvalidBundle",
                f"{self.source}: {MANIFEST} has no imageDigest; build bundles with "
                "bhctl plugin pack",
            )
        with self.image() as handle:
            found = inspect_image(handle, f"{self.source}: {IMAGE}")
        if found.digest != wanted:
            raise BundleRefusedError(
                "ImageDigestMismatch",
                f"{self.source}: the image's digest is {found.digest}, but {MANIFEST} "
                f"says {wanted}: the image is not the one that was signed",
            )
        if self.manifest.image not in found.tags:
            raise BundleRefusedError(
                "InvalidBundle",
                f"{self.source}: the image archive is tagged {', '.join(found.tags) or 'nothing'},"
                f" not {self.manifest.image} as {MANIFEST} says",
            )
        return found

    def extract_image(self, destination: Path) -> None:
        """Copy the image archive to ``destination`` (for an engine to load)."""
        with self.image() as handle, destination.open("wb") as out:
            while chunk := handle.read(_CHUNK):
                out.write(chunk)


def write(
    output: Path, manifest_bytes: bytes, signature: bytes | None, image_archive: Path
) -> None:
    """Write a bundle file: manifest, signature (if any), image archive, in that order."""
    staged = output.with_name(output.name + ".part")
    try:
        with tarfile.open(staged, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name, data in ((MANIFEST, manifest_bytes), (SIGNATURE, signature)):
                if data is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
            info = archive.gettarinfo(str(image_archive), arcname=IMAGE)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with image_archive.open("rb") as handle:
                archive.addfile(info, handle)
        staged.replace(output)
    finally:
        staged.unlink(missing_ok=True)


def pack(
    manifest_path: Path, image_archive: Path, output: Path, key: Path | None = None
) -> manifest_module.Manifest:
    """Write a bundle of ``manifest_path`` and a ``docker save`` archive, pinning its digest.

    The manifest gets the image's digest as ``imageDigest``; with ``key`` it is
    signed too.
    """
    try:
        text = manifest_path.read_bytes()
    except OSError as e:
        raise RegistryError(f"{manifest_path}: {e.strerror}") from None
    found = manifest_module.parse(text, str(manifest_path))
    with image_archive.open("rb") as handle:
        image = inspect_image(handle, str(image_archive))
    if found.image not in image.tags:
        raise RegistryError(
            f"{image_archive} holds {', '.join(image.tags) or 'an untagged image'}, not "
            f"{found.image} as {manifest_path} names; docker save {found.image}"
        )
    pinned = found.model_copy(update={"image_digest": image.digest})
    manifest_bytes = manifest_module.render(pinned)
    signature = signing.sign(manifest_bytes, signing.load_private(key)) if key else None
    write(output, manifest_bytes, signature, image_archive)
    return pinned


def sign_in_place(path: Path, key: Path) -> str:
    """Sign a bundle (file or directory) with ``key``, replacing any signature; the key id."""
    private = signing.load_private(key)
    with Bundle(path) as opened:
        signature = signing.sign(opened.manifest_bytes, private)
        if path.is_dir():
            (path / SIGNATURE).write_bytes(signature)
        else:
            staged = path.with_name(path.name + ".image")
            try:
                opened.extract_image(staged)
                write(path, opened.manifest_bytes, signature, staged)
            finally:
                staged.unlink(missing_ok=True)
    return signing.key_id(private.public_key())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
