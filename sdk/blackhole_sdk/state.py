"""``Store``: a dict-like state container that tracks its changes, and ``StatefulPlugin`` on it.

A plugin that keeps its state in a :class:`Store` gets everything a swap
and a checkpoint need for free: a whole-state export that does not stop the
plugin serving, and *deltas*, the changes since an earlier revision, so that
a blue/green swap holds calls only while the last few changes move (the
controller copies the bulk beforehand, while the old color still serves).

Keys are strings; values are anything JSON can encode. Values are kept
encoded, so reading one gives a fresh copy: change a value by assigning it
again (``store[key] = value``), never by mutating what a read returned.

Every change advances the store's *revision*, ``"<epoch>:<counter>"``. A
revision names exactly one state: importing a whole state adopts the
exporter's revision, so a delta made on top of it applies here and nowhere
else, and the first local change after an import starts a new epoch (the
two copies have diverged).

The bytes, at the plugin's ``state_version``:

- whole state: ``{"entries": {key: value, ...}}`` (JSON);
- delta: ``{"set": {key: value, ...}, "deleted": [key, ...]}`` (JSON).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

import grpc

from blackhole_sdk.plugin import Plugin, PluginError

DELTA_FEATURE = "state.delta"
"""What a plugin says in its handshake when it exports and imports deltas."""
TOMBSTONES = 100_000
"""Deleted keys remembered for deltas; past this, the oldest are forgotten (and deltas from
before them become whole-state copies)."""
EXPORT_SLICE_BYTES = 256 << 10
"""Bytes of entries serialised between two yields to the event loop during an export."""


class RevisionError(PluginError):
    """A delta does not apply: the state is not at the delta's base revision."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.FAILED_PRECONDITION)


def _encode(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise PluginError(f"a state value must be JSON: {e}", grpc.StatusCode.INTERNAL) from e


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"state keys are strings, not {type(key).__name__}")
    return key


def _entries(items: list[tuple[str, bytes]]) -> bytes:
    return b",".join(_encode(k) + b":" + v for k, v in items)


def whole(entries: Mapping[str, Any]) -> bytes:
    """The whole-state bytes of these entries, exactly as a :class:`Store` holding them exports
    them: what a ``@migration`` of a ``StatefulPlugin`` should return, so that the state
    a plugin says it imported (its sha256) is the one it exports."""
    return b'{"entries":{' + _entries([(_key(k), _encode(v)) for k, v in entries.items()]) + b"}}"


