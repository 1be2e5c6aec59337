"""The plugin protocol answered by the in-memory runtime's instances, for tests and benchmarks.

Speaks for :class:`~controller.runtimes.memory.MemoryRuntime` the way
:class:`~controller.protocol.client.Clients` speaks to real plugins, so that
the reconciler runs unchanged with no engine and no plugin process.
"""

from __future__ import annotations

import collections

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
        return client.Handshake(
            protocol_version=1,
            provides=tuple(want.spec.provides),
            state_version=self.state_versions.get(name, declared),
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

    async def drop(self, endpoint: str) -> None:
        self.calls["drop"] += 1
