"""Deterministic cpio "newc" archives, as the Linux kernel unpacks them for an initramfs.

The writer is pure Python so that an initramfs can hold device nodes and root-owned
files without privileges, and so that the same inputs always give the same bytes:
entries are sorted, parent directories are added implicitly, inode numbers are assigned
in order and every timestamp is fixed.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
FIXED_MTIME = 0
_HEADER_LEN = 110


class CpioFormatError(ValueError):
    """A cpio archive could not be parsed."""


@dataclass(frozen=True)
class CpioEntry:
    """One member of an archive.

    ``path`` is relative (no leading slash). ``mode`` is a full ``st_mode`` including the
    file type bits. ``data`` is the file content, or the target for a symlink.
    """

    path: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    mtime: int = FIXED_MTIME

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def _normalize(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid archive path: {path!r}")
    return "/".join(parts)


def _pad4(length: int) -> bytes:
    return b"\0" * ((4 - length % 4) % 4)


class Initramfs:
    """An in-memory set of entries written out as one sorted newc archive."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and _normalize(path) in self._entries

    def _put(self, entry: CpioEntry) -> None:
        existing = self._entries.get(entry.path)
        if existing is not None and not (existing.is_dir and entry.is_dir):
            raise ValueError(f"duplicate archive path: {entry.path}")
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(CpioEntry(_normalize(path), stat.S_IFDIR | (mode & 0o7777)))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(CpioEntry(_normalize(path), stat.S_IFREG | (mode & 0o7777), data))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(CpioEntry(_normalize(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(
            CpioEntry(
                _normalize(path),
                stat.S_IFCHR | (mode & 0o7777),
                rdev_major=major,
                rdev_minor=minor,
            )
        )

    def entries(self) -> list[CpioEntry]:
        """All entries in archive order, with any missing parent directories added."""
        result = dict(self._entries)
        for path in list(result):
            parent = path.rpartition("/")[0]
            while parent and parent not in result:
                result[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755)
                parent = parent.rpartition("/")[0]
        # Sorting by path components puts every directory before its contents.
        return [result[p] for p in sorted(result, key=lambda p: p.split("/"))]

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, entry in enumerate(self.entries(), start=1):
            out += _encode(entry, ino)
        out += _encode(CpioEntry(TRAILER_NAME, 0), 0)
        return bytes(out)

    def write(self, path: Path) -> int:
        """Write the archive to ``path``; returns its size in bytes."""
        data = self.to_bytes()
        path.write_bytes(data)
        return len(data)


def _encode(entry: CpioEntry, ino: int) -> bytes:
    name = entry.path.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        2 if entry.is_dir else 1,
        entry.mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad4(_HEADER_LEN + len(name)) + entry.data + _pad4(len(entry.data))


def iter_newc(data: bytes) -> Iterator[CpioEntry]:
    """Parse a newc archive (up to its trailer) back into entries."""
    pos = 0
    while True:
        if pos + _HEADER_LEN > len(data):
            raise CpioFormatError("archive ends without a trailer")
        if data[pos : pos + 6] != NEWC_MAGIC:
            raise CpioFormatError(f"bad magic at offset {pos}")
        try:
            fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise CpioFormatError(f"bad header at offset {pos}") from exc
        _ino, mode, uid, gid, _nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _ = fields
        name_start = pos + _HEADER_LEN
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + len(_pad4(_HEADER_LEN + namesize))
        body = data[data_start : data_start + size]
        if len(body) != size:
            raise CpioFormatError(f"truncated member {name!r}")
        pos = data_start + size + len(_pad4(size))
        if name == TRAILER_NAME:
            return
        yield CpioEntry(name, mode, body, uid, gid, rmaj, rmin, mtime)
