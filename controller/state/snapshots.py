"""Snapshots and checkpoints of plugins' state in SQLite (WAL) in the controller's data directory.

A snapshot is what a plugin exported: its bytes with the plugin version,
state version, sha256, size and, from plugins that keep revisions, the
revision it is at. A *delta* snapshot holds only the changes from the
revision ``base_revision`` to ``revision``; a full snapshot followed by the
deltas that chain on it is the state at the last delta's revision.

Written whole (``save``: ``bhctl state export``, before an import) or
streamed (``write``: checkpoints and swaps, chunk by chunk, never held whole
in memory). A streamed snapshot is marked complete only once its last chunk
is in and its sha256 checked, so one cut short by a crash or a full disk is
never read (and is removed when the store opens). Reads check the sha256;
a damaged snapshot raises :class:`SnapshotDamagedError`.

Kept: the last :data:`KEPT` whole snapshots per plugin, and the checkpoints
of the last :data:`CHAINS_KEPT` full checkpoints (each with its deltas).
The swap coordinator and the reconciler write them; ``bhctl state`` and
``bhctl swap undo`` read them.

A full or read-only disk or an I/O error raises
:class:`~controller.errors.StoreUnavailableError` (told to the
:class:`~controller.database.Health` given). A damaged file (garbage in its
pages or its header) is moved aside as ``snapshots.db.damaged-TIME`` and
replaced by a fresh one, at most once per backoff: what it held is only a
copy of plugins' state, so the plugins go on without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controller import database
from controller.errors import ControllerError, StoreUnavailableError

KEPT = 10
"""Whole snapshots kept per plugin: of exports, and apart from them of the others (imports,
the state an import replaced)."""
EXPORT = "export"
"""The reason of a snapshot taken by ``bhctl state export``."""
CHAINS_KEPT = 2
"""Full checkpoints kept per plugin, each with the deltas that follow it."""
STORE = "snapshots"
"""This store's name in :class:`~controller.database.Health` and the metrics."""
CHECKPOINT_REASONS = ("checkpoint", "swap")
"""Reasons of the snapshots pruned by chain (streamed), not by count."""
REVISIONS_KEPT = 10
"""Revisions kept per plugin (as Argo Rollouts' ``revisionHistoryLimit``); older ones are
dropped."""

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
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    snapshot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (snapshot, seq)
);
CREATE TABLE IF NOT EXISTS revisions (
    key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    instance_hash TEXT NOT NULL,
    version TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    result_at TEXT,
    PRIMARY KEY (key, revision)
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
    revision: str = ""
    base_revision: str = ""
    """Set on a delta: the revision it applies on."""

    @property
    def delta(self) -> bool:
        return bool(self.base_revision)

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
            "revision": self.revision,
            "delta": self.delta,
        }


_COLUMNS = (
    "id, key, plugin_version, state_version, sha256, size, taken_at, reason, revision, "
    "base_revision"
)
_ADDED = {
    "revision": "TEXT NOT NULL DEFAULT ''",
    "base_revision": "TEXT NOT NULL DEFAULT ''",
    "chunked": "INTEGER NOT NULL DEFAULT 0",
    "complete": "INTEGER NOT NULL DEFAULT 1",
}
"""Columns added since the first schema, with how existing rows read."""


