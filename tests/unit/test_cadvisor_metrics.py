"""The cAdvisor metric set of ListMetricDescriptors / ListPodSandboxMetrics
(cri/cadvisor_metrics.py and its use in cri/metrics.py), checked the way critest v1.37
and kubelet look at it."""

from __future__ import annotations

import base64
from pathlib import Path

from cri_api.v1 import api_pb2

from agent.protocol import (
    CgroupLimits,
    ContainerDetail,
    ContainerStats,
    DeviceIo,
    FsUsage,
    GuestStats,
    InterfaceStats,
)
from cri import cadvisor_metrics as cm
from cri.runtime.pod_metrics import metric_descriptors, pod_metrics_messages
from cri.runtime.snapshot import SandboxSample, Snapshot
from cri.runtime.state import EXITED, RUNNING, ContainerRecord

# critest v1.37.0 pkg/validate/pod.go: the names kubelet got from cAdvisor ...
EXPECTED = [
    "container_blkio_device_usage_total",
    "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total",
    "container_cpu_cfs_throttled_seconds_total",
    "container_cpu_system_seconds_total",
    "container_cpu_usage_seconds_total",
    "container_cpu_user_seconds_total",
    "container_file_descriptors",
    "container_fs_inodes_free",
    "container_fs_inodes_total",
    "container_fs_limit_bytes",
    "container_fs_reads_bytes_total",
    "container_fs_reads_total",
    "container_fs_usage_bytes",
    "container_fs_writes_bytes_total",
    "container_fs_writes_total",
    "container_hugetlb_max_usage_bytes",
    "container_hugetlb_usage_bytes",
    "container_last_seen",
    "container_memory_cache",
    "container_memory_failcnt",
    "container_memory_failures_total",
    "container_memory_kernel_usage",
    "container_memory_mapped_file",
    "container_memory_max_usage_bytes",
    "container_memory_rss",
    "container_memory_swap",
    "container_memory_usage_bytes",
    "container_memory_working_set_bytes",
    "container_network_receive_bytes_total",
    "container_network_receive_errors_total",
    "container_network_receive_packets_dropped_total",
    "container_network_receive_packets_total",
    "container_network_transmit_bytes_total",
    "container_network_transmit_errors_total",
    "container_network_transmit_packets_dropped_total",
    "container_network_transmit_packets_total",
    "container_oom_events_total",
    "container_pressure_cpu_stalled_seconds_total",
    "container_pressure_cpu_waiting_seconds_total",
    "container_pressure_io_stalled_seconds_total",
    "container_pressure_io_waiting_seconds_total",
    "container_pressure_memory_stalled_seconds_total",
    "container_pressure_memory_waiting_seconds_total",
    "container_processes",
    "container_sockets",
    "container_spec_cpu_period",
    "container_spec_cpu_quota",
    "container_spec_cpu_shares",
    "container_spec_memory_limit_bytes",
    "container_spec_memory_reservation_limit_bytes",
    "container_spec_memory_swap_limit_bytes",
    "container_start_time_seconds",
    "container_threads",
    "container_threads_max",
    "container_ulimits_soft",
]
# ... those it lets a runtime leave out of ListMetricDescriptors ...
UNIMPLEMENTED = [
    "container_hugetlb_max_usage_bytes",
    "container_hugetlb_usage_bytes",
    "container_pressure_cpu_stalled_seconds_total",
    "container_pressure_cpu_waiting_seconds_total",
    "container_pressure_io_stalled_seconds_total",
    "container_pressure_io_waiting_seconds_total",
    "container_pressure_memory_stalled_seconds_total",
    "container_pressure_memory_waiting_seconds_total",
    "container_spec_cpu_quota",
    "container_spec_memory_reservation_limit_bytes",
    "container_ulimits_soft",
]
# ... and those whose values may be missing (block I/O accounting).
OPTIONAL_VALUES = [
    "container_blkio_device_usage_total",
    "container_fs_reads_bytes_total",
    "container_fs_reads_total",
    "container_fs_writes_bytes_total",
    "container_fs_writes_total",
]

NOW = 1_700_000_000 * 10**9


def resources(**fields: int) -> str:
    res = api_pb2.LinuxContainerResources()
    for name, value in fields.items():
        setattr(res, name, value)
    return base64.b64encode(res.SerializeToString()).decode()


