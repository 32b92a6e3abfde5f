"""Wire format between the host and the in-guest agent.

This module is imported by both sides: the asyncio host client and the guest agent that
runs as PID 1 inside the VM. The guest imports it at start-up, so it stays lean: only
``struct`` and ``json`` at import time, no ``typing``, no ``dataclasses`` (the shared
records below use a small local base class that mypy understands as a dataclass).

Framing (all integers big-endian)::

    magic (2) = b"\\xc1\\xcc" | version (1) | kind (1) | stream (4) | length (4) | payload

A connection starts with the host writing :data:`SYNC_MARKER`; the guest answers with the
same marker. Each side discards everything it reads until it sees the marker, and resets
its decoder whenever the marker shows up again, so partial frames from a dead peer never
leak into a new connection. See PROTOCOL.md for the full description.
"""

from __future__ import annotations

import json
import struct
from enum import StrEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_kwargs: object) -> object:
        return lambda obj: obj


#: Name of the virtio-serial port (``-device virtserialport,name=...``).
#: The capability set containerd and Docker give a container by default.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

AGENT_PORT_NAME = "org.clearcri.agent"

#: The pod's shared directory (virtio-9p): the tag QEMU exports it under and where
#: the agent mounts it. Host paths of container mounts are entries below it.
SHARE_TAG = "clearcri-share"
GUEST_SHARE_DIR = "/run/clearcri/share"
#: Version of this wire protocol; bumped on incompatible changes.
PROTOCOL_VERSION = 1
#: Version of the agent software.
AGENT_VERSION = "0.1.0"

MAGIC = b"\xc1\xcc"
HEADER = struct.Struct(">2sBBII")
HEADER_SIZE = HEADER.size
#: Largest payload accepted in one frame.
MAX_PAYLOAD = 1 << 20
#: Largest stdio chunk carried in one DATA frame.
MAX_DATA_CHUNK = 64 * 1024
#: Written by the host when it connects and echoed by the guest; resets both decoders.
SYNC_MARKER = bytes.fromhex("c1cc5e7c0a6e7d1b93f4a2d8e15c07b6")

# Frame kinds.
REQUEST = 1
RESPONSE = 2
EVENT = 3
DATA = 4
CLOSE = 5
KINDS = frozenset({REQUEST, RESPONSE, EVENT, DATA, CLOSE})
KIND_NAMES = {
    REQUEST: "REQUEST",
    RESPONSE: "RESPONSE",
    EVENT: "EVENT",
    DATA: "DATA",
    CLOSE: "CLOSE",
}

# Channels inside a stream (first payload byte of DATA and CLOSE frames).
STDIN = 0
STDOUT = 1
STDERR = 2
#: Port-forward streams only: a 4-byte big-endian count of bytes the sender may send more.
WINDOW = 3

#: Port-forward stream ids are chosen by the host from this value up (the guest numbers
#: its exec and container streams from 1).
PORT_FORWARD_STREAM_BASE = 0x40000000
#: Bytes either side may send on a port-forward stream before the other grants more.
PORT_FORWARD_WINDOW = 1 << 20


