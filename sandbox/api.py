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