def record(cid: str = "c1", state: int = RUNNING, res: str = "") -> ContainerRecord:
    return ContainerRecord(
        id=cid,
        pod_id="p1",
        name="app",
        attempt=0,
        created_at_ns=NOW - 20 * 10**9,
        config="",
        image="registry.k8s.io/busybox:1",
        image_id="sha256:" + "a" * 64,
        image_ref="sha256:" + "a" * 64,
        state=state,
        started_at_ns=NOW - 10 * 10**9 + 5,
        resources=res,
    )


def vm_detail() -> ContainerDetail:
    """What a pod VM's guest reports for a container with critest's limits."""
    return ContainerDetail(
        cgroup="v2",
        cpu_user_usec=2_900_000,
        cpu_system_usec=1_100_000,
        cpu_periods=18,
        cpu_throttled_periods=15,
        cpu_throttled_usec=1_032_273,
        memory_max_usage=770048,
        memory_cache=16384,
        memory_rss=163840,
        memory_mapped_file=0,
        memory_kernel=356352,
        memory_swap=0,
        memory_failcnt=0,
        pgfault=1183,
        pgmajfault=0,
        pgfault_hierarchy=1183,
        pgmajfault_hierarchy=0,
        oom_kills=0,
        hugetlb_usage={"2MB": 0},
        pressure_usec={
            "cpu_some": 2_439_126,
            "cpu_full": 1_421_405,
            "memory_some": 0,
            "memory_full": 0,
            "io_some": 0,
            "io_full": 0,
        },
        io=[DeviceIo(major=259, minor=1, device="/dev/pmem1", read_bytes=4096, reads=1)],
        processes=1,
        threads=1,
        threads_max=0,
        file_descriptors=3,
        sockets=0,
        ulimits_soft={"max_open_files": 1024},
        fs=FsUsage(
            device="tmpfs",
            usage_bytes=53248,
            inodes_used=13,
            capacity_bytes=117 << 20,
            inodes_total=28000,
            inodes_free=27500,
        ),
        limits=CgroupLimits(
            cpu_weight=39,
            cpu_period_usec=100000,
            cpu_quota_usec=20000,
            memory_max=64 << 20,
            memory_swap_max=64 << 20,
            memory_reservation=0,
        ),
    )


def vm_snapshot(detail: ContainerDetail | None) -> Snapshot:
    stats = ContainerStats(
        id="c1",
        cpu_usage_usec=4_000_001,
        memory_current=331776,
        memory_anon=163840,
        memory_file=16384,
        memory_working_set=331776,
        pids_current=1,
        detail=detail,
    )
    return Snapshot(
        sandboxes=[
            SandboxSample(
                sandbox_id="p1",
                pod="web",
                namespace="ns",
                pid=1,
                os_image=None,
                image_ids=(),
                guest=GuestStats(mem_total_kib=1000, mem_available_kib=500),
                containers=(stats, ContainerStats(id="gone")),
                interfaces=(InterfaceStats(name="eth0", rx_bytes=5000, tx_packets=30),),
            )
        ]
    )


def critest_check(message: api_pb2.PodSandboxMetrics) -> None:
    """testMetricDescriptors and testPodSandboxMetrics of critest v1.37."""
    descriptors = metric_descriptors()
    names = {d.name for d in descriptors}
    for d in descriptors:
        assert d.help and d.label_keys, d.name
    assert not [n for n in EXPECTED if n not in names and n not in UNIMPLEMENTED]
    found: dict[str, list[str]] = {}
    for m in message.metrics:
        found.setdefault(m.name, list(m.label_values))
    for ctr in message.container_metrics:
        for m in ctr.metrics:
            found.setdefault(m.name, list(m.label_values))
    missing = [
        n
        for n in EXPECTED
        if not found.get(n) and n not in OPTIONAL_VALUES and n not in UNIMPLEMENTED
    ]
    assert not missing
    for d in descriptors:
        if d.name not in found:
            assert d.name in OPTIONAL_VALUES or d.name in UNIMPLEMENTED, d.name
        else:
            assert len(found[d.name]) == len(d.label_keys), d.name


def by_labels(metrics: list[api_pb2.Metric]) -> dict[tuple[str, ...], int]:
    return {(m.name, *m.label_values[6:]): m.value.value for m in metrics}


