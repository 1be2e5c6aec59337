"""The single-host controller's own records, in SQLite (WAL) in its data directory.

Holds what a Kubernetes API server would hold for the cluster controller:
specs applied through the admin API (``bhctl apply``), each plugin's
generation and last status, and a bounded log of events per plugin. The
user's spec files are never written; everything the controller learns goes
here, so a restarted controller keeps generations, restart counts and events.

Synchronous and not thread-safe: :class:`~controller.sources.directory.DirectorySource`
calls it from one thread at a time. A full or read-only disk, an I/O error
or a damaged file raises :class:`~controller.errors.StoreUnavailableError`
(told to the :class:`~controller.database.Health` given); a damaged file is
never replaced, since it holds what nothing else does (applied specs, swaps
in progress): a controller that finds it so at start-up says which file and
how to recover it, and does not start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from controller import database
from controller.errors import StoreUnavailableError
from controller.spec import models

STORE = "state"
"""This store's name in :class:`~controller.database.Health` and the metrics."""

EVENTS_KEPT = 50
"""Events kept per plugin; older ones are dropped."""

EventType = Literal["Normal", "Warning"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    key TEXT PRIMARY KEY,
    document TEXT NOT NULL,
    applied_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS plugins (
    key TEXT PRIMARY KEY,
    spec_hash TEXT NOT NULL,
    generation INTEGER NOT NULL,
    status TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    first_time TEXT NOT NULL,
    last_time TEXT NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS events_by_key ON events (key, id);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    action TEXT NOT NULL,
    argument TEXT NOT NULL DEFAULT '',
    requested_at TEXT NOT NULL,
    answered_at TEXT,
    outcome TEXT,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_by_key ON requests (key, answered_at, id);
"""

REQUESTS_KEPT = 20
"""Answered requests kept per plugin; older ones are dropped."""


@dataclass(frozen=True)
class Request:
    """What an operator asked of one plugin (``bhctl swap ...``, a state import): recorded
    first, carried out by the plugin's next pass, so it survives a restart of the controller
    and never races the pass."""

    id: int
    key: str
    action: str
    argument: str = ""
    outcome: str | None = None
    """None while pending; then Done or Refused."""
    message: str = ""

    def to_document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "plugin": self.key,
            "action": self.action,
            "outcome": self.outcome or "Pending",
            "message": self.message,
        }


@dataclass(frozen=True)
class Event:
    """Something the controller did or saw, like a Kubernetes Event; repeats are counted."""

    type: EventType
    reason: str
    message: str
    first_time: datetime
    last_time: datetime
    count: int = 1

    def to_document(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "firstTimestamp": self.first_time.isoformat(),
            "lastTimestamp": self.last_time.isoformat(),
            "count": self.count,
        }


class Store:
    """One SQLite database file; created with its tables on first use."""

    def __init__(self, path: Path, health: database.Health | None = None) -> None:
        self.path = path
        self.health = health or database.Health()
        try:
            with self._guard("open", write=True):
                self._db = database.connect(path, _SCHEMA)
        except StoreUnavailableError as e:
            if e.reason != "Damaged":
                raise
            raise StoreUnavailableError(
                STORE,
                str(path),
                "open",
                e.reason,
                f"the file is damaged ({e.__cause__ or e}). It holds the specs applied with "
                "bhctl apply, generations, status and swaps in progress, so it is not "
                "replaced: stop here, keep a copy, then try "
                f"`sqlite3 {path} .recover | sqlite3 {path}.recovered` and move the result into "
                "its place (or remove the file to start with no records)",
            ) from e

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _guard(self, operation: str, *, write: bool) -> Iterator[None]:
        with self.health.guard(STORE, self.path, operation, write=write):
            yield

    # Specs applied through the admin API.

    def applied(self) -> dict[str, str]:
        """Applied specs by key, each as the YAML or JSON text it was applied with."""
        with self._guard("read_applied", write=False):
            return dict(self._db.execute("SELECT key, document FROM applied ORDER BY key"))

    def put_applied(self, key: str, document: str) -> None:
        with self._guard("apply", write=True):
            self._db.execute(
                "INSERT INTO applied (key, document, applied_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET document = excluded.document, "
                "applied_at = excluded.applied_at",
                (key, document, _now().isoformat()),
            )

    def delete_applied(self, key: str) -> bool:
        with self._guard("delete_applied", write=True):
            return self._db.execute("DELETE FROM applied WHERE key = ?", (key,)).rowcount > 0

    # Generations and status.

    def generation(self, key: str, spec_hash: str) -> int:
        """The generation of ``key`` with this spec: unchanged for the same hash, else bumped.

        Reads first: an unchanged spec needs no write, so a read-only or full
        disk still gives the generations of every spec that did not change.
        """
        with self._guard("read_generation", write=False):
            row = self._db.execute(
                "SELECT spec_hash, generation FROM plugins WHERE key = ?", (key,)
            ).fetchone()
        if row is not None and row[0] == spec_hash:
            return int(row[1])
        with self._guard("write_generation", write=True), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT spec_hash, generation FROM plugins WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and row[0] == spec_hash:
                return int(row[1])
            generation = 1 if row is None else int(row[1]) + 1
            self._db.execute(
                "INSERT INTO plugins (key, spec_hash, generation) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET spec_hash = excluded.spec_hash, "
                "generation = excluded.generation",
                (key, spec_hash, generation),
            )
            return generation

    def status(self, key: str) -> models.PluginStatus | None:
        with self._guard("read_status", write=False):
            row = self._db.execute("SELECT status FROM plugins WHERE key = ?", (key,)).fetchone()
        if row is None or row[0] is None:
            return None
        return models.PluginStatus.model_validate_json(row[0])

    def put_status(self, key: str, status: models.PluginStatus) -> None:
        text = status.model_dump_json(by_alias=True, exclude_none=True)
        with self._guard("write_status", write=True):
            self._db.execute("UPDATE plugins SET status = ? WHERE key = ?", (text, key))

    def forget(self, key: str) -> None:
        """Drop everything about a plugin that is gone: its status, generation and events."""
        with self._guard("forget", write=True), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM plugins WHERE key = ?", (key,))
            self._db.execute("DELETE FROM events WHERE key = ?", (key,))
            self._db.execute(
                "UPDATE requests SET answered_at = ?, outcome = 'Refused', "
                "message = 'the plugin was deleted' WHERE key = ? AND answered_at IS NULL",
                (_now().isoformat(), key),
            )

    def known(self) -> list[str]:
        """Keys that have a status or generation recorded."""
        with self._guard("read_known", write=False):
            return [row[0] for row in self._db.execute("SELECT key FROM plugins ORDER BY key")]

    # Requests.

    def put_request(self, key: str, action: str, argument: str = "") -> Request:
        with self._guard("put_request", write=True):
            cursor = self._db.execute(
                "INSERT INTO requests (key, action, argument, requested_at) VALUES (?, ?, ?, ?)",
                (key, action, argument, _now().isoformat()),
            )
        assert cursor.lastrowid is not None
        return Request(cursor.lastrowid, key, action, argument)

    def pending_request(self, key: str) -> Request | None:
        """The oldest request for ``key`` not answered yet."""
        with self._guard("read_requests", write=False):
            row = self._db.execute(
                "SELECT id, key, action, argument FROM requests "
                "WHERE key = ? AND answered_at IS NULL ORDER BY id LIMIT 1",
                (key,),
            ).fetchone()
        return None if row is None else Request(int(row[0]), row[1], row[2], row[3])

    def answer_request(self, id: int, outcome: str, message: str) -> None:
        with self._guard("answer_request", write=True), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "UPDATE requests SET answered_at = ?, outcome = ?, message = ? "
                "WHERE id = ? AND answered_at IS NULL RETURNING key",
                (_now().isoformat(), outcome, message, id),
            ).fetchone()
            if row is not None:
                self._db.execute(
                    "DELETE FROM requests WHERE key = ? AND answered_at IS NOT NULL AND id NOT IN "
                    "(SELECT id FROM requests WHERE key = ? ORDER BY id DESC LIMIT ?)",
                    (row[0], row[0], REQUESTS_KEPT),
                )

    def request(self, id: int) -> Request | None:
        with self._guard("read_requests", write=False):
            row = self._db.execute(
                "SELECT id, key, action, argument, outcome, message FROM requests WHERE id = ?",
                (id,),
            ).fetchone()
        if row is None:
            return None
        return Request(int(row[0]), row[1], row[2], row[3], row[4], row[5])

    # Events.

    def record(
        self, key: str, type: EventType, reason: str, message: str, when: datetime | None = None
    ) -> None:
        """Record an event (``when``: its time, if it happened earlier than now)."""
        now = (when or _now()).isoformat()
        with self._guard("record_event", write=True), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            last = self._db.execute(
                "SELECT id, type, reason, message FROM events WHERE key = ? "
                "ORDER BY id DESC LIMIT 1",
                (key,),
            ).fetchone()
            if last is not None and tuple(last[1:]) == (type, reason, message):
                self._db.execute(
                    "UPDATE events SET count = count + 1, last_time = ? WHERE id = ?",
                    (now, last[0]),
                )
                return
            self._db.execute(
                "INSERT INTO events (key, first_time, last_time, type, reason, message) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, now, now, type, reason, message),
            )
            self._db.execute(
                "DELETE FROM events WHERE key = ? AND id NOT IN "
                "(SELECT id FROM events WHERE key = ? ORDER BY id DESC LIMIT ?)",
                (key, key, EVENTS_KEPT),
            )

    def events(self, key: str) -> list[Event]:
        with self._guard("read_events", write=False):
            rows = self._db.execute(
                "SELECT type, reason, message, first_time, last_time, count FROM events "
                "WHERE key = ? ORDER BY id",
                (key,),
            ).fetchall()
        return [
            Event(
                type=row[0],
                reason=row[1],
                message=row[2],
                first_time=datetime.fromisoformat(row[3]),
                last_time=datetime.fromisoformat(row[4]),
                count=int(row[5]),
            )
            for row in rows
        ]


def _now() -> datetime:
    return datetime.now(UTC)
