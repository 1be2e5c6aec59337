"""The catalog of installed bundles, in SQLite in the controller's data directory, and search.

One row per installed ``name@version``: the manifest's exact signed bytes,
its signature and signer, the bundle's sha256 (its cached file is
``registry/bundles/<sha256>.bundle``) and the image digest. Safe for
concurrent use: a lock serialises this process's threads, and SQLite's WAL
and busy timeout serialise the controller and ``bhctl plugin`` processes.
:func:`rank` orders anything with a name, version, description, author,
category and capabilities for a query; the catalog and a marketplace
index are searched the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

from controller import database
from controller.registry import manifest as manifest_module
from controller.spec import models
from controller.spec.semver import Version

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    manifest BLOB NOT NULL,
    signature BLOB,
    key_id TEXT,
    source TEXT NOT NULL,
    installed_at TEXT NOT NULL,
    loaded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, version)
);
"""


@dataclass(frozen=True)
class Entry:
    """An installed bundle."""

    manifest: manifest_module.Manifest
    manifest_bytes: bytes
    signature: bytes | None
    key_id: str | None
    """The trusted key that signed it; None for an unsigned bundle the policy let in."""
    sha256: str
    """Of the bundle file, as cached."""
    image_digest: str
    source: str
    """Where it was installed from."""
    installed_at: datetime
    loaded: bool = False
    """Whether an install of it loaded its image into the engine (False: the engine had it
    already, so removing the bundle leaves the image)."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> Version:
        return self.manifest.version

    @property
    def requires(self) -> list[models.Dependency]:
        return self.manifest.requires

    @property
    def description(self) -> str:
        return self.manifest.description

    @property
    def author(self) -> str:
        return self.manifest.author

    @property
    def category(self) -> str:
        return self.manifest.category

    @property
    def provides(self) -> list[str]:
        return self.manifest.provides

    def to_document(self) -> dict[str, object]:
        return {
            **self.manifest.to_document(),
            "bundleSha256": self.sha256,
            "signedBy": self.key_id,
            "source": self.source,
            "installedAt": self.installed_at.isoformat(),
        }


class Catalog:
    """The installed bundles; every method may be called from any thread."""

    def __init__(self, path: Path) -> None:
        self._db = database.connect(path, _SCHEMA)
        self._lock = threading.Lock()
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(bundles)")}
        if "loaded" not in columns:  # a catalog from before images loaded were recorded
            self._db.execute("ALTER TABLE bundles ADD COLUMN loaded INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(
        self,
        found: manifest_module.Manifest,
        manifest_bytes: bytes,
        signature: bytes | None,
        key_id: str | None,
        sha256: str,
        source: str,
        loaded: bool = False,
    ) -> Entry:
        """Record an installed bundle, replacing one of the same name and version (``loaded``:
        whether this install loaded its image; once loaded, it stays so)."""
        now = datetime.now(UTC)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO bundles (name, version, sha256, image_digest, manifest, signature, "
                "key_id, source, installed_at, loaded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, version) DO UPDATE SET sha256 = excluded.sha256, "
                "image_digest = excluded.image_digest, manifest = excluded.manifest, "
                "signature = excluded.signature, key_id = excluded.key_id, "
                "source = excluded.source, installed_at = excluded.installed_at, "
                "loaded = MAX(bundles.loaded, excluded.loaded)",
                (found.name, str(found.version), sha256, found.image_digest or "",
                 manifest_bytes, signature, key_id, source, now.isoformat(), int(loaded)),
            )  # fmt: skip
            row = self._db.execute(
                "SELECT loaded FROM bundles WHERE name = ? AND version = ?",
                (found.name, str(found.version)),
            ).fetchone()
        return Entry(
            found, manifest_bytes, signature, key_id, sha256, found.image_digest or "", source,
            now, bool(row[0]),
        )  # fmt: skip

    def remove(self, name: str, version: Version | None = None) -> list[Entry]:
        """Forget ``name`` (one version, or all); the entries removed."""
        gone = [e for e in self.versions(name) if version is None or e.version == version]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for entry in gone:
                self._db.execute(
                    "DELETE FROM bundles WHERE name = ? AND version = ?",
                    (entry.name, str(entry.version)),
                )
        return gone

    def versions(self, name: str) -> list[Entry]:
        """The installed versions of ``name``, lowest first."""
        return sorted(self._select("WHERE name = ?", (name,)), key=lambda e: e.version)

    def entries(self) -> list[Entry]:
        """Every installed bundle, by name, then version."""
        return sorted(self._select("", ()), key=lambda e: (e.name, e.version))

    def uses(self, sha256: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM bundles WHERE sha256 = ?", (sha256,))
            return int(row.fetchone()[0])

    def uses_image(self, digest: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM bundles WHERE image_digest = ?", (digest,))
            return int(row.fetchone()[0])

    def _select(self, where: str, arguments: tuple[object, ...]) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT manifest, signature, key_id, sha256, image_digest, source, installed_at, "
                "loaded "
                f"FROM bundles {where}",
                arguments,
            ).fetchall()
        return [
            Entry(
                manifest_module.parse(bytes(row[0]), "catalog"),
                bytes(row[0]),
                None if row[1] is None else bytes(row[1]),
                row[2],
                str(row[3]),
                str(row[4]),
                str(row[5]),
                datetime.fromisoformat(str(row[6])),
                bool(row[7]),
            )
            for row in rows
        ]


class Listing(Protocol):
    """What search reads of a bundle."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> Version: ...

    @property
    def description(self) -> str: ...

    @property
    def author(self) -> str: ...

    @property
    def category(self) -> str: ...

    @property
    def provides(self) -> list[str]: ...