def test_descriptors_cover_critest_with_cadvisor_labels() -> None:
    descriptors = {d.name: d for d in metric_descriptors()}
    assert set(EXPECTED) <= set(descriptors)  # the "unimplemented" ones too
    assert len(descriptors) == len(metric_descriptors())
    base = ["container", "id", "image", "name", "namespace", "pod"]
    extra = {
        "container_cpu_usage_seconds_total": ["cpu"],
        "container_network_receive_bytes_total": ["interface"],
        "container_fs_usage_bytes": ["device"],
        "container_fs_reads_total": ["device"],
        "container_blkio_device_usage_total": ["device", "major", "minor", "operation"],
        "container_memory_failures_total": ["failure_type", "scope"],
        "container_ulimits_soft": ["ulimit"],
        "container_hugetlb_usage_bytes": ["pagesize"],
        "container_memory_rss": [],
        "clearcri_pod_memory_pss_bytes": [],
    }
    for name, keys in extra.items():
        assert list(descriptors[name].label_keys) == base + keys, name
    for d in descriptors.values():
        assert list(d.label_keys)[:6] == base, d.name


def fake_qemu(proc: Path) -> Path:
    base = proc / "1"
    base.mkdir(parents=True)
    (base / "smaps_rollup").write_text("Rss: 2000 kB\nPss: 1000 kB\n")
    (base / "status").write_text("RssAnon:\t900 kB\nRssFile:\t90 kB\nRssShmem:\t10 kB\n")
    (base / "stat").write_text("1 (qemu) " + " ".join(["S"] + ["7"] * 40) + "\n")
    return proc


def test_vm_pod_passes_critest_checks_with_true_values(tmp_path: Path) -> None:
    containers = {"c1": record(res=resources(cpu_shares=1024, cpu_quota=20000))}
    proc = fake_qemu(tmp_path / "proc")
    (message,) = pod_metrics_messages(vm_snapshot(vm_detail()), containers, proc)
    critest_check(message)
    (ctr,) = message.container_metrics  # "gone" is not a container the runtime knows
    assert ctr.container_id == "c1"
    values = by_labels(list(ctr.metrics))
    assert list(ctr.metrics[0].label_values[:6]) == [
        "app",
        "c1",
        "registry.k8s.io/busybox:1",
        "c1",
        "ns",
        "web",
    ]
    assert values["container_cpu_usage_seconds_total", "total"] == 4  # whole seconds
    assert values["clearcri_container_cpu_usage_nanoseconds_total",] == 4_000_001_000
    assert values["container_cpu_user_seconds_total",] == 2
    assert values["container_cpu_cfs_throttled_seconds_total",] == 1
    assert values["container_memory_working_set_bytes",] == 331776
    assert values["container_memory_max_usage_bytes",] == 770048
    assert values["container_memory_failures_total", "pgfault", "container"] == 1183
    assert values["container_memory_failures_total", "pgmajfault", "hierarchy"] == 0
    assert values["container_fs_usage_bytes", "tmpfs"] == 53248
    assert values["container_fs_inodes_free", "tmpfs"] == 27500
    assert values["container_fs_reads_bytes_total", "/dev/pmem1"] == 4096
    assert values["container_blkio_device_usage_total", "/dev/pmem1", "259", "1", "Read"] == 4096
    assert values["container_hugetlb_usage_bytes", "2MB"] == 0
    assert values["container_ulimits_soft", "max_open_files"] == 1024
    assert values["container_pressure_cpu_waiting_seconds_total",] == 2
    assert values["container_pressure_cpu_stalled_seconds_total",] == 1
    assert values["container_spec_memory_limit_bytes",] == 64 << 20
    assert values["container_spec_memory_swap_limit_bytes",] == 64 << 20
    assert values["container_spec_cpu_quota",] == 20000
    assert values["container_spec_cpu_period",] == 100000
    # weight 39 is what shares 1024 become: the CRI's figure is reported
    assert values["container_spec_cpu_shares",] == 1024
    assert values["container_start_time_seconds",] == NOW // 10**9 - 10
    assert values["container_last_seen",] > 0
    kinds = {m.name: m.metric_type for m in ctr.metrics}
    assert kinds["container_cpu_usage_seconds_total"] == api_pb2.COUNTER
    assert kinds["container_memory_rss"] == api_pb2.GAUGE
    net = by_labels(list(message.metrics))
    assert net["container_network_receive_bytes_total", "eth0"] == 5000
    assert net["container_network_transmit_packets_total", "eth0"] == 30
    assert list(message.metrics[-1].label_values[:6]) == ["POD", "p1", "", "p1", "ns", "web"]


