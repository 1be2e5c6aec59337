"""Image load and save, for the plugin registry: bundles carry their images as ``docker save``
archives. The functions here block: the backend runs them on its engine threads.
"""

from __future__ import annotations

from pathlib import Path

import docker

from controller.errors import RuntimeBackendError


def load(client: docker.DockerClient, archive: Path, name: str) -> str:
    """Load a ``docker save`` archive; the id (``sha256:<hex>``) of the image it held."""
    with archive.open("rb") as handle:
        messages = list(client.api.load_image(handle))  # type: ignore[no-untyped-call]
    loaded = []
    for message in messages:
        if "error" in message:
            raise RuntimeBackendError(f"{name} could not load {archive}: {message}")
        text = str(message.get("stream", ""))
        for prefix in ("Loaded image ID: ", "Loaded image: "):
            if text.startswith(prefix):
                loaded.append(text.removeprefix(prefix).strip())
    if not loaded:
        raise RuntimeBackendError(f"{name} loaded no image from {archive}: {messages}")
    attrs = client.api.inspect_image(loaded[0])  # type: ignore[no-untyped-call]
    return str(attrs["Id"])


def save(client: docker.DockerClient, reference: str, archive: Path) -> None:
    """Write ``reference`` as a ``docker save`` archive, tagged."""
    with archive.open("wb") as out:
        for chunk in client.api.get_image(reference):
            out.write(chunk)
