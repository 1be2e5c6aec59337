"""The plugin spec: models, quantities, versions, YAML loading and the generated CRD."""

from controller.spec.loader import LoadedPlugin, load_file, load_paths, load_text
from controller.spec.models import Plugin, PluginSpec, PluginStatus
from controller.spec.quantity import Quantity
from controller.spec.semver import Version, VersionRange

__all__ = [
    "LoadedPlugin",
    "Plugin",
    "PluginSpec",
    "PluginStatus",
    "Quantity",
    "Version",
    "VersionRange",
    "load_file",
    "load_paths",
    "load_text",
]