class Snapshots:
    """One SQLite file of snapshots, safe to use from one thread at a time."""

    def __init__(self, path: Path, kept: int = KEPT, health: database.Health | None = None) -> None:
        self.path = path
        self.kept = kept
        self.health = health or database.Health()
        self.health.resettable.add(STORE)
        self._reset_lock = threading.Lock()
        try:
            with self.guard("open", write=True):
                self._db = self._open()
        except StoreUnavailableError as e:
            if e.reason != "Damaged":
                raise
            self._db = self._reset(str(e.__cause__ or e))

    def _open(self) -> sqlite3.Connection:
        db = database.connect(self.path, _SCHEMA)
        try:
            present = {row[1] for row in db.execute("PRAGMA table_info(snapshots)")}
            for column, declaration in _ADDED.items():
                if column not in present:
                    db.execute(f"ALTER TABLE snapshots ADD COLUMN {column} {declaration}")
            _remove_incomplete(db)
            _revisions_from_specs(db)
        except BaseException:
            db.close()
            raise
        return db

    def _reset(self, why: str) -> sqlite3.Connection:
        """Move the damaged file aside, open a fresh one and say so (once per reset)."""
        moved = database.move_aside(self.path)
        self.health.reset(STORE, self.path, moved, why)
        with self.guard("open", write=True):
            return self._open()

    def close(self) -> None:
        self._db.close()

    @property
    def db(self) -> sqlite3.Connection:
        return self._db

    @contextlib.contextmanager
    def guard(self, operation: str, *, write: bool) -> Iterator[None]:
        """Run an operation on the file: faults reported and raised as
        :class:`StoreUnavailableError`; a damaged file replaced (at most once per backoff)."""
        try:
            with self.health.guard(STORE, self.path, operation, write=write):
                yield
        except StoreUnavailableError as e:
            if e.reason == "Damaged" and operation != "open":
                with self._reset_lock:
                    if self.health.may_reset(STORE, time.monotonic()):
                        # The old connection is left to close with its last user.
                        self._db = self._reset(str(e.__cause__ or e))
            raise

    def save(
        self, key: str, plugin_version: str, state_version: int, data: bytes, reason: str
    ) -> Snapshot:
        """Keep ``data`` as the newest snapshot of ``key``; drop those past the last N."""
        with self.guard("save", write=True):
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
                # Exports are pruned among themselves: taking copies never pushes out the
                # snapshots an import or an undo keeps.
                kinds: tuple[str, ...]
                if reason == EXPORT:
                    kind, kinds = "reason = ?", (EXPORT,)
                else:
                    kind, kinds = "reason NOT IN (?, ?, ?)", (*CHECKPOINT_REASONS, EXPORT)
                self._db.execute(
                    f"DELETE FROM snapshots WHERE key = ? AND {kind} AND id NOT IN "
                    f"(SELECT id FROM snapshots WHERE key = ? AND {kind} "
                    "ORDER BY id DESC LIMIT ?)",
                    (key, *kinds, key, *kinds, self.kept),
                )
            return Snapshot(
                int(cursor.lastrowid or 0), key, plugin_version, state_version, digest, len(data),
                taken, reason,
            )  # fmt: skip

    # Streamed snapshots (checkpoints, swaps).

    def begin(
        self,
        key: str,
        plugin_version: str,
        state_version: int,
        reason: str,
        *,
        sha256: str,
        size: int,
        revision: str,
        base_revision: str = "",
        taken: datetime | None = None,
    ) -> int:
        """Start a streamed snapshot; its id, for :meth:`append` and :meth:`finish`.

        ``taken``: when the state was asked for (default now).
        """
        with self.guard("begin", write=True):
            cursor = self._db.execute(
                "INSERT INTO snapshots (key, plugin_version, state_version, sha256, size, "
                "taken_at, reason, data, revision, base_revision, chunked, complete) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, x'', ?, ?, 1, 0)",
                (key, plugin_version, state_version, sha256, size,
                 (taken or datetime.now(UTC)).isoformat(), reason, revision, base_revision),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    def append(self, ident: int, seq: int, data: bytes) -> None:
        with self.guard("append", write=True):
            self._db.execute(
                "INSERT INTO snapshot_chunks (snapshot, seq, data) VALUES (?, ?, ?)",
                (ident, seq, data),
            )

    def finish(self, ident: int, key: str) -> Snapshot:
        """Mark a streamed snapshot complete; prune the chains past the last kept."""
        with self.guard("finish", write=True):
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("UPDATE snapshots SET complete = 1 WHERE id = ?", (ident,))
                fulls = self._db.execute(
                    "SELECT id FROM snapshots WHERE key = ? AND reason IN (?, ?) AND complete = 1 "
                    "AND base_revision = '' ORDER BY id DESC LIMIT ?",
                    (key, *CHECKPOINT_REASONS, CHAINS_KEPT),
                ).fetchall()
                if len(fulls) == CHAINS_KEPT:
                    oldest = fulls[-1][0]
                    doomed = (
                        "SELECT id FROM snapshots WHERE key = ? AND reason IN (?, ?) AND id < ?"
                    )
                    arguments = (key, *CHECKPOINT_REASONS, oldest)
                    self._db.execute(
                        f"DELETE FROM snapshot_chunks WHERE snapshot IN ({doomed})", arguments
                    )
                    self._db.execute(f"DELETE FROM snapshots WHERE id IN ({doomed})", arguments)
            return self._meta(ident)

    def abandon(self, ident: int) -> None:
        """Drop a streamed snapshot that will not be finished."""
        with self.guard("abandon", write=True), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM snapshot_chunks WHERE snapshot = ?", (ident,))
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (ident,))

    def chunks(self, ident: int) -> Iterator[bytes]:
        """The bytes of snapshot ``ident`` in its stored chunks (the whole, for a saved one)."""
        with self.guard("chunks", write=False):
            found = self._db.execute(
                "SELECT chunked, data FROM snapshots WHERE id = ?", (ident,)
            ).fetchone()
        if found is None:
            raise SnapshotNotFoundError(f"no snapshot {ident}")
        if not found[0]:
            yield bytes(found[1])
            return
        seq = 0
        while True:
            part = self.chunk(ident, seq)
            if part is None:
                return
            yield part
            seq += 1

    def chunk(self, ident: int, seq: int) -> bytes | None:
        """One stored chunk of a snapshot; None past the last. A snapshot saved whole (an
        export, an import) is its own one chunk."""
        with self.guard("chunk", write=False):
            part = self._db.execute(
                "SELECT data FROM snapshot_chunks WHERE snapshot = ? AND seq = ?", (ident, seq)
            ).fetchone()
            if part is not None:
                return bytes(part[0])
            if seq:
                return None
            whole = self._db.execute(
                "SELECT chunked, data FROM snapshots WHERE id = ?", (ident,)
            ).fetchone()
            if whole is None or whole[0] or whole[1] is None:
                return None
            return bytes(whole[1])

    def checkpoints(self, key: str) -> list[Snapshot]:
        """The complete streamed snapshots of ``key`` (checkpoints, swaps), oldest first."""
        with self.guard("checkpoints", write=False):
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE key = ? AND reason IN (?, ?) "
                "AND complete = 1 AND chunked = 1 ORDER BY id",
                (key, *CHECKPOINT_REASONS),
            )
            return [_snapshot(row) for row in rows]

    def restore_chain(self, key: str, newer_than: int = 0) -> list[Snapshot]:
        """The newest full checkpoint (older than id ``newer_than``, if set) and its deltas.

        The deltas are those that follow it link by link (each on the one
        before's revision); the chain stops at the first that does not.
        """
        found = self.checkpoints(key)
        fulls = [s for s in found if not s.delta and (not newer_than or s.id < newer_than)]
        if not fulls:
            return []
        chain = [fulls[-1]]
        for snapshot in found:
            if snapshot.id > chain[-1].id and snapshot.delta:
                if snapshot.base_revision != chain[-1].revision:
                    break
                chain.append(snapshot)
        return chain

    def newest_full(self, key: str, max_state_version: int) -> Snapshot:
        """The newest full checkpoint (of a pass or a swap) of at most that state version,
        without its bytes: never an export or an import, which are no checkpoints."""
        with self.guard("newest_full", write=False):
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE key = ? AND complete = 1 "
                "AND reason IN (?, ?) AND base_revision = '' AND state_version <= ? "
                "ORDER BY id DESC LIMIT 1",
                (key, *CHECKPOINT_REASONS, max_state_version),
            ).fetchone()
            if row is None:
                raise SnapshotNotFoundError(
                    f"{key} has no snapshot of state version {max_state_version} or older"
                )
            return _snapshot(row)

    def _meta(self, ident: int) -> Snapshot:
        with self.guard("meta", write=False):
            row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (ident,))
            found = row.fetchone()
            if found is None:
                raise SnapshotNotFoundError(f"no snapshot {ident}")
            return _snapshot(found)

    def history(self, key: str) -> list[Snapshot]:
        """The snapshots of ``key``, oldest first, without their bytes."""
        with self.guard("history", write=False):
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE key = ? AND complete = 1 ORDER BY id",
                (key,),
            )
            return [_snapshot(row) for row in rows]

    def get(
        self, key: str, ident: int | None = None, *, max_state_version: int | None = None
    ) -> Snapshot:
        """A whole snapshot with its bytes: ``ident`` (of any kind), else the newest full
        checkpoint (of at most that state version; never an export or an import). Deltas hold
        only changes: asked for by id, they come as they are."""
        query = f"SELECT {_COLUMNS} FROM snapshots WHERE key = ? AND complete = 1"
        arguments: list[object] = [key]
        if ident is not None:
            query += " AND id = ?"
            arguments.append(ident)
        else:
            query += " AND base_revision = '' AND reason IN (?, ?)"
            arguments += CHECKPOINT_REASONS
        if max_state_version is not None:
            query += " AND state_version <= ?"
            arguments.append(max_state_version)
        with self.guard("get", write=False):
            row = self._db.execute(query + " ORDER BY id DESC LIMIT 1", arguments).fetchone()
        if row is None:
            which = f"snapshot {ident}" if ident is not None else "snapshot"
            raise SnapshotNotFoundError(f"{key} has no {which}; see bhctl state history {key}")
        snapshot = _snapshot(row)
        data = b"".join(self.chunks(snapshot.id))
        if hashlib.sha256(data).hexdigest() != snapshot.sha256:
            raise SnapshotDamagedError(f"snapshot {snapshot.id} of {key} does not match its sha256")
        return dataclasses.replace(snapshot, data=data)


