"""Opening one of the controller's SQLite files, the same way for every store.

WAL journal with ``synchronous=NORMAL`` (a commit is atomic and survives a
crash of the controller; only a power loss may take the last ones back),
a busy timeout for the moments two threads write, autocommit so that each
store opens its own transactions, the schema created on first use, and the
file readable by its owner only from its first moment: SQLite gives the
``-wal`` and ``-shm`` files it makes beside it the database file's mode.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """``path`` opened (and created, with ``schema``) for use from any one thread at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            existing.chmod(0o600)  # left readable by an older version
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db
