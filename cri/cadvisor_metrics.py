"""The cAdvisor metric set for kubelet's CRI stats provider.

With ``PodAndContainerStatsFromCRI`` kubelet stops running cAdvisor on containers and
re-exports what ``ListMetricDescriptors`` / ``ListPodSandboxMetrics`` return on
``/metrics/cadvisor``: the same names, label keys and units dashboards and alerts know
from cAdvisor (``container_cpu_usage_seconds_total``, ``container_memory_working_set_bytes``,
...). This module describes that set and turns the guest's figures (agent
``container_stats`` with ``detail``) into CRI ``Metric`` messages.

Rules:

* Every series carries the base labels ``container, id, image, name, namespace, pod``
  plus its own (``cpu``, ``interface``, ``device``, ...), as cAdvisor's do. For a
  container: its CRI name, its id, the image as the user named it, its name in the
  guest's crun (the id), its pod's namespace and name. Pod-level series (network)
  have ``container="POD"`` and the pod's id as ``id`` and ``name``.
* CRI values are unsigned integers: "seconds" metrics are whole seconds (rounded down),
  as containerd and CRI-O report them.
* A figure the guest could not read is left out, never reported as zero.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

from cri_api.v1 import api_pb2

from agent.protocol import CgroupLimits, ContainerDetail, ContainerStats, InterfaceStats
from cri.runtime.state import ContainerRecord

BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")
POD_CONTAINER = "POD"
NS_PER_S = 1_000_000_000
USEC_PER_S = 1_000_000

GAUGE = api_pb2.GAUGE
COUNTER = api_pb2.COUNTER


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    kind: int  # api_pb2.GAUGE or api_pb2.COUNTER
    extra: tuple[str, ...] = ()

    @property
    def label_keys(self) -> tuple[str, ...]:
        return BASE_LABELS + self.extra

    def message(self) -> api_pb2.MetricDescriptor:
        return api_pb2.MetricDescriptor(
            name=self.name, help=self.help, label_keys=list(self.label_keys)
        )


def _d(name: str, text: str, kind: int, *extra: str) -> Descriptor:
    return Descriptor(name, text, kind, extra)


DESCRIPTORS: tuple[Descriptor, ...] = (
    # presence
    _d("container_last_seen", "When the runtime last saw the container (unix seconds).", GAUGE),
    _d(
        "container_start_time_seconds",
        "When the container started (unix seconds; its creation if it never started).",
        GAUGE,
    ),
    # CPU (cgroup cpu.stat / cpuacct)
    _d(
        "container_cpu_usage_seconds_total",
        'CPU time the container used, whole seconds; cpu="total" (no per-CPU split).',
        COUNTER,
        "cpu",
    ),
    _d("container_cpu_user_seconds_total", "CPU time in user mode, whole seconds.", COUNTER),
    _d("container_cpu_system_seconds_total", "CPU time in kernel mode, whole seconds.", COUNTER),
    _d(
        "container_cpu_cfs_periods_total",
        "CFS bandwidth periods that have elapsed while the container was runnable.",
        COUNTER,
    ),
    _d(
        "container_cpu_cfs_throttled_periods_total",
        "CFS bandwidth periods in which the container hit its CPU quota.",
        COUNTER,
    ),
    _d(
        "container_cpu_cfs_throttled_seconds_total",
        "Time the container was held back by its CPU quota, whole seconds.",
        COUNTER,
    ),
    # memory (cgroup memory.*)
    _d("container_memory_usage_bytes", "Memory charged to the container's cgroup.", GAUGE),
    _d(
        "container_memory_working_set_bytes",
        "Memory charged to the cgroup minus inactive page cache: what eviction looks at.",
        GAUGE,
    ),
    _d("container_memory_max_usage_bytes", "Highest memory charge the cgroup reached.", GAUGE),
    _d("container_memory_rss", "Anonymous memory of the container (cgroup anon / rss).", GAUGE),
    _d("container_memory_cache", "Page cache charged to the container.", GAUGE),
    _d("container_memory_mapped_file", "Page cache mapped into the container's processes.", GAUGE),
    _d(
        "container_memory_kernel_usage",
        "Kernel memory charged to the container (stacks, page tables, slab, ...).",
        GAUGE,
    ),
    _d("container_memory_swap", "Swap used by the container.", GAUGE),
    _d(
        "container_memory_failcnt",
        "How often the container's memory use ran into its limit.",
        COUNTER,
    ),
    _d(
        "container_memory_failures_total",
        "Page faults (failure_type pgfault or pgmajfault) of the container's own cgroup "
        '(scope="container") and of its subtree (scope="hierarchy").',
        COUNTER,
        "failure_type",
        "scope",
    ),
    _d(
        "container_oom_events_total",
        "Processes of the container the kernel's OOM killer killed.",
        COUNTER,
    ),
    _d(
        "container_hugetlb_usage_bytes",
        "Huge pages in use by the container, per page size.",
        GAUGE,
        "pagesize",
    ),
    _d(
        "container_hugetlb_max_usage_bytes",
        "Most huge pages the container used at once, per page size.",
        GAUGE,
        "pagesize",
    ),
    # filesystem: the writable layer and the filesystem holding it
    _d(
        "container_fs_usage_bytes",
        "Bytes allocated to the container's writable layer on this filesystem.",
        GAUGE,
        "device",
    ),
    _d(
        "container_fs_limit_bytes",
        "Size of the filesystem holding the container's writable layer.",
        GAUGE,
        "device",
    ),
    _d(
        "container_fs_inodes_total",
        "Inodes of the filesystem holding the container's writable layer.",
        GAUGE,
        "device",
    ),
    _d(
        "container_fs_inodes_free",
        "Free inodes of the filesystem holding the container's writable layer.",
        GAUGE,
        "device",
    ),
    # block I/O (cgroup io.stat / blkio)
    _d(
        "container_fs_reads_bytes_total", "Bytes the container read, per device.", COUNTER, "device"
    ),
    _d("container_fs_reads_total", "Reads the container completed, per device.", COUNTER, "device"),
    _d(
        "container_fs_writes_bytes_total",
        "Bytes the container wrote, per device.",
        COUNTER,
        "device",
    ),
    _d(
        "container_fs_writes_total",
        "Writes the container completed, per device.",
        COUNTER,
        "device",
    ),
    _d(
        "container_blkio_device_usage_total",
        "Bytes of block I/O by the container, per device and operation (Read, Write).",
        COUNTER,
        "device",
        "major",
        "minor",
        "operation",
    ),
    # network: the pod's interfaces (pod-level series)
    _d(
        "container_network_receive_bytes_total",
        "Bytes received on the pod's interface.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_receive_packets_total",
        "Packets received on the pod's interface.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_receive_packets_dropped_total",
        "Received packets the pod's interface dropped.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_receive_errors_total",
        "Receive errors on the pod's interface.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_transmit_bytes_total",
        "Bytes sent on the pod's interface.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_transmit_packets_total",
        "Packets sent on the pod's interface.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_transmit_packets_dropped_total",
        "Packets to send that the pod's interface dropped.",
        COUNTER,
        "interface",
    ),
    _d(
        "container_network_transmit_errors_total",
        "Transmit errors on the pod's interface.",
        COUNTER,
        "interface",
    ),
    # processes (cgroup members and their /proc entries)
    _d("container_processes", "Processes in the container.", GAUGE),
    _d("container_threads", "Threads in the container.", GAUGE),
    _d(
        "container_threads_max",
        "Limit on the container's threads (pids.max); 0 means no limit.",
        GAUGE,
    ),
    _d("container_file_descriptors", "Open file descriptors of the container's processes.", GAUGE),
    _d("container_sockets", "Open sockets of the container's processes.", GAUGE),
    _d(
        "container_ulimits_soft",
        'Soft resource limits of the container\'s first process (ulimit="max_open_files").',
        GAUGE,
        "ulimit",
    ),
    # spec: limits in force in the cgroup (the CRI's request where the guest has none)
    _d("container_spec_cpu_period", "CFS period of the container, microseconds.", GAUGE),
    _d(
        "container_spec_cpu_quota",
        "CFS quota of the container per period, microseconds (absent: no quota).",
        GAUGE,
    ),
    _d("container_spec_cpu_shares", "CPU shares of the container.", GAUGE),
    _d("container_spec_memory_limit_bytes", "Memory limit of the container; 0: none.", GAUGE),
    _d(
        "container_spec_memory_swap_limit_bytes",
        "Limit on the container's memory plus swap; 0: none.",
        GAUGE,
    ),
    _d(
        "container_spec_memory_reservation_limit_bytes",
        "Memory the kernel protects for the container (memory.min / soft limit); 0: none.",
        GAUGE,
    ),
    # pressure stall information (cgroup v2 *.pressure)
    _d(
        "container_pressure_cpu_waiting_seconds_total",
        "Time some of the container's tasks waited for a CPU, whole seconds.",
        COUNTER,
    ),
    _d(
        "container_pressure_cpu_stalled_seconds_total",
        "Time all of the container's tasks waited for a CPU, whole seconds.",
        COUNTER,
    ),
    _d(
        "container_pressure_memory_waiting_seconds_total",
        "Time some of the container's tasks waited for memory, whole seconds.",
        COUNTER,
    ),
    _d(
        "container_pressure_memory_stalled_seconds_total",
        "Time all of the container's tasks waited for memory, whole seconds.",
        COUNTER,
    ),
    _d(
        "container_pressure_io_waiting_seconds_total",
        "Time some of the container's tasks waited for I/O, whole seconds.",
        COUNTER,
    ),
    _d(
        "container_pressure_io_stalled_seconds_total",
        "Time all of the container's tasks waited for I/O, whole seconds.",
        COUNTER,
    ),
)
BY_NAME = {d.name: d for d in DESCRIPTORS}


# -- cpu.weight and shares -----------------------------------------------------------


def shares_to_weight(shares: int) -> int:
    """cgroup v2 cpu.weight for CPU shares, as crun and runc convert them."""
    shares = max(2, min(262144, shares))
    return 1 + ((shares - 2) * 9999) // 262142


def weight_to_shares(weight: int) -> int:
    """The shares a cpu.weight stands for (the inverse mapping, as cAdvisor reads it)."""
    weight = max(1, min(10000, weight))
    return 2 + ((weight - 1) * 262142) // 9999


def decode_resources(encoded: str) -> api_pb2.LinuxContainerResources | None:
    if not encoded:
        return None
    resources = api_pb2.LinuxContainerResources()
    resources.ParseFromString(base64.b64decode(encoded))
    return resources


def spec_values(
    resources: api_pb2.LinuxContainerResources | None, limits: CgroupLimits | None
) -> dict[str, int | None]:
    """container_spec_* values: the limits in force in the container's cgroup; without
    one (cgroups off), the CRI's request. None: leave the series out."""
    res = resources or api_pb2.LinuxContainerResources()
    if limits is None:
        return {
            "container_spec_cpu_period": res.cpu_period or None,
            "container_spec_cpu_quota": res.cpu_quota if res.cpu_quota > 0 else None,
            "container_spec_cpu_shares": res.cpu_shares or None,
            "container_spec_memory_limit_bytes": max(0, res.memory_limit_in_bytes),
            "container_spec_memory_swap_limit_bytes": max(0, res.memory_swap_limit_in_bytes),
            "container_spec_memory_reservation_limit_bytes": None,
        }
    shares = limits.cpu_shares
    if shares is None and limits.cpu_weight is not None:
        # cpu.weight cannot hold every shares value: report the CRI's shares when they
        # are what the weight in force was made from
        if res.cpu_shares > 0 and shares_to_weight(res.cpu_shares) == limits.cpu_weight:
            shares = res.cpu_shares
        else:
            shares = weight_to_shares(limits.cpu_weight)
    return {
        "container_spec_cpu_period": limits.cpu_period_usec,
        "container_spec_cpu_quota": limits.cpu_quota_usec,
        "container_spec_cpu_shares": shares,
        "container_spec_memory_limit_bytes": limits.memory_max or 0,
        "container_spec_memory_swap_limit_bytes": limits.memory_swap_max or 0,
        "container_spec_memory_reservation_limit_bytes": limits.memory_reservation or 0,
    }


