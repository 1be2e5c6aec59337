"""Snapshots of plugins' state in SQLite (WAL) in the controller's data directory.

Each snapshot is what a plugin exported at a swap (or by ``bhctl state
export``): its bytes with the plugin version, state version, sha256 and
size, written in one transaction, so a snapshot is either whole or absent.
The last :data:`KEPT` per plugin are kept. The swap coordinator writes them;
``bhctl state`` and ``bhctl swap undo`` read them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controller import database
from controller.errors import ControllerError

KEPT = 10
"""Snapshots kept per plugin."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    plugin_version TEXT NOT NULL,
    state_version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    taken_at TEXT NOT NULL,
    reason TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_key ON snapshots (key, id);
CREATE TABLE IF NOT EXISTS specs (
    key TEXT NOT NULL,
    instance_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    saved_at TEXT NOT NULL,
    PRIMARY KEY (key, instance_hash)
);
CREATE TABLE IF NOT EXISTS pins (
    key TEXT PRIMARY KEY,
    declared_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    pinned_at TEXT NOT NULL
);
"""


class SnapshotNotFoundError(ControllerError):
    """No such snapshot."""


class SnapshotDamagedError(ControllerError):
    """A snapshot's bytes do not match its sha256."""


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    plugin_version: str
    state_version: int
    sha256: str
    size: int
    taken_at: datetime
    reason: str
    data: bytes = b""

    def to_document(self) -> dict[str, object]:
        return {
            "id": self.id,
            "plugin": self.key,
            "pluginVersion": self.plugin_version,
            "stateVersion": self.state_version,
            "sha256": self.sha256,
            "size": self.size,
            "takenAt": self.taken_at.isoformat(),
            "reason": self.reason,
        }


class Snapshots:
    """One SQLite file of snapshots, safe to use from one thread at a time."""

    def __init__(self, path: Path, kept: int = KEPT) -> None:
        self.kept = kept
        self._db = database.connect(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(
        self, key: str, plugin_version: str, state_version: int, data: bytes, reason: str
    ) -> Snapshot:
        """Keep ``data`` as the newest snapshot of ``key``; drop those past the last N."""
        digest = hashlib.sha256(data).hexdigest()
        taken = datetime.now(UTC)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute(
                "INSERT INTO snapshots (key, plugin_version, state_version, sha256, size, "
                "taken_at, reason, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, plugin_version, state_version, digest, len(data), taken.isoformat(),
                 reason, data),
            )  # fmt: skip
            self._db.execute(
                "DELETE FROM snapshots WHERE key = ? AND id NOT IN "
                "(SELECT id FROM snapshots WHERE key = ? ORDER BY id DESC LIMIT ?)",
                (key, key, self.kept),
            )
        return Snapshot(
            int(cursor.lastrowid or 0), key, plugin_version, state_version, digest, len(data),
            taken, reason,
        )  # fmt: skip

    def history(self, key: str) -> list[Snapshot]:
        """The snapshots of ``key``, oldest first, without their bytes."""
        rows = self._db.execute(
            "SELECT id, key, plugin_version, state_version, sha256, size, taken_at, reason "
            "FROM snapshots WHERE key = ? ORDER BY id",
            (key,),
        )
        return [_snapshot(row) for row in rows]

    def get(
        self, key: str, ident: int | None = None, *, max_state_version: int | None = None
    ) -> Snapshot:
        """A snapshot with its bytes: ``ident``, else the newest (of at most that state version)."""
        query = (
            "SELECT id, key, plugin_version, state_version, sha256, size, taken_at, reason, data "
            "FROM snapshots WHERE key = ?"
        )
        arguments: list[object] = [key]
        if ident is not None:
            query += " AND id = ?"
            arguments.append(ident)
        if max_state_version is not None:
            query += " AND state_version <= ?"
            arguments.append(max_state_version)
        row = self._db.execute(query + " ORDER BY id DESC LIMIT 1", arguments).fetchone()
        if row is None:
            which = f"snapshot {ident}" if ident is not None else "snapshot"
            raise SnapshotNotFoundError(f"{key} has no {which}; see bhctl state history {key}")
        snapshot = _snapshot(row[:8])
        data = bytes(row[8])
        if hashlib.sha256(data).hexdigest() != snapshot.sha256:
            raise SnapshotDamagedError(f"snapshot {snapshot.id} of {key} does not match its sha256")
        return Snapshot(**{**snapshot.__dict__, "data": data})


class Specs:
    """What each instance was made from, and the specs ``bhctl swap undo`` pins over declared ones.

    Kept beside the snapshots: undoing a swap needs the previous version's
    spec, which the user's files no longer hold.
    """

    def __init__(self, snapshots: Snapshots) -> None:
        self._db = snapshots._db
        self.kept = snapshots.kept

    def save(self, key: str, instance_hash: str, spec: str) -> None:
        now = datetime.now(UTC).isoformat()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO specs (key, instance_hash, spec, saved_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key, instance_hash) DO UPDATE SET saved_at = excluded.saved_at",
                (key, instance_hash, spec, now),
            )
            self._db.execute(
                "DELETE FROM specs WHERE key = ? AND instance_hash NOT IN (SELECT instance_hash "
                "FROM specs WHERE key = ? ORDER BY saved_at DESC LIMIT ?)",
                (key, key, self.kept),
            )

    def get(self, key: str, instance_hash: str) -> str | None:
        row = self._db.execute(
            "SELECT spec FROM specs WHERE key = ? AND instance_hash = ?", (key, instance_hash)
        ).fetchone()
        return None if row is None else str(row[0])

    def pin(self, key: str, declared_hash: str, spec: str) -> None:
        self._db.execute(
            "INSERT INTO pins (key, declared_hash, spec, pinned_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET declared_hash = excluded.declared_hash, "
            "spec = excluded.spec, pinned_at = excluded.pinned_at",
            (key, declared_hash, spec, datetime.now(UTC).isoformat()),
        )

    def pinned(self, key: str) -> tuple[str, str] | None:
        """The declared spec hash a pin holds for, and the spec pinned over it."""
        row = self._db.execute(
            "SELECT declared_hash, spec FROM pins WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def unpin(self, key: str) -> None:
        self._db.execute("DELETE FROM pins WHERE key = ?", (key,))


def _snapshot(row: tuple[object, ...]) -> Snapshot:
    return Snapshot(
        id=int(str(row[0])),
        key=str(row[1]),
        plugin_version=str(row[2]),
        state_version=int(str(row[3])),
        sha256=str(row[4]),
        size=int(str(row[5])),
        taken_at=datetime.fromisoformat(str(row[6])),
        reason=str(row[7]),
    )
