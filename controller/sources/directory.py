"""Desired state from a directory of spec files, watched for changes and resynced periodically.

Each change of a file (written, renamed, removed) reloads the directory and
enqueues the keys of the plugins whose spec appeared, changed or went away;
every ``resync_seconds`` all keys are enqueued again, so that drift in the
runtime is corrected even when no file changes. The user's files are only
ever read.

An invalid file changes nothing that runs: the plugins it declared keep their
last valid spec until the file is fixed or removed, and the file's problems
are kept in :attr:`DirectorySource.errors` for status and logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from controller.errors import SpecError, SpecIssue
from controller.spec import loader, models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Desired:
    """A plugin as its spec file declares it, with the generation of its spec."""

    plugin: models.Plugin
    source: Path
    spec_hash: str


def spec_hash(plugin: models.Plugin) -> str:
    """A short, stable digest of what the user declared (spec and labels)."""
    declared = {
        "spec": plugin.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "labels": plugin.metadata.labels,
    }
    text = json.dumps(declared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DirectorySource:
    """The plugins declared by the YAML files directly in one directory."""

    def __init__(
        self,
        directory: Path,
        enqueue: Callable[[str], None],
        *,
        resync_seconds: float = 300.0,
    ) -> None:
        if not directory.is_dir():
            raise FileNotFoundError(f"spec directory {directory} does not exist")
        self.directory = directory
        self.enqueue = enqueue
        self.resync_seconds = resync_seconds
        self.errors: dict[Path, SpecError] = {}
        """Files that failed to load, with their problems."""
        self._desired: dict[str, Desired] = {}
        self._generations: dict[str, int] = {}

    def get(self, key: str) -> Desired | None:
        """The plugin ``key`` as declared now, or None when no file declares it."""
        return self._desired.get(key)

    def keys(self) -> list[str]:
        return sorted(self._desired)

    def generation(self, key: str) -> int:
        """How often ``key``'s spec changed since this source started (1 for the first)."""
        return self._generations.get(key, 0)

    def rescan(self) -> set[str]:
        """Reload every file; return the keys whose spec appeared, changed or went away."""
        by_file: dict[Path, list[Desired]] = {}
        for previous in self._desired.values():
            by_file.setdefault(previous.source, []).append(previous)
        errors: dict[Path, SpecError] = {}
        fresh: dict[str, Desired] = {}
        for path in loader.spec_files(self.directory):
            try:
                items = [
                    Desired(item.plugin, path, spec_hash(item.plugin))
                    for item in loader.load_file(path)
                ]
            except SpecError as e:
                errors[path] = e
                items = by_file.get(path, [])  # keep the last valid specs of a broken file
            for item in items:
                key = item.plugin.key
                if key in fresh:
                    errors[path] = SpecError([_duplicate(path, key, fresh[key].source)])
                    continue
                fresh[key] = item
        for path, error in errors.items():
            if self.errors.get(path) is None or str(self.errors[path]) != str(error):
                log.error("invalid spec file %s:\n%s", path, error)
        self.errors = errors
        changed = {
            key
            for key in fresh.keys() | self._desired.keys()
            if key not in fresh
            or key not in self._desired
            or fresh[key].spec_hash != self._desired[key].spec_hash
        }
        for key in changed:
            if key in fresh:
                self._generations[key] = self._generations.get(key, 0) + 1
            else:
                self._generations.pop(key, None)
        self._desired = fresh
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        """Load, enqueue every key, then follow changes and resync until ``stop`` is set."""
        self.rescan()
        for key in self.keys():
            self.enqueue(key)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(stop))
            group.create_task(self._resync(stop))

    async def _watch(self, stop: asyncio.Event) -> None:
        async for _ in watchfiles.awatch(
            self.directory, stop_event=stop, recursive=False, debounce=50, step=20
        ):
            for key in sorted(self.rescan()):
                self.enqueue(key)

    async def _resync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.resync_seconds)
            except TimeoutError:
                self.rescan()
                for key in self.keys():
                    self.enqueue(key)


def _duplicate(path: Path, key: str, first: Path) -> SpecIssue:
    return SpecIssue(
        str(path),
        None,
        "metadata.name",
        f"plugin declared twice; first in {first}; this declaration is ignored",
        value=key,
        has_value=True,
    )
