"""The key that names one plugin across the controller: ``name``, or ``namespace/name`` on
Kubernetes. Queues, stores, routes, metrics and events all use it; build and split it here only."""

from __future__ import annotations

from typing import NewType

PluginKey = NewType("PluginKey", str)


def plugin_key(name: str, namespace: str | None = None) -> PluginKey:
    """The key of plugin ``name`` in ``namespace`` (None or "" outside Kubernetes)."""
    return PluginKey(f"{namespace}/{name}" if namespace else name)


def split_key(key: str) -> tuple[str | None, str]:
    """``(namespace, name)`` of ``key``; the namespace is None outside Kubernetes."""
    namespace, _, name = key.rpartition("/")
    return namespace or None, name