class ErrorCode(StrEnum):
    """Why a call failed. The agent's failed responses carry the first eight; the host's
    layers (agent client, sandboxes, images, CRI) raise errors with these codes too, and
    the CRI server answers each with the gRPC status of the same name (UNKNOWN_OP:
    UNIMPLEMENTED)."""

    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNKNOWN_OP = "UNKNOWN_OP"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DATA_LOSS = "DATA_LOSS"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class CodedError(Exception):
    """An error of any layer (agent client, sandbox, network, images, streaming, CRI):
    ``code`` says why in the vocabulary above, and the CRI server answers it with the
    gRPC status of that name in one place (cri/runtime/service.py ``cri_call``). The
    message says what failed and what to do."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


# The wire codes by name, as the agent and its client spell them.
NOT_FOUND = ErrorCode.NOT_FOUND
ALREADY_EXISTS = ErrorCode.ALREADY_EXISTS
INVALID_ARGUMENT = ErrorCode.INVALID_ARGUMENT
FAILED_PRECONDITION = ErrorCode.FAILED_PRECONDITION
INTERNAL = ErrorCode.INTERNAL
UNAVAILABLE = ErrorCode.UNAVAILABLE
DEADLINE_EXCEEDED = ErrorCode.DEADLINE_EXCEEDED
UNKNOWN_OP = ErrorCode.UNKNOWN_OP

# Events (guest to host).
EVENT_CONTAINER_EXITED = "container_exited"
EVENT_CONTAINER_OOM = "container_oom"
EVENT_EXEC_EXITED = "exec_exited"
EVENT_OUTPUT_DROPPED = "output_dropped"
EVENT_PORT_FORWARD_CLOSED = "port_forward_closed"


class ProtocolError(Exception):
    """A frame or message that breaks the protocol."""


# ---------------------------------------------------------------------------- framing


def encode_frame(kind: int, stream: int, payload: bytes) -> bytes:
    """Return one frame; raises ProtocolError when the payload is too large."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, stream, len(payload)) + payload


def encode_json(kind: int, stream: int, message: dict[str, Any]) -> bytes:
    return encode_frame(kind, stream, json.dumps(message, separators=(",", ":")).encode())


def encode_data(stream: int, channel: int, data: bytes) -> bytes:
    return encode_frame(DATA, stream, bytes((channel,)) + data)


def encode_close(stream: int, channel: int) -> bytes:
    return encode_frame(CLOSE, stream, bytes((channel,)))


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"bad JSON payload: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("JSON payload is not an object")
    return message


class Frame:
    """One decoded frame. ``kind == 0`` marks a resynchronisation (SYNC marker seen)."""

    __slots__ = ("kind", "payload", "stream")

    def __init__(self, kind: int, stream: int, payload: bytes) -> None:
        self.kind = kind
        self.stream = stream
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.kind, self.stream, self.payload) == (other.kind, other.stream, other.payload)

    def __hash__(self) -> int:
        return hash((self.kind, self.stream, self.payload))

    def __repr__(self) -> str:
        name = KIND_NAMES.get(self.kind, "SYNC" if self.kind == SYNC else str(self.kind))
        return f"Frame({name}, stream={self.stream}, {len(self.payload)} bytes)"


#: Pseudo kind yielded by the decoder when it sees SYNC_MARKER.
SYNC = 0


