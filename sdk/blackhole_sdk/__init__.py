"""The Blackhole plugin SDK: what a plugin image needs to speak the plugin protocol.

Depends on gRPC and protobuf only. ``PROTOCOL_VERSION`` is the version of
the plugin protocol (``blackhole.plugin.v1``) this SDK implements; the
controller refuses plugins whose protocol version it does not support.
"""

from blackhole_sdk.plugin import Plugin, PluginError, serve

__all__ = ["PROTOCOL_PACKAGE", "PROTOCOL_VERSION", "Plugin", "PluginError", "serve"]

__version__ = "0.1.0"

PROTOCOL_VERSION = 1
"""The plugin protocol version this SDK speaks."""

PROTOCOL_PACKAGE = "blackhole.plugin.v1"
"""The gRPC package of the protocol."""
