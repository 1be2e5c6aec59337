"""Desired state on one host: a watched directory of spec files, plus specs applied by API.

Each change of a file (written, renamed, removed) reloads the directory and
enqueues the keys of the plugins whose spec appeared, changed or went away;
every ``resync_seconds`` all keys are enqueued again, so that drift in the
runtime is corrected even when no file changes. The user's files are only
ever read. Specs applied with ``bhctl apply`` are kept in the controller's
:class:`~controller.sources.store.Store`, and so are generations, status and
events: a restarted controller carries on where it stopped.

An invalid file changes nothing that runs: the plugins it declared keep their
last valid spec until the file is fixed or removed, and the file's problems
are kept in :attr:`DirectorySource.errors` for status and logs.

A store that fails (a full or read-only disk, an I/O error) changes nothing
that runs either: a spec whose new generation cannot be recorded keeps its
last spec (a new one waits, declared but not acted on), status and events
that cannot be written are kept in memory and written once the store works
again, and the directory is read again with backoff until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

from controller import inotify
from controller.errors import SpecError, SpecIssue, StoreUnavailableError
from controller.sources import store as store_module
from controller.sources.base import Desired, spec_hash
from controller.spec import loader, models

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

DEBOUNCE = 0.05
"""Seconds a burst of changes in the spec directory must be quiet before it is read again."""
DEBOUNCE_CEILING = 0.5
"""Longest a burst that goes on delays the reading, in seconds."""
GONE_RETRY = 1.0
"""How often a spec directory that is not there is looked for, in seconds."""
WATCH_MASK = (
    inotify.IN_CREATE | inotify.IN_CLOSE_WRITE | inotify.IN_MODIFY | inotify.IN_ATTRIB
    | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM | inotify.IN_DELETE
    | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
)  # fmt: skip

APPLIED = "applied"
"""The origin of specs applied through the admin API rather than read from a file."""


class DirectorySource:
    """The plugins declared by the YAML files directly in one directory and by ``apply``."""

    def __init__(
        self,
        directory: Path | None,
        store: store_module.Store,
        enqueue: Callable[[str], None],
        *,
        resync_seconds: float = 300.0,
    ) -> None:
        if directory is not None and not directory.is_dir():
            raise FileNotFoundError(f"spec directory {directory} does not exist")
        self.directory = directory
        self.store = store
        self.enqueue = enqueue
        self.resync_seconds = resync_seconds
        self.errors: dict[str, SpecError] = {}
        """Files (and applied specs) that failed to load, with their problems."""
        self._desired: dict[str, Desired] = {}
        self._lock = threading.Lock()
        self._waiting: set[str] = set()
        """Keys declared by a spec that cannot be taken in until the store records it."""
        self._incomplete = False
        """Whether the last rescan could not read or record everything."""
        self._unwritten: dict[str, models.PluginStatus] = {}
        """Status not yet written to the store (it failed), newest first in what is read."""
        self._known_status: dict[str, models.PluginStatus] = {}
        """The last status read or written per key, answered while the store cannot be read."""
        self._unrecorded: dict[str, list[tuple[store_module.Event, datetime]]] = {}
        """Events not yet in the store, with when they happened."""
        self._store_failed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, key: str) -> Desired | None:
        """The plugin ``key`` as declared now, or None when nothing declares it."""
        return self._desired.get(key)

    def declared_keys(self) -> list[str]:
        return sorted(self._desired)

    def declares(self, key: str) -> bool:
        return key in self._desired or key in self._waiting

    def generation(self, key: str) -> int:
        """The generation of ``key``'s spec: 1 when first seen, bumped on every change."""
        desired = self._desired.get(key)
        return desired.generation if desired else 0

    def rescan(self) -> set[str]:
        """Reload every spec; return the keys whose spec appeared, changed or went away."""
        with self._lock:
            return self._rescan()

    def _rescan(self) -> set[str]:
        by_origin: dict[str, list[Desired]] = {}
        for previous in self._desired.values():
            by_origin.setdefault(previous.origin, []).append(previous)
        errors: dict[str, SpecError] = {}
        fresh: dict[str, Desired] = {}
        try:
            files = loader.spec_files(self.directory) if self.directory else []
        except OSError as e:  # the directory is gone or unreadable: keep what its files said
            assert self.directory is not None
            origin = str(self.directory)
            errors[origin] = SpecError([SpecIssue(origin, None, "", f"cannot list: {e}")])
            files = []
            for kind, items in by_origin.items():
                if kind != APPLIED:
                    fresh.update((item.plugin.key, item) for item in items)
        documents: list[tuple[str, Callable[[], list[loader.LoadedPlugin]]]] = [
            (str(path), functools.partial(loader.load_file, path)) for path in files
        ]
        waiting: set[str] = set()
        incomplete = False
        try:
            applied = self.store.applied()
        except StoreUnavailableError:  # keep the applied specs as they were
            applied, incomplete = {}, True
            fresh.update((item.plugin.key, item) for item in by_origin.get(APPLIED, []))
        for key, text in applied.items():
            text = _unescaped(text)
            documents.append((f"{APPLIED}:{key}", functools.partial(loader.load_text, text, key)))
        for origin, load in documents:
            kind = APPLIED if origin.startswith(f"{APPLIED}:") else origin
            try:
                items = [Desired(item.plugin, kind, spec_hash(item.plugin)) for item in load()]
            except SpecError as e:
                errors[origin] = e
                items = by_origin.get(kind, []) if kind != APPLIED else []
            for item in items:
                key = item.plugin.key
                if key in fresh:
                    errors[origin] = SpecError([_duplicate(origin, key, fresh[key].origin)])
                    continue
                try:
                    generation = self.store.generation(key, item.spec_hash)
                except StoreUnavailableError:
                    # Not taken in before it is recorded: the last spec goes on meanwhile.
                    incomplete = True
                    waiting.add(key)
                    if key in self._desired:
                        fresh[key] = self._desired[key]
                    continue
                metadata = item.plugin.metadata.model_copy(update={"generation": generation})
                fresh[key] = Desired(
                    item.plugin.model_copy(update={"metadata": metadata}), kind, item.spec_hash
                )
        for origin, error in errors.items():
            if origin not in self.errors or str(self.errors[origin]) != str(error):
                log.error("invalid spec %s:\n%s", origin, error)
        self.errors = errors
        changed = {
            key
            for key in fresh.keys() | self._desired.keys()
            if key not in fresh
            or key not in self._desired
            or fresh[key].spec_hash != self._desired[key].spec_hash
        }
        self._desired = fresh
        self._waiting = waiting - fresh.keys()
        self._incomplete = incomplete
        if incomplete:
            self._failed()
        return changed

    def _failed(self) -> None:
        """Have :meth:`run` try the store again (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._store_failed.set)

    async def _locked(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def call() -> T:
            with self._lock:
                return fn(*args, **kwargs)

        return await asyncio.to_thread(call)

    # The admin API's writes.

    async def apply(self, text: str | bytes, origin: str = "<apply>") -> list[Desired]:
        """Validate specs and store them, replacing earlier applies of the same names.

        Raises :class:`SpecError` for an invalid spec or for a name a spec file
        declares (files are the user's; edit the file instead), storing nothing.
        """
        loaded = await asyncio.to_thread(loader.load_text, text, origin)  # up to 1 MiB of YAML
        issues = []
        for item in loaded:
            existing = self._desired.get(item.plugin.key)
            if existing is not None and existing.origin != APPLIED:
                issues.append(
                    SpecIssue(
                        origin,
                        None,
                        "metadata.name",
                        f"is declared by the spec file {existing.origin}; edit that file",
                        value=item.plugin.key,
                        has_value=True,
                    )
                )
        if issues:
            raise SpecError(issues)
        for item in loaded:
            # Characters as they are: libyaml, which reads it back, refuses the surrogate
            # pairs JSON escapes characters beyond U+FFFF as.
            document = json.dumps(item.plugin.to_document(), ensure_ascii=False)
            await self._locked(self.store.put_applied, item.plugin.key, document)
        for key in sorted(await asyncio.to_thread(self.rescan)):
            self.enqueue(key)
        return [d for item in loaded if (d := self._desired.get(item.plugin.key)) is not None]

    async def delete(self, key: str) -> bool:
        """Delete an applied spec; raises :class:`SpecError` for one declared by a file."""
        existing = self._desired.get(key)
        if existing is not None and existing.origin != APPLIED:
            raise SpecError(
                [
                    SpecIssue(
                        existing.origin,
                        None,
                        "metadata.name",
                        f"is declared by the spec file {existing.origin}; remove it from that file",
                        value=key,
                        has_value=True,
                    )
                ]
            )
        deleted = await self._locked(self.store.delete_applied, key)
        for changed in sorted(await asyncio.to_thread(self.rescan)):
            self.enqueue(changed)
        return deleted

    # Status and events, written by the reconciler.

    async def read_status(self, key: str) -> models.PluginStatus | None:
        """The status last written; while the store cannot be read, the last one known."""
        if key in self._unwritten:
            return self._unwritten[key]
        try:
            status = await self._locked(self.store.status, key)
        except StoreUnavailableError:
            self._failed()
            return self._known_status.get(key)
        if status is not None:
            self._known_status[key] = status
        return status

    async def write_status(self, key: str, status: models.PluginStatus) -> None:
        """Write the status; raises :class:`StoreUnavailableError` when it could not be, and
        keeps it to read back and to write once the store works again."""
        self._known_status[key] = status
        try:
            await self._locked(self.store.put_status, key, status)
        except StoreUnavailableError:
            self._unwritten[key] = status
            self._failed()
            raise
        self._unwritten.pop(key, None)

    async def record_event(
        self, key: str, type: store_module.EventType, reason: str, message: str
    ) -> None:
        """Record an event; one the store cannot take now is kept and recorded later."""
        if key not in self._unrecorded:
            try:
                await self._locked(self.store.record, key, type, reason, message)
                return
            except StoreUnavailableError:
                self._failed()
        now = datetime.now(UTC)
        kept = self._unrecorded.setdefault(key, [])
        kept.append((store_module.Event(type, reason, message, now, now), now))
        del kept[: -store_module.EVENTS_KEPT]

    async def events(self, key: str) -> list[store_module.Event]:
        try:
            recorded = await self._locked(self.store.events, key)
        except StoreUnavailableError:
            self._failed()
            recorded = []
        return recorded + [event for event, _ in self._unrecorded.get(key, [])]

    def _flush(self) -> None:
        """Write what the store could not take before: status, then events (raises if it
        still cannot)."""
        for key, status in list(self._unwritten.items()):
            self.store.put_status(key, status)
            if self._unwritten.get(key) is status:
                del self._unwritten[key]
        for key, kept in list(self._unrecorded.items()):
            while kept:
                event, when = kept[0]
                self.store.record(key, event.type, event.reason, event.message, when)
                kept.pop(0)
            self._unrecorded.pop(key, None)

    @property
    def degraded(self) -> bool:
        """Whether something waits for the store: a spec, a status or an event."""
        return self._incomplete or bool(self._waiting or self._unwritten or self._unrecorded)

    async def forget(self, key: str) -> None:
        """The plugin is gone from the runtime too: drop its status and events.

        Checked under the lock that applies take, against the applied specs
        too: a spec applied again while the instances were being removed keeps
        its status, even before the rescan that declares it.
        """

        def forget_undeclared() -> None:
            if not self.declares(key) and key not in self.store.applied():
                self.store.forget(key)
                self._known_status.pop(key, None)
                self._unwritten.pop(key, None)
                self._unrecorded.pop(key, None)

        await self._locked(forget_undeclared)

    async def known(self) -> list[str]:
        """Keys with recorded status: plugins that may still have instances to clean up."""
        return await self._locked(self.store.known)

    # Following changes.

    async def run(self, stop: asyncio.Event) -> None:
        """Load, enqueue every key, then follow changes and resync until ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        # Watched before the first reading, so that no change in between is missed.
        watching = _Watch(self.directory) if self.directory is not None else None
        await asyncio.to_thread(self.rescan)
        for key in self.declared_keys():
            self.enqueue(key)
        async with asyncio.TaskGroup() as group:
            if watching is not None:
                group.create_task(self._watch(watching, stop))
            group.create_task(self._resync(stop))
            group.create_task(self._retry(stop))

    async def _retry(self, stop: asyncio.Event) -> None:
        """While the store fails: write what waits and read the specs again, with backoff."""
        while not stop.is_set():
            waiter = asyncio.create_task(self._store_failed.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopping.cancel()
            while self.degraded and not stop.is_set():
                self._store_failed.clear()
                with contextlib.suppress(TimeoutError):
                    delay = self.store.health.retry_delay(store_module.STORE)
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                try:
                    await self._locked(self._flush)
                except StoreUnavailableError:
                    continue
                for key in sorted(await asyncio.to_thread(self.rescan)):
                    self.enqueue(key)
                if not self.degraded:
                    log.info("the store works again: every spec is taken in")
                    for key in self.declared_keys():
                        self.enqueue(key)
            self._store_failed.clear()

    async def _watch(self, watching: _Watch, stop: asyncio.Event) -> None:
        """Read the specs again after each change in the directory: once a burst of events has
        been quiet for :data:`DEBOUNCE` seconds (an editor's save is several), at most
        :data:`DEBOUNCE_CEILING` after its first. inotify is read by the event loop, so an
        idle watch wakes nothing; a directory removed or replaced is watched again once it is
        back (looked for every :data:`GONE_RETRY` seconds)."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def readable() -> None:
            if watching.read():
                changed.set()

        loop.add_reader(watching.notify.fd, readable)
        try:
            while not stop.is_set():
                if watching.watch is None and watching.add():
                    changed.set()  # it may have changed while it was not watched
                timeout = None if watching.watch is not None else GONE_RETRY
                await _either(changed, stop, timeout)
                if stop.is_set() or not changed.is_set():
                    continue
                await _quiet(changed, stop)
                for key in sorted(await asyncio.to_thread(self.rescan)):
                    self.enqueue(key)
        finally:
            loop.remove_reader(watching.notify.fd)
            watching.notify.close()

    async def _resync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.resync_seconds)
            except TimeoutError:
                await asyncio.to_thread(self.rescan)
                for key in self.declared_keys():
                    self.enqueue(key)


class _Watch:
    """The inotify watch of the spec directory (None while the directory is not there)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.notify = inotify.Inotify()
        self.watch: int | None = None
        self.add()

    def add(self) -> bool:
        """Watch the directory; whether it is watched now."""
        try:
            self.watch = self.notify.add(self.directory, WATCH_MASK)
        except OSError:  # not there (yet): looked for again
            self.watch = None
        return self.watch is not None

    def read(self) -> bool:
        """Take the events that arrived; whether there were any."""
        events = self.notify.read()
        gone = inotify.IN_IGNORED | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
        if any(wd == self.watch and mask & gone for wd, mask, _ in events):
            self.watch = None
        return bool(events)


async def _either(event: asyncio.Event, stop: asyncio.Event, timeout: float | None) -> None:
    """Wait until ``event`` or ``stop`` is set, or ``timeout`` seconds pass."""
    waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _quiet(changed: asyncio.Event, stop: asyncio.Event) -> None:
    """Wait until no change came for DEBOUNCE seconds (at most DEBOUNCE_CEILING in all)."""
    deadline = time.monotonic() + DEBOUNCE_CEILING
    while not stop.is_set():
        changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await _either(changed, stop, min(DEBOUNCE, left))
        if not changed.is_set():
            return


def _unescaped(text: str) -> str:
    """A stored applied spec (JSON) with its characters as they are: rows written before they
    were stored so hold JSON's surrogate-pair escapes, which libyaml refuses."""
    if "\\u" not in text:
        return text
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text  # not JSON: the loader says what is wrong with it


def _duplicate(origin: str, key: str, first: str) -> SpecIssue:
    return SpecIssue(
        origin,
        None,
        "metadata.name",
        f"plugin declared twice; first in {first}; this declaration is ignored",
        value=key,
        has_value=True,
    )
