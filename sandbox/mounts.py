"""Mount syscalls of the host side (bind, propagation, read-only, detach) and the host's
mount table. Every call is one syscall on paths: nothing here reads a file's contents,
so a host path such as /proc or a FIFO cannot block it."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.mountapi import (
    AT_RECURSIVE,
    MOUNT_ATTR_IDMAP,
    MOUNT_ATTR_RDONLY,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
    libc,
    move_mount,
    open_tree,
    set_attributes,
    unescape_mount_field,
)
from agent.mountapi import mounts_under as mounts_under
from agent.mountapi import unmount_under as unmount_under

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000

MOUNTINFO = Path("/proc/self/mountinfo")


def check(result: int, what: str) -> None:
    """Raise OSError (with errno) when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: Path, flags: int, what: str) -> None:
    check(
        libc().mount(
            os.fsencode(source) if source is not None else None,
            os.fsencode(target),
            None,
            ctypes.c_ulong(flags),
            None,
        ),
        what,
    )


def bind(source: Path, target: Path, *, recursive: bool = True) -> None:
    """Bind ``source`` (its submounts too, with ``recursive``) at ``target``."""
    flags = MS_BIND | (MS_REC if recursive else 0)
    _mount(str(source), target, flags, f"bind {source} at {target}")


def set_propagation(target: Path, kind: str) -> None:
    """Make the mount at ``target`` and its submounts rprivate, rslave or rshared."""
    flag = {"rprivate": MS_PRIVATE, "rslave": MS_SLAVE, "rshared": MS_SHARED}[kind]
    _mount(None, target, flag | MS_REC, f"make {target} {kind}")


def own_mount(path: Path, *, shared: bool) -> None:
    """Make ``path`` a mount of its own (a bind onto itself), private so that nothing
    mounted elsewhere reaches it; with ``shared``, in a peer group of its own: mounts
    made below it later reach the mount namespaces made since that copied it (a jailed
    VMM's) and no other. Left as it is when it already is a mount."""
    if str(path) in mounts_under(path):
        return
    bind(path, path, recursive=False)
    _mount(None, path, MS_PRIVATE, f"make {path} private")
    if shared:
        _mount(None, path, MS_SHARED, f"make {path} shared")


def attach_clone(
    source: Path,
    target: Path,
    *,
    readonly: bool,
    propagation: str = "rprivate",
    userns_fd: int | None = None,
) -> None:
    """Bind ``source`` with its submounts at ``target``, its attributes set before it
    is attached, so that every copy the attach propagates (into a jailed VMM's
    namespace) has them too: read-only (the top mount, as a bind mount's flag),
    ``propagation`` (rprivate, or rslave: mounts the host makes below ``source`` later
    follow) and, with ``userns_fd``, idmapped with that user namespace's mappings."""
    kind = {"rprivate": MS_PRIVATE, "rslave": MS_SLAVE}[propagation]
    tree = open_tree(str(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    try:
        set_attributes(tree, propagation=kind, recursive=True)
        if userns_fd is not None:
            set_attributes(tree, attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd, recursive=True)
        if readonly:
            set_attributes(tree, attr_set=MOUNT_ATTR_RDONLY)
        move_mount(tree, str(target))
    finally:
        os.close(tree)


@dataclass(frozen=True)
class MountEntry:
    point: str
    tags: tuple[str, ...]  # optional fields: shared:N, master:N, ...


def mount_table(mountinfo: Path = MOUNTINFO) -> Iterator[MountEntry]:
    with mountinfo.open() as f:
        for line in f:
            fields = line.split()
            if len(fields) < 7:
                continue
            tags = fields[6 : fields.index("-")] if "-" in fields else []
            yield MountEntry(unescape_mount_field(fields[4]), tuple(tags))


def propagation_problem(
    host_path: Path, propagation: str, mountinfo: Path = MOUNTINFO
) -> str | None:
    """Why ``host_path`` cannot carry ``propagation`` ("rshared" needs its mount to be
    shared, "rslave" shared or a slave), or None. As other runtimes do, a mount that
    would silently not propagate is refused."""
    path = os.path.realpath(host_path)
    best: MountEntry | None = None
    for entry in mount_table(mountinfo):
        point = entry.point
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):
            best = entry
    if best is None:
        return f"no mount holds host path {path}"
    shared = any(t.startswith("shared:") for t in best.tags)
    slave = any(t.startswith("master:") for t in best.tags)
    if propagation == "rshared" and not shared:
        return (
            f"host path {path} is on mount {best.point}, which is not shared: "
            f"make it shared (mount --make-rshared {best.point}) for Bidirectional propagation"
        )
    if propagation == "rslave" and not (shared or slave):
        return (
            f"host path {path} is on mount {best.point}, which is neither shared nor a slave: "
            f"make it shared (mount --make-rshared {best.point}) for HostToContainer propagation"
        )
    return None


def remove_tree(path: Path) -> None:
    """Delete ``path`` and everything below it, after detaching every mount there; if
    anything stays mounted nothing is deleted (a bind of a host path below ``path`` must
    never lose the host's files). Missing is fine."""
    if not os.path.lexists(path):
        return
    unmount_under(path)
    left = mounts_under(path)
    if left:
        raise OSError(errno.EBUSY, f"still mounted below {path}: {', '.join(left[:3])}")
    shutil.rmtree(path, ignore_errors=True)


def remove_tree_and_link(tree: Path, link: Path) -> None:
    """:func:`remove_tree` of ``tree``, then ``link`` if it is a symbolic link (a run
    root's entry for a pod on a standby VM, whose run directory is the standby's)."""
    remove_tree(tree)
    if link.is_symlink():
        link.unlink()
