"""The content store: verified blobs on disk, addressed by digest.

Layout under the image root::

    blobs/sha256/<hex>     one file per blob, immutable, mode 0444
    tmp/                   blobs being written (removed at start: an interrupted pull
                           leaves nothing behind)

A blob is written to a temporary file, checked against its descriptor's digest and
size, fsynced, and only then renamed to its final name; a blob under ``blobs/`` is
always complete and verified.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from cri.images.errors import ContentVerificationError
from cri.images.manifest import Descriptor
from cri.images.reference import ReferenceError, validate_digest
from cri.images.registry import check_content, new_hasher


class BlobWriter:
    """Receives one blob's bytes; ``commit()`` verifies and publishes it.

    Leaving the ``with`` block without a commit removes the temporary file.
    """

    def __init__(self, store: ContentStore, desc: Descriptor, what: str) -> None:
        self._store = store
        self.desc = desc
        self.what = what
        self.tmp = store.tmp_dir / f"{desc.digest.replace(':', '-')}.{secrets.token_hex(4)}"
        self._file = open(self.tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        self._hasher: Any = new_hasher(desc.digest)
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.desc.size:
            raise ContentVerificationError(
                f"{self.what} is longer than the {self.desc.size} bytes its manifest says; "
                "nothing was stored"
            )
        self._hasher.update(chunk)
        self._file.write(chunk)

    def reset(self) -> None:
        """Start again from byte 0 (a retried download)."""
        self._file.seek(0)
        self._file.truncate()
        self._hasher = new_hasher(self.desc.digest)
        self.written = 0

    def commit(self) -> Path:
        """Check digest and size, make the blob durable and visible; return its path."""
        check_content(self.desc, self.written, self._hasher, self.what)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp, 0o444)
        final = self._store.path(self.desc.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, final)
        return final

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"

    def prepare(self) -> None:
        """Create the directories and drop leftovers of interrupted writes."""
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        return self.blobs_dir / algorithm / encoded

    def exists(self, desc: Descriptor) -> bool:
        try:
            return self.path(desc.digest).stat().st_size == desc.size
        except FileNotFoundError:
            return False

    def writer(self, desc: Descriptor, what: str) -> BlobWriter:
        return BlobWriter(self, desc, what)

    def put(self, desc: Descriptor, data: bytes, what: str) -> Path:
        """Store a small blob already in memory (verified like any other)."""
        if self.exists(desc):
            return self.path(desc.digest)
        with self.writer(desc, what) as writer:
            writer.write(data)
            return writer.commit()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def digests(self) -> set[str]:
        """Every stored blob's digest."""
        found: set[str] = set()
        if not self.blobs_dir.is_dir():
            return found
        for algorithm_dir in self.blobs_dir.iterdir():
            for entry in algorithm_dir.iterdir():
                digest = f"{algorithm_dir.name}:{entry.name}"
                try:
                    found.add(validate_digest(digest))
                except ReferenceError:
                    continue
        return found

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
