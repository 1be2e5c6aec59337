"""The pid lock files that keep one controller, and one gateway, per data directory.

``bhctl run`` (:mod:`controller.cli.run`) and ``bhctl gateway``
(:mod:`controller.cli.gateway`) each hold one for as long as they run; the
file says the holder's pid, and the lock goes with the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from controller.errors import ControllerError


@contextlib.contextmanager
def holding(path: Path, taken: Callable[[], ControllerError]) -> Iterator[None]:
    """Hold the lock at ``path`` with our pid in it; raise ``taken()`` if another holds it.

    An ``OSError`` opening the file (a read-only or full disk) is the caller's to report.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise taken() from None
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
