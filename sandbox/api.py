"""The port between cri/ and the pod backends: everything cri/ may know of a pod
sandbox, whatever runs it (a VM or the host). The ``Sandbox`` protocol is what a pod
sandbox does (sandbox/lifecycle.py is the one implementation, its backends in
sandbox/vmpod.py and sandbox/hostpod.py); ``SandboxProvider`` is what the node offers
(sandbox/handlers.py: the runtime handlers and the sandbox kind behind each). The
records here are the requests and answers that cross the port; the errors carry the
shared ``ErrorCode``. cri/ imports nothing else of sandbox/ (tests/unit/test_package_layout.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.protocol import CodedError, ErrorCode

# What a process (a pod VM's QEMU) costs the node, read from /proc: the node's metrics
# read it as the sandboxes do.
from sandbox.procfs import PROC as PROC
from sandbox.procfs import ProcessMemory as ProcessMemory
from sandbox.procfs import process_cpu_ns as process_cpu_ns
from sandbox.procfs import read_process_memory as read_process_memory

if TYPE_CHECKING:
    # the process streams a sandbox hands out (its agent's)
    from agent.client import ExecResult as ExecResult
    from agent.protocol import (
        CgroupUpdate,
        ContainerInfo,
        ContainerSpec,
        ExecSpec,
        ExitStatus,
        Mount,
        StatsReport,
    )
    from agent.streams import ContainerOutput as ContainerOutput
    from agent.streams import ExecSession as ExecSession
    from agent.streams import PortForwardStream as PortForwardStream


#: The runtime handlers a node serves: pods in VMs, and pods on the host for what a VM
#: cannot serve (host namespaces, privileged).
VM_HANDLER = "clearcri"
HOST_HANDLER = "host"


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


# ------------------------------------------------------------------------ errors


class SandboxError(CodedError):
    """A sandbox operation failed; the message says what and what to do. ``code``: why,
    in the vocabulary every layer shares (agent/protocol.py ``ErrorCode``)."""

    code = ErrorCode.FAILED_PRECONDITION


class SandboxNotFound(SandboxError):
    code = ErrorCode.NOT_FOUND


class SandboxExhausted(SandboxError):
    """A node or per-VM resource (memory, VMM ids, image slots) is used up."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class SandboxRefused(SandboxError):
    """What was asked cannot work in this kind of sandbox: the request is at fault, nothing
    failed."""

    code = ErrorCode.INVALID_ARGUMENT


class SandboxUnavailable(SandboxError):
    """The sandbox could not be started (its VM or agent failed on the way up)."""

    code = ErrorCode.UNAVAILABLE


# ------------------------------------------------------------------------ requests


@dataclass
class PortMapping:
    """A hostPort: ``host_ip:host_port`` on the node reaches ``container_port``."""

    protocol: str  # "tcp", "udp" or "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass
class DnsConfig:
    """The CRI DNSConfig of a pod."""

    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass
class Bandwidth:
    """Traffic limits in bits per second (0: unlimited); bursts in bits."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0


@dataclass
class PodNetworkSpec:
    """What the network of one pod depends on (from the CRI PodSandboxConfig)."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    port_mappings: list[PortMapping] = field(default_factory=list)
    dns: DnsConfig | None = None
    bandwidth: Bandwidth | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PodNetworkSpec:
        dns = data.get("dns")
        bandwidth = data.get("bandwidth")
        return cls(
            name=str(data.get("name", "")),
            namespace=str(data.get("namespace", "")),
            uid=str(data.get("uid", "")),
            port_mappings=[PortMapping(**m) for m in data.get("port_mappings", [])],
            dns=DnsConfig(**dns) if isinstance(dns, dict) else None,
            bandwidth=Bandwidth(**bandwidth) if isinstance(bandwidth, dict) else None,
        )


@dataclass
class SandboxSpec:
    """What one pod VM asks for (runtime handler ``clearcri``)."""

    sandbox_id: str
    hostname: str = ""
    resolv_conf: str = ""
    hosts: str = ""
    cpu_quota_us: int = 0
    cpu_period_us: int = 0
    memory_limit_bytes: int = 0
    # What the pod's cgroup may hold in all (containers' limits + pod overhead, as
    # kubelet limits the pod cgroup): the VM and QEMU must fit in it. 0: no limit.
    memory_budget_bytes: int = 0
    # kubelet's pod cgroup: the VM's host processes go below it
    cgroup_parent: str = ""
    cgroup_driver: str = "cgroupfs"
    extra_args: list[str] = field(default_factory=list)
    # None: the VM gets no NIC. Otherwise CNI decides its address (sandbox/network.py).
    network: PodNetworkSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):  # read back from state.json
            self.network = PodNetworkSpec.from_dict(self.network)


@dataclass
class HostPodSpec:
    """What one host pod asks for (runtime handler ``host``)."""

    sandbox_id: str
    hostname: str = ""
    resolv_conf: str = ""
    hosts: str = ""
    host_network: bool = False
    host_ipc: bool = False
    # kubelet's cgroup_parent and the node's cgroup driver ("cgroupfs" or "systemd")
    cgroup_parent: str = ""
    cgroup_driver: str = "cgroupfs"
    # CNI input (None: CNI is not asked, e.g. networking disabled in a test)
    network: PodNetworkSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):  # read back from state.json
            self.network = PodNetworkSpec.from_dict(self.network)


# ------------------------------------------------------------------------ answers


