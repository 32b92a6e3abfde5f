"""The cAdvisor metric set of ListMetricDescriptors / ListPodSandboxMetrics end to end:
`clearcri serve` as a real process, a pod VM (and a host-handler pod) on a test-owned
CNI bridge, a container with critest's kind of limits that writes files, burns CPU
and pings the bridge; then every series is checked for its label arity and for values
that match what the container did."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.integration.cri_daemon import CriDaemon
from tests.integration.test_host_pods import HostPodDaemon, lab  # noqa: F401 - fixture
from tests.integration.test_network import CNI_BIN_DIRS, CniLab
from tests.registry import RegistryServer, busybox_layer, push_image, registry  # noqa: F401
from tests.unit.test_cadvisor_metrics import EXPECTED, OPTIONAL_VALUES, UNIMPLEMENTED

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (VMs, CNI)"),
    pytest.mark.skipif(
        not all(any((d / p).exists() for d in CNI_BIN_DIRS) for p in ("bridge", "host-local")),
        reason="CNI plugins are not installed",
    ),
]

Stub = api_pb2_grpc.RuntimeServiceStub
MIB = 1 << 20
# What the container does before the metrics are read: 10 small files in its writable
# layer (as critest), two seconds and more of CPU (at half a CPU: throttled), and
# pings of the bridge's gateway (traffic on the pod's eth0).
WORK = (
    "mkdir -p /var/lib/mydisktest && for i in $(seq 1 10); do "
    "echo hi >> /var/lib/mydisktest/inode_test_file_$i; done; sync; "
    "end=$(( $(date +%s) + 6 )); while [ $(date +%s) -lt $end ]; do :; done"
)


@pytest.fixture(scope="module")
def image_ref(registry: RegistryServer) -> str:  # noqa: F811
    asyncio.run(push_image(registry.host, "library/busybox", ["1"], [busybox_layer()]))
    return f"{registry.host}/library/busybox:1"


async def _remove_all(d: CriDaemon) -> None:
    async with d.channel() as channel:
        rt = Stub(channel)  # type: ignore[no-untyped-call]
        for pod in (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items:
            await rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


@pytest.fixture
def daemon(lab: CniLab) -> Iterator[HostPodDaemon]:  # noqa: F811 - the imported fixture
    root = Path(f"/tmp/cc-cadv-{os.getpid()}-{os.urandom(3).hex()}")
    root.mkdir()
    d = HostPodDaemon(root, lab, templates=True)
    try:
        d.start()
        yield d
        asyncio.run(_remove_all(d))
    finally:
        d.stop()
        if list((root / "run" / "sandboxes").glob("*/state.json")):
            d.start()
            asyncio.run(_remove_all(d))
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def rt(daemon: HostPodDaemon, image_ref: str) -> AsyncIterator[Stub]:
    async with daemon.channel() as channel:
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
        yield Stub(channel)  # type: ignore[no-untyped-call]


def pod_config(name: str, log_dir: Path, host: bool) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="metrics", uid=f"uid-{name}"),
        hostname=name,
        log_directory=str(log_dir),
    )
    if host:
        # a host pod: privileged, so the host handler serves it; a cgroup of its own
        config.linux.security_context.privileged = True
        config.linux.cgroup_parent = f"/cc-cadvisor-test/{name}-{os.urandom(3).hex()}"
    return config


async def run_workload(
    rt: Stub, name: str, image: str, log_dir: Path, *, host: bool
) -> tuple[str, str, float]:
    pod = pod_config(name, log_dir, host)
    request = api_pb2.RunPodSandboxRequest(config=pod, runtime_handler="host" if host else "")
    pod_id = str((await rt.RunPodSandbox(request)).pod_sandbox_id)
    status = await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    gateway = status.status.network.ip.rsplit(".", 1)[0] + ".1"
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="app"),
        image=api_pb2.ImageSpec(image=image),
        command=["sleep", "1000"],
        log_path="app.log",
    )
    res = config.linux.resources
    res.cpu_period = 100000
    res.cpu_quota = 50000
    res.cpu_shares = 1024
    res.memory_limit_in_bytes = 64 * MIB
    res.memory_swap_limit_in_bytes = 64 * MIB
    config.linux.security_context.privileged = host
    create = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod
    )
    cid = str((await rt.CreateContainer(create)).container_id)
    started = time.time()
    await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    for cmd in (["sh", "-c", WORK], ["ping", "-c", "3", "-W", "5", gateway]):
        result = await rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=120))
        assert result.exit_code == 0, (cmd, result.stdout, result.stderr)
    return pod_id, cid, started


Series = dict[tuple[str, ...], int]


async def pod_metrics(rt: Stub, pod_id: str) -> tuple[api_pb2.PodSandboxMetrics, dict[str, int]]:
    """The pod's metrics once its container has its full set, and the label arity of
    every descriptor."""
    descriptors = await rt.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest())
    arity = {d.name: len(d.label_keys) for d in descriptors.descriptors}
    deadline = time.monotonic() + 60
    while True:
        response = await rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest())
        (mine,) = [m for m in response.pod_metrics if m.pod_sandbox_id == pod_id]
        names = {m.name for c in mine.container_metrics for m in c.metrics}
        if "container_threads" in names or time.monotonic() > deadline:
            return mine, arity
        await asyncio.sleep(1)  # a guest too busy to answer in time: ask again


def check_critest(message: api_pb2.PodSandboxMetrics, arity: dict[str, int]) -> None:
    """What critest's two metrics specs check."""
    assert not [n for n in EXPECTED if n not in arity and n not in UNIMPLEMENTED]
    found: dict[str, int] = {}
    for metric in [*message.metrics, *(m for c in message.container_metrics for m in c.metrics)]:
        assert len(metric.label_values) == arity[metric.name], metric.name
        found[metric.name] = len(metric.label_values)
    missing = [n for n in EXPECTED if n not in found and n not in OPTIONAL_VALUES]
    missing = [n for n in missing if n not in UNIMPLEMENTED]
    assert not missing
    for name in arity:
        assert name in found or name in OPTIONAL_VALUES or name in UNIMPLEMENTED, name


