"""The Blackhole plugin SDK: what a plugin image needs to speak the plugin protocol.

Depends on gRPC and protobuf only. Subclass :class:`Plugin` (or
:class:`StatefulPlugin`, whose state lives in a :class:`Store` and moves as
deltas), declare state migrations with :func:`migration`, and run it with :func:`serve`; test it
without Docker with :mod:`blackhole_sdk.testing`. ``PROTOCOL_VERSION`` is the
version of the plugin protocol (``blackhole.plugin.v1``) this SDK speaks.
"""

__version__ = "0.2.0"

PROTOCOL_VERSION = 1
"""The plugin protocol version this SDK speaks."""

SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})
"""The protocol versions of controllers this SDK answers."""

PROTOCOL_PACKAGE = "blackhole.plugin.v1"
"""The gRPC package of the protocol."""

from blackhole_sdk.plugin import MigrationError, Plugin, PluginError, migration  # noqa: E402
from blackhole_sdk.server import serve  # noqa: E402
from blackhole_sdk.state import RevisionError, StatefulPlugin, Store  # noqa: E402

__all__ = [
    "PROTOCOL_PACKAGE",
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "MigrationError",
    "Plugin",
    "PluginError",
    "RevisionError",
    "StatefulPlugin",
    "Store",
    "migration",
    "serve",
]
