"""The ``Plugin`` base class a plugin author subclasses, and state migrations.

A plugin answers calls (:meth:`Plugin.handle`, JSON in and out, or
:meth:`Plugin.handle_bytes` for raw payloads), says whether it is healthy,
and, if it keeps state, exports it as bytes and imports bytes exported by
another instance. ``state_version`` names the format of those bytes; a
method decorated with :func:`migration` turns one version into the next, and
the SDK chains them when an instance imports an older state. The server
(:mod:`blackhole_sdk.server`) calls these methods; nothing here knows gRPC
beyond the status code a :class:`PluginError` carries.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, TypeVar

import grpc

F = TypeVar("F", bound=Callable[..., bytes])


class PluginError(Exception):
    """A call failed in a way the caller should see: its message is sent back.

    ``status`` is the gRPC status code the caller gets; the gateway maps it
    to HTTP (``INVALID_ARGUMENT`` 400, ``NOT_FOUND`` 404, ``FAILED_PRECONDITION``
    409, ``UNIMPLEMENTED`` 501, ...).
    """

    def __init__(self, message: str, status: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.status = status


class MigrationError(PluginError):
    """State of one version cannot be turned into another."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc.StatusCode.FAILED_PRECONDITION)


async def resolve(value: Any) -> Any:
    """``value``, awaited first when a plugin method was ``async``."""
    return await value if inspect.isawaitable(value) else value


async def invoke(method: Callable[..., object], *args: Any) -> Any:
    """Call a plugin's method, plain or ``async``, and return what it gave."""
    return await resolve(method(*args))


def encode(result: Any) -> bytes:
    """An answer as bytes: bytes as they are, anything else as JSON."""
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result)
    try:
        return json.dumps(result, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise PluginError(
            f"the answer cannot be encoded as JSON: {e}", grpc.StatusCode.INTERNAL
        ) from e


def migration(from_version: int, to_version: int) -> Callable[[F], F]:
    """Declare a method that turns state bytes of ``from_version`` into ``to_version``.

    ::

        class Store(Plugin):
            state_version = 2

            @migration(1, 2)
            def _add_timestamps(self, state: bytes) -> bytes: ...
    """
    if to_version <= from_version or from_version < 1:
        raise ValueError(f"migration({from_version}, {to_version}): versions must increase from 1")

    def mark(method: F) -> F:
        method.__blackhole_migration__ = (from_version, to_version)  # type: ignore[attr-defined]
        return method

    return mark


class Plugin:
    """Subclass it: override ``handle`` (and the others a plugin needs).

    Class attributes describe the plugin to the controller at the handshake:
    ``provides`` (its capabilities) and ``state_version`` (0 when it keeps no
    state). Methods may be plain or ``async``; plain ones run on the server's
    event loop, so keep them quick or make them ``async``.
    """

    provides: ClassVar[tuple[str, ...]] = ()
    state_version: ClassVar[int] = 0
    _migrations: ClassVar[dict[int, tuple[int, str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        steps: dict[int, tuple[int, str]] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                mark = getattr(value, "__blackhole_migration__", None)
                if mark is not None:
                    steps[mark[0]] = (mark[1], name)
        cls._migrations = steps

    def initialize(self, config: dict[str, Any]) -> None:
        """Called once before the first call, with the spec's ``config``."""

    def handle(self, method: str, payload: Any) -> Any:
        """Answer one call: ``payload`` is the decoded JSON body (None when empty).

        Return anything JSON can encode; raise :class:`PluginError` to send
        an error back.
        """
        raise PluginError(f"unknown method {method!r}", grpc.StatusCode.UNIMPLEMENTED)

    def handle_bytes(self, method: str, metadata: dict[str, str], payload: bytes) -> Any:
        """Answer one call with raw bytes; by default decodes JSON and calls :meth:`handle`.

        May return ``bytes`` (sent as they are) or anything :meth:`handle` may.
        """
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError as e:
            raise PluginError(f"the payload is not JSON: {e}") from None
        return self.handle(method, decoded)

    async def handle_stream(
        self, method: str, metadata: dict[str, str], chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """Answer a streamed call; by default joins the chunks and answers as ``handle_bytes``."""
        payload = b"".join([chunk async for chunk in chunks])
        yield encode(await resolve(self.handle_bytes(method, metadata, payload)))

    def health(self) -> bool:
        """Whether the plugin can take calls."""
        return True

    def export_state(self) -> bytes:
        """The plugin's whole state, in format ``state_version``."""
        if self.state_version:
            raise PluginError(
                f"{type(self).__name__} declares state_version {self.state_version} "
                "but does not override export_state",
                grpc.StatusCode.UNIMPLEMENTED,
            )
        return b""

    def import_state(self, state: bytes) -> None:
        """Take over ``state``, already migrated to ``state_version``, replacing what it had."""
        if self.state_version:
            raise PluginError(
                f"{type(self).__name__} declares state_version {self.state_version} "
                "but does not override import_state",
                grpc.StatusCode.UNIMPLEMENTED,
            )

    # Revisions and deltas (optional): what lets a swap hold calls only for the last changes.
    # blackhole_sdk.state.StatefulPlugin implements them on a Store; a plugin that keeps
    # structures of its own can implement them itself (all of them, or none).

    def state_revision(self) -> str:
        """The revision the state is at now; "" when the plugin keeps no revisions."""
        return ""

    async def export_snapshot(self) -> tuple[bytes, str]:
        """The whole state and the revision it is at (by default, :meth:`export_state` and "")."""
        return bytes(await resolve(self.export_state())), ""

    def export_changes(self, since: str) -> tuple[bytes, str] | None:
        """The changes since revision ``since`` and the revision they bring to, or None.

        None when ``since`` is not a revision the plugin can make a delta from (another
        epoch, too old): the SDK then sends the whole state. May be ``async``.
        """
        return None

    def import_snapshot(self, state: bytes, revision: str) -> Any:
        """Take over a whole state at ``revision`` (already migrated; "" when migrated or
        when the exporter keeps no revisions). By default, :meth:`import_state`."""
        return self.import_state(state)

    def import_changes(self, changes: bytes, base: str, revision: str) -> None:
        """Apply a delta from revision ``base`` to ``revision``; raise
        :class:`~blackhole_sdk.state.RevisionError` unless the state is at ``base``."""
        raise PluginError(
            f"{type(self).__name__} does not import deltas", grpc.StatusCode.UNIMPLEMENTED
        )

    @classmethod
    def features(cls) -> tuple[str, ...]:
        """The optional protocol parts it implements, said in the handshake."""
        if cls.export_changes is not Plugin.export_changes and (
            cls.import_changes is not Plugin.import_changes
        ):
            return ("state.delta",)
        return ()

    def migrate(self, state: bytes, from_version: int) -> bytes:
        """``state`` of ``from_version`` turned into ``state_version`` by the declared steps."""
        target = self.state_version
        if from_version == target:
            return state
        if from_version > target:
            raise MigrationError(
                f"state version {from_version} is newer than this plugin's ({target}); "
                "a plugin cannot read state from the future"
            )
        version = from_version
        while version != target:
            step = self._migrations.get(version)
            if step is None or step[0] > target:
                declared = ", ".join(f"{a}->{b}" for a, (b, _) in sorted(self._migrations.items()))
                raise MigrationError(
                    f"no migration from state version {version} towards {target}; "
                    f"declared: {declared or 'none'}"
                )
            state = getattr(self, step[1])(state)
            version = step[0]
        return state