def series(metrics: list[api_pb2.Metric]) -> Series:
    return {(m.name, *m.label_values[6:]): m.value.value for m in metrics}


def check_container(
    message: api_pb2.PodSandboxMetrics, cid: str, started: float, image: str, pod: str
) -> Series:
    (ctr,) = message.container_metrics
    assert ctr.container_id == cid
    for metric in ctr.metrics:
        assert list(metric.label_values[:6]) == ["app", cid, image, cid, "metrics", pod]
    s = series(list(ctr.metrics))
    now = time.time()
    # CPU: the busy loop ran for seconds at half a CPU, throttled by its quota
    usage_ns = s["clearcri_container_cpu_usage_nanoseconds_total",]
    assert usage_ns >= 1_000_000_000
    assert s["container_cpu_usage_seconds_total", "total"] == usage_ns // 1_000_000_000
    user, system = s["container_cpu_user_seconds_total",], s["container_cpu_system_seconds_total",]
    assert user + system <= s["container_cpu_usage_seconds_total", "total"] + 1
    assert s["container_cpu_cfs_periods_total",] > 0
    assert (
        0 < s["container_cpu_cfs_throttled_periods_total",] <= s["container_cpu_cfs_periods_total",]
    )
    # memory: charged, under the 64 MiB limit, peak at least the current use
    usage = s["container_memory_usage_bytes",]
    assert 0 < s["container_memory_working_set_bytes",] <= usage < 64 * MIB
    assert s["container_memory_max_usage_bytes",] >= usage
    assert s["container_memory_rss",] > 0
    assert s["container_memory_failures_total", "pgfault", "container"] > 0
    assert s["container_oom_events_total",] == 0 and s["container_memory_swap",] == 0
    # the spec: the limits in force
    assert s["container_spec_memory_limit_bytes",] == 64 * MIB
    assert s["container_spec_memory_swap_limit_bytes",] == 64 * MIB
    assert s["container_spec_cpu_quota",] == 50000
    assert s["container_spec_cpu_period",] == 100000
    assert s["container_spec_cpu_shares",] == 1024
    assert started - 2 <= s["container_start_time_seconds",] <= now
    assert now - 120 <= s["container_last_seen",] <= now + 1
    # processes: sleep, and its /proc entries
    assert s["container_processes",] >= 1
    assert s["container_threads",] >= s["container_processes",]
    assert s["container_file_descriptors",] >= 3
    assert s["container_ulimits_soft", "max_open_files"] > 0
    # the writable layer holds the ten files (a page at least each on tmpfs)
    ((fs_key, fs_used),) = [(k, v) for k, v in s.items() if k[0] == "container_fs_usage_bytes"]
    assert fs_used >= 10 * 512
    device = fs_key[1]
    assert s["container_fs_limit_bytes", device] >= fs_used
    assert s["container_fs_inodes_total", device] >= s["container_fs_inodes_free", device] > 0
    return s


