"""SQLite state of the daemon: what survives a restart (images today; pods and containers
are added as further migrations).

One database file, one connection, WAL journal. Every change is made inside
``Store.transaction()``, which serialises writers with a lock so the connection can be
shared by the event loop thread and worker threads (``asyncio.to_thread``).

Cost on the event loop: the statements the CRI calls make are single-row lookups or a
handful of small writes on an indexed table; in WAL mode with ``synchronous=NORMAL``
a commit does not fsync, so these run in well under a millisecond and are called
directly from async code. Anything that scans many rows or touches many files goes
through ``asyncio.to_thread`` (the callers document which).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STATE_DB = Path("/var/lib/clearcri/state.db")


class StoreError(Exception):
    """The state database cannot be opened or migrated."""


@dataclass(frozen=True)
class Migration:
    """One schema step; ``version`` is what ``PRAGMA user_version`` holds after it."""

    version: int
    name: str
    statements: tuple[str, ...]


IMAGES_SCHEMA = Migration(
    version=1,
    name="images",
    statements=(
        # One row per image; the id is the digest of the image config, as in containerd.
        """
        CREATE TABLE images (
            id TEXT PRIMARY KEY,
            manifest_digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            config TEXT NOT NULL,
            layers TEXT NOT NULL,
            passwd TEXT,
            grp TEXT,
            pinned INTEGER NOT NULL DEFAULT 0,
            created_ns INTEGER NOT NULL
        )
        """,
        # Names an image is known by: repo tags ("docker.io/library/busybox:latest") and
        # repo digests ("docker.io/library/busybox@sha256:...").
        """
        CREATE TABLE image_refs (
            ref TEXT PRIMARY KEY,
            image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
        )
        """,
        "CREATE INDEX image_refs_by_image ON image_refs(image_id)",
        # Every blob (index, manifest, config, layer) an image needs; a blob no row
        # names is garbage.
        """
        CREATE TABLE image_blobs (
            image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            digest TEXT NOT NULL,
            PRIMARY KEY (image_id, digest)
        )
        """,
        "CREATE INDEX image_blobs_by_digest ON image_blobs(digest)",
    ),
)

# Pods and containers: one JSON document per row (the records in cri/runtime/state.py).
RUNTIME_SCHEMA = Migration(
    version=2,
    name="pods and containers",
    statements=(
        "CREATE TABLE pods (id TEXT PRIMARY KEY, data TEXT NOT NULL)",
        """
        CREATE TABLE containers (
            id TEXT PRIMARY KEY,
            pod_id TEXT NOT NULL,
            data TEXT NOT NULL
        )
        """,
        "CREATE INDEX containers_by_pod ON containers(pod_id)",
    ),
)

# Append-only: a new table or column is a new Migration with the next version.
MIGRATIONS: tuple[Migration, ...] = (IMAGES_SCHEMA, RUNTIME_SCHEMA)


def _owner_only(path: Path) -> None:
    """The database holds pod and container configs (environment variables included, so
    secrets): readable by root alone. SQLite gives its -wal and -shm files the mode of
    the database file; files an older daemon made are narrowed too."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open state database {path}: {exc}") from exc


class Store:
    """The daemon's SQLite database (thread-safe; see the module docstring for costs)."""

    def __init__(
        self, path: Path = DEFAULT_STATE_DB, migrations: Sequence[Migration] = MIGRATIONS
    ) -> None:
        self.path = path
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        _owner_only(path)
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate(migrations)

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute("PRAGMA user_version").fetchone()
        return int(row[0])

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)):
            raise StoreError(f"migration versions must be unique and ascending: {versions}")
        current = self.schema_version
        newest = versions[-1] if versions else 0
        if current > newest:
            raise StoreError(
                f"state database {self.path} has schema version {current}, newer than this "
                f"clearcri knows ({newest}); run a newer clearcri or move the file away"
            )
        for migration in migrations:
            if migration.version <= current:
                continue
            try:
                with self.transaction() as conn:
                    for statement in migration.statements:
                        conn.execute(statement)
                    # PRAGMA does not take parameters; the version is an int we own.
                    conn.execute(f"PRAGMA user_version = {int(migration.version)}")
            except sqlite3.Error as exc:
                raise StoreError(
                    f"migration {migration.version} ({migration.name}) of {self.path} failed: {exc}"
                ) from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on normal exit, rolled back on an exception.

        Nested use from the same thread joins the outer transaction.
        """
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read statement and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            self._conn.close()
