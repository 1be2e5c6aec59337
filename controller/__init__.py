"""Blackhole plugin controller: declarative plugin specs in, isolated plugin instances out.

The package's layers point one way: ``cli`` -> ``reconcile`` -> ``sources`` |
``runtimes`` -> ``spec`` -> ``errors`` (see the import-linter contracts in
``pyproject.toml``).
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed package's metadata when first asked for
    (reading it costs more than the rest of a ``bhctl get``)."""
    if name == "__version__":
        from importlib import metadata

        return metadata.version("blackhole-controller")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