# -- building messages ---------------------------------------------------------------


class MetricList:
    """Metric messages of one label identity (a container, or the pod)."""

    def __init__(self, base: Iterable[str], now_ns: int) -> None:
        self.base = list(base)
        if len(self.base) != len(BASE_LABELS):
            raise ValueError(f"{len(self.base)} base label values for {len(BASE_LABELS)} keys")
        self.now_ns = now_ns
        self.metrics: list[api_pb2.Metric] = []

    def add(self, name: str, value: int | None, *extra: str) -> None:
        """One sample; a None value (not known) adds nothing."""
        if value is None:
            return
        desc = BY_NAME[name]
        if len(extra) != len(desc.extra):
            raise ValueError(f"{name}: {len(extra)} extra label values for {desc.extra}")
        metric = api_pb2.Metric(
            name=name,
            timestamp=self.now_ns,
            metric_type=desc.kind,  # type: ignore[arg-type]
            label_values=[*self.base, *extra],
        )
        metric.value.value = max(0, int(value))
        self.metrics.append(metric)


def _seconds(usec: int | None) -> int | None:
    return None if usec is None else usec // USEC_PER_S


def container_labels(ctr: ContainerRecord, pod: str, namespace: str) -> list[str]:
    return [ctr.name, ctr.id, ctr.image, ctr.id, namespace, pod]