class FrameDecoder:
    """Incremental decoder with resynchronisation.

    Until the first SYNC_MARKER every byte is discarded (``synced`` is False). After it,
    frames are parsed; a header with a bad magic, version, kind or an oversized length
    makes the decoder skip to the next plausible header. A SYNC_MARKER anywhere in the
    stream (even inside what looked like a payload) discards the partial state and yields
    a ``Frame(SYNC, 0, b"")``.
    """

    def __init__(self, *, synced: bool = False, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._scan_from = 0  # SYNC_MARKER cannot start before this offset
        self.synced = synced
        self.max_payload = max_payload
        self.discarded = 0  # bytes thrown away while resynchronising

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        while True:
            marker = buf.find(SYNC_MARKER, self._scan_from)
            if marker < 0:
                break
            used = 0
            if self.synced:
                used = self._parse(marker, frames)
            self.discarded += marker - used
            del buf[: marker + len(SYNC_MARKER)]
            self._scan_from = 0
            self.synced = True
            frames.append(Frame(SYNC, 0, b""))
        if self.synced:
            del buf[: self._parse(len(buf), frames)]
        else:
            extra = len(buf) - (len(SYNC_MARKER) - 1)
            if extra > 0:
                self.discarded += extra
                del buf[:extra]
        self._scan_from = max(0, len(buf) - len(SYNC_MARKER) + 1)
        return frames

    def _parse(self, limit: int, out: list[Frame]) -> int:
        """Append the complete frames in _buf[:limit] to out; return bytes consumed."""
        buf = self._buf
        pos = 0
        while limit - pos >= HEADER_SIZE:
            magic, version, kind, stream, length = HEADER.unpack_from(buf, pos)
            if (
                magic != MAGIC
                or version != PROTOCOL_VERSION
                or kind not in KINDS
                or length > self.max_payload
            ):
                nxt = buf.find(MAGIC, pos + 1, limit)
                skip_to = nxt if nxt >= 0 else limit - 1
                self.discarded += skip_to - pos
                pos = skip_to
                continue
            end = pos + HEADER_SIZE + length
            if end > limit:
                break
            out.append(Frame(kind, stream, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        return pos

    @property
    def buffered(self) -> int:
        return len(self._buf)


# ---------------------------------------------------------------------------- records


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Any = _Missing()
_RECORDS: dict[str, type[Record]] = {}


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default: Any, default_factory: Callable[[], Any] | None) -> None:
        self.default = default
        self.default_factory = default_factory


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None) -> Any:
    """Field specifier for :class:`Record` (``default_factory`` for lists and dicts)."""
    return _Field(default, default_factory)


def _nested(annotation: str) -> tuple[str, str] | None:
    """Parse ``X``, ``X | None``, ``list[X]`` into (shape, record name) for records."""
    text = annotation.replace(" | None", "").replace("None | ", "").strip()
    if text.startswith("list[") and text.endswith("]"):
        inner = text[5:-1].strip()
        return ("list", inner) if inner in _RECORDS else None
    return ("one", text) if text in _RECORDS else None


@dataclass_transform(kw_only_default=True, field_specifiers=(field,))
class Record:
    """Keyword-only, JSON round-trippable record (a lean stand-in for a dataclass)."""

    __slots__ = ()
    _fields: ClassVar[tuple[tuple[str, str, Any, Callable[[], Any] | None], ...]] = ()

    def __init_subclass__(cls) -> None:
        fields = list(getattr(cls, "_fields", ()))
        known = {f[0] for f in fields}
        # inspect.get_annotations would pull in the heavy inspect module at guest start.
        annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
        for name, annotation in annotations.items():
            if annotation.startswith("ClassVar"):
                continue
            value = cls.__dict__.get(name, _MISSING)
            if isinstance(value, _Field):
                default, factory = value.default, value.default_factory
            else:
                default, factory = value, None
            if name in cls.__dict__:
                delattr(cls, name)
            entry = (name, annotation, default, factory)
            if name in known:
                fields = [entry if f[0] == name else f for f in fields]
            else:
                fields.append(entry)
        cls._fields = tuple(fields)
        _RECORDS[cls.__name__] = cls

    def __init__(self, **kwargs: Any) -> None:
        for name, _annotation, default, factory in self._fields:
            if name in kwargs:
                value = kwargs.pop(name)
            elif factory is not None:
                value = factory()
            elif default is not _MISSING:
                value = default
            else:
                raise TypeError(f"{type(self).__name__}: missing field {name!r}")
            object.__setattr__(self, name, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(kwargs)}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f[0]) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{f[0]}={getattr(self, f[0])!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (nested records converted)."""
        return {f[0]: _plain(getattr(self, f[0])) for f in self._fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Build from a dict; unknown keys are ignored, wrong shapes raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for name, annotation, _default, _factory in cls._fields:
            if name not in data:
                continue
            value = data[name]
            nested = _nested(annotation)
            if nested is not None and value is not None:
                shape, record_name = nested
                record = _RECORDS[record_name]
                if shape == "list":
                    if not isinstance(value, list):
                        raise ValueError(f"{cls.__name__}.{name}: expected a list")
                    value = [record.from_dict(item) for item in value]
                else:
                    value = record.from_dict(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Mount(Record):
    """A mount inside the container; ``source`` is a path in the guest."""

    destination: str
    source: str = ""
    type: str = "bind"
    options: list[str] = field(default_factory=list)
    # a read-only volume kubelet writes atomically (ConfigMap, Secret, projected,
    # downward API) on the pod's share: the container gets a guest copy kept in step,
    # so that inotify fires in it on updates (agent/guest/watched.py)
    watch: bool = False


class Rlimit(Record):
    type: str  # e.g. "RLIMIT_NOFILE"
    soft: int
    hard: int


class Resources(Record):
    cpu_shares: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    memory_limit: int | None = None
    pids_limit: int | None = None


class ContainerSpec(Record):
    """What the host asks the agent to run. User names are resolved by the host."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    #: Image mounted with ``mount_image`` (the overlay's lower layer) ...
    image_id: str = ""
    #: ... or an explicit lower directory in the guest.
    rootfs_dir: str = ""
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    #: None means the default set (as containerd's); [] drops every capability.
    capabilities: list[str] | None = None
    rlimits: list[Rlimit] = field(default_factory=list)
    no_new_privs: bool = False
    readonly_rootfs: bool = False
    #: None means the defaults (as runc's); [] masks nothing.
    masked_paths: list[str] | None = None
    readonly_paths: list[str] | None = None
    #: None: unconfined; "runtime/default": the built-in profile; or an OCI seccomp object.
    seccomp: Any = None
    apparmor: str | None = None  # accepted and ignored
    mounts: list[Mount] = field(default_factory=list)
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False
    resources: Resources | None = None
    oom_score_adj: int | None = None
    sysctls: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: "container": own pid namespace; "pod": one namespace shared by the pod's containers;
    #: "host": the host's (host handler pods only).
    pid_namespace: str = "container"
    #: Bind the pod's /etc/hosts, /etc/resolv.conf and /etc/hostname into the container.
    pod_etc_files: bool = True
    #: Every device, writable /sys, nothing masked (host handler pods only).
    privileged: bool = False
    #: A user namespace with these [container id, host id, length] mappings (the pod's,
    #: user namespace mode POD); empty: the pod's user namespace (none of its own).
    uid_mappings: list[list[int]] = field(default_factory=list)
    gid_mappings: list[list[int]] = field(default_factory=list)


class ExecSpec(Record):
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = ""  # "" keeps the container's cwd
    uid: int | None = None  # None keeps the container's user
    gid: int | None = None
    additional_gids: list[int] | None = None
    tty: bool = False
    stdin: bool = False
    #: Seconds after which the guest kills the process (None: no limit).
    timeout: float | None = None
    #: The terminal's size when the process starts (tty only; 0: not known yet).
    cols: int = 0
    rows: int = 0


class ExitStatus(Record):
    exit_code: int
    signal: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    reason: str = ""  # "Completed", "Error" or "OOMKilled"


class ReadyInfo(Record):
    agent_version: str
    protocol_version: int
    #: Guest uptimes (seconds) of boot milestones: init_start, switch_root, agent_start,
    #: agent_ready.
    boot_times: dict[str, float] = field(default_factory=dict)
    guest_time_ns: int = 0
    dax: bool | None = None
    kernel_release: str = ""
    mem_total_kib: int = 0
    #: Bumped on every hello; lets the host tell reconnections apart.
    connection: int = 0


class ContainerInfo(Record):
    id: str
    state: str  # "created", "running" or "exited"
    pid: int = 0
    #: Stream id carrying the container's stdout/stderr (DATA frames).
    stream: int = 0
    image_id: str = ""
    created_at_ns: int = 0
    exit_status: ExitStatus | None = None
    #: How long the guest took for each step of the call that answered (seconds):
    #: create: layer, overlay, mounts, config, crun_create; start: release (the
    #: container's init let go by the agent itself) or crun_start.
    timings: dict[str, float] = field(default_factory=dict)


class DeviceIo(Record):
    """One block device's I/O by a container's cgroup (io.stat / blkio)."""

    major: int
    minor: int
    #: /dev name of the device when the guest knows it ("" otherwise)
    device: str = ""
    read_bytes: int = 0
    write_bytes: int = 0
    reads: int = 0
    writes: int = 0


class FsUsage(Record):
    """A container's writable layer and the filesystem that holds it."""

    #: source of the filesystem's mount (e.g. "tmpfs", "/dev/vda1")
    device: str = ""
    #: bytes allocated to the writable layer (512-byte blocks, hard links once)
    usage_bytes: int = 0
    #: inodes the writable layer uses
    inodes_used: int = 0
    #: size of the filesystem, and its inodes in all and free
    capacity_bytes: int = 0
    inodes_total: int = 0
    inodes_free: int = 0


class CgroupLimits(Record):
    """Limits in force in a container's cgroup. None: not limited."""

    #: cgroup v2 cpu.weight (1-10000) ...
    cpu_weight: int | None = None
    #: ... or cgroup v1 cpu.shares
    cpu_shares: int | None = None
    cpu_period_usec: int | None = None
    cpu_quota_usec: int | None = None
    memory_max: int | None = None
    #: memory plus swap (cgroup v1 memsw, or v2 memory.max + memory.swap.max)
    memory_swap_max: int | None = None
    #: memory the kernel keeps for the cgroup (v2 memory.min, v1 soft limit)
    memory_reservation: int | None = None
    pids_max: int | None = None


class ContainerDetail(Record):
    """What ``container_stats`` with ``detail`` adds per container: every figure the
    guest could read, None (or absent from a dict) where it could not."""

    #: "v2", "v1" or "" (no cgroup)
    cgroup: str = ""
    cpu_user_usec: int | None = None
    cpu_system_usec: int | None = None
    cpu_periods: int | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_usec: int | None = None
    memory_max_usage: int | None = None
    memory_cache: int | None = None
    memory_rss: int | None = None
    memory_mapped_file: int | None = None
    memory_kernel: int | None = None
    memory_swap: int | None = None
    #: times usage hit the limit (v1 memory.failcnt, v2 memory.events "max")
    memory_failcnt: int | None = None
    #: page faults of the cgroup itself and of its whole subtree
    pgfault: int | None = None
    pgmajfault: int | None = None
    pgfault_hierarchy: int | None = None
    pgmajfault_hierarchy: int | None = None
    oom_kills: int | None = None
    #: page size ("2MB") -> bytes in use, and the most ever used (cgroup v1 only)
    hugetlb_usage: dict[str, int] = field(default_factory=dict)
    hugetlb_max_usage: dict[str, int] = field(default_factory=dict)
    #: PSI totals in microseconds: "cpu_some", "cpu_full", "memory_some", ... "io_full"
    pressure_usec: dict[str, int] = field(default_factory=dict)
    io: list[DeviceIo] = field(default_factory=list)
    processes: int | None = None
    threads: int | None = None
    #: pids.max; 0 when unlimited
    threads_max: int | None = None
    file_descriptors: int | None = None
    sockets: int | None = None
    #: soft limits of the container's first process, e.g. {"max_open_files": 1024}
    #: (unlimited ones are left out)
    ulimits_soft: dict[str, int] = field(default_factory=dict)
    fs: FsUsage | None = None
    limits: CgroupLimits | None = None


class ContainerStats(Record):
    id: str
    timestamp_ns: int = 0
    cpu_usage_usec: int = 0
    memory_current: int = 0
    memory_anon: int = 0
    memory_file: int = 0
    memory_working_set: int = 0
    pids_current: int = 0
    #: only with ``detail`` (and from agents that know it)
    detail: ContainerDetail | None = None


class InterfaceStats(Record):
    """Counters of one network interface in the pod's network namespace (not lo)."""

    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


class GuestStats(Record):
    timestamp_ns: int = 0
    mem_total_kib: int = 0
    mem_free_kib: int = 0
    mem_available_kib: int = 0
    #: /proc/stat "cpu" line in USER_HZ ticks.
    cpu_user: int = 0
    cpu_system: int = 0
    cpu_idle: int = 0
    cpu_total: int = 0


class StatsReport(Record):
    containers: list[ContainerStats] = field(default_factory=list)
    guest: GuestStats | None = None
    #: only with ``detail``: the agent's network namespace, which is the pod's
    interfaces: list[InterfaceStats] = field(default_factory=list)


class ExecStarted(Record):
    stream: int
    pid: int = 0
    #: How long the guest took for each step (seconds): process (writing the exec's
    #: process.json), crun_exec (crun until the process runs).
    timings: dict[str, float] = field(default_factory=dict)


class PortForwardStarted(Record):
    stream: int
    #: The address the guest connected to, e.g. "127.0.0.1:8080".
    address: str = ""


class HotplugResult(Record):
    """What a VM the host hot-plugged into has once the guest onlined it all."""

    vcpus: int
    mem_total_kib: int
    #: guest seconds the ``hotplug`` request waited for the vCPUs and memory, and then
    #: took to raise the limits
    seconds: float = 0.0
    limits_seconds: float = 0.0
    #: what the guest raised to a VM of its new size's (sysctls, rlimits, huge pages)
    raised: list[str] = field(default_factory=list)


class NetRoute(Record):
    #: CIDR ("0.0.0.0/0", "fd00::/64"); gateway "" makes a device route.
    dst: str
    gateway: str = ""


class NetInterface(Record):
    """A guest NIC for ``configure_network``: the NIC whose MAC is ``match_mac`` (or
    already ``mac``) gets ``mac``, ``mtu``, the ``addresses`` (CIDR) and ``routes``."""

    mac: str
    match_mac: str = ""
    mtu: int = 0
    addresses: list[str] = field(default_factory=list)
    routes: list[NetRoute] = field(default_factory=list)


class ConfiguredInterface(Record):
    """A NIC ``configure_network`` configured."""

    name: str
    mac: str
    #: guest milliseconds of each step ("find", "link", "addresses", "routes")
    ms: dict[str, float] = field(default_factory=dict)


class ImageSource(Record):
    """Where ``mount_image`` finds an image; exactly one of ``pci_path`` (a pod VM: the
    virtio-pmem device behind that PCIe root port, erofs with DAX), ``device`` (a block
    device, e.g. a host pod's loop device) or ``dir`` (a directory, bound read-only)."""

    pci_path: str = ""
    device: str = ""
    #: with ``device``: its filesystem ("" is erofs) and mount data
    fstype: str = ""
    options: str = ""
    dir: str = ""
    #: with ``pci_path``: seconds to wait for the device to show up (None: 5)
    timeout: float | None = None

    #: the fields that say where the image is
    LOCATIONS: ClassVar[tuple[str, ...]] = ("pci_path", "device", "dir")

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set: agents before this record told the kind of
        source by which keys are present."""
        return {k: v for k, v in super().to_dict().items() if v not in ("", None)}

    @property
    def locations(self) -> list[str]:
        """The location fields that are set (valid: exactly one)."""
        return [name for name in self.LOCATIONS if getattr(self, name)]


class CgroupUpdate(Record):
    """New limits of a running container (``update_container``, from CRI
    UpdateContainerResources): the contents of cgroup v2 files, each field named after
    its file (``cpu_max`` is cpu.max); None leaves the file as it is. An agent on cgroup
    v1 translates them to the v1 files (agent/guest/resources.py).

    The values stay the files' text ("max", "50000 100000"), which is what is written and
    what the v1 translation parses."""

    #: "<quota|max> <period>" (microseconds)
    cpu_max: str | None = None
    #: 1..10000
    cpu_weight: str | None = None
    #: bytes or "max"
    memory_max: str | None = None
    memory_swap_max: str | None = None
    pids_max: str | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set (None must not reach a file as "None")."""
        return {k: v for k, v in super().to_dict().items() if v is not None}

    @property
    def empty(self) -> bool:
        """True when the update changes nothing."""
        return not self.to_dict()


def iter_records() -> Iterator[type[Record]]:
    """Every record type defined in this module (used by tests)."""
    return iter(list(_RECORDS.values()))
