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
be checked: members are read in place, each bounded before it is read (no
sparse member, none whose size runs past the end of its file, limits on the
manifest, the signature and the image's JSON). The archive's tags must be
exactly the manifest's image, and what an engine loads is an archive
rebuilt from the checked members only (:func:`inspect_image`).
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
from typing import IO, cast

from controller.errors import BundleRefusedError, RegistryError
from controller.registry import manifest as manifest_module
from controller.registry import signing

MANIFEST = "plugin.yaml"
SIGNATURE = "plugin.yaml.sig"
IMAGE = "image.tar"
SUFFIX = ".bundle"
_CHUNK = 1 << 20

MAX_SIGNATURE_BYTES = 64 << 10
"""Largest ``plugin.yaml.sig`` accepted."""
MAX_IMAGE_JSON_BYTES = 8 << 20
"""Largest ``manifest.json`` or image config inside ``image.tar``."""
MAX_IMAGE_MEMBERS = 10_000
"""Most members ``image.tar`` may have (docker save writes about three per layer)."""
_MAX_HEADER_READ = 8 << 20
"""Largest single read tarfile may make: a header (pax, long name) claiming more is refused
before anything is allocated for it."""


@dataclass(frozen=True)
class ImageArchive:
    """What a ``docker save`` archive holds, checked."""

    digest: str
    """``sha256:<hex>`` of the config blob: the image id an engine gives it."""
    tags: tuple[str, ...]


class _Guarded:
    """A file object whose every read is bounded, handed to tarfile.

    tarfile reads a pax or long-name header's data in one read of the size
    the header claims; refused here, before it allocates that size.
    """

    def __init__(self, handle: IO[bytes], source: str) -> None:
        self.handle, self.source = handle, source

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_HEADER_READ:
            raise BundleRefusedError(
                "InvalidBundle", f"{self.source}: a tar header claims {size} bytes of data"
            )
        return self.handle.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def seekable(self) -> bool:
        return True


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, OverflowError, UnicodeError)
"""What tarfile raises on a damaged archive."""


def _members(
    handle: IO[bytes], size: int, source: str, limit: int
) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """Open the tar in ``handle`` (``size`` bytes long) and index its members, each checked.

    Refused: more than ``limit`` members, a name twice, a sparse member, or one
    whose data is not all in the file (its declared size past the end).
    """
    try:
        guarded = cast("IO[bytes]", _Guarded(handle, source))
        archive = tarfile.open(fileobj=guarded, mode="r:")  # noqa: SIM115 (closed by the caller)
    except _TAR_ERRORS as e:
        raise BundleRefusedError("InvalidBundle", f"{source}: not a tar archive: {e}") from None
    found: dict[str, tarfile.TarInfo] = {}
    try:
        while (info := archive.next()) is not None:
            name = posixpath.normpath(info.name)
            if len(found) >= limit:
                raise BundleRefusedError("InvalidBundle", f"{source}: more than {limit} members")
            if name in found:
                raise BundleRefusedError("InvalidBundle", f"{source}: {name} appears twice")
            if info.issparse() or info.offset_data + info.size > size:
                raise BundleRefusedError(
                    "InvalidBundle",
                    f"{source}: member {name} claims {info.size} bytes that are not in the "
                    f"archive ({size} bytes){' (a sparse file)' if info.issparse() else ''}",
                )
            found[name] = info
    except BaseException:
        archive.close()
        raise
    return archive, found


def _read(archive: tarfile.TarFile, info: tarfile.TarInfo, limit: int, source: str) -> bytes:
    """A member's bytes, refused past ``limit`` before reading any."""
    if info.size > limit:
        raise BundleRefusedError(
            "InvalidBundle",
            f"{source}: {info.name} is {info.size} bytes, over the limit of {limit} bytes",
        )
    handle = archive.extractfile(info)
    if handle is None:
        raise BundleRefusedError("InvalidBundle", f"{source}: {info.name} is not a file")
    return handle.read(info.size)


def _hash(handle: IO[bytes]) -> str:
    """The sha256 (hex) of a layer, uncompressed."""
    digest = hashlib.sha256()
    head = handle.read(2)
    handle.seek(-len(head), io.SEEK_CUR)
    stream: IO[bytes] = handle
    if head == b"\x1f\x8b":  # a compressed layer: diff ids are of the uncompressed tar
        stream = gzip.GzipFile(fileobj=handle)  # type: ignore[assignment]
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _layer(
    archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, source: str
) -> tarfile.TarInfo:
    name = posixpath.normpath(name)
    for _ in range(8):  # docker writes repeated layers as symlinks to the first
        info = members.get(name)
        if info is None:
            raise BundleRefusedError("InvalidBundle", f"{source}: the image archive lacks {name}")
        if info.issym():
            name = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
            continue
        if info.isfile():
            return info
        break
    raise BundleRefusedError("InvalidBundle", f"{source}: {name} is not a file in the image")