def pod_labels(pod_id: str, pod: str, namespace: str) -> list[str]:
    return [POD_CONTAINER, pod_id, "", pod_id, namespace, pod]


def container_metrics(
    ctr: ContainerRecord, pod: str, namespace: str, stats: ContainerStats, now_ns: int
) -> list[api_pb2.Metric]:
    """Every cAdvisor series of one container the guest's figures allow."""
    out = MetricList(container_labels(ctr, pod, namespace), now_ns)
    d = stats.detail
    out.add("container_last_seen", now_ns // NS_PER_S)
    out.add("container_start_time_seconds", (ctr.started_at_ns or ctr.created_at_ns) // NS_PER_S)
    # an agent without detail reports cgroup figures only; with detail, cgroup="" says
    # the container has no cgroup (and its zero figures mean nothing)
    cgroup = d is None or bool(d.cgroup)
    if cgroup:
        out.add("container_cpu_usage_seconds_total", _seconds(stats.cpu_usage_usec), "total")
        out.add("container_memory_usage_bytes", stats.memory_current)
        out.add("container_memory_working_set_bytes", stats.memory_working_set)
        if d is None:
            out.add("container_memory_rss", stats.memory_anon)
            out.add("container_memory_cache", stats.memory_file)
    spec = spec_values(decode_resources(ctr.resources), d.limits if d is not None else None)
    for name, value in spec.items():
        out.add(name, value)
    if d is not None:
        _detail(out, d)
    return out.metrics


def _detail(out: MetricList, d: ContainerDetail) -> None:
    out.add("container_cpu_user_seconds_total", _seconds(d.cpu_user_usec))
    out.add("container_cpu_system_seconds_total", _seconds(d.cpu_system_usec))
    out.add("container_cpu_cfs_periods_total", d.cpu_periods)
    out.add("container_cpu_cfs_throttled_periods_total", d.cpu_throttled_periods)
    out.add("container_cpu_cfs_throttled_seconds_total", _seconds(d.cpu_throttled_usec))

    out.add("container_memory_max_usage_bytes", d.memory_max_usage)
    out.add("container_memory_rss", d.memory_rss)
    out.add("container_memory_cache", d.memory_cache)
    out.add("container_memory_mapped_file", d.memory_mapped_file)
    out.add("container_memory_kernel_usage", d.memory_kernel)
    out.add("container_memory_swap", d.memory_swap)
    out.add("container_memory_failcnt", d.memory_failcnt)
    for kind, container, hierarchy in (
        ("pgfault", d.pgfault, d.pgfault_hierarchy),
        ("pgmajfault", d.pgmajfault, d.pgmajfault_hierarchy),
    ):
        out.add("container_memory_failures_total", container, kind, "container")
        out.add("container_memory_failures_total", hierarchy, kind, "hierarchy")
    out.add("container_oom_events_total", d.oom_kills)
    for size, value in sorted(d.hugetlb_usage.items()):
        out.add("container_hugetlb_usage_bytes", value, size)
    for size, value in sorted(d.hugetlb_max_usage.items()):
        out.add("container_hugetlb_max_usage_bytes", value, size)

    if d.fs is not None:
        device = d.fs.device
        out.add("container_fs_usage_bytes", d.fs.usage_bytes, device)
        out.add("container_fs_limit_bytes", d.fs.capacity_bytes, device)
        out.add("container_fs_inodes_total", d.fs.inodes_total, device)
        out.add("container_fs_inodes_free", d.fs.inodes_free, device)
    for io in d.io:
        device = io.device or f"{io.major}:{io.minor}"
        out.add("container_fs_reads_bytes_total", io.read_bytes, device)
        out.add("container_fs_reads_total", io.reads, device)
        out.add("container_fs_writes_bytes_total", io.write_bytes, device)
        out.add("container_fs_writes_total", io.writes, device)
        major, minor = str(io.major), str(io.minor)
        out.add("container_blkio_device_usage_total", io.read_bytes, device, major, minor, "Read")
        out.add("container_blkio_device_usage_total", io.write_bytes, device, major, minor, "Write")

    out.add("container_processes", d.processes)
    out.add("container_threads", d.threads)
    out.add("container_threads_max", d.threads_max)
    out.add("container_file_descriptors", d.file_descriptors)
    out.add("container_sockets", d.sockets)
    for limit, value in sorted(d.ulimits_soft.items()):
        out.add("container_ulimits_soft", value, limit)

    for resource in ("cpu", "memory", "io"):
        waiting = d.pressure_usec.get(f"{resource}_some")
        stalled = d.pressure_usec.get(f"{resource}_full")
        out.add(f"container_pressure_{resource}_waiting_seconds_total", _seconds(waiting))
        out.add(f"container_pressure_{resource}_stalled_seconds_total", _seconds(stalled))


def pod_network_metrics(
    pod_id: str, pod: str, namespace: str, interfaces: Iterable[InterfaceStats], now_ns: int
) -> list[api_pb2.Metric]:
    """The pod's interfaces: pod-level series, as cAdvisor reports the network of the
    pod's sandbox (all of a pod's containers share its network namespace)."""
    out = MetricList(pod_labels(pod_id, pod, namespace), now_ns)
    for i in interfaces:
        out.add("container_network_receive_bytes_total", i.rx_bytes, i.name)
        out.add("container_network_receive_packets_total", i.rx_packets, i.name)
        out.add("container_network_receive_packets_dropped_total", i.rx_dropped, i.name)
        out.add("container_network_receive_errors_total", i.rx_errors, i.name)
        out.add("container_network_transmit_bytes_total", i.tx_bytes, i.name)
        out.add("container_network_transmit_packets_total", i.tx_packets, i.name)
        out.add("container_network_transmit_packets_dropped_total", i.tx_dropped, i.name)
        out.add("container_network_transmit_errors_total", i.tx_errors, i.name)
    return out.metrics
