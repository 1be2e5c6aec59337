"""What the process runtime checks of a spec before it runs it: ``spec.process`` and volumes.

The plugin's directory must lie under the plugin root (symlinks followed),
its entrypoint, virtual environment and ``pythonPath`` inside that
directory; only ``network: none`` is possible; volumes may not be mounted
over what the runtime provides itself (``/proc``, ``/tmp``, the system
directories); host paths follow every backend's rules
(:func:`controller.runtimes.base.check_host_paths`).
"""

from __future__ import annotations

import os
from pathlib import Path

from controller.errors import SpecIssue
from controller.runtimes import base
from controller.spec import models

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
"""Host directories every instance sees, read-only; with its code and interpreter, all it sees."""
PRIVATE_DIRS = ("/proc", "/dev", "/run", "/tmp")
"""Directories each instance gets its own of; what lies below them on the host is bound over."""
RESERVED_MOUNTS = (*PRIVATE_DIRS, *SYSTEM_DIRS)


def issue(path: str, message: str, value: object = None) -> SpecIssue:
    return SpecIssue("runtime", None, path, message, value=value, has_value=value is not None)


def check(spec: models.PluginSpec, plugins: Path, host_path_root: Path | None) -> list[SpecIssue]:
    """Every problem that would stop ``spec`` from running as a process; empty when none.

    ``plugins`` is the plugin root, ``host_path_root`` the directory host
    paths must lie under (None: host paths are refused).
    """
    issues = []
    if spec.runtime not in (None, models.RuntimeName.PROCESS):
        issues.append(
            issue(
                "spec.runtime",
                f"this controller runs plugins as processes; use process or leave "
                f"it out, or run the plugin on a {spec.runtime.value} controller",
                spec.runtime.value,
            )
        )
    if spec.permissions.network is not models.NetworkMode.NONE:
        issues.append(
            issue(
                "spec.permissions.network",
                "is not supported on the process runtime; use none",
                spec.permissions.network.value,
            )
        )
    if spec.process is None:
        issues.append(
            issue(
                "spec.process",
                "the process runtime runs a plugin from a directory: give spec.process.path "
                "(under the plugin root) and its entrypoint",
            )
        )
    else:
        issues += check_source(spec.process, plugins)
    issues += _check_mounts(spec)
    issues += base.check_host_paths(spec, host_path_root)
    return issues


def check_source(source: models.ProcessSource, plugins: Path) -> list[SpecIssue]:
    """The checks of ``spec.process``: a directory under the root, the files it names inside."""
    root = plugins.resolve()
    directory = (plugins / source.path).resolve()
    if not directory.is_relative_to(root):
        return [
            issue(
                "spec.process.path",
                f"resolves to {directory}, outside the plugin root {root} "
                "(bhctl run --plugin-root)",
                source.path,
            )
        ]
    if not directory.is_dir():
        return [
            issue(
                "spec.process.path",
                f"{directory} is not a directory; unpack the plugin under {root}",
                source.path,
            )
        ]
    if str(directory) in PRIVATE_DIRS:
        return [
            issue(
                "spec.process.path",
                f"is {directory} itself, of which each plugin gets a private one; "
                f"put the plugin in a directory below it",
                source.path,
            )
        ]
    issues = []
    entry = (directory / source.entrypoint).resolve()
    if not entry.is_relative_to(directory) or not entry.is_file():
        issues.append(
            issue(
                "spec.process.entrypoint",
                f"{entry} is not a file inside {directory}",
                source.entrypoint,
            )
        )
    if source.virtualenv is not None:
        venv = (directory / source.virtualenv).resolve()
        python = venv / "bin" / "python"
        if not venv.is_relative_to(directory) or not os.access(python, os.X_OK):
            issues.append(
                issue(
                    "spec.process.virtualenv",
                    f"{python} is not an interpreter; create it with python3 -m venv",
                    source.virtualenv,
                )
            )
    for index, entry_path in enumerate(source.python_path):
        path = (directory / entry_path).resolve()
        if not path.is_relative_to(directory) or not path.is_dir():
            issues.append(
                issue(
                    f"spec.process.pythonPath[{index}]",
                    f"{path} is not a directory inside {directory}",
                    entry_path,
                )
            )
    return issues


def _check_mounts(spec: models.PluginSpec) -> list[SpecIssue]:
    issues = []
    for index, volume in enumerate(spec.volumes):
        mount = Path(volume.mount_path)
        if any(mount == Path(r) or mount.is_relative_to(r) for r in RESERVED_MOUNTS):
            issues.append(
                issue(
                    f"spec.volumes[{index}].mountPath",
                    "is a directory the process runtime provides itself; mount elsewhere, "
                    "e.g. /data",
                    volume.mount_path,
                )
            )
    return issues