def _size(handle: IO[bytes]) -> int:
    position = handle.tell()
    end = handle.seek(0, io.SEEK_END)
    handle.seek(position)
    return end


def inspect_image(handle: IO[bytes], source: str, out: Path | None = None) -> ImageArchive:
    """Check a ``docker save`` archive and compute its digest; raises BundleRefusedError.

    With ``out``, a new archive is written there as it is checked, holding
    only what was checked: ``manifest.json`` (naming the config, the layers
    and the archive's tags), the config and the layers. An engine loading it
    sees no member that was not checked (no ``repositories``, no OCI index).
    """
    archive, members = _members(handle, _size(handle), source, MAX_IMAGE_MEMBERS)
    with archive:
        info = members.get("manifest.json")
        if info is None or not info.isfile():
            raise BundleRefusedError(
                "InvalidBundle", f"{source}: the image archive lacks manifest.json"
            )
        try:
            entries = json.loads(_read(archive, info, MAX_IMAGE_JSON_BYTES, source))
            (entry,) = entries
            config_name, layers = str(entry["Config"]), [str(x) for x in entry["Layers"]]
            tags = tuple(str(t) for t in entry.get("RepoTags") or ())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise BundleRefusedError(
                "InvalidBundle",
                f"{source}: manifest.json must list exactly one image with Config and Layers "
                "(the format of docker save IMAGE)",
            ) from None
        config_bytes = _read(
            archive, _layer(archive, members, config_name, source), MAX_IMAGE_JSON_BYTES, source
        )
        digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        try:
            diff_ids = [str(d) for d in json.loads(config_bytes)["rootfs"]["diff_ids"]]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise BundleRefusedError(
                "InvalidBundle", f"{source}: the image config has no rootfs.diff_ids"
            ) from None
        if len(diff_ids) != len(layers):
            raise BundleRefusedError(
                "ImageDigestMismatch",
                f"{source}: the image has {len(layers)} layers, its config lists {len(diff_ids)}",
            )
        checked: list[str] = []
        with contextlib.ExitStack() as stack:
            rebuilt = (
                stack.enter_context(tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT))
                if out is not None
                else None
            )
            written: set[str] = set()
            for index, (layer, expected) in enumerate(zip(layers, diff_ids, strict=True)):
                info = _layer(archive, members, layer, source)
                handle_ = archive.extractfile(info)
                assert handle_ is not None
                name = f"{expected.removeprefix('sha256:')[:64]}/layer.tar"
                if rebuilt is None or name in written:
                    found = "sha256:" + _hash(handle_)
                else:
                    found = _copy_layer(rebuilt, name, handle_, info.size)
                    written.add(name)
                if found != expected:
                    raise BundleRefusedError(
                        "ImageDigestMismatch",
                        f"{source}: layer {index} ({layer}) is {found}, but the image config "
                        f"(digest {digest}) says {expected}",
                    )
                checked.append(name)
            if rebuilt is not None:
                config_member = digest.removeprefix("sha256:") + ".json"
                document = [
                    {
                        "Config": config_member,
                        "RepoTags": list(tags),
                        "Layers": checked,
                    }
                ]
                _add(rebuilt, config_member, config_bytes)
                _add(rebuilt, "manifest.json", json.dumps(document).encode())
    return ImageArchive(digest, tags)


