"""Moving a plugin's state: from one instance to another, into the snapshot store and back.

Everything streams chunk by chunk; the controller never holds a whole state.
Its neighbours: the swap coordinator moves state between colors with
:func:`move` (pre-copy rounds, then the last delta while calls are held);
the reconciler takes checkpoints with :func:`checkpoint` and restores the
newest good one into a restarted instance with :func:`restore`. The plugin
protocol calls are the coordinator's :class:`Plugins`; the store is
:class:`~controller.state.snapshots.Snapshots`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from controller.errors import ControllerError, PluginCallError
from controller.protocol import client
from controller.state import snapshots as snapshots_module

FULL_EVERY = 20
"""Delta checkpoints after a full one before the next is full again."""
UNUSABLE = frozenset({"DATA_LOSS", "FAILED_PRECONDITION", "UNIMPLEMENTED", "INVALID_ARGUMENT"})
"""Import failures that mean a stored snapshot is damaged, does not chain, or cannot be read
by this instance (a delta of another state version), not that the instance is down."""


class Plugins(Protocol):
    """The streamed state calls (:class:`~controller.protocol.client.Clients`)."""

    async def export_state_to(
        self, endpoint: str, sink: client.Sink[client.T], *, since: str = "", timeout: float
    ) -> client.T: ...

    async def import_state_from(
        self,
        endpoint: str,
        chunks: AsyncIterator[tuple[client.Transfer, bytes]],
        *,
        timeout: float,
    ) -> client.Transfer: ...


class StateTooLargeError(ControllerError):
    """A plugin offered more state than it can hold: not stored (it would fill the disk)."""


class Unsuitable(ControllerError):
    """The state on offer cannot go where it was sent (another state version): nothing moved."""

    def __init__(self, message: str, state_version: int) -> None:
        super().__init__(message)
        self.state_version = state_version


@dataclass
class Recording:
    """Where the chunks of a transfer are also written: a streamed snapshot in the store."""

    snapshots: snapshots_module.Snapshots
    key: str
    plugin_version: str
    reason: str
    ident: int | None = None
    seq: int = 0
    skip_unchanged: bool = False
    """Do not keep a delta that changes nothing (a checkpoint with no writes since)."""
    saved: snapshots_module.Snapshot | None = None
    asked: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When the state was asked for: every write acknowledged before it is in the snapshot."""
    limit: int | None = None
    """The most bytes kept: a plugin's state lives in its memory, so its memory limit."""

    async def add(self, header: client.Transfer, data: bytes) -> None:
        if self.ident is None:
            if self.limit is not None and header.size > self.limit:
                raise StateTooLargeError(
                    f"the plugin offered {header.size} bytes of state, more than its memory "
                    f"limit ({self.limit} bytes) can hold: not kept"
                )
            if self.skip_unchanged and header.delta and header.revision == header.base_revision:
                return
            self.ident = await asyncio.to_thread(
                self.snapshots.begin,
                self.key,
                self.plugin_version,
                header.state_version,
                self.reason,
                sha256=header.sha256,
                size=header.size,
                revision=header.revision,
                base_revision=header.base_revision if header.delta else "",
                taken=self.asked,
            )
        await asyncio.to_thread(self.snapshots.append, self.ident, self.seq, data)
        self.seq += 1

    async def finish(self) -> snapshots_module.Snapshot | None:
        if self.ident is not None:
            self.saved = await asyncio.to_thread(self.snapshots.finish, self.ident, self.key)
        return self.saved

    async def abandon(self) -> None:
        if self.ident is not None:
            await asyncio.to_thread(self.snapshots.abandon, self.ident)
            self.ident = None


@dataclass
class Moved:
    """One transfer: what was sent and what the receiver holds after."""

    sent: client.Transfer
    after: client.Transfer
    snapshot: snapshots_module.Snapshot | None = None


async def move(
    plugins: Plugins,
    source: str,
    target: str,
    *,
    since: str = "",
    timeout: float,
    state_version: int | None = None,
    max_state_version: int | None = None,
    recording: Recording | None = None,
) -> Moved:
    """Stream the state of ``source`` (the delta since ``since``) into ``target``.

    With ``state_version``, a state of another version is not sent at all
    (:class:`Unsuitable`, nothing imported), nor with ``max_state_version``
    one newer than it; with ``recording``, the chunks are kept in the store
    as they pass, and the snapshot is complete only if the import succeeded.
    """
    sent: list[client.Transfer] = []
    failure: list[BaseException] = []

    async def sink(chunks: AsyncIterator[tuple[client.Transfer, bytes]]) -> client.Transfer:
        async def relay() -> AsyncIterator[tuple[client.Transfer, bytes]]:
            try:
                async for header, data in chunks:
                    if not sent:
                        sent.append(header)
                        offered = header.state_version
                        if state_version is not None and offered != state_version:
                            raise Unsuitable(
                                f"state version {offered} offered, {state_version} wanted",
                                offered,
                            )
                        if max_state_version is not None and offered > max_state_version:
                            raise Unsuitable(
                                f"state version {offered} is newer than {max_state_version}",
                                offered,
                            )
                    if recording is not None:
                        await recording.add(header, data)
                    yield header, data
            except (ControllerError, OSError) as e:
                # Ending the stream short makes the receiver refuse it (size and sha256).
                failure.append(e)
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()  # and the export ends too

        try:
            return await plugins.import_state_from(target, relay(), timeout=timeout)
        except ControllerError:
            if failure:
                raise failure[0] from None
            raise

    try:
        after = await plugins.export_state_to(source, sink, since=since, timeout=timeout)
        if failure:
            raise failure[0]
    except BaseException:
        if recording is not None:
            await recording.abandon()
        raise
    snapshot = await recording.finish() if recording is not None else None
    return Moved(sent[0], after, snapshot)


