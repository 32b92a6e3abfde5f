"""A template's RAM file has no holes, so clones' faults never add pages to it."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.template import fill_holes


def test_fill_holes_allocates_every_page_of_a_sparse_tmpfs_file() -> None:
    path = Path(f"/dev/shm/clearcri-test-ram-{os.getpid()}")
    try:
        with path.open("wb") as f:
            f.truncate(8 << 20)
            f.seek(4096)
            f.write(b"guest data")
        assert path.stat().st_blocks * 512 < 1 << 20  # sparse: one page written
        fill_holes(path)
        assert path.stat().st_blocks * 512 >= 8 << 20
        data = path.read_bytes()
        assert data[4096:4106] == b"guest data"  # what the guest wrote is kept
        assert data[:4096] == bytes(4096)
    finally:
        path.unlink(missing_ok=True)
