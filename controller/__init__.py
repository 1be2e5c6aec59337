"""Blackhole plugin controller: declarative plugin specs in, isolated plugin instances out.

The package's layers point one way: ``cli`` -> ``reconcile`` -> ``sources`` |
``runtimes`` -> ``spec`` -> ``errors`` (see the import-linter contracts in
``pyproject.toml``).
"""

from importlib import metadata

__version__ = metadata.version("blackhole-controller")