def check_network(message: api_pb2.PodSandboxMetrics, pod_id: str) -> None:
    net = series([m for m in message.metrics if m.name.startswith("container_network_")])
    for metric in message.metrics:
        assert list(metric.label_values[:4]) == ["POD", pod_id, "", pod_id]
    # three pings and their answers crossed eth0
    assert net["container_network_transmit_packets_total", "eth0"] >= 3
    assert net["container_network_receive_packets_total", "eth0"] >= 3
    assert net["container_network_transmit_bytes_total", "eth0"] >= 3 * 84
    assert net["container_network_receive_errors_total", "eth0"] == 0


async def test_pod_vm_reports_the_cadvisor_set(rt: Stub, image_ref: str, tmp_path: Path) -> None:
    pod_id, cid, started = await run_workload(rt, "cadv-vm", image_ref, tmp_path, host=False)
    message, arity = await pod_metrics(rt, pod_id)
    check_critest(message, arity)
    s = check_container(message, cid, started, image_ref, "cadv-vm")
    ((_, device),) = [k for k in s if k[0] == "container_fs_usage_bytes"]
    assert device == "tmpfs"  # the guest's /run
    assert s["container_fs_usage_bytes", device] >= 10 * 4096  # a page per file
    check_network(message, pod_id)
    # what the guest kernel knows beyond critest's minimum: PSI and huge pages
    assert s["container_pressure_cpu_waiting_seconds_total",] >= 0
    assert ("container_pressure_io_stalled_seconds_total",) in s
    assert s["container_hugetlb_usage_bytes", "2MB"] == 0
    assert s["container_spec_memory_reservation_limit_bytes",] == 0
    assert s["container_threads_max",] == 0  # no pids limit
    pod_level = {m.name: m.value.value for m in message.metrics}
    assert pod_level["clearcri_pod_memory_pss_bytes"] > 0


async def test_host_pod_reports_the_cadvisor_set(rt: Stub, image_ref: str, tmp_path: Path) -> None:
    if shutil.which("crun") is None:
        pytest.skip("crun is not installed")
    pod_id, cid, started = await run_workload(rt, "cadv-host", image_ref, tmp_path, host=True)
    message, arity = await pod_metrics(rt, pod_id)
    names = {m.name for c in message.container_metrics for m in c.metrics}
    # a host pod has no guest: its clearcri_pod_guest_* figures are the only ones missing
    assert not [n for n in EXPECTED if n not in names | {m.name for m in message.metrics}
                and n not in OPTIONAL_VALUES and n not in UNIMPLEMENTED]  # fmt: skip
    for metric in [*message.metrics, *(m for c in message.container_metrics for m in c.metrics)]:
        assert len(metric.label_values) == arity[metric.name], metric.name
    check_container(message, cid, started, image_ref, "cadv-host")
    check_network(message, pod_id)
