"""Docker and Podman: one backend, with an engine setting where their APIs agree.

Split by concern, as Nomad splits its drivers: :mod:`.engine` (the connection
and its errors), :mod:`.isolation` (what a spec becomes: user, capabilities,
read-only root, limits), :mod:`.networks` (private networks between peers),
:mod:`.volumes`, :mod:`.inspection` (an instance from the engine's words, and
their cache), :mod:`.events` (the engine's event thread), :mod:`.images` (load
and save), :mod:`.start_cpu` (the start-up CPU boost) and :mod:`.runtime` (the
backend that composes them). ``docker`` is imported in this package only.
"""

from controller.runtimes.container.engine import (
    Engine,
    EngineInfo,
    connect,
    default_run_dir,
    describe,
    engine_url,
)
from controller.runtimes.container.isolation import Isolation
from controller.runtimes.container.runtime import ContainerRuntime, Settings
from controller.runtimes.container.start_cpu import START_CPU_MILLIS

__all__ = [
    "START_CPU_MILLIS",
    "ContainerRuntime",
    "Engine",
    "EngineInfo",
    "Isolation",
    "Settings",
    "connect",
    "default_run_dir",
    "describe",
    "engine_url",
]
