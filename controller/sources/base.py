"""What every source of desired state gives the rest of the controller.

A source says which plugins are declared (:class:`Desired`, by key
``name`` or ``namespace/name``), keeps their status and events, and enqueues
the keys whose declaration changed. Two sources implement :class:`Source`:
a directory of spec files with specs applied by the admin API
(:mod:`~controller.sources.directory`), and Plugin objects on a Kubernetes
API server (:mod:`~controller.sources.kubernetes`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from controller.errors import SpecError
from controller.sources import store as store_module
from controller.spec import models


@dataclass(frozen=True)
class Desired:
    """A plugin as declared, its ``metadata.generation`` set, with where it was declared."""

    plugin: models.Plugin
    origin: str
    """The spec file, ``applied`` for specs applied through the admin API, or the object."""
    spec_hash: str

    @property
    def generation(self) -> int:
        return self.plugin.metadata.generation or 0


def spec_hash(plugin: models.Plugin) -> str:
    """A short, stable digest of what the user declared (spec and labels)."""
    declared = {
        "spec": plugin.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "labels": plugin.metadata.labels,
    }
    text = json.dumps(declared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Source(Protocol):
    """Declared plugins, their status and events, and the changes to follow."""

    resync_seconds: float
    errors: dict[str, SpecError]
    """Declarations that failed to load, by origin, with their problems."""

    def get(self, key: str) -> Desired | None:
        """The plugin ``key`` as declared now, or None when nothing declares it."""
        ...

    def declared_keys(self) -> list[str]: ...

    def declares(self, key: str) -> bool:
        """Whether anything declares ``key``, validly or not (an invalid declaration
        without a valid one before it has no :meth:`get`, and must not be deleted)."""
        ...

    async def apply(self, text: str | bytes, origin: str = "<apply>") -> list[Desired]:
        """Declare the specs in ``text`` (bytes: UTF-8); raises :class:`SpecError`."""
        ...

    async def delete(self, key: str) -> bool:
        """Withdraw a spec declared by :meth:`apply`; raises :class:`SpecError`."""
        ...

    async def read_status(self, key: str) -> models.PluginStatus | None: ...

    async def write_status(self, key: str, status: models.PluginStatus) -> None: ...

    async def record_event(
        self, key: str, type: store_module.EventType, reason: str, message: str
    ) -> None: ...

    async def events(self, key: str) -> list[store_module.Event]: ...

    async def forget(self, key: str) -> None:
        """The plugin's instances are gone and nothing declares it: let go of it."""
        ...

    async def known(self) -> list[str]:
        """Keys that may still have something to clean up."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Load, enqueue every key, then follow changes until ``stop`` is set."""
        ...
