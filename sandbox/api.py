"""What cri/ may know of a pod sandbox, whatever runs it (a VM or the host): the
vocabulary the sandbox backends (sandbox/pod.py, sandbox/hostpod.py) and their callers
share."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class SandboxState(StrEnum):
    """A sandbox's life: created → booting → ready → stopping → stopped → removed; any
    running state → dead when its VM (or host agent) goes away unasked. The values are
    what state files hold."""

    CREATED = "created"
    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEAD = "dead"
    REMOVED = "removed"

    @property
    def at_rest(self) -> bool:
        """Nothing to stop: never started, stopped, dead or removed."""
        return self in (
            SandboxState.CREATED,
            SandboxState.STOPPED,
            SandboxState.DEAD,
            SandboxState.REMOVED,
        )

    @property
    def running(self) -> bool:
        """A VM (or host agent) process is meant to be there."""
        return self in (SandboxState.BOOTING, SandboxState.READY)


#: Files a pod VM maps as persistent memory (container images, the guest OS image) are
#: a whole number of these.
PMEM_ALIGN = 2 * 1024 * 1024


def align_up(value: int, align: int = PMEM_ALIGN) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class RootfsImage:
    """A container image's root filesystem as a sandbox attaches it: one read-only erofs
    file on the host (built by cri/images/rootfs.py), its size a multiple of PMEM_ALIGN.

    A pod VM that runs a container of the image gets the file hot-plugged as a
    virtio-pmem device (``memory-backend-file,share=on,readonly=on``) and mounts it with
    DAX, so the image's pages live once in the host page cache however many pods use it;
    each container gets its own writable overlay upper layer inside the guest. A host pod
    mounts the same file from a loop device.
    """

    image_id: str
    path: Path

    @property
    def size(self) -> int:
        """Size of the file, a multiple of the persistent-memory alignment."""
        return self.path.stat().st_size


@dataclass
class PodUsage:
    """What a pod costs the node: CPU time and memory of everything it runs on the host
    (a VM's QEMU process, or a host pod's cgroup)."""

    cpu_ns: int
    usage_bytes: int
    working_set_bytes: int
    rss_bytes: int


@dataclass
class HostPathMount:
    """A container's mount of a host path, as cri/ asks a sandbox for it."""

    #: names this mount among the pod's (a pod VM's share entry)
    key: str
    destination: str
    host_path: Path
    readonly: bool
    #: rprivate, rslave (HostToContainer) or rshared (Bidirectional)
    propagation: str
    #: the bind's options for the agent ("rbind", "ro"/"rw", "rro")
    options: list[str]
    #: the pod's user namespace mappings (uids, gids; each [container id, host id,
    #: length]), None outside one
    id_mappings: tuple[list[list[int]], list[list[int]]] | None = None
    #: a volume kubelet swaps atomically (``..data``): a pod VM serves it from a guest
    #: copy kept in step, so inotify fires in the container
    watch: bool = False
