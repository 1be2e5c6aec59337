"""The plugin protocol answered by the in-memory runtime's instances, for tests and benchmarks.

Speaks for :class:`~controller.runtimes.memory.MemoryRuntime` the way
:class:`~controller.protocol.client.Clients` speaks to real plugins, so that
the reconciler runs unchanged with no engine and no plugin process.
"""

from __future__ import annotations

import collections
import hashlib

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
        return client.Handshake(
            protocol_version=1,
            provides=tuple(want.spec.provides),
            state_version=self.declared[name],
            sdk="memory",
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

    async def export_state(self, endpoint: str, timeout: float) -> client.State:
        name = self._answering(endpoint, "export_state")
        data = self.states.get(name, b"")
        return client.State(self.declared.get(name, 0), data, hashlib.sha256(data).hexdigest())

    async def import_state(
        self, endpoint: str, state: client.State, timeout: float
    ) -> client.State:
        name = self._answering(endpoint, "import_state")
        version = self.declared.get(name, 0)
        if state.version > version:
            raise PluginCallError("FAILED_PRECONDITION", f"state version {state.version} is newer")
        self.states[name] = state.data
        return client.State(version, b"", hashlib.sha256(state.data).hexdigest())

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
        self.declared.pop(name, None)
