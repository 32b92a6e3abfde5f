"""Host paths for the containers of a host pod, cloned from the host's mount namespace.

A host pod's agent lives in a mount namespace of its own (its image mounts, overlays and
the pod's /dev/shm stay out of the host's), created when the pod started. Bind-mounting
a host path from there would show the container the host's mounts *as they were then*:
a volume mounted by kubelet later, a tmpfs under a hostPath, or a mount that should
propagate (``rslave``/``rshared``) would be missing.

So each host-path mount of a container is cloned from the host's namespace at container
creation: a forked child joins the host namespace (the agent keeps a descriptor of it),
clones the path's whole mount tree with ``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)``,
returns to the agent's namespace and attaches the clone at a staging point in the
container's bundle with ``move_mount``. The clone keeps the source's propagation: a
clone of a shared mount is its peer, so with the container's ``rslave``/``rshared``
options host mounts reach the container (and back, for ``rshared``) as under runc on the
host. The fork is needed because a thread cannot change mount namespace while other
threads share its filesystem context.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from typing import Any

from agent.guest.system import libc

CLONE_NEWNS = 0x00020000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
# the same on every architecture (syscalls added after 5.1 share one table)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_IDMAP = 0x00100000


class HostMountError(OSError):
    pass


def raw_syscall() -> Any:
    """libc's ``syscall``, returning a long."""
    fn = libc().syscall
    fn.restype = ctypes.c_long
    return fn


def open_tree(path: str, flags: int) -> int:
    """``open_tree(2)``: a detached clone of the mount at ``path`` (with OPEN_TREE_CLONE);
    the caller closes the descriptor."""
    tree = int(
        raw_syscall()(
            SYS_OPEN_TREE,
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(flags),
        )
    )
    if tree < 0:
        errno = ctypes.get_errno()
        raise HostMountError(errno, f"clone {path}: {os.strerror(errno)}")
    return tree


def move_mount(tree: int, target: str) -> None:
    """``move_mount(2)``: attach the detached mount ``tree`` at ``target``."""
    rc = raw_syscall()(
        SYS_MOVE_MOUNT,
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(target.encode()),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    if rc != 0:
        errno = ctypes.get_errno()
        raise HostMountError(errno, f"attach at {target}: {os.strerror(errno)}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def set_idmap(tree: int, userns_fd: int, *, recursive: bool = False) -> None:
    """``mount_setattr(MOUNT_ATTR_IDMAP)`` on the detached mount ``tree``: its files
    appear with the ids ``userns_fd``'s mappings give them."""
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    rc = raw_syscall()(
        SYS_MOUNT_SETATTR,
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc != 0:
        errno = ctypes.get_errno()
        raise HostMountError(errno, f"idmapped mount: {os.strerror(errno)}")


def _clone_in_child(
    host_ns: int, agent_ns: int, source: str, target: str, userns_fd: int | None
) -> str | None:
    """Runs in the forked child. Returns an error message or None."""
    lib = libc()
    if lib.setns(host_ns, CLONE_NEWNS) != 0:
        return f"join the host's mount namespace: {os.strerror(ctypes.get_errno())}"
    try:
        tree = open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
        if userns_fd is not None:
            set_idmap(tree, userns_fd, recursive=True)
    except HostMountError as exc:
        return f"host path: {exc.strerror}"
    is_dir = stat.S_ISDIR(os.fstat(tree).st_mode)
    if lib.setns(agent_ns, CLONE_NEWNS) != 0:
        return f"return to the agent's mount namespace: {os.strerror(ctypes.get_errno())}"
    try:
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a"):
                pass
    except OSError as exc:
        return f"create mount point {target}: {exc}"
    try:
        move_mount(tree, target)
    except HostMountError as exc:
        return f"{source}: {exc.strerror}"
    return None


#: What the child writes first on success; anything else is an error message.
_DONE = b"\0"


def clone_host_path(host_ns: int, source: str, target: str, userns_path: str | None = None) -> None:
    """Mount the host's ``source`` (its whole mount tree, as the host sees it now) at
    ``target`` in the agent's namespace. ``target`` is created as a directory or file.
    With ``userns_path`` (the pod's user namespace) the clone is idmapped by it.

    The child reports through a pipe, not its exit status: the agent reaps every child
    itself (it is PID 1 or a subreaper), so the status may be gone before we ask."""
    if not source.startswith("/"):
        raise HostMountError(f"host path {source!r} is not absolute")
    raw_syscall()  # resolve libc in the parent, not after fork
    agent_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    userns = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC) if userns_path else None
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                os.close(r)
                error = _clone_in_child(host_ns, agent_ns, source, target, userns)
                os.write(w, _DONE if error is None else error.encode()[:4000])
            except BaseException as exc:
                os.write(w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        with contextlib.suppress(ChildProcessError):  # reaped by the agent's reaper
            os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        os.close(agent_ns)
        if userns is not None:
            os.close(userns)
    report = b"".join(chunks)
    if report != _DONE:
        raise HostMountError(report.decode(errors="replace") or "the clone child died")


def unmount_under(path: str) -> None:
    """Detach every mount at or below ``path`` (deepest first), so that removing the
    directory afterwards can never reach into a host path."""
    prefix = path.rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4:
                point = unescape_mount_field(parts[4])
                if point == path.rstrip("/") or point.startswith(prefix):
                    points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        if libc().umount2(point.encode(), 2) != 0:  # MNT_DETACH
            errno = ctypes.get_errno()
            if errno not in (22, 2):  # not a mount (any more), or gone
                raise HostMountError(f"umount {point}: {os.strerror(errno)}")


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