@dataclass
class BootTimes:
    """Phases of one start, in seconds."""

    vmm_spawn: float = 0.0
    # restoring a VM template's device state (0 for a cold boot)
    restore: float = 0.0
    firmware: float = 0.0
    kernel: float = 0.0
    agent_ready: float = 0.0
    # a clone sized at clone time: from its restore until the guest has what was
    # hot-plugged (overlaps the pod's setup after agent_ready)
    hotplug: float = 0.0
    # a pod that took over a standby VM (sandbox/standby.py), whose VM had started before
    # the pod asked: from its launch until the VM was the pod's (cgroup, namespace)
    standby: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class NetworkStatus:
    """The CRI NetworkReady condition."""

    ready: bool
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class SharedFiles:
    """The node's files a sandbox maps and shares with every other (what the memory
    metrics count once per node): the guest OS image and the images attached."""

    os_image: Path | None = None
    image_ids: tuple[str, ...] = ()


# ------------------------------------------------------------------------ the port


@dataclass(frozen=True)
class BaseStandby:
    """The standby VMs of one base at a moment (sandbox/standby.py): the base's shape,
    how many the pool keeps now, and the QEMU processes of those ready."""

    vcpus: int
    memory_mib: int
    target: int
    pids: tuple[int, ...]


@dataclass(frozen=True)
class PoolReport:
    """What the pool holds (``bases``, the default's first), and how many pods took a
    standby VM or found none of their base ready since the daemon started."""

    bases: tuple[BaseStandby, ...]
    taken: int
    missed: int


class Sandbox(Protocol):
    """One pod sandbox: a VM, or a pod on the host. Its operations raise SandboxError
    (or an AgentError from its agent): each carries the ``ErrorCode`` cri/ answers."""

    @property
    def id(self) -> str: ...
    @property
    def handler(self) -> str:
        """The runtime handler that made it."""
        ...

    @property
    def state(self) -> SandboxState: ...
    @property
    def pid(self) -> int:
        """Its host process (QEMU, or the host pod's agent); 0 before it starts."""
        ...

    @property
    def exit_reason(self) -> str: ...
    @property
    def boot(self) -> BootTimes: ...
    @property
    def created_at(self) -> float: ...
    @property
    def pod_ips(self) -> list[str]:
        """IPv4 first, then IPv6; empty without a pod network."""
        ...

    @property
    def writable_layer_dir(self) -> Path | None:
        """Where its containers' writable layers are on the host (None: in the guest)."""
        ...

    # lifecycle
    async def start(self) -> BootTimes: ...
    async def stop(self, timeout: float | None = None) -> None: ...
    async def destroy(self) -> None: ...
    async def close(self) -> None:
        """Drop the host's connections, leave the pod running (daemon shutdown)."""
        ...

    def on_exit(self, callback: Callable[[Sandbox], None]) -> None: ...

    # images and volumes
    async def attach_image(self, image: RootfsImage) -> str: ...
    async def host_path_mount(self, request: HostPathMount) -> Mount: ...
    async def unshare_host_paths(self, keys: list[str]) -> None: ...

    # containers and processes
    async def create_container(
        self, container_id: str, spec: ContainerSpec, image: RootfsImage | None = None
    ) -> ContainerInfo: ...
    async def start_container(self, container_id: str) -> ContainerInfo: ...
    async def signal_container(
        self,
        container_id: str,
        signal: int,
        *,
        all_processes: bool = False,
        timeout: float | None = None,
    ) -> None: ...
    async def wait_container(
        self, container_id: str, *, timeout: float | None = None
    ) -> ExitStatus: ...
    async def delete_container(self, container_id: str, *, force: bool = False) -> None: ...
    async def update_container(self, container_id: str, update: CgroupUpdate) -> None: ...
    async def list_containers(self) -> list[ContainerInfo]: ...
    def subscribe_output(self, container_id: str) -> ContainerOutput: ...
    async def exec(self, container_id: str, spec: ExecSpec) -> ExecSession: ...
    async def exec_sync(
        self, container_id: str, args: list[str], *, timeout: float | None, max_output: int
    ) -> ExecResult: ...
    async def port_forward(self, port: int) -> PortForwardStream: ...

    # figures
    async def stats(
        self, container_id: str | None = None, timeout: float = 5.0, *, detail: bool = False
    ) -> StatsReport: ...
    def status_info(self) -> dict[str, object]: ...
    def pod_usage(self) -> PodUsage | None: ...
    def shared_files(self) -> SharedFiles: ...


class SandboxProvider(Protocol):
    """What the node's sandbox layer offers cri/: the runtime handlers, making and
    re-adopting sandboxes of each, the pod network's state and the node's checks."""

    @property
    def handlers(self) -> tuple[str, ...]: ...
    @property
    def networking(self) -> bool:
        """Pods get a CNI network (``[vm.network] enabled``)."""
        ...

    def create(self, handler: str, spec: SandboxSpec | HostPodSpec) -> Sandbox:
        """A sandbox of ``handler``'s kind, made but not started."""
        ...

    async def adopt(self, sandbox_id: str) -> Sandbox:
        """Re-attach to a sandbox of any kind an earlier daemon left."""
        ...

    async def remove_leftover(self, sandbox_id: str) -> None:
        """Remove what a sandbox nobody knows of left on the host (idempotent)."""
        ...

    def sandbox_ids(self) -> list[str]: ...
    def node_info(self) -> dict[str, str]:
        """What the runtime's verbose Status tells of the node (accelerator, guest)."""
        ...

    def network_status(self) -> NetworkStatus: ...
    def update_pod_cidr(self, cidr: str) -> None: ...
    def memory_budget(self, cgroup_parent: str, driver: str, limit: int, overhead: int) -> int:
        """What a pod's cgroup may hold in all (0: no limit)."""
        ...

    def cgroup_parent_problem(self, parent: str, driver: str) -> str | None:
        """What is wrong with a pod's cgroup parent for this node, or None."""
        ...
