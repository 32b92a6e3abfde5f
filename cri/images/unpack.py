"""Apply image layers, in order, to a directory tree.

Layer tars come from untrusted registries, so every entry is checked before it touches
the disk:

- names are relative and never contain ``..``; leading ``./`` is dropped;
- the parent directories of an entry are resolved inside the tree as a chroot would
  (a symlink in the path is followed, an absolute target is relative to the tree's
  root), and an entry whose path leaves the tree is refused;
- the entry itself is never followed: an existing file or symlink of the same name is
  replaced, so a symlink in one layer cannot redirect a write of a later one;
- hard link targets must exist inside the tree and must not be directories;
- totals (uncompressed bytes, entries, name length) are bounded.

Whiteouts follow the OCI layer spec: ``.wh.<name>`` deletes ``<name>`` from lower
layers, ``.wh..wh..opq`` hides everything lower layers put in its directory. Ownership
is numeric (user and group names in the tar are ignored), modes keep setuid/setgid/
sticky bits, extended attributes (``SCHILY.xattr.*``) are applied except overlayfs's own
``trusted.overlay.*``. Device nodes are created only when running as root, inside the
private (0700) work directory; FIFOs always. Layers may be gzip, zstd (through the
``zstd`` program) or uncompressed; the compression is detected from the data.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cri.images.errors import ContentVerificationError, UnsafeLayer, UnsupportedImage

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_SYMLINK_HOPS = 40
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = 64 << 30  # uncompressed bytes over all layers of an image
    max_entries: int = 4_000_000
    max_name: int = 4096


@dataclass(frozen=True)
class LayerSource:
    path: Path  # the (compressed) blob in the content store
    digest: str
    diff_id: str | None  # digest of the uncompressed tar, from the image config


class _Budget:
    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.bytes = 0  # the uncompressed tar streams
        self.written = 0  # the regular files' sizes (a sparse member's full size)
        self.entries = 0

    def add_file(self, member: tarfile.TarInfo, layer: str) -> None:
        """Count a regular file at the size it unpacks to: a GNU sparse member's tar
        data is only its non-zero parts, tarfile writes it whole."""
        self.written += max(member.size, 0)
        if self.written > self.limits.max_bytes:
            raise UnsafeLayer(
                f"layer {layer}: its files unpack to more than {self.limits.max_bytes} bytes "
                f"(the image size limit; {member.name!r} alone is {member.size}); refusing it"
            )


class _CountingReader:
    """Counts (against the budget) and hashes the uncompressed tar stream."""

    def __init__(self, raw: IO[bytes], budget: _Budget, algorithm: str, layer: str) -> None:
        self.raw = raw
        self.budget = budget
        self.hasher: Any = hashlib.new(algorithm)
        self.layer = layer

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.budget.bytes += len(data)
        if self.budget.bytes > self.budget.limits.max_bytes:
            raise UnsafeLayer(
                f"layer {self.layer} unpacks to more than {self.budget.limits.max_bytes} bytes "
                "(the image size limit); refusing it"
            )
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass


@contextmanager
def _open_decompressed(path: Path, layer: str) -> Iterator[IO[bytes]]:
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if magic.startswith(GZIP_MAGIC):
        with open(path, "rb") as compressed, gzip.GzipFile(fileobj=compressed) as stream:
            yield stream  # type: ignore[misc]
    elif magic == ZSTD_MAGIC:
        if shutil.which("zstd") is None:
            raise UnsupportedImage(
                f"layer {layer} is zstd-compressed and the zstd program is missing; "
                "install the zstd package"
            )
        proc = subprocess.Popen(
            ["zstd", "-d", "-c", "-q", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.returncode not in (0, -9):
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                if proc.stderr:
                    proc.stderr.close()
                raise UnsafeLayer(f"layer {layer}: zstd failed: {stderr.strip()}")
            if proc.stderr:
                proc.stderr.close()
    else:
        with open(path, "rb") as stream:
            yield stream


def resolve_in_root(root: Path, rel: str, *, follow_final: bool, layer: str = "") -> Path:
    """The path of ``rel`` inside ``root``, following symlinks as if ``root`` were ``/``.

    Missing components are taken literally. Raises UnsafeLayer when the path would
    leave ``root`` or loops.
    """
    pending = [p for p in rel.split("/") if p]
    pending.reverse()
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if not resolved:
                raise UnsafeLayer(f"layer {layer}: path {rel!r} leaves the image root")
            resolved.pop()
            continue
        if not pending and not follow_final:
            resolved.append(part)
            break
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise UnsafeLayer(f"layer {layer}: too many symlinks resolving {rel!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed([p for p in target.split("/") if p]))
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _clean_name(name: str, layer: str, limits: UnpackLimits, what: str = "entry") -> list[str]:
    if len(name) > limits.max_name:
        raise UnsafeLayer(f"layer {layer}: {what} name longer than {limits.max_name} bytes")
    if name.startswith("/"):
        raise UnsafeLayer(f"layer {layer}: {what} {name!r} is an absolute path; refusing the layer")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer {layer}: {what} {name!r} contains '..'; refusing the layer")
    if "\0" in name:
        raise UnsafeLayer(f"layer {layer}: {what} name contains a NUL byte")
    return parts


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _opaque(directory: str, added: set[str]) -> None:
    with os.scandir(directory) as entries:
        children = list(entries)
    for child in children:
        if child.path in added:
            if child.is_dir(follow_symlinks=False):
                _opaque(child.path, added)
            continue
        _remove(child.path)


class _LayerApplier:
    def __init__(self, root: Path, source: LayerSource, budget: _Budget) -> None:
        self.root = root
        self.source = source
        self.layer = source.digest
        self.budget = budget
        self.added: set[str] = set()
        self.is_root = os.geteuid() == 0

    def _ensure_dirs(self, parent_rel: list[str]) -> str:
        parent = resolve_in_root(
            self.root, "/".join(parent_rel), follow_final=True, layer=self.layer
        )
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            # create missing parents one by one, each resolved inside the root again
            current: list[str] = []
            for part in parent_rel:
                current.append(part)
                path = resolve_in_root(
                    self.root, "/".join(current), follow_final=True, layer=self.layer
                )
                if not os.path.lexists(path):
                    os.mkdir(path, 0o755)
                elif not os.path.isdir(path):
                    raise UnsafeLayer(
                        f"layer {self.layer}: {'/'.join(current)!r} is not a directory"
                    ) from None
            parent = resolve_in_root(
                self.root, "/".join(parent_rel), follow_final=True, layer=self.layer
            )
            st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"layer {self.layer}: {'/'.join(parent_rel)!r} is not a directory")
        return str(parent)

    def _metadata(self, path: str, member: tarfile.TarInfo, *, is_link: bool = False) -> None:
        if self.is_root:
            os.lchown(path, member.uid, member.gid)
        if not is_link:
            os.chmod(path, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            if name.startswith("trusted.overlay."):
                continue
            try:
                os.setxattr(
                    path,
                    name,
                    value.encode("utf-8", "surrogateescape"),
                    follow_symlinks=False,
                )
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                log.warning("layer %s: xattr %s on %s not kept: %s", self.layer, name, path, exc)

    def apply(self, tar: tarfile.TarFile) -> None:
        limits = self.budget.limits
        for member in tar:
            self.budget.entries += 1
            if self.budget.entries > limits.max_entries:
                raise UnsafeLayer(
                    f"layer {self.layer}: more than {limits.max_entries} entries in the image"
                )
            parts = _clean_name(member.name, self.layer, limits)
            if not parts:
                if member.isdir():
                    self._metadata(str(self.root), member)
                continue
            base = parts[-1]
            parent = self._ensure_dirs(parts[:-1])
            if base == OPAQUE_WHITEOUT:
                _opaque(parent, self.added)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                name = base[len(WHITEOUT_PREFIX) :]
                if name in ("", ".", ".."):
                    # would remove the directory itself or its parent (the shared
                    # unpack directory, at the layer's root)
                    raise UnsafeLayer(
                        f"layer {self.layer}: whiteout {member.name!r} names no entry; "
                        "refusing the layer"
                    )
                victim = os.path.join(parent, name)
                if victim not in self.added:
                    _remove(victim)
                continue
            target = os.path.join(parent, base)
            self._entry(tar, member, target)
            self.added.add(target)

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        try:
            existing: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(target)
                existing = None
            if existing is None:
                os.mkdir(target, 0o700)
            self._metadata(target, member)
            return
        if existing is not None:
            _remove(target)
        if member.isreg():
            self.budget.add_file(member, self.layer)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                stream = tar.extractfile(member)
                if stream is not None:
                    shutil.copyfileobj(stream, out, COPY_CHUNK)
            self._metadata(target, member)
        elif member.issym():
            os.symlink(member.linkname, target)
            self._metadata(target, member, is_link=True)
        elif member.islnk():
            link_parts = _clean_name(member.linkname, self.layer, self.budget.limits, "hard link")
            if not link_parts:
                raise UnsafeLayer(
                    f"layer {self.layer}: hard link {member.name!r} points to the image root"
                )
            source_parent = resolve_in_root(
                self.root, "/".join(link_parts[:-1]), follow_final=True, layer=self.layer
            )
            source = source_parent / link_parts[-1]
            try:
                st = os.lstat(source)
            except FileNotFoundError:
                raise UnsafeLayer(
                    f"layer {self.layer}: hard link {member.name!r} points to "
                    f"{member.linkname!r}, which does not exist in the image"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeLayer(
                    f"layer {self.layer}: hard link {member.name!r} points to a directory"
                )
            os.link(source, target, follow_symlinks=False)
        elif member.ischr() or member.isblk():
            if not self.is_root:
                log.warning("layer %s: device %s skipped (not root)", self.layer, member.name)
                return
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            self._metadata(target, member)
        elif member.isfifo():
            os.mkfifo(target, 0o600)
            self._metadata(target, member)
        else:
            log.warning(
                "layer %s: entry %s of unsupported type %r skipped",
                self.layer,
                member.name,
                member.type,
            )


def unpack_layers(
    root: Path, layers: Sequence[LayerSource], limits: UnpackLimits | None = None
) -> None:
    """Apply ``layers`` in order to the (new, empty) directory ``root``."""
    budget = _Budget(limits or UnpackLimits())
    root.mkdir(mode=0o755, parents=False, exist_ok=True)
    for source in layers:
        algorithm = (source.diff_id or "sha256:").split(":", 1)[0]
        with _open_decompressed(source.path, source.digest) as raw:
            reader = _CountingReader(raw, budget, algorithm, source.digest)
            applier = _LayerApplier(root, source, budget)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    applier.apply(tar)
                reader.drain()
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise UnsafeLayer(
                    f"layer {source.digest} is not a valid (compressed) tar archive: {exc}"
                ) from exc
        if source.diff_id:
            actual = f"{algorithm}:{reader.hasher.hexdigest()}"
            if actual != source.diff_id:
                raise ContentVerificationError(
                    f"layer {source.digest} unpacks to {actual}, but the image config says "
                    f"{source.diff_id}; the image is corrupt"
                )


def read_image_file(root: Path, rel: str, limit: int = 1 << 20) -> str | None:
    """Text of regular file ``rel`` in an unpacked tree (symlinks resolved inside it)."""
    try:
        path = resolve_in_root(root, rel, follow_final=True)
        st = os.lstat(path)
    except (UnsafeLayer, OSError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    return path.read_bytes().decode("utf-8", errors="replace")
