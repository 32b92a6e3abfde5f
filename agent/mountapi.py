"""Mount syscalls both sides use: libc, the new mount API (``open_tree``,
``move_mount``, ``mount_setattr`` for idmapped mounts) and the mount table's escaping.
The host's pod shares (sandbox/share.py) and the agent's host-path clones and idmapped
layers (agent/guest/hostmounts.py, idmap.py) call the same code.

ctypes is imported on first use only: the agent imports this before its first request.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_IDMAP = 0x00100000
# the same on every architecture (syscalls added after 5.1 share one table)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

_libc: Any = None


class MountApiError(OSError):
    pass


def libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def raw_syscall() -> Any:
    """libc's ``syscall``, returning a long."""
    import ctypes

    fn = libc().syscall
    fn.restype = ctypes.c_long
    return fn


def open_tree(path: str, flags: int) -> int:
    """``open_tree(2)``: a detached clone of the mount at ``path`` (with OPEN_TREE_CLONE);
    the caller closes the descriptor."""
    import ctypes

    tree = int(
        raw_syscall()(
            SYS_OPEN_TREE,
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.c_uint(flags),
        )
    )
    if tree < 0:
        err = _errno()
        raise MountApiError(err, f"clone {path}: {os.strerror(err)}")
    return tree


def move_mount(tree: int, target: str) -> None:
    """``move_mount(2)``: attach the detached mount ``tree`` at ``target``."""
    import ctypes

    rc = raw_syscall()(
        SYS_MOVE_MOUNT,
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(target)),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    if rc != 0:
        err = _errno()
        raise MountApiError(err, f"attach at {target}: {os.strerror(err)}")


def set_attributes(
    tree: int,
    *,
    attr_set: int = 0,
    propagation: int = 0,
    userns_fd: int = 0,
    recursive: bool = False,
) -> None:
    """``mount_setattr(2)`` on the detached mount ``tree``: set ``attr_set`` flags
    (MOUNT_ATTR_RDONLY, MOUNT_ATTR_IDMAP with ``userns_fd``) and a ``propagation``
    (MS_PRIVATE, MS_SLAVE, ...; 0 leaves it)."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    attr = MountAttr(attr_set=attr_set, propagation=propagation, userns_fd=userns_fd)
    rc = raw_syscall()(
        SYS_MOUNT_SETATTR,
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc != 0:
        err = _errno()
        raise MountApiError(err, f"set mount attributes: {os.strerror(err)}")


def set_idmap(tree: int, userns_fd: int, *, recursive: bool = False) -> None:
    """``mount_setattr(MOUNT_ATTR_IDMAP)`` on the detached mount ``tree``: its files
    appear with the ids ``userns_fd``'s mappings give them."""
    set_attributes(tree, attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd, recursive=recursive)


def unescape_mount_field(field: str) -> str:
    """A mountinfo path field with its octal escapes (space, tab, newline, backslash)
    decoded."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


MOUNTINFO = "/proc/self/mountinfo"
MNT_DETACH = 2


def mounts_under(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    top = os.fspath(path).rstrip("/")
    prefix = top + "/"
    points = set()
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                point = unescape_mount_field(fields[4])
                if point == top or point.startswith(prefix):
                    points.add(point)
    return sorted(points, key=len, reverse=True)


def unmount_under(path: str | os.PathLike[str]) -> None:
    """Detach every mount at or below ``path`` (deepest first), so that removing the
    directory afterwards can never reach into what was mounted there."""
    for point in mounts_under(path):
        if libc().umount2(os.fsencode(point), MNT_DETACH) != 0:
            err = _errno()
            if err not in (22, 2):  # EINVAL, ENOENT: not a mount (any more), or gone
                raise MountApiError(err, f"umount {point}: {os.strerror(err)}")
