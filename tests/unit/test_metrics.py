"""Metrics: the pushed instruments, the scrape-time collector on fake runtime and
sandbox objects (fake /proc and /sys trees), the HTTP endpoint, the CRI metric
messages, and the host KSM switch on a fake sysfs directory."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.protocol import ContainerStats, GuestStats, InterfaceStats, StatsReport
from cri.config import ConfigError, load_config
from cri.metrics import (
    PAGE_SIZE,
    MetricsExporter,
    MetricsServer,
    RuntimeCollector,
    RuntimeMetrics,
    crash_cause,
    page_cache_bytes,
    read_ksm,
)
from cri.runtime.pod_metrics import (
    list_pod_sandbox_metrics,
    metric_descriptors,
    pod_metrics_messages,
)
from cri.runtime.snapshot import take_snapshot
from cri.runtime.state import CREATED, EXITED, POD_NOTREADY, RUNNING, ContainerRecord, PodRecord
from sandbox.api import BaseStandby, BootTimes, PoolReport, SharedFiles
from sandbox.procfs import CLOCK_TICKS
from sandbox.vm import configure_host_ksm

# -- fakes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeMachine:
    os_image: Path


@dataclass
class FakeSandbox:
    id: str
    pid: int
    machine: FakeMachine
    slots: dict[int, str] = field(default_factory=dict)
    state: str = "ready"
    guest_kib: tuple[int, int] = (262144, 200000)
    containers: list[ContainerStats] = field(default_factory=list)
    hang: bool = False

    interfaces: list[InterfaceStats] = field(default_factory=list)
    detail_calls: int = 0

    def shared_files(self) -> SharedFiles:
        return SharedFiles(self.machine.os_image, tuple(sorted(set(self.slots.values()))))

    async def stats(self, container_id: str | None = None, *, detail: bool = False) -> StatsReport:
        if self.hang:
            await asyncio.sleep(3600)
        total, available = self.guest_kib
        self.detail_calls += detail
        return StatsReport(
            containers=list(self.containers),
            guest=GuestStats(mem_total_kib=total, mem_available_kib=available),
            interfaces=list(self.interfaces) if detail else [],
        )


@dataclass
class FakeRecords:
    pods: dict[str, PodRecord] = field(default_factory=dict)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeImage:
    id: str
    repo_tags: tuple[str, ...]
    rootfs_id: str


@dataclass
class FakePullStats:
    blob_bytes: int = 0


@dataclass
class FakeImages:
    root: Path
    images: list[FakeImage] = field(default_factory=list)
    stats: FakePullStats = field(default_factory=FakePullStats)

    def list(self) -> Sequence[FakeImage]:
        return self.images

    def rootfs_path(self, image_id: str) -> Path:
        return self.root / f"{image_id.split(':', 1)[1]}.erofs"


@dataclass
class FakeRuntime:
    state: FakeRecords
    sandboxes: Mapping[str, FakeSandbox]
    images: FakeImages


def pod_record(pod_id: str, name: str, state: int = api_pb2.SANDBOX_READY) -> PodRecord:
    return PodRecord(
        id=pod_id,
        name=name,
        uid="uid-" + name,
        namespace="ns",
        attempt=0,
        created_at_ns=1,
        runtime_handler="clearcri",
        config="",
        state=state,
    )


def container_record(cid: str, pod_id: str, state: int) -> ContainerRecord:
    return ContainerRecord(
        id=cid,
        pod_id=pod_id,
        name="c-" + cid,
        attempt=0,
        created_at_ns=1,
        config="",
        image="busybox",
        image_id="sha256:" + "a" * 64,
        image_ref="busybox",
        state=state,
    )


def fake_proc(root: Path, pid: int, *, pss_kib: int, anon_kib: int, ticks: int) -> None:
    base = root / str(pid)
    base.mkdir(parents=True)
    (base / "smaps_rollup").write_text(
        "55d0-7ff0 ---p 00000000 00:00 0 [rollup]\n"
        f"Rss:              {anon_kib + 1000} kB\n"
        f"Pss:              {pss_kib} kB\n"
        f"Pss_Anon:         {anon_kib} kB\n"
    )
    (base / "status").write_text(
        f"Name:\tqemu-system-x86\nVmRSS:\t{anon_kib + 1000} kB\n"
        f"RssAnon:\t{anon_kib} kB\nRssFile:\t900 kB\nRssShmem:\t100 kB\n"
    )
    # comm with a space and a parenthesis, as /proc allows
    fields = ["S"] + ["0"] * 10 + [str(ticks), str(ticks)] + ["0"] * 30
    (base / "stat").write_text(f"{pid} (qemu sys) x) " + " ".join(fields) + "\n")
    (base / "ksm_merging_pages").write_text("25\n")


def fake_ksm(root: Path, **values: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    defaults = {
        "run": 1,
        "pages_shared": 10,
        "pages_sharing": 300,
        "pages_unshared": 40,
        "pages_volatile": 5,
        "full_scans": 7,
        "pages_to_scan": 100,
        "sleep_millisecs": 20,
    }
    defaults.update(values)
    for name, value in defaults.items():
        (root / name).write_text(f"{value}\n")
    return root


IMAGE_ID = "sha256:" + "b" * 64


@pytest.fixture
def world(tmp_path: Path) -> tuple[FakeRuntime, RuntimeCollector]:
    """Three pods: two ready VMs sharing the OS image, one with a container image,
    and one pod whose VM is gone."""
    os_image = tmp_path / "os.img"
    os_image.write_bytes(b"\0" * (64 * PAGE_SIZE))
    images = FakeImages(tmp_path / "rootfs", [FakeImage(IMAGE_ID, ("busybox:1",), "img1")])
    images.root.mkdir()
    images.rootfs_path(IMAGE_ID).write_bytes(b"\0" * (32 * PAGE_SIZE))
    images.stats.blob_bytes = 12345
    proc = tmp_path / "proc"
    fake_proc(proc, 101, pss_kib=50_000, anon_kib=40_000, ticks=150)
    fake_proc(proc, 102, pss_kib=60_000, anon_kib=45_000, ticks=300)
    records = FakeRecords()
    for pod_id, name in (("p1", "web"), ("p2", "db")):
        records.pods[pod_id] = pod_record(pod_id, name)
    records.pods["p3"] = pod_record("p3", "old", POD_NOTREADY)
    records.containers["c1"] = container_record("c1", "p1", RUNNING)
    records.containers["c2"] = container_record("c2", "p1", EXITED)
    records.containers["c3"] = container_record("c3", "p2", CREATED)
    machine = FakeMachine(os_image)
    sandboxes = {
        "p1": FakeSandbox(
            "p1",
            101,
            machine,
            {0: "img1"},
            containers=[ContainerStats(id="c1", cpu_usage_usec=5, memory_working_set=4096)],
        ),
        "p2": FakeSandbox("p2", 102, machine),
        "p3": FakeSandbox("p3", 103, machine, state="dead"),
    }
    runtime = FakeRuntime(records, sandboxes, images)
    resident = {os_image: 16 * PAGE_SIZE, images.rootfs_path(IMAGE_ID): 8 * PAGE_SIZE}
    collector = RuntimeCollector(
        proc=proc, ksm_dir=fake_ksm(tmp_path / "ksm"), resident=lambda p: resident.get(p)
    )
    return runtime, collector


def samples(registry_text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(registry_text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


async def render(runtime: FakeRuntime, collector: RuntimeCollector) -> bytes:
    metrics = RuntimeMetrics()
    body, content_type = await MetricsExporter(metrics, runtime, collector).render()
    assert content_type.startswith("text/plain")
    return body


# -- pushed metrics ------------------------------------------------------------------------


def test_cri_requests_and_durations() -> None:
    metrics = RuntimeMetrics()
    metrics.observe_cri("RunPodSandbox", "OK", 2.5)
    metrics.observe_cri("RunPodSandbox", "UNAVAILABLE", 0.1)
    metrics.observe_cri("ListPodSandbox", "OK", 0.0007)
    text = generate_latest(metrics.registry)
    assert value(text, "clearcri_cri_requests_total", method="RunPodSandbox", code="OK") == 1
    assert (
        value(text, "clearcri_cri_requests_total", method="RunPodSandbox", code="UNAVAILABLE") == 1
    )
    assert value(text, "clearcri_cri_request_duration_seconds_count", method="RunPodSandbox") == 2
    assert (
        value(
            text,
            "clearcri_cri_request_duration_seconds_bucket",
            method="ListPodSandbox",
            le="0.001",
        )
        == 1
    )


def test_boot_phases_and_first_container() -> None:
    metrics = RuntimeMetrics()
    boot = BootTimes(vmm_spawn=0.04, firmware=0.1, kernel=1.2, agent_ready=0.6, total=2.0)
    metrics.sandbox_started("p1", boot, 2.2)
    metrics.sandbox_started("p2", boot, 2.4)
    metrics.container_started("p1", 0.3)
    metrics.container_started("p1", 0.2)  # a second container is not part of the boot
    text = generate_latest(metrics.registry)
    for phase in ("vmm_spawn", "firmware", "kernel", "agent_ready"):
        assert value(text, "clearcri_sandbox_boot_seconds_count", phase=phase) == 2
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="first_container") == 1
    assert value(text, "clearcri_sandbox_boot_seconds_bucket", phase="vmm_spawn", le="0.05") == 2
    assert value(text, "clearcri_sandbox_boot_seconds_bucket", phase="kernel", le="1.0") == 0
    assert value(text, "clearcri_sandbox_boot_seconds_bucket", phase="kernel", le="1.25") == 2
    assert value(text, "clearcri_sandbox_start_seconds_count") == 2
    assert value(text, "clearcri_sandbox_start_seconds_sum") == pytest.approx(4.6)
    assert value(text, "clearcri_container_start_seconds_count") == 2
    # the buckets reach from 50 ms to 30 s
    assert value(text, "clearcri_sandbox_start_seconds_bucket", le="0.05") == 0
    assert value(text, "clearcri_sandbox_start_seconds_bucket", le="30.0") == 2


def test_a_clone_sized_at_clone_time_reports_its_hotplug_phase() -> None:
    metrics = RuntimeMetrics()
    plain = BootTimes(vmm_spawn=0.05, restore=0.02, agent_ready=0.4, total=0.5)
    sized = BootTimes(vmm_spawn=0.05, restore=0.03, agent_ready=0.4, hotplug=0.9, total=1.0)
    metrics.sandbox_started("p1", plain, 1.0)
    metrics.sandbox_started("p2", sized, 1.5)
    text = generate_latest(metrics.registry)
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="restore") == 2
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="hotplug") == 1
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="kernel") == 0


def test_a_pod_on_a_standby_vm_reports_the_take_over_alone() -> None:
    metrics = RuntimeMetrics()
    metrics.sandbox_started("p1", BootTimes(standby=0.02, total=0.02), 0.3)
    metrics.sandbox_started("p2", BootTimes(vmm_spawn=0.05, restore=0.02, total=0.5), 1.0)
    text = generate_latest(metrics.registry)
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="standby") == 1
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="vmm_spawn") == 1
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="restore") == 1
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="agent_ready") == 1


def test_first_container_window_drops_stale_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = RuntimeMetrics()
    metrics.sandbox_started("old", BootTimes(), 1.0)
    later = time.monotonic() + 3600
    monkeypatch.setattr(time, "monotonic", lambda: later)
    metrics.sandbox_started("new", BootTimes(), 1.0)
    assert "old" not in metrics._ready_at
    metrics.container_started("old", 0.1)
    text = generate_latest(metrics.registry)
    assert value(text, "clearcri_sandbox_boot_seconds_count", phase="first_container") == 0


def test_crashes_and_pulls() -> None:
    metrics = RuntimeMetrics()
    metrics.vm_crashed("the guest kernel panicked")
    metrics.vm_crashed("qemu exited with signal 9")
    metrics.vm_crashed("the VM exited while no daemon was watching it")
    metrics.image_pulled(True, 1.5)
    metrics.image_pulled(False, 0.2)
    text = generate_latest(metrics.registry)
    for cause in ("panic", "exit", "lost"):
        assert value(text, "clearcri_vm_crashes_total", cause=cause) == 1
    assert value(text, "clearcri_image_pulls_total", result="success") == 1
    assert value(text, "clearcri_image_pulls_total", result="failure") == 1
    assert value(text, "clearcri_image_pull_seconds_count") == 1
    assert crash_cause("its VM state was lost: gone") == "lost"
    assert crash_cause("the VM shut down (guest-shutdown)") == "exit"


def test_dedicated_registry() -> None:
    from prometheus_client import REGISTRY

    RuntimeMetrics()
    RuntimeMetrics()  # a second instance does not clash: nothing goes to the global one
    assert "clearcri_sandbox_boot_seconds" not in REGISTRY._names_to_collectors


# -- scrape-time collector -----------------------------------------------------------------


async def test_collector_sandboxes_and_states(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> None:
    runtime, collector = world
    text = await render(runtime, collector)
    web = {"sandbox_id": "p1", "pod": "web", "namespace": "ns"}
    db = {"sandbox_id": "p2", "pod": "db", "namespace": "ns"}
    assert value(text, "clearcri_sandbox_memory_pss_bytes", **web) == 50_000 * 1024
    assert value(text, "clearcri_sandbox_memory_pss_bytes", **db) == 60_000 * 1024
    assert value(text, "clearcri_sandbox_memory_rss_bytes", kind="anon", **web) == 40_000 * 1024
    assert value(text, "clearcri_sandbox_memory_rss_bytes", kind="file", **web) == 900 * 1024
    assert value(text, "clearcri_sandbox_memory_rss_bytes", kind="shmem", **web) == 100 * 1024
    assert value(text, "clearcri_sandbox_cpu_seconds_total", **db) == 600 / CLOCK_TICKS
    assert value(text, "clearcri_sandbox_ksm_merged_bytes", **web) == 25 * PAGE_SIZE
    assert value(text, "clearcri_sandbox_guest_memory_total_bytes", **web) == 262144 * 1024
    assert value(text, "clearcri_sandbox_guest_memory_available_bytes", **web) == 200000 * 1024
    # the dead VM has no per-sandbox series
    assert not [k for k in samples(text) if ("sandbox_id", "p3") in k[1]]
    assert value(text, "clearcri_sandboxes", state="ready") == 2
    assert value(text, "clearcri_sandboxes", state="notready") == 1
    assert value(text, "clearcri_containers", state="running") == 1
    assert value(text, "clearcri_containers", state="exited") == 1
    assert value(text, "clearcri_containers", state="created") == 1
    assert value(text, "clearcri_containers", state="unknown") == 0
    assert value(text, "clearcri_image_pull_bytes_total") == 12345


async def test_collector_ksm(world: tuple[FakeRuntime, RuntimeCollector]) -> None:
    runtime, collector = world
    text = await render(runtime, collector)
    assert value(text, "clearcri_ksm_run") == 1
    assert value(text, "clearcri_ksm_pages_shared") == 10
    assert value(text, "clearcri_ksm_pages_sharing") == 300
    assert value(text, "clearcri_ksm_pages_unshared") == 40
    assert value(text, "clearcri_ksm_full_scans_total") == 7
    assert value(text, "clearcri_ksm_saved_bytes") == 300 * PAGE_SIZE


async def test_collector_standby_vms_by_base(
    world: tuple[FakeRuntime, RuntimeCollector], tmp_path: Path
) -> None:
    runtime, collector = world
    fake_proc(tmp_path / "proc", 201, pss_kib=70_000, anon_kib=30_000, ticks=10)
    fake_proc(tmp_path / "proc", 202, pss_kib=72_000, anon_kib=30_000, ticks=10)
    report = PoolReport(
        bases=(
            BaseStandby(vcpus=1, memory_mib=256, target=2, pids=(201, 202)),
            BaseStandby(vcpus=1, memory_mib=96, target=0, pids=()),
        ),
        taken=5,
        missed=2,
    )
    body, _ = await MetricsExporter(
        RuntimeMetrics(), runtime, collector, standby=lambda: report
    ).render()
    default = {"vcpus": "1", "memory_mib": "256"}
    smallest = {"vcpus": "1", "memory_mib": "96"}
    assert value(body, "clearcri_standby_vms", **default) == 2
    assert value(body, "clearcri_standby_target", **default) == 2
    assert value(body, "clearcri_standby_memory_pss_bytes", **default) == 142_000 * 1024
    assert value(body, "clearcri_standby_vms", **smallest) == 0
    assert value(body, "clearcri_standby_memory_pss_bytes", **smallest) == 0
    assert value(body, "clearcri_standby_taken_total") == 5
    assert value(body, "clearcri_standby_missed_total") == 2
    # a node without a pool has no standby series
    assert not any(
        name.startswith("clearcri_standby") for name, _ in samples(await render(runtime, collector))
    )


async def test_collector_without_ksm(
    world: tuple[FakeRuntime, RuntimeCollector], tmp_path: Path
) -> None:
    runtime, collector = world
    collector.ksm_dir = tmp_path / "absent"
    text = await render(runtime, collector)
    assert not [k for k in samples(text) if k[0].startswith("clearcri_ksm_")]
    assert read_ksm(tmp_path / "absent") == {}


async def test_collector_shared_images(world: tuple[FakeRuntime, RuntimeCollector]) -> None:
    runtime, collector = world
    text = await render(runtime, collector)
    os_path = str(runtime.sandboxes["p1"].machine.os_image)
    os_labels = {"image": "guest-os", "kind": "os", "path": os_path}
    img_path = str(runtime.images.rootfs_path(IMAGE_ID))
    img_labels = {"image": "busybox:1", "kind": "container", "path": img_path}
    assert value(text, "clearcri_shared_image_vms", **os_labels) == 2
    assert value(text, "clearcri_shared_image_size_bytes", **os_labels) == 64 * PAGE_SIZE
    assert value(text, "clearcri_shared_image_resident_bytes", **os_labels) == 16 * PAGE_SIZE
    assert value(text, "clearcri_shared_image_saved_bytes", **os_labels) == 16 * PAGE_SIZE
    assert value(text, "clearcri_shared_image_vms", **img_labels) == 1
    assert value(text, "clearcri_shared_image_saved_bytes", **img_labels) == 0
    # the second VM attaches the container image too: 2 VMs, one copy saved
    runtime.sandboxes["p2"].slots[0] = "img1"
    text = await render(runtime, collector)
    assert value(text, "clearcri_shared_image_vms", **img_labels) == 2
    assert value(text, "clearcri_shared_image_saved_bytes", **img_labels) == 8 * PAGE_SIZE


async def test_image_missing_from_store_still_counted(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> None:
    runtime, collector = world
    runtime.images.images.clear()
    text = await render(runtime, collector)
    labels = {"image": "img1", "kind": "container", "path": ""}
    assert value(text, "clearcri_shared_image_vms", **labels) == 1
    assert ("clearcri_shared_image_saved_bytes", tuple(sorted(labels.items()))) not in samples(text)


async def test_hung_agent_loses_only_its_guest_figures(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> None:
    runtime, _ = world
    runtime.sandboxes["p2"].hang = True
    started = time.monotonic()
    snap = await take_snapshot(runtime, guest_timeout=0.2)
    assert time.monotonic() - started < 2
    by_id = {s.sandbox_id: s for s in snap.sandboxes}
    assert by_id["p1"].guest is not None and by_id["p2"].guest is None
    assert set(by_id) == {"p1", "p2"}


async def test_slow_agent_keeps_its_recent_figures(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> None:
    runtime, _ = world
    cache: dict[str, tuple[float, StatsReport]] = {}
    await take_snapshot(runtime, cache=cache)
    assert set(cache) == {"p1", "p2"}
    runtime.sandboxes["p2"].hang = True
    snap = await take_snapshot(runtime, guest_timeout=0.1, cache=cache)
    guest = {s.sandbox_id: s.guest for s in snap.sandboxes}["p2"]
    assert guest is not None and guest.mem_total_kib == 262144
    cache["p2"] = (time.monotonic() - 3600, cache["p2"][1])  # too old to stand in
    snap = await take_snapshot(runtime, guest_timeout=0.1, cache=cache)
    assert {s.sandbox_id: s.guest for s in snap.sandboxes}["p2"] is None
    runtime.sandboxes["p2"].state = "dead"
    await take_snapshot(runtime, guest_timeout=0.1, cache=cache)
    assert set(cache) == {"p1"}


async def test_collection_runs_off_the_event_loop(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> None:
    runtime, collector = world
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def slow_resident(path: Path) -> int:
        seen.append(threading.get_ident())
        time.sleep(0.3)
        return 0

    collector.resident = slow_resident
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        await render(runtime, collector)
    finally:
        task.cancel()
    assert seen and loop_thread not in seen
    assert ticks > 20  # the loop kept running during ~0.6 s of slow reads


def test_page_cache_bytes(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(8 * PAGE_SIZE))
    path.read_bytes()  # in the page cache now
    resident = page_cache_bytes(path)
    assert resident is not None and 0 < resident <= 8 * PAGE_SIZE
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert page_cache_bytes(empty) == 0
    assert page_cache_bytes(tmp_path / "missing") is None


# -- CRI metrics ---------------------------------------------------------------------------


async def test_pod_sandbox_metrics_messages(world: tuple[FakeRuntime, RuntimeCollector]) -> None:
    runtime, collector = world
    descriptors = {d.name: list(d.label_keys) for d in metric_descriptors()}
    runtime.sandboxes["p1"].interfaces = [InterfaceStats(name="eth0", rx_bytes=1500)]
    snap = await take_snapshot(runtime, detail=True)
    assert runtime.sandboxes["p1"].detail_calls == 1
    messages = {
        m.pod_sandbox_id: m
        for m in pod_metrics_messages(snap, runtime.state.containers, collector.proc)
    }
    assert set(messages) == {"p1", "p2"}
    web = {m.name: m for m in messages["p1"].metrics}
    assert web["clearcri_pod_memory_pss_bytes"].value.value == 50_000 * 1024
    assert web["clearcri_pod_memory_pss_bytes"].metric_type == api_pb2.GAUGE
    assert web["clearcri_pod_guest_memory_available_bytes"].value.value == 200000 * 1024
    cpu = web["clearcri_pod_vm_cpu_usage_nanoseconds_total"]
    assert cpu.metric_type == api_pb2.COUNTER
    assert cpu.value.value == 300 * 1_000_000_000 // CLOCK_TICKS
    rx = web["container_network_receive_bytes_total"]
    assert (rx.value.value, rx.metric_type) == (1500, api_pb2.COUNTER)
    assert list(rx.label_values) == ["POD", "p1", "", "p1", "ns", "web", "eth0"]
    for metric in messages["p1"].metrics:
        assert len(metric.label_values) == len(descriptors[metric.name])
        assert list(metric.label_values)[:6] == ["POD", "p1", "", "p1", "ns", "web"]
        assert metric.timestamp > 0
    # c2 (exited) is left out; c1 runs
    (ctr,) = messages["p1"].container_metrics
    assert ctr.container_id == "c1"
    by_name = {m.name: m for m in ctr.metrics}
    assert by_name["clearcri_container_memory_working_set_bytes"].value.value == 4096
    assert list(by_name["clearcri_container_memory_working_set_bytes"].label_values) == [
        "c-c1",
        "c1",
        "busybox",
        "c1",
        "ns",
        "web",
    ]
    assert by_name["container_memory_working_set_bytes"].value.value == 4096
    for metric in ctr.metrics:
        assert len(metric.label_values) == len(descriptors[metric.name])
    # p2's container c3 (created) has no guest figures: nothing to report for it
    assert not messages["p2"].container_metrics


async def test_list_pod_sandbox_metrics_asks_for_detail(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> None:
    runtime, _collector = world
    messages = await list_pod_sandbox_metrics(runtime)
    assert {m.pod_sandbox_id for m in messages} == {"p1", "p2"}
    assert runtime.sandboxes["p1"].detail_calls == 1
    names = {d.name for d in metric_descriptors()}
    assert len(names) == len(metric_descriptors())
    for message in messages:
        for metric in message.metrics:
            assert metric.name in names


# -- HTTP endpoint ------------------------------------------------------------------------------


@pytest.fixture
async def server(
    world: tuple[FakeRuntime, RuntimeCollector],
) -> AsyncIterator[MetricsServer]:
    runtime, collector = world
    exporter = MetricsExporter(RuntimeMetrics(), runtime, collector)
    srv = MetricsServer(exporter, "127.0.0.1", 0)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _get(url: str, method: str = "GET", accept: str = "") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def test_http_endpoint(server: MetricsServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    status, ctype, body = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert value(body, "clearcri_sandboxes", state="ready") == 2
    status, ctype, body = await asyncio.to_thread(
        _get, base + "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    status, _, body = await asyncio.to_thread(_get, base + "/metrics", "HEAD")
    assert status == 200 and body == b""
    assert (await asyncio.to_thread(_get, base + "/nope"))[0] == 404
    assert (await asyncio.to_thread(_get, base + "/metrics", "POST"))[0] == 405


async def test_http_bad_and_concurrent_requests(server: MetricsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"garbage\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 400")
    writer.close()
    base = f"http://127.0.0.1:{server.port}/metrics"
    results = await asyncio.gather(*(asyncio.to_thread(_get, base) for _ in range(5)))
    assert [r[0] for r in results] == [200] * 5


# -- config and host KSM switch -------------------------------------------------------------


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[vm]\nhost_ksm = true\nksm_pages_to_scan = 2000\n"
        '[metrics]\nenabled = true\naddress = "127.0.0.1"\nport = 0\n'
    )
    config = load_config(path)
    assert config.vm.host_ksm and config.vm.ksm_pages_to_scan == 2000
    assert config.metrics.port == 0
    assert load_config(None).vm.host_ksm is False
    assert load_config(None).metrics.port == 9464
    path.write_text("[vm]\nksm_pages_to_scan = -1\n")
    with pytest.raises(ConfigError, match="ksm_pages_to_scan"):
        load_config(path)
    path.write_text("[metrics]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_config(path)


def test_configure_host_ksm(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path / "ksm", run=0, pages_to_scan=100)
    message = configure_host_ksm(2000, ksm)
    assert (ksm / "run").read_text().strip() == "1"
    assert (ksm / "pages_to_scan").read_text().strip() == "2000"
    assert "on" in message and "2000" in message
    # 0 leaves the scan rate alone
    (ksm / "run").write_text("0\n")
    configure_host_ksm(0, ksm)
    assert (ksm / "pages_to_scan").read_text().strip() == "2000"
    assert (ksm / "run").read_text().strip() == "1"


def test_configure_host_ksm_where_not_allowed(tmp_path: Path) -> None:
    assert "not available" in configure_host_ksm(0, tmp_path / "none")
    ksm = tmp_path / "ro"
    (ksm / "run").mkdir(parents=True)  # writing to it fails like a read-only /sys
    (ksm / "pages_to_scan").mkdir()
    message = configure_host_ksm(500, ksm)
    assert "left as it is" in message


def test_flushes_of_idle_vms_translated_code_are_counted() -> None:
    metrics = RuntimeMetrics()
    assert value(generate_latest(metrics.registry), "clearcri_jit_flushes_total") == 0
    metrics.jit_flushed()
    metrics.jit_flushed()
    assert value(generate_latest(metrics.registry), "clearcri_jit_flushes_total") == 2
