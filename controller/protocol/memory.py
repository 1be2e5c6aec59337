"""The plugin protocol answered by the in-memory runtime's instances, for tests and benchmarks.

Speaks for :class:`~controller.runtimes.memory.MemoryRuntime` the way
:class:`~controller.protocol.client.Clients` speaks to real plugins, so that
the reconciler runs unchanged with no engine and no plugin process.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import AsyncIterator, Callable

import blackhole_sdk
from blackhole_sdk import state as sdk_state

from controller.errors import IncompatiblePluginError, PluginCallError
from controller.protocol import client
from controller.runtimes import base
from controller.runtimes.memory import MemoryRuntime


class MemoryPlugins:
    """The plugin protocol answered by the in-memory runtime's instances.

    An instance answers when it runs and is not in ``runtime.unready``; its
    handshake reports the spec's state version unless ``state_versions``
    says otherwise, and names in ``incompatible`` fail it as a plugin of
    another protocol version would.

    By default an instance's state is opaque bytes (``states``), as a plugin
    of an older SDK keeps it: whole copies only. With ``revisions`` set
    (before its handshake) it keeps an SDK :class:`~blackhole_sdk.state.Store`
    (``stores``) and exports and imports deltas like ``StatefulPlugin``.
    ``on_export`` runs before each export (e.g. to write while a swap copies).
    """

    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime
        self.state_versions: dict[str, int] = {}
        self.incompatible: set[str] = set()
        self.states: dict[str, bytes] = {}
        """Each instance's state, by instance name."""
        self.declared: dict[str, int] = {}
        """Each handshaken instance's state version."""
        self.draining: set[str] = set()
        self.failing: dict[str, str] = {}
        """Instance name to the protocol call that fails on it (e.g. "import_state")."""
        self.calls: collections.Counter[str] = collections.Counter()
        self.revisions = False
        self.stores: dict[str, sdk_state.Store] = {}
        """The state of each instance that keeps revisions, by instance name."""
        self.on_export: Callable[[str], None] | None = None
        self.chunk_bytes = 64 << 10
        self.initializations: collections.Counter[str] = collections.Counter()
        """Handshakes each process (by instance id) answered, as the SDK counts them."""

    def _name(self, endpoint: str) -> str:
        return endpoint.removeprefix("memory:")

    async def handshake(
        self, endpoint: str, want: base.InstanceSpec, timeout: float
    ) -> client.Handshake:
        self.calls["handshake"] += 1
        name = self._name(endpoint)
        if name in self.incompatible:
            raise IncompatiblePluginError(
                "ProtocolMismatch", f"{name} speaks protocol version 99; this controller runs [1]"
            )
        if not await self.healthy(endpoint, timeout):
            raise PluginCallError("UNAVAILABLE", f"{name} does not answer")
        declared = want.spec.state.version if want.spec.state else 0
        self.declared[name] = self.state_versions.get(name, declared)
        if self.revisions and name not in self.stores:
            self.stores[name] = sdk_state.Store()
        current = self.runtime.instances.get(name)
        process = current.id if current is not None else name
        self.initializations[process] += 1
        return client.Handshake(
            protocol_version=1,
            provides=tuple(want.spec.provides),
            state_version=self.declared[name],
            sdk="memory",
            features=(client.DELTA_FEATURE,) if name in self.stores else (),
            initializations=self.initializations[process],
        )

    async def healthy(self, endpoint: str, timeout: float) -> bool:
        self.calls["healthy"] += 1
        name = self._name(endpoint)
        current = self.runtime.instances.get(name)
        return (
            current is not None
            and current.state is base.InstanceState.RUNNING
            and name not in self.runtime.unready
        )

    def _answering(self, endpoint: str, what: str) -> str:
        self.calls[what] += 1
        name = self._name(endpoint)
        current = self.runtime.instances.get(name)
        if current is None or current.state is not base.InstanceState.RUNNING:
            raise PluginCallError("UNAVAILABLE", f"{name} does not answer")
        if self.failing.get(name) == what:
            raise PluginCallError("INTERNAL", f"{name}: {what} failed on purpose")
        return name

    async def call(self, endpoint: str, method: str, payload: bytes, timeout: float) -> bytes:
        name = self._answering(endpoint, "call")
        if name in self.draining:
            raise PluginCallError("UNAVAILABLE", "draining: not taking calls")
        return payload

    def _export(self, name: str, since: str) -> tuple[client.Transfer, bytes]:
        if self.on_export is not None:
            self.on_export(name)
        version = self.declared.get(name, 0)
        store = self.stores.get(name)
        if store is None:
            data = self.states.get(name, b"")
            return client.Transfer(version, len(data), hashlib.sha256(data).hexdigest()), data
        changes = store.changes(since) if since else None
        data, revision = changes if changes is not None else (store.dump(), store.revision)
        header = client.Transfer(
            version,
            len(data),
            hashlib.sha256(data).hexdigest(),
            revision,
            changes is not None,
            since if changes is not None else "",
        )
        return header, data

    async def export_state(self, endpoint: str, timeout: float) -> client.State:
        name = self._answering(endpoint, "export_state")
        header, data = self._export(name, "")
        return client.State(header.state_version, data, header.sha256)

    async def export_state_to(
        self, endpoint: str, sink: client.Sink[client.T], *, since: str = "", timeout: float
    ) -> client.T:
        name = self._answering(endpoint, "export_state")
        header, data = self._export(name, since)
        step = self.chunk_bytes

        async def chunks() -> AsyncIterator[tuple[client.Transfer, bytes]]:
            for start in range(0, max(len(data), 1), step):
                yield header, data[start : start + step]

        return await sink(chunks())

    async def import_state(
        self, endpoint: str, state: client.State, timeout: float
    ) -> client.State:
        header = client.Transfer(state.version, len(state.data), state.sha256)

        async def chunks() -> AsyncIterator[tuple[client.Transfer, bytes]]:
            yield header, state.data

        after = await self.import_state_from(endpoint, chunks(), timeout=timeout)
        return client.State(after.state_version, b"", after.sha256)

    async def import_state_from(
        self,
        endpoint: str,
        chunks: AsyncIterator[tuple[client.Transfer, bytes]],
        *,
        timeout: float,
    ) -> client.Transfer:
        name = self._answering(endpoint, "import_state")
        parts: list[bytes] = []
        header: client.Transfer | None = None
        async for this, data in chunks:
            if header is not None and this != header:
                raise PluginCallError("INVALID_ARGUMENT", "state chunks disagree")
            header = this
            parts.append(data)
        if header is None:
            raise PluginCallError("INVALID_ARGUMENT", "no state chunk was sent")
        data = b"".join(parts)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != header.size or digest != header.sha256:
            raise PluginCallError("DATA_LOSS", f"state damaged in transfer: {len(data)} bytes")
        version = self.declared.get(name, 0)
        if header.state_version > version:
            raise PluginCallError(
                "FAILED_PRECONDITION", f"state version {header.state_version} is newer"
            )
        store = self.stores.get(name)
        try:
            if header.delta:
                if store is None or header.state_version != version:
                    raise PluginCallError("UNIMPLEMENTED", f"{name} imports no such delta")
                store.apply(data, header.base_revision, header.revision)
            elif store is not None:
                adopted = header.revision if header.state_version == version else ""
                store.load(data, adopted)
            else:
                self.states[name] = data
        except sdk_state.RevisionError as e:
            raise PluginCallError("FAILED_PRECONDITION", str(e)) from None
        except blackhole_sdk.PluginError as e:
            raise PluginCallError("INVALID_ARGUMENT", str(e)) from None
        revision = store.revision if store is not None else ""
        return client.Transfer(version, len(data), digest, revision, header.delta)

    async def drain(self, endpoint: str, timeout: float, *, resume: bool = False) -> int:
        name = self._answering(endpoint, "drain")
        (self.draining.discard if resume else self.draining.add)(name)
        return 0

    async def drop(self, endpoint: str) -> None:
        """The instance is gone: a new one of its name starts afresh."""
        self.calls["drop"] += 1
        name = self._name(endpoint)
        self.draining.discard(name)
        self.states.pop(name, None)
        self.stores.pop(name, None)
        self.declared.pop(name, None)