def test_unknown_figures_are_left_out_not_zero() -> None:
    detail = vm_detail()
    detail.memory_max_usage = None
    detail.memory_swap = None
    detail.pressure_usec = {}
    detail.hugetlb_usage = {}
    detail.ulimits_soft = {}
    detail.fs = None
    assert detail.limits is not None
    detail.limits.cpu_quota_usec = None  # no quota
    containers = {"c1": record()}
    (message,) = pod_metrics_messages(vm_snapshot(detail), containers, Path("/nonexistent"))
    names = {m.name for m in message.container_metrics[0].metrics}
    for gone in (
        "container_memory_max_usage_bytes",
        "container_memory_swap",
        "container_pressure_cpu_waiting_seconds_total",
        "container_hugetlb_usage_bytes",
        "container_ulimits_soft",
        "container_fs_usage_bytes",
        "container_spec_cpu_quota",
    ):
        assert gone not in names


def test_exited_containers_are_left_out() -> None:
    containers = {"c1": record(state=EXITED)}
    (message,) = pod_metrics_messages(vm_snapshot(vm_detail()), containers, Path("/nonexistent"))
    assert not message.container_metrics


def test_agent_without_detail_gives_the_cgroup_basics() -> None:
    (message,) = pod_metrics_messages(vm_snapshot(None), {"c1": record()}, Path("/nonexistent"))
    values = by_labels(list(message.container_metrics[0].metrics))
    assert values["container_memory_rss",] == 163840
    assert values["container_memory_cache",] == 16384
    assert values["container_cpu_usage_seconds_total", "total"] == 4
    assert "container_threads" not in {n for n, *_ in values}


def test_spec_values() -> None:
    # cgroups in force: the cgroup's figures
    limits = CgroupLimits(cpu_weight=100, cpu_period_usec=50000, memory_max=None)
    values = cm.spec_values(None, limits)
    assert values["container_spec_cpu_shares"] == cm.weight_to_shares(100) == 2597
    assert values["container_spec_cpu_period"] == 50000
    assert values["container_spec_cpu_quota"] is None
    assert values["container_spec_memory_limit_bytes"] == 0  # unlimited
    # shares the weight was not made from (an update written elsewhere): the weight's
    res = api_pb2.LinuxContainerResources(cpu_shares=512)
    assert cm.spec_values(res, CgroupLimits(cpu_weight=39))["container_spec_cpu_shares"] == 998
    assert cm.shares_to_weight(1024) == 39 and cm.shares_to_weight(1) == 1
    # cgroup v1 shares as they are
    assert cm.spec_values(res, CgroupLimits(cpu_shares=512))["container_spec_cpu_shares"] == 512
    # no cgroup: the CRI's request
    res = api_pb2.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=20000,
        cpu_shares=1024,
        memory_limit_in_bytes=64 << 20,
        memory_swap_limit_in_bytes=128 << 20,
    )
    assert cm.spec_values(res, None) == {
        "container_spec_cpu_period": 100000,
        "container_spec_cpu_quota": 20000,
        "container_spec_cpu_shares": 1024,
        "container_spec_memory_limit_bytes": 64 << 20,
        "container_spec_memory_swap_limit_bytes": 128 << 20,
        "container_spec_memory_reservation_limit_bytes": None,
    }


def test_container_without_cgroup_reports_no_cgroup_zeros() -> None:
    detail = ContainerDetail(cgroup="", processes=2, threads=3, file_descriptors=4, sockets=1)
    containers = {"c1": record(res=resources(memory_limit_in_bytes=1 << 20))}
    (message,) = pod_metrics_messages(vm_snapshot(detail), containers, Path("/nonexistent"))
    values = by_labels(list(message.container_metrics[0].metrics))
    assert ("container_cpu_usage_seconds_total", "total") not in values
    assert "container_memory_usage_bytes" not in {n for n, *_ in values}
    assert values["container_processes",] == 2
    assert values["container_spec_memory_limit_bytes",] == 1 << 20


def test_label_arity_is_enforced() -> None:
    out = cm.MetricList(["a"] * 6, NOW)
    out.add("container_threads", None)
    assert out.metrics == []
    try:
        out.add("container_fs_usage_bytes", 1)
    except ValueError:
        pass
    else:
        raise AssertionError("a missing device label must be refused")