@dataclass(frozen=True)
class Revision:
    """One applied spec of a plugin, numbered from 1 in the order its instances were first
    made from it; a spec made again later (``bhctl swap undo``) is a new revision."""

    key: str
    revision: int
    instance_hash: str
    version: str
    spec: str
    """The spec, as JSON."""
    created_at: datetime
    result: str = ""
    """How the swap to it ended: InProgress, Promoted, RolledBack, Aborted; "" when it
    started with no swap (the first one, a replacement)."""
    reason: str = ""
    result_at: datetime | None = None

    def to_document(self) -> dict[str, object]:
        return {
            "revision": self.revision,
            "plugin": self.key,
            "version": self.version,
            "specHash": self.instance_hash,
            "createdAt": self.created_at.isoformat(),
            "result": self.result or "None",
            "reason": self.reason,
            "resultAt": self.result_at.isoformat() if self.result_at else None,
        }


_REVISION_COLUMNS = (
    "key, revision, instance_hash, version, spec, created_at, result, reason, result_at"
)


class Specs:
    """The revisions of each plugin (what its instances were made from), and the specs
    ``bhctl swap undo`` pins over declared ones.

    Kept beside the snapshots: undoing a swap needs the previous version's
    spec, which the user's files no longer hold.
    """

    def __init__(self, snapshots: Snapshots, kept: int | None = None) -> None:
        self._snapshots = snapshots
        self.guard = snapshots.guard
        self.kept = REVISIONS_KEPT if kept is None else kept

    @property
    def _db(self) -> sqlite3.Connection:
        return self._snapshots.db

    def save(self, key: str, instance_hash: str, spec: str) -> int:
        """Keep the spec an instance is made from; its revision number.

        The newest revision when it has this hash (a restart, the same spec
        again): nothing is written. Else a new revision, numbered after the newest.
        """
        newest = self._newest(key)
        if newest is not None and newest[1] == instance_hash:
            return newest[0]
        version = str(json.loads(spec).get("version", ""))
        with self.guard("spec_save", write=True), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT revision, instance_hash FROM revisions WHERE key = ? "
                "ORDER BY revision DESC LIMIT 1",
                (key,),
            ).fetchone()
            if row is not None and row[1] == instance_hash:
                return int(row[0])
            revision = 1 if row is None else int(row[0]) + 1
            self._db.execute(
                "INSERT INTO revisions (key, revision, instance_hash, version, spec, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, revision, instance_hash, version, spec, datetime.now(UTC).isoformat()),
            )
            self._db.execute(
                "DELETE FROM revisions WHERE key = ? AND revision <= ?",
                (key, revision - self.kept),
            )
            return revision

    def _newest(self, key: str) -> tuple[int, str] | None:
        with self.guard("spec_get", write=False):
            row = self._db.execute(
                "SELECT revision, instance_hash FROM revisions WHERE key = ? "
                "ORDER BY revision DESC LIMIT 1",
                (key,),
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def get(self, key: str, instance_hash: str) -> str | None:
        """The spec of the newest revision made of ``instance_hash``."""
        with self.guard("spec_get", write=False):
            row = self._db.execute(
                "SELECT spec FROM revisions WHERE key = ? AND instance_hash = ? "
                "ORDER BY revision DESC LIMIT 1",
                (key, instance_hash),
            ).fetchone()
            return None if row is None else str(row[0])

    def revision(self, key: str, revision: int) -> Revision | None:
        with self.guard("revision_get", write=False):
            row = self._db.execute(
                f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE key = ? AND revision = ?",
                (key, revision),
            ).fetchone()
        return None if row is None else _revision(row)

    def revisions(self, key: str) -> list[Revision]:
        """The revisions kept of ``key``, oldest first."""
        with self.guard("revision_list", write=False):
            rows = self._db.execute(
                f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE key = ? ORDER BY revision",
                (key,),
            ).fetchall()
        return [_revision(row) for row in rows]

    def settle(self, key: str, instance_hash: str, result: str, reason: str = "") -> None:
        """Record how the swap to the newest revision made of ``instance_hash`` went."""
        with self.guard("revision_result", write=True):
            self._db.execute(
                "UPDATE revisions SET result = ?, reason = ?, result_at = ? WHERE key = ? "
                "AND revision = (SELECT MAX(revision) FROM revisions "
                "WHERE key = ? AND instance_hash = ?)",
                (result, reason, datetime.now(UTC).isoformat(), key, key, instance_hash),
            )

    def pin(self, key: str, declared_hash: str, spec: str) -> None:
        with self.guard("spec_pin", write=True):
            self._db.execute(
                "INSERT INTO pins (key, declared_hash, spec, pinned_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET declared_hash = excluded.declared_hash, "
                "spec = excluded.spec, pinned_at = excluded.pinned_at",
                (key, declared_hash, spec, datetime.now(UTC).isoformat()),
            )

    def pinned(self, key: str) -> tuple[str, str] | None:
        """The declared spec hash a pin holds for, and the spec pinned over it."""
        with self.guard("spec_pinned", write=False):
            row = self._db.execute(
                "SELECT declared_hash, spec FROM pins WHERE key = ?", (key,)
            ).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

    def unpin(self, key: str) -> None:
        with self.guard("spec_unpin", write=True):
            self._db.execute("DELETE FROM pins WHERE key = ?", (key,))


def _revision(row: tuple[object, ...]) -> Revision:
    return Revision(
        key=str(row[0]),
        revision=int(str(row[1])),
        instance_hash=str(row[2]),
        version=str(row[3]),
        spec=str(row[4]),
        created_at=datetime.fromisoformat(str(row[5])),
        result=str(row[6] or ""),
        reason=str(row[7] or ""),
        result_at=datetime.fromisoformat(str(row[8])) if row[8] else None,
    )


def _revisions_from_specs(db: sqlite3.Connection) -> None:
    """A file of an earlier controller kept one spec per instance hash (``specs``): they
    become the first revisions, in the order they were saved."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'specs'").fetchone() is None:
        return
    with db:
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute(
            "SELECT key, instance_hash, spec, saved_at FROM specs ORDER BY key, saved_at"
        ).fetchall()
        numbers: dict[str, int] = {}
        for key, instance_hash, spec, saved_at in rows:
            numbers[key] = numbers.get(key, 0) + 1
            try:
                version = str(json.loads(spec).get("version", ""))
            except ValueError:
                version = ""
            db.execute(
                "INSERT OR IGNORE INTO revisions "
                "(key, revision, instance_hash, version, spec, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, numbers[key], instance_hash, version, spec, saved_at),
            )
        db.execute("DROP TABLE specs")


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
        revision=str(row[8] or ""),
        base_revision=str(row[9] or ""),
    )


def _remove_incomplete(db: sqlite3.Connection) -> None:
    """Streamed snapshots cut short (by a crash of ours, a full disk): never read, removed."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "DELETE FROM snapshot_chunks WHERE snapshot IN "
            "(SELECT id FROM snapshots WHERE complete = 0)"
        )
        db.execute("DELETE FROM snapshots WHERE complete = 0")
