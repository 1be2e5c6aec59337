"""Where a controller keeps what ``bhctl`` reaches: its data directory, its admin socket and
the file that says where its gateway listens.

Light on purpose (the standard library only): every command that talks to a
running controller starts here, and must start fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_GATEWAY = "127.0.0.1:8080"


def default_data_dir() -> Path:
    """``BLACKHOLE_DATA_DIR``, else /var/lib/blackhole as root, else the user's data home."""
    if configured := os.environ.get("BLACKHOLE_DATA_DIR"):
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/lib/blackhole")
    home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(home) / "blackhole"


def admin_socket(data_dir: Path) -> Path:
    return data_dir / "admin.sock"


def addresses_file(data_dir: Path) -> Path:
    """Where a running controller says it listens (gateway, metrics), for ``bhctl call``."""
    return data_dir / "addresses.json"


def gateway_address(data_dir: Path) -> str:
    """The HTTP address of the gateway of the controller on ``data_dir`` (else the default)."""
    try:
        return str(json.loads(addresses_file(data_dir).read_text())["http"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_GATEWAY


PKI_DIR = "pki"
"""The directory, in the data directory, of the controller's CA and client certificates."""


def client_certificates(data_dir: Path, role: str) -> Path:
    """Where the controller keeps the renewed client certificate of ``role`` (``controller``,
    ``gateway``): the gateway process reads its own from there."""
    return data_dir / PKI_DIR / "clients" / role
