"""The choices and options ``bhctl`` commands share: runtimes, engines, output formats and
the data directory.

Light on purpose (typer and the standard library only), so that defining the
commands imports none of the machinery behind them; the defaults that mirror
a backend's constants are checked against them by the unit tests.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer


class GatewayMode(StrEnum):
    """Where ``bhctl run``'s gateway runs."""

    PROCESS = "process"
    """Its own process, started and supervised by the controller (adopted if running)."""
    EXTERNAL = "external"
    """Its own process, started by someone else (``bhctl gateway``): never started here."""
    IN_PROCESS = "in-process"
    """Inside the controller: it stops with it (Kubernetes, where the pod is the unit)."""


class RuntimeChoice(StrEnum):
    """Where ``bhctl run`` runs instances: a container engine, or plain processes."""

    DOCKER = "docker"
    PODMAN = "podman"
    PROCESS = "process"


class EngineChoice(StrEnum):
    """A container engine (the values of ``controller.runtimes.container.Engine``)."""

    DOCKER = "docker"
    PODMAN = "podman"


class Format(StrEnum):
    """What ``-o``/``--output`` takes, in every command that has it (each a subset)."""

    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"
    NAME = "name"
    TEXT = "text"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def output(default: Format, *allowed: Format) -> Format:
    """An ``-o/--output`` option whose help names the allowed formats."""
    return typer.Option(  # type: ignore[no-any-return]
        default,
        "--output",
        "-o",
        help=f"Output format: {', '.join(allowed)}.",
        show_choices=True,
    )


def check_format(value: Format, *allowed: Format) -> None:
    if value not in allowed:
        raise typer.BadParameter(
            f'"{value}"; use {", ".join(allowed)} (files go to --output-file)',
            param_hint="--output",
        )


START_CPU_MILLIS = 2000
"""``--start-cpu``'s default: ``controller.runtimes.container.START_CPU_MILLIS``."""
MAX_DOWNLOAD_BYTES = 1 << 30
"""``plugin install --max-bytes``: ``controller.registry.remote.Limits.max_bytes``."""
DOWNLOAD_TIMEOUT = 600.0
"""``plugin install --timeout``: ``controller.registry.remote.Limits.timeout``."""
DOWNLOAD_ATTEMPTS = 3
"""``plugin install --attempts``: ``controller.registry.remote.Limits.attempts``."""

DATA_DIR: Path | None = typer.Option(
    None,
    "--data-dir",
    envvar="BLACKHOLE_DATA_DIR",
    help="The controller's data directory, absolute (default /var/lib/blackhole as root).",
    show_envvar=False,
)
TRUST_DIR: Path | None = typer.Option(
    None,
    "--trust-dir",
    envvar="BLACKHOLE_TRUST_DIR",
    help="Directory of trusted public keys, *.pub (default DATA_DIR/registry/trusted).",
    show_envvar=False,
)
POLICY: Path | None = typer.Option(
    None,
    "--policy",
    envvar="BLACKHOLE_POLICY",
    help="The operator's policy file (default DATA_DIR/registry/policy.yaml).",
    show_envvar=False,
)
RUNTIME: EngineChoice = typer.Option(
    EngineChoice.DOCKER, "--runtime", help="The engine that loads bundles' images."
)
