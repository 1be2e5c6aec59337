"""The process runtime: plugins as supervised processes in cgroups and namespaces of their own.

Split by concern: :mod:`.cgroups` (instances' cgroups), :mod:`.validation`
(checks of ``spec.process`` and volumes), :mod:`.launcher` (the launcher
protocol, the backend's side), :mod:`.shim` (the launcher program and each
instance's shim, which isolate and run the plugin), :mod:`.seccomp` (the
filter plugins run under), :mod:`.records` (what runs, from files) and
:mod:`.runtime` (the backend that composes them).
"""

from controller.runtimes.process.runtime import HostInfo, ProcessRuntime, Settings, describe

__all__ = ["HostInfo", "ProcessRuntime", "Settings", "describe"]
