"""Helpers that build what the registry's tests feed it: image archives, keys, bundles, indexes.

``image_archive`` writes a real ``docker save`` archive (legacy layout:
``manifest.json``, the config blob, one uncompressed layer) without an
engine, which Docker and Podman load as they load any saved image.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import yaml

from controller.registry import bundle, signing


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    archive.addfile(info, io.BytesIO(data))


def image_archive(
    path: Path,
    tag: str,
    content: bytes = b"hello\n",
    *,
    also: tuple[str, ...] = (),
    extra: dict[str, bytes] | None = None,
) -> str:
    """A one-layer image holding ``/hello`` with ``content``, saved as tagged ``tag`` (and the
    tags ``also``, and with the ``extra`` members); its id."""
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        _add(layer, "hello", content)
    layer_bytes = layer_buffer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "tests/bundles.py"}],
        },
        sort_keys=True,
    ).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    layer_dir = hashlib.sha256(b"layer" + layer_bytes).hexdigest()
    repository, _, version = tag.rpartition(":")
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, f"{config_hex}.json", config)
        _add(archive, f"{layer_dir}/layer.tar", layer_bytes)
        _add(archive, f"{layer_dir}/VERSION", b"1.0")
        _add(
            archive,
            "manifest.json",
            json.dumps(
                [
                    {
                        "Config": f"{config_hex}.json",
                        "RepoTags": [tag, *also],
                        "Layers": [f"{layer_dir}/layer.tar"],
                    }
                ]
            ).encode(),
        )
        _add(archive, "repositories", json.dumps({repository: {version: layer_dir}}).encode())
        for name, data in (extra or {}).items():
            _add(archive, name, data)
    return f"sha256:{config_hex}"


def manifest_text(name: str, version: str, image: str, **fields: Any) -> str:
    document = {
        "name": name,
        "version": version,
        "description": fields.pop("description", f"The {name} test plugin."),
        "author": fields.pop("author", "Registry Tests"),
        "category": fields.pop("category", "testing"),
        "provides": fields.pop("provides", [f"test.{name}"]),
        "protocolVersion": fields.pop("protocolVersion", 1),
        "image": image,
        **fields,
    }
    return yaml.safe_dump(document, sort_keys=False)


class Keys:
    """A signing key pair in ``directory``, and a trust directory holding its public half."""

    def __init__(self, directory: Path, name: str = "author", trust: Path | None = None) -> None:
        self.private, self.public, self.key_id = signing.generate(directory, name)
        if trust is not None:
            trust.mkdir(parents=True, exist_ok=True)
            (trust / self.public.name).write_bytes(self.public.read_bytes())


def make_bundle(
    directory: Path,
    name: str,
    version: str,
    *,
    key: Path | None,
    image_content: bytes | None = None,
    image: str | None = None,
    archive: Path | None = None,
    **fields: Any,
) -> Path:
    """Pack a bundle of a fresh image (or ``archive``) into ``directory``; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    image = image or f"blackhole/registry-test-{name}:{version}"
    if archive is None:
        archive = directory / f"{name}-{version}.image.tar"
        content = image_content or f"{name} {version}\n".encode()
        image_archive(archive, image, content)
    source = directory / f"{name}-{version}.yaml"
    source.write_text(manifest_text(name, version, image, **fields))
    output = directory / f"{name}-{version}{bundle.SUFFIX}"
    bundle.pack(source, archive, output, key)
    return output


def replace_member(path: Path, member: str, data: bytes) -> None:
    """Rewrite one member of a bundle file, keeping the others as they are."""
    with tarfile.open(path) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    members[member] = data
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in members.items():
            _add(archive, name, content)


def read_member(path: Path, member: str) -> bytes:
    with tarfile.open(path) as archive:
        handle = archive.extractfile(member)
        assert handle is not None
        return handle.read()


def index_entry(path: Path, url: str, **extra: Any) -> dict[str, Any]:
    """The marketplace index entry of the bundle at ``path``, served at ``url``."""
    with bundle.Bundle(path) as opened:
        found = opened.parse_manifest()
    return {
        "name": found.name,
        "version": str(found.version),
        "url": url,
        "sha256": bundle.sha256_file(path),
        "size": path.stat().st_size,
        "description": found.description,
        "author": found.author,
        "category": found.category,
        "provides": found.provides,
        "requires": [{"name": d.name, "version": str(d.version)} for d in found.requires],
        **extra,
    }


def index(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"apiVersion": "blackhole.dev/v1alpha1", "kind": "PluginIndex", "plugins": entries}
    ).encode()
