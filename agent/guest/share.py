"""The pod's shared directory in the guest: one virtio-9p mount of the directory the
host exports for this pod (sandbox/share.py), below which every host path a container
mounts appears live. Mounted the first time a container needs it, so a VM saved as a
template (QEMU cannot save a VM with a 9p share attached) has never mounted it."""

from __future__ import annotations

import os
import threading

from agent.guest import system
from agent.guest.errors import precondition
from agent.protocol import GUEST_SHARE_DIR, SHARE_TAG

#: cache=none: every read and write goes to the host file (both sides see changes at
#: once); access=client: the guest kernel checks permissions, files are created with the
#: caller's ids; msize: 512 KiB messages for bulk throughput.
MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,cache=none,access=client,posixacl,msize=524288"

_lock = threading.Lock()


def ensure_mounted(mount_point: str = GUEST_SHARE_DIR) -> None:
    """Mount the pod's share at ``mount_point`` unless it already is."""
    with _lock:
        if mount_point in system.mount_points():
            return
        os.makedirs(mount_point, mode=0o755, exist_ok=True)
        try:
            system.mount(SHARE_TAG, mount_point, "9p", system.MS_NOSUID, MOUNT_OPTIONS)
        except OSError as exc:
            raise precondition(
                f"cannot mount the pod's shared directory ({exc.strerror}): the guest "
                "kernel needs 9p over virtio (the clearcri kernel has it; rebuild the guest "
                "with `clearcri guest build`)"
            ) from exc


def names_share(source: str) -> bool:
    return source.startswith(GUEST_SHARE_DIR + "/")
