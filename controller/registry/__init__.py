"""The plugin registry: signed bundles, their catalog and search, sources, checks, dependencies."""

from controller.registry.catalog import Catalog, Entry
from controller.registry.manifest import Manifest
from controller.registry.policy import Policy
from controller.registry.registry import Images, Installed, Registry, Settings

__all__ = [
    "Catalog",
    "Entry",
    "Images",
    "Installed",
    "Manifest",
    "Policy",
    "Registry",
    "Settings",
]
