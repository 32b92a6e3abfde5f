"""Idmapped mounts for containers in a user namespace of their own.

A container of a pod with user namespace mode POD runs as an unprivileged id range of
the guest (e.g. its root is guest uid 1000). The image's files belong to the guest's
root, so that root could neither create the mount points crun needs nor write its own
rootfs. The image's lower layer is therefore bound through an idmapped mount (the
image's ids shifted by the pod's mappings, ``mount_setattr(MOUNT_ATTR_IDMAP)``), and the
overlay's upper layer belongs to the mapped root: inside the container the image's
files are owned by its own root, as on the image's build machine, while the shared
erofs image itself is untouched.
"""

from __future__ import annotations

import ctypes
import os

from agent.guest import hostmounts
from agent.guest.hostmounts import OPEN_TREE_CLOEXEC, OPEN_TREE_CLONE
from agent.guest.system import libc

CLONE_NEWUSER = 0x10000000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_IDMAP = 0x00100000
SYS_MOUNT_SETATTR = 442  # the same on every architecture


class IdmapError(OSError):
    pass


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _map_text(mappings: list[list[int]]) -> str:
    return "".join(f"{c} {h} {n}\n" for c, h, n in mappings)


def user_namespace(uid_mappings: list[list[int]], gid_mappings: list[list[int]]) -> int:
    """A descriptor of a new user namespace with these mappings (held by no process)."""
    lib = libc()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only unshares and waits
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            if lib.unshare(CLONE_NEWUSER) == 0:
                code = 0
            os.write(ready_w, b"1" if code == 0 else b"0")
            os.read(done_r, 1)
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise IdmapError("cannot create a user namespace (unshare failed)")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(_map_text(uid_mappings))
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(_map_text(gid_mappings))
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise IdmapError(f"user namespace for an idmapped mount: {exc}") from exc
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def idmapped_bind(source: str, target: str, userns_fd: int) -> None:
    """Bind ``source`` at ``target`` (an existing directory) with the ids of
    ``userns_fd``'s mappings: files owned by host id H appear owned by H's mapped id."""
    tree = hostmounts.open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    try:
        attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
        rc = hostmounts.raw_syscall()(
            SYS_MOUNT_SETATTR,
            ctypes.c_int(tree),
            ctypes.c_char_p(b""),
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc != 0:
            raise IdmapError(f"idmap {source}: {os.strerror(ctypes.get_errno())}")
        hostmounts.move_mount(tree, target)
    finally:
        os.close(tree)


def mapped_root(mappings: list[list[int]]) -> int:
    """The host id container id 0 maps to."""
    for container_id, host_id, length in mappings:
        if container_id <= 0 < container_id + length:
            return host_id - container_id
    raise IdmapError("the mappings do not map container id 0")