# Checkpoints.


@dataclass
class Checkpointed:
    """A checkpoint taken (None when nothing changed since the last)."""

    snapshot: snapshots_module.Snapshot | None


async def checkpoint(
    plugins: Plugins,
    snapshots: snapshots_module.Snapshots,
    key: str,
    endpoint: str,
    plugin_version: str,
    *,
    timeout: float,
    full: bool = False,
    limit: int | None = None,
) -> Checkpointed:
    """Keep the state of the instance at ``endpoint``: a delta on the newest checkpoint if
    the plugin can make one (and ``full`` is not asked), else the whole state."""
    kept = await asyncio.to_thread(snapshots.checkpoints, key)
    since = ""
    if kept and kept[-1].revision and not full:
        fulls = [i for i, s in enumerate(kept) if not s.delta]
        if fulls:
            last_full = kept[fulls[-1]]
            deltas = kept[fulls[-1] + 1 :]
            delta_bytes = sum(s.size for s in deltas)
            if len(deltas) < FULL_EVERY and delta_bytes < max(last_full.size, 1 << 20):
                since = kept[-1].revision
    return Checkpointed(
        await record(
            plugins,
            snapshots,
            key,
            endpoint,
            plugin_version,
            "checkpoint",
            since,
            timeout=timeout,
            limit=limit,
        )
    )


async def record(
    plugins: Plugins,
    snapshots: snapshots_module.Snapshots,
    key: str,
    endpoint: str,
    plugin_version: str,
    reason: str,
    since: str = "",
    *,
    timeout: float,
    limit: int | None = None,
) -> snapshots_module.Snapshot | None:
    """Stream the state (the delta since ``since``) of ``endpoint`` into the store.

    None when it was a delta that changes nothing (not kept); at most ``limit`` bytes.
    """
    recording = Recording(snapshots, key, plugin_version, reason, skip_unchanged=True, limit=limit)

    async def sink(chunks: AsyncIterator[tuple[client.Transfer, bytes]]) -> None:
        async for header, data in chunks:
            await recording.add(header, data)

    try:
        await plugins.export_state_to(endpoint, sink, since=since, timeout=timeout)
    except BaseException:
        await recording.abandon()
        raise
    return await recording.finish()


# Restores.


@dataclass
class Restored:
    """What a restore did: the newest checkpoint now in the instance, and those skipped."""

    snapshot: snapshots_module.Snapshot | None
    skipped: list[tuple[snapshots_module.Snapshot, str]] = field(default_factory=list)


async def _stored(
    snapshots: snapshots_module.Snapshots, snapshot: snapshots_module.Snapshot
) -> AsyncIterator[tuple[client.Transfer, bytes]]:
    header = client.Transfer(
        snapshot.state_version,
        snapshot.size,
        snapshot.sha256,
        snapshot.revision,
        snapshot.delta,
        snapshot.base_revision,
    )
    seq = 0
    sent = False
    while True:
        data = await asyncio.to_thread(snapshots.chunk, snapshot.id, seq)
        if data is None:
            break
        yield header, data
        sent = True
        seq += 1
    if not sent:  # no chunk at all: an empty one, so the receiver checks and refuses it
        yield header, b""


async def load(
    plugins: Plugins,
    snapshots: snapshots_module.Snapshots,
    snapshot: snapshots_module.Snapshot,
    endpoint: str,
    *,
    timeout: float,
) -> client.Transfer:
    """Stream one stored snapshot into the instance at ``endpoint`` (it checks the sha256)."""
    return await plugins.import_state_from(endpoint, _stored(snapshots, snapshot), timeout=timeout)


async def restore(
    plugins: Plugins,
    snapshots: snapshots_module.Snapshots,
    key: str,
    endpoint: str,
    *,
    timeout: float,
) -> Restored:
    """Import the newest good checkpoint (a full one and the deltas chaining on it).

    A damaged or torn checkpoint is skipped for the one before it and
    reported; an instance that does not answer raises, to be tried again.
    """
    restored = Restored(None)
    newer_than = 0
    while True:
        chain = await asyncio.to_thread(snapshots.restore_chain, key, newer_than)
        if not chain:
            return restored
        for snapshot in chain:
            try:
                await load(plugins, snapshots, snapshot, endpoint, timeout=timeout)
            except PluginCallError as e:
                if e.code not in UNUSABLE:
                    raise
                restored.skipped.append((snapshot, str(e)))
                break
            restored.snapshot = snapshot
        if restored.snapshot is not None:
            return restored
        newer_than = chain[0].id  # the full one itself is damaged: the chain before it
