"""Unix socket paths longer than the kernel takes, made usable.

Below every other module of the controller: the admin API, its client and
the runtimes all reach sockets in data directories that may be deep.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SUN_PATH_MAX = 107
"""Longest Unix socket path the kernel takes (sun_path is 108 bytes with its NUL)."""


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits in sun_path, however deep the directory is.

    Long paths are reached through ``/proc/self/fd`` of their open directory,
    which works for ``bind`` and ``connect`` alike.
    """
    text = str(path)
    if len(text.encode()) <= SUN_PATH_MAX:
        yield text
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)