def _copy_layer(rebuilt: tarfile.TarFile, name: str, handle: IO[bytes], size: int) -> str:
    """Copy a layer into ``rebuilt``, then hash it; its diff id."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    rebuilt.addfile(info, handle)
    handle.seek(0)
    return "sha256:" + _hash(handle)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


class Bundle:
    """An opened bundle, file or directory; use as a context manager.

    Opening reads the manifest's and the signature's bytes (bounded) and
    parses nothing: :meth:`parse_manifest` is called once the signature over
    those bytes was checked (or the policy allows an unsigned bundle), so
    that no unverified YAML is ever parsed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = str(path)
        self._archive: tarfile.TarFile | None = None
        self._image: tarfile.TarInfo | None = None
        self._manifest: manifest_module.Manifest | None = None
        self._stack = contextlib.ExitStack()
        try:
            files = self._open_directory(path) if path.is_dir() else self._open_file(path)
        except BaseException:
            self.close()
            raise
        manifest_bytes = files.get(MANIFEST)
        if manifest_bytes is None:
            self.close()
            raise BundleRefusedError("InvalidBundle", f"{path}: no {MANIFEST}")
        self.manifest_bytes: bytes = manifest_bytes
        self.signature: bytes | None = files.get(SIGNATURE)

    def _open_directory(self, path: Path) -> dict[str, bytes]:
        files = {}
        for name, limit in (
            (MANIFEST, manifest_module.MAX_BYTES),
            (SIGNATURE, MAX_SIGNATURE_BYTES),
        ):
            member = path / name
            if member.is_file():
                with member.open("rb") as handle:
                    data = handle.read(limit + 1)
                if len(data) > limit:
                    raise BundleRefusedError(
                        "InvalidBundle", f"{member}: over the limit of {limit} bytes"
                    )
                files[name] = data
        if not (path / IMAGE).is_file():
            raise BundleRefusedError("InvalidBundle", f"{path}: no {IMAGE} in the directory")
        return files

    def _open_file(self, path: Path) -> dict[str, bytes]:
        try:
            handle = self._stack.enter_context(path.open("rb"))
        except OSError as e:
            raise BundleRefusedError("InvalidBundle", f"{path}: {e.strerror}") from None
        archive, members = _members(handle, _size(handle), str(path), 3)
        self._archive = self._stack.enter_context(archive)
        for name, info in members.items():
            if name not in (MANIFEST, SIGNATURE, IMAGE) or not info.isfile():
                raise BundleRefusedError(
                    "InvalidBundle",
                    f"{path}: unexpected member {info.name!r}; a bundle holds only the "
                    f"regular files {MANIFEST}, {SIGNATURE} and {IMAGE}",
                )
        if MANIFEST not in members or IMAGE not in members:
            raise BundleRefusedError(
                "InvalidBundle", f"{path}: a bundle needs {MANIFEST} and {IMAGE}"
            )
        self._image = members[IMAGE]
        files = {MANIFEST: _read(archive, members[MANIFEST], manifest_module.MAX_BYTES, str(path))}
        if SIGNATURE in members:
            files[SIGNATURE] = _read(archive, members[SIGNATURE], MAX_SIGNATURE_BYTES, str(path))
        return files

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def parse_manifest(self) -> manifest_module.Manifest:
        """Parse the manifest; call it only after its signature was checked."""
        if self._manifest is None:
            self._manifest = manifest_module.parse(
                self.manifest_bytes, f"{self.source}: {MANIFEST}"
            )
        return self._manifest

    @property
    def manifest(self) -> manifest_module.Manifest:
        """The manifest :meth:`parse_manifest` read."""
        if self._manifest is None:
            raise RegistryError(f"{self.source}: the manifest is read only once it is verified")
        return self._manifest

    @contextlib.contextmanager
    def image(self) -> Iterator[IO[bytes]]:
        """The image archive, read in place."""
        if self._archive is None:
            with (self.path / IMAGE).open("rb") as handle:
                yield handle
            return
        assert self._image is not None
        member = self._archive.extractfile(self._image)
        assert member is not None
        yield member

    def check_image(self, out: Path | None = None) -> ImageArchive:
        """The image, checked against the manifest: its digest, and its tags, which must be
        exactly the manifest's image; raises BundleRefusedError.

        With ``out``, the archive an engine is to load is written there, holding
        only what was checked (see :func:`inspect_image`).
        """
        wanted = self.manifest.image_digest
        if wanted is None:
            raise BundleRefusedError(
                "InvalidBundle",
                f"{self.source}: {MANIFEST} has no imageDigest; build bundles with "
                "bhctl plugin pack",
            )
        with self.image() as handle:
            found = inspect_image(handle, f"{self.source}: {IMAGE}", out)
        if found.digest != wanted:
            raise BundleRefusedError(
                "ImageDigestMismatch",
                f"{self.source}: the image's digest is {found.digest}, but {MANIFEST} "
                f"says {wanted}: the image is not the one that was signed",
            )
        if found.tags != (self.manifest.image,):
            raise BundleRefusedError(
                "InvalidBundle",
                f"{self.source}: the image archive is tagged {', '.join(found.tags) or 'nothing'}"
                f"; a bundle's image must be tagged exactly {self.manifest.image}, as {MANIFEST} "
                "says, and nothing else (an engine loading it would move every tag it names)",
            )
        return found

    def extract_image(self, destination: Path) -> None:
        """Copy the image archive as it is to ``destination`` (to write a bundle again)."""
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
    if image.tags != (found.image,):
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
        opened.parse_manifest()  # the author's own: refuse to sign what is not a manifest
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
