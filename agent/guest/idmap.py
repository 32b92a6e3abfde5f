"""Idmapped mounts for containers in the pod's user namespace.

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

import os

from agent.guest import hostmounts
from agent.mountapi import OPEN_TREE_CLOEXEC, OPEN_TREE_CLONE, move_mount, open_tree, set_idmap


def idmapped_bind(source: str, target: str, userns_fd: int) -> None:
    """Bind ``source`` at ``target`` (an existing directory) with the ids of
    ``userns_fd``'s mappings: files owned by host id H appear owned by H's mapped id."""
    tree = open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    try:
        set_idmap(tree, userns_fd)
        move_mount(tree, target)
    finally:
        os.close(tree)


def mapped_root(mappings: list[list[int]]) -> int:
    """The host id container id 0 maps to."""
    for container_id, host_id, length in mappings:
        if container_id <= 0 < container_id + length:
            return host_id - container_id
    raise hostmounts.HostMountError("the mappings do not map container id 0")
