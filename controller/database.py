"""Opening one of the controller's SQLite files, the same way for every store.

WAL journal with ``synchronous=NORMAL`` (a commit is atomic and survives a
crash of the controller; only a power loss may take the last ones back),
a busy timeout for the moments two threads write, autocommit so that each
store opens its own transactions, the schema created on first use, and the
file readable by its owner only from its first moment: SQLite gives the
``-wal`` and ``-shm`` files it makes beside it the database file's mode.

Also how a store's faults are seen: :class:`Health` turns the SQLite and
file errors of a full or read-only disk, an I/O error or a damaged file into
:class:`~controller.errors.StoreUnavailableError`, counts them, says when to
try again (backoff), and keeps what the operator is shown: the stores
failing now, the files moved aside, and an event for each change.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from controller.errors import StoreUnavailableError

log = logging.getLogger(__name__)

FIRST_RETRY = 0.5
"""Seconds before a failing store is tried again; doubled after each failure."""
LONGEST_RETRY = 30.0
EVENTS_KEPT = 50
"""Events about the stores kept in memory (they cannot go into a store that fails)."""

_REASONS = {
    "SQLITE_FULL": "DiskFull",
    "SQLITE_READONLY": "ReadOnly",
    "SQLITE_IOERR": "IOError",
    "SQLITE_CORRUPT": "Damaged",
    "SQLITE_NOTADB": "Damaged",
    "SQLITE_CANTOPEN": "CannotOpen",
    "SQLITE_BUSY": "Busy",
    "SQLITE_LOCKED": "Busy",
    "SQLITE_PERM": "ReadOnly",
}
_ERRNOS = {
    errno.ENOSPC: "DiskFull",
    errno.EDQUOT: "DiskFull",
    errno.EROFS: "ReadOnly",
    errno.EACCES: "ReadOnly",
    errno.EPERM: "ReadOnly",
    errno.EIO: "IOError",
}


def fault_reason(error: BaseException) -> str | None:
    """What a store's error says of the disk (``DiskFull``, ``ReadOnly``, ...), else None.

    None is a mistake of the controller's own (a bad query, a closed
    connection), never retried as a fault of the disk.
    """
    if isinstance(error, sqlite3.Error):
        name = str(getattr(error, "sqlite_errorname", "") or "")
        for prefix, reason in _REASONS.items():
            if name == prefix or name.startswith(prefix + "_"):
                return reason
        return None
    if isinstance(error, OSError):
        return _ERRNOS.get(error.errno or 0)
    return None


EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Fault:
    """A store failing now."""

    store: str
    path: str
    operation: str
    reason: str
    message: str
    since: datetime
    failures: int
    write: bool
    """Whether a write failed (only a write that succeeds again clears it: a full disk reads)."""


@dataclass(frozen=True)
class Reset:
    """A damaged file moved aside and replaced by a fresh one."""

    store: str
    path: str
    moved_to: str
    message: str
    time: datetime


@dataclass(frozen=True)
class HealthEvent:
    type: EventType
    reason: str
    message: str
    time: datetime
    store: str


class Health:
    """How the controller's stores are doing, for every store of one process (thread-safe)."""

    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        self.on_error = on_error
        """Told ``(store, operation)`` of every fault (the metrics count them)."""
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self._faults: dict[str, Fault] = {}
        self._resets: dict[str, Reset] = {}
        self._next_reset: dict[str, tuple[float, float]] = {}
        self.events: collections.deque[HealthEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self._lock = threading.Lock()
        self.resettable: set[str] = set()
        """Stores that replace a damaged file (reported as :meth:`reset`, not as a fault)."""

    def faults(self) -> dict[str, Fault]:
        with self._lock:
            return dict(self._faults)

    def resets(self) -> dict[str, Reset]:
        with self._lock:
            return dict(self._resets)

    def failing(self, store: str | None = None) -> bool:
        with self._lock:
            return bool(self._faults) if store is None else store in self._faults

    def retry_delay(self, store: str | None = None) -> float:
        """How long to wait before trying a failing store again: doubled per failure."""
        with self._lock:
            found = [f for f in self._faults.values() if store is None or f.store == store]
            failures = max((f.failures for f in found), default=0)
        return min(LONGEST_RETRY, FIRST_RETRY * 2.0 ** max(0, failures - 1))

    @contextlib.contextmanager
    def guard(self, store: str, path: Path, operation: str, *, write: bool) -> Iterator[None]:
        """Run a store operation: its disk faults become :class:`StoreUnavailableError`."""
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            reason = fault_reason(e)
            if reason is None:
                raise
            raise self.failed(store, path, operation, reason, e, write=write) from e
        self.succeeded(store, write=write)

    def failed(
        self, store: str, path: Path, operation: str, reason: str, error: BaseException, *,
        write: bool,
    ) -> StoreUnavailableError:  # fmt: skip
        message = str(error) or type(error).__name__
        now = datetime.now(UTC)
        with self._lock:
            self.errors[(store, operation)] += 1
            before = self._faults.get(store)
            fresh = (before is None or before.reason != reason) and not (
                reason == "Damaged" and store in self.resettable
            )
            self._faults[store] = Fault(
                store=store,
                path=str(path),
                operation=operation,
                reason=reason,
                message=message,
                since=now if before is None else before.since,
                failures=1 if before is None else before.failures + 1,
                write=write or (before is not None and before.write),
            )
            if fresh:
                self._event(
                    "Warning",
                    "StoreUnavailable",
                    f"{path}: {operation} failed: {message} ({reason}); retrying with backoff. "
                    "Plugins keep running and the gateway keeps routing; "
                    + _CONSEQUENCES.get(store, "what needs this store waits for it"),
                    store,
                )
        if self.on_error is not None:
            self.on_error(store, operation)
        if fresh:
            log.error("store %s (%s): %s failed: %s (%s)", store, path, operation, message, reason)
        return StoreUnavailableError(store, str(path), operation, reason, message)

    def succeeded(self, store: str, *, write: bool) -> None:
        with self._lock:
            fault = self._faults.get(store)
            if fault is None or (fault.write and not write):
                return
            del self._faults[store]
            seconds = (datetime.now(UTC) - fault.since).total_seconds()
            self._event(
                "Normal",
                "StoreRecovered",
                f"{fault.path} works again after {seconds:.1f}s ({fault.failures} failures)",
                store,
            )
        log.warning("store %s (%s) works again", store, fault.path)

    def may_reset(self, store: str, now: float) -> bool:
        """Whether a damaged ``store`` may be replaced now: at most once per backoff."""
        with self._lock:
            at, delay = self._next_reset.get(store, (0.0, FIRST_RETRY))
            if now < at:
                return False
            self._next_reset[store] = (now + delay, min(LONGEST_RESET, delay * 4))
            return True

    def reset(self, store: str, path: Path, moved_to: Path, why: str) -> None:
        """Say that ``path`` was damaged, moved to ``moved_to`` and replaced by a fresh file."""
        message = (
            f"{path} is damaged ({why}): moved aside to {moved_to.name} and replaced by a "
            "fresh file; " + _RESET_CONSEQUENCES.get(store, "")
        )
        with self._lock:
            self._resets[store] = Reset(store, str(path), str(moved_to), message, datetime.now(UTC))
            self._faults.pop(store, None)
            self._event("Warning", "StoreDamaged", message, store)
        log.error("store %s: %s", store, message)

    def _event(self, type: EventType, reason: str, message: str, store: str) -> None:
        last = self.events[-1] if self.events else None
        if last is not None and (last.type, last.reason, last.message) == (type, reason, message):
            return
        self.events.append(HealthEvent(type, reason, message, datetime.now(UTC), store))


LONGEST_RESET = 300.0
"""Longest wait between two replacements of a damaged store."""
_CONSEQUENCES = {
    "state": "spec changes, generations, status and events wait until it can be written",
    "snapshots": "checkpoints and state snapshots wait until it can be written",
}
_RESET_CONSEQUENCES = {
    "snapshots": "plugins go on without the checkpoints and snapshots it held "
    "(a restarted instance starts empty until the next checkpoint)",
}


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its ``-wal``, ``-shm``) to ``NAME.damaged-TIME``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).rename(target.with_name(target.name + suffix))
    return target


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