class Store(MutableMapping[str, Any]):
    """A mapping of strings to JSON values that knows what changed since each revision."""

    def __init__(self, *, tombstones: int = TOMBSTONES) -> None:
        self._values: dict[str, bytes] = {}
        self._log: dict[str, int] = {}
        """Every key changed or deleted, in the order of its last change, with its counter."""
        self._dead = 0
        """How many keys of the log are deletions (absent from _values)."""
        self._tombstones = tombstones
        self.epoch = secrets.token_hex(8)
        self.counter = 0
        self.floor = 0
        """The oldest counter of this epoch a delta can start from."""
        self._adopted = False
        """Whether the state came from an import (the next local change starts a new epoch)."""

    # The mapping.

    def __getitem__(self, key: str) -> Any:
        return json.loads(self._values[key])

    def __setitem__(self, key: str, value: Any) -> None:
        key = _key(key)
        encoded = _encode(value)
        if key in self._log and key not in self._values:
            self._dead -= 1  # a deleted key set again
        self._touch(key)
        self._values[key] = encoded

    def __delitem__(self, key: str) -> None:
        del self._values[key]
        self._touch(key)
        self._dead += 1
        if self._dead > self._tombstones:
            self._forget_oldest_deletions()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def _touch(self, key: str) -> None:
        if self._adopted:
            # The state diverges from the exporter's: its revisions are no longer ours.
            self.epoch, self.floor, self._adopted = secrets.token_hex(8), self.counter, False
        self.counter += 1
        self._log.pop(key, None)
        self._log[key] = self.counter

    def _forget_oldest_deletions(self) -> None:
        keep = self._tombstones // 2
        for key, counter in list(self._log.items()):
            if self._dead <= keep:
                break
            if key not in self._values:
                del self._log[key]
                self._dead -= 1
                self.floor = max(self.floor, counter)

    # Revisions.

    @property
    def revision(self) -> str:
        return f"{self.epoch}:{self.counter}"

    def _counter_of(self, revision: str) -> int | None:
        """The counter of ``revision`` if it is of this epoch and deltas from it are known."""
        epoch, _, counter = revision.partition(":")
        if epoch != self.epoch or not counter.isdigit():
            return None
        value = int(counter)
        return value if self.floor <= value <= self.counter else None

    # Export.

    async def export(self) -> tuple[bytes, str]:
        """The whole state and its revision; serving goes on while it is written."""
        revision = self.revision
        items = list(self._values.items())  # the state at this revision: values are immutable
        pieces = [b'{"entries":{']
        written = 0
        for index, (key, value) in enumerate(items):
            if index:
                pieces.append(b",")
            pieces.append(_encode(key) + b":" + value)
            written += len(value)
            if written >= EXPORT_SLICE_BYTES:  # let calls in between
                written = 0
                await asyncio.sleep(0)
        pieces.append(b"}}")
        return b"".join(pieces), revision

    def dump(self) -> bytes:
        """The whole state, at once."""
        return b'{"entries":{' + _entries(list(self._values.items())) + b"}}"

    def changes(self, since: str) -> tuple[bytes, str] | None:
        """The delta from revision ``since`` to now, and now's revision; None if unknown."""
        counter = self._counter_of(since)
        if counter is None:
            return None
        changed: list[bytes] = []
        deleted: list[bytes] = []
        for key in reversed(self._log):
            if self._log[key] <= counter:
                break
            value = self._values.get(key)
            if value is None:
                deleted.append(_encode(key))
            else:
                changed.append(_encode(key) + b":" + value)
        data = b'{"set":{' + b",".join(changed) + b'},"deleted":[' + b",".join(deleted) + b"]}"
        return data, self.revision

    # Import.

    def load(self, state: bytes, revision: str = "") -> None:
        """Replace everything with a whole state; at ``revision`` when it is the exporter's."""
        try:
            entries = json.loads(state)["entries"] if state else {}
            if not isinstance(entries, dict):
                raise TypeError("entries is not an object")
            values = {_key(k): _encode(v) for k, v in entries.items()}
        except (ValueError, TypeError, KeyError) as e:
            raise PluginError(f'the state is not {{"entries": {{...}}}}: {e}') from None
        epoch, _, counter = revision.partition(":")
        self._values = values
        self._dead = 0
        if epoch and counter.isdigit():
            self.epoch, self.counter, self._adopted = epoch, int(counter), True
        else:
            self.epoch, self.counter, self._adopted = secrets.token_hex(8), 0, False
        self.floor = self.counter
        self._log = dict.fromkeys(values, self.counter)

    def apply(self, delta: bytes, base: str, revision: str) -> None:
        """Apply a delta made on revision ``base``; refused unless this state is at ``base``."""
        if base != self.revision:
            raise RevisionError(
                f"the delta applies to revision {base}, but this state is at {self.revision}; "
                "send the whole state"
            )
        epoch, _, counter = revision.partition(":")
        if epoch != self.epoch or not counter.isdigit() or int(counter) < self.counter:
            raise RevisionError(f"the delta's revision {revision} does not follow {base}")
        try:
            decoded = json.loads(delta)
            changed = {_key(k): _encode(v) for k, v in decoded["set"].items()}
            deleted = [_key(k) for k in decoded["deleted"]]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            shape = '{"set": {...}, "deleted": [...]}'
            raise PluginError(f"the delta is not {shape}: {e}") from None
        target = int(counter)
        for key, value in changed.items():
            self._log.pop(key, None)
            self._log[key] = target
            self._values[key] = value
        for key in deleted:
            if self._values.pop(key, None) is not None:
                self._log.pop(key, None)
                self._log[key] = target
                self._dead += 1
        self.counter, self._adopted = target, True


class StatefulPlugin(Plugin):
    """A plugin whose state is ``self.state``, a :class:`Store`: swaps move deltas.

    Subclass it, set ``state_version``, keep everything that must survive a
    swap or a crash in ``self.state`` and nothing else; export, import,
    revisions and deltas are done. ``@migration`` steps receive and return
    the whole-state bytes (``{"entries": {...}}``; return :func:`whole` of the new
    entries); deltas move only between
    instances of the same state version (other versions get the whole state).
    """

    state_version: ClassVar[int] = 1

    def __init__(self) -> None:
        self.state = Store()

    async def export_snapshot(self) -> tuple[bytes, str]:
        return await self.state.export()

    def export_changes(self, since: str) -> tuple[bytes, str] | None:
        return self.state.changes(since)

    def import_snapshot(self, state: bytes, revision: str) -> None:
        self.state.load(state, revision)

    def import_changes(self, changes: bytes, base: str, revision: str) -> None:
        self.state.apply(changes, base, revision)

    def state_revision(self) -> str:
        return self.state.revision

    def export_state(self) -> bytes:
        return self.state.dump()

    def import_state(self, state: bytes) -> None:
        self.state.load(state)
