"""The SQLite state module: migrations, transactions, and the image tables."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from cri.store import MIGRATIONS, Migration, Store, StoreError


def test_fresh_database_gets_all_migrations_in_wal_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.schema_version == MIGRATIONS[-1].version
    assert store.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
    tables = {r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"images", "image_refs", "image_blobs"} <= tables
    store.close()


def test_migrations_run_once_and_later_ones_are_added(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    extra = Migration(len(MIGRATIONS) + 1, "later", ("CREATE TABLE later (id TEXT PRIMARY KEY)",))
    store = Store(path, (*MIGRATIONS, extra))
    assert store.schema_version == extra.version
    store.close()
    Store(path, (*MIGRATIONS, extra)).close()  # nothing left to do
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_bad_migration_lists_are_refused(tmp_path: Path) -> None:
    bad = (Migration(2, "b", ()), Migration(1, "a", ()))
    with pytest.raises(StoreError, match="ascending"):
        Store(tmp_path / "x.db", bad)


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute(
            "INSERT INTO images (id, manifest_digest, size, config, layers, created_ns) "
            "VALUES ('sha256:x', 'm', 1, '{}', '[]', 0)"
        )
        raise RuntimeError("boom")
    assert store.query("SELECT * FROM images") == []


def test_foreign_keys_cascade(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO images (id, manifest_digest, size, config, layers, created_ns) "
            "VALUES ('sha256:x', 'm', 1, '{}', '[]', 0)"
        )
        conn.execute("INSERT INTO image_refs VALUES ('r:1', 'sha256:x', 'tag')")
        conn.execute("INSERT INTO image_blobs VALUES ('sha256:x', 'sha256:blob')")
    with store.transaction() as conn:
        conn.execute("DELETE FROM images")
    assert store.query("SELECT * FROM image_refs") == []
    assert store.query("SELECT * FROM image_blobs") == []
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        conn.execute("INSERT INTO image_refs VALUES ('r:2', 'sha256:none', 'tag')")


def test_shared_between_threads(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")

    def writer(n: int) -> None:
        for i in range(50):
            with store.transaction() as conn:
                conn.execute(
                    "INSERT INTO images (id, manifest_digest, size, config, layers, created_ns) "
                    "VALUES (?, 'm', 1, '{}', '[]', 0)",
                    (f"sha256:{n}-{i}",),
                )

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.query_one("SELECT count(*) FROM images")[0] == 200  # type: ignore[index]


def test_the_database_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    """Pod and container configs (secrets in env) once sat in a 0644 state.db."""
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    (tmp_path / "old.db-wal").touch(mode=0o644)
    for path in (tmp_path / "new.db", old):
        store = Store(path)
        store.close()
        for suffix in ("", "-wal", "-shm"):
            file = Path(f"{path}{suffix}")
            if file.exists():
                assert file.stat().st_mode & 0o777 == 0o600, file