L = TypeVar("L", bound=Listing)


def _capability_matches(capability: str, wanted: str) -> bool:
    """``storage`` matches ``storage.kv``; ``storage.kv`` matches only itself."""
    return capability == wanted or capability.startswith(wanted + ".")


def score(item: Listing, token: str) -> int:
    """How well one query word matches: the name counts most, then capabilities, category,
    author, then the description."""
    token = token.lower()
    name, points = item.name.lower(), 0
    if name == token:
        points += 10
    elif token in name:
        points += 6
    if any(_capability_matches(c, token) for c in item.provides):
        points += 5
    elif any(token in c for c in item.provides):
        points += 3
    if item.category.lower() == token:
        points += 4
    if token in item.author.lower():
        points += 3
    words = item.description.lower().replace(",", " ").replace(".", " ").split()
    if token in words:
        points += 2
    elif token in item.description.lower():
        points += 1
    return points


def rank(
    items: Iterable[L],
    query: str = "",
    *,
    provides: str | None = None,
    author: str | None = None,
    category: str | None = None,
    all_versions: bool = False,
) -> list[tuple[int, L]]:
    """The items matching every filter and every query word, best first, with their scores.

    ``provides`` is a capability (``storage`` also matches ``storage.kv``),
    ``author`` a case-insensitive part of the author, ``category`` the
    category, case-insensitive. Only each name's highest version is kept
    unless ``all_versions``.
    """
    tokens = query.split()
    found: list[tuple[int, L]] = []
    for item in items:
        if provides and not any(_capability_matches(c, provides) for c in item.provides):
            continue
        if author and author.lower() not in item.author.lower():
            continue
        if category and category.lower() != item.category.lower():
            continue
        scores = [score(item, t) for t in tokens]
        if any(s == 0 for s in scores):
            continue
        found.append((sum(scores), item))
    if not all_versions:
        best: dict[str, tuple[int, L]] = {}
        for points, item in found:
            if item.name not in best or best[item.name][1].version < item.version:
                best[item.name] = (points, item)
        found = list(best.values())
    found.sort(key=lambda pair: (-pair[0], pair[1].name, _descending(pair[1].version)))
    return found


def _descending(version: Version) -> tuple[int, ...]:
    return (-version.major, -version.minor, -version.patch)


def latest(entries: Sequence[Entry]) -> Entry | None:
    return max(entries, key=lambda e: e.version, default=None)
