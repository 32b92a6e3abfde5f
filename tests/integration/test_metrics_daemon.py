"""Metrics end to end: `clearcri serve` with `[metrics] enabled`, real pod VMs, scraped
over HTTP; and the host KSM switch on the real /sys/kernel/mm/ksm (restored after)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import GUEST_DIR
from tests.integration.cri_daemon import CriDaemon
from tests.registry import RegistryServer, busybox_layer, push_image, registry  # noqa: F401

pytestmark = pytest.mark.vm

KSM = Path("/sys/kernel/mm/ksm")
KSM_KEYS = ("run", "pages_to_scan", "sleep_millisecs")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MetricsDaemon(CriDaemon):
    """A CriDaemon whose config serves metrics on a free port (and extra [vm] keys)."""

    def __init__(
        self, root: Path, registry_host: str = "", vm: str = "", *, standby: int = 0
    ) -> None:
        super().__init__(root, GUEST_DIR, registry_host, standby=standby)
        self.port = free_port()
        text = self.config_path.read_text()
        text = text.replace(
            "[metrics]\nenabled = false", f"[metrics]\nenabled = true\nport = {self.port}"
        )
        if vm:
            text = text.replace("[vm]\n", f"[vm]\n{vm}\n")
        self.config_path.write_text(text)

    def scrape(self) -> Samples:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def pick(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {k[1]: v for k, v in samples.items() if k[0] == name and want <= set(k[1])}


def one(samples: Samples, name: str, **labels: str) -> float:
    found = pick(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


async def scrape_until(
    daemon: MetricsDaemon, ready: Callable[[Samples], bool], timeout: float = 30
) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(daemon.scrape)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.5)


async def remove_all(d: CriDaemon) -> None:
    async with d.channel() as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        for pod in (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items:
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


def cleanup(d: CriDaemon) -> None:
    d.stop()
    if list((d.root / "run" / "sandboxes").glob("*/state.json")):
        d.start()
        asyncio.run(remove_all(d))
        d.stop()
    shutil.rmtree(d.root, ignore_errors=True)


def new_root() -> Path:
    root = Path(f"/tmp/cc-met-{os.getpid()}-{os.urandom(3).hex()}")
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def image_ref(registry: RegistryServer) -> str:  # noqa: F811
    asyncio.run(push_image(registry.host, "library/busybox", ["1"], [busybox_layer()]))
    return f"{registry.host}/library/busybox:1"


@pytest.fixture
def daemon() -> Iterator[MetricsDaemon]:
    d = MetricsDaemon(new_root())
    d.start()
    try:
        yield d
    finally:
        cleanup(d)


@pytest.fixture
async def rt(daemon: MetricsDaemon) -> AsyncIterator[api_pb2_grpc.RuntimeServiceStub]:
    async with daemon.channel() as channel:
        yield api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]


def pod_config(name: str) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="metrics", uid=f"uid-{name}"),
        hostname=name,
    )


async def run_pod_with_container(
    rt: api_pb2_grpc.RuntimeServiceStub, name: str, image: str
) -> tuple[str, str]:
    pod_id = (
        await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config(name)))
    ).pod_sandbox_id
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="app"),
        image=api_pb2.ImageSpec(image=image),
        command=["sleep", "1000"],
    )
    cid = (
        await rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config(name)
            )
        )
    ).container_id
    await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    return pod_id, cid


async def test_scrape_boot_memory_sharing_and_requests(
    daemon: MetricsDaemon, rt: api_pb2_grpc.RuntimeServiceStub, image_ref: str
) -> None:
    async with daemon.channel() as channel:
        image_stub = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await image_stub.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref))
        )
        with pytest.raises(Exception):  # noqa: B017 - grpc.aio.AioRpcError
            await image_stub.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec()))
    before = await asyncio.to_thread(daemon.scrape)
    # ImageService calls are counted with the RuntimeService's
    assert one(before, "clearcri_cri_requests_total", method="PullImage", code="OK") == 1
    assert (
        one(before, "clearcri_cri_requests_total", method="PullImage", code="INVALID_ARGUMENT") == 1
    )
    assert one(before, "clearcri_sandboxes", state="ready") == 0
    assert one(before, "clearcri_sandbox_boot_seconds_count", phase="kernel") == 0
    assert one(before, "clearcri_image_pulls_total", result="success") == 1
    assert one(before, "clearcri_image_pull_bytes_total") > 0

    pod_a, _ = await run_pod_with_container(rt, "a", image_ref)
    labels_a = {"sandbox_id": pod_a, "pod": "a", "namespace": "metrics"}
    # a guest busy past the scrape's agent timeout (a loaded TCG host) has no guest
    # figures until it answers once
    first = await scrape_until(
        daemon, lambda s: bool(pick(s, "clearcri_sandbox_guest_memory_total_bytes", **labels_a))
    )
    # a pod VM either boots (firmware, kernel), is restored from a template, or is a
    # standby VM taken over
    taken = one(first, "clearcri_sandbox_boot_seconds_count", phase="standby") == 1
    cloned = one(first, "clearcri_sandbox_boot_seconds_count", phase="restore") == 1
    phases: tuple[str, ...] = (
        ("standby",)
        if taken
        else ("vmm_spawn", "agent_ready", "restore")
        if cloned
        else ("vmm_spawn", "agent_ready", "firmware", "kernel")
    )
    for phase in (*phases, "first_container"):
        assert one(first, "clearcri_sandbox_boot_seconds_count", phase=phase) == 1, phase
    assert not (taken and cloned)
    main_phase = "standby" if taken else "restore" if cloned else "kernel"
    assert 0 < one(first, "clearcri_sandbox_boot_seconds_sum", phase=main_phase) < 30
    assert one(first, "clearcri_sandbox_start_seconds_count") == 1
    assert one(first, "clearcri_container_start_seconds_count") == 1
    assert one(first, "clearcri_sandbox_memory_pss_bytes", **labels_a) > 16 << 20
    assert one(first, "clearcri_sandbox_memory_rss_bytes", kind="anon", **labels_a) > 0
    assert one(first, "clearcri_sandbox_cpu_seconds_total", **labels_a) > 0
    total = one(first, "clearcri_sandbox_guest_memory_total_bytes", **labels_a)
    available = one(first, "clearcri_sandbox_guest_memory_available_bytes", **labels_a)
    assert 0 < available < total
    assert one(first, "clearcri_shared_image_vms", kind="os") == 1
    assert one(first, "clearcri_shared_image_vms", kind="container", image=image_ref) == 1
    assert one(first, "clearcri_shared_image_saved_bytes", kind="os") == 0
    assert one(first, "clearcri_sandboxes", state="ready") == 1
    assert one(first, "clearcri_containers", state="running") == 1
    assert one(first, "clearcri_cri_requests_total", method="RunPodSandbox", code="OK") == 1
    assert one(first, "clearcri_cri_requests_total", method="StartContainer", code="OK") == 1
    assert one(first, "clearcri_cri_request_duration_seconds_count", method="RunPodSandbox") == 1

    pod_b, _ = await run_pod_with_container(rt, "b", image_ref)
    second = await asyncio.to_thread(daemon.scrape)
    assert one(second, "clearcri_shared_image_vms", kind="os") == 2
    assert one(second, "clearcri_shared_image_vms", kind="container", image=image_ref) == 2
    resident = one(second, "clearcri_shared_image_resident_bytes", kind="os")
    assert resident > 0
    assert one(second, "clearcri_shared_image_saved_bytes", kind="os") == resident
    assert one(second, "clearcri_sandbox_boot_seconds_count", phase="first_container") == 2
    # each pod booted, was cloned, or took over a standby VM (which has no agent phase)
    started = {
        phase: one(second, "clearcri_sandbox_boot_seconds_count", phase=phase)
        for phase in ("kernel", "restore", "standby", "agent_ready")
    }
    assert started["kernel"] + started["restore"] + started["standby"] == 2, started
    assert started["agent_ready"] == started["kernel"] + started["restore"], started
    assert one(second, "clearcri_cri_requests_total", method="RunPodSandbox", code="OK") == 2
    assert len(pick(second, "clearcri_sandbox_memory_pss_bytes")) == 2

    # an error is counted under its code
    bad = api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig())
    with pytest.raises(Exception):  # noqa: B017 - grpc.aio.AioRpcError
        await rt.RunPodSandbox(bad)

    descriptors = await rt.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest())
    keys = {d.name: len(d.label_keys) for d in descriptors.descriptors}
    assert "clearcri_pod_memory_pss_bytes" in keys
    deadline = time.monotonic() + 30
    while True:
        response = await rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest())
        by_pod = {m.pod_sandbox_id: m for m in response.pod_metrics}
        guests = [
            m
            for p in by_pod.values()
            for m in p.metrics
            if m.name == "clearcri_pod_guest_memory_available_bytes"
        ]
        if len(guests) == 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert set(by_pod) == {pod_a, pod_b}
    for pod_metrics in by_pod.values():
        values = {m.name: m.value.value for m in pod_metrics.metrics}
        assert values["clearcri_pod_memory_pss_bytes"] > 0
        assert values["clearcri_pod_vm_cpu_usage_nanoseconds_total"] > 0
        assert values["clearcri_pod_guest_memory_available_bytes"] > 0
        for metric in pod_metrics.metrics:
            assert len(metric.label_values) == keys[metric.name]
        assert len(pod_metrics.container_metrics) == 1

    await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_b))
    third = await asyncio.to_thread(daemon.scrape)
    assert one(third, "clearcri_shared_image_vms", kind="os") == 1
    assert one(third, "clearcri_sandboxes", state="ready") == 1
    assert one(third, "clearcri_vm_crashes_total", cause="exit") == 0
    assert (
        one(third, "clearcri_cri_requests_total", method="RunPodSandbox", code="INVALID_ARGUMENT")
        == 1
    )

    # a VM that dies under the daemon is a crash
    pid = int((daemon.root / "run" / "sandboxes" / pod_a / "vmm" / "qemu.pid").read_text())
    os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crashed = await asyncio.to_thread(daemon.scrape)
        # (a scrape's states are copied before its counters are read: wait for both)
        if (
            one(crashed, "clearcri_vm_crashes_total", cause="exit") == 1
            and one(crashed, "clearcri_sandboxes", state="notready") == 1
        ):
            break
        await asyncio.sleep(0.3)
    assert one(crashed, "clearcri_vm_crashes_total", cause="exit") == 1
    assert one(crashed, "clearcri_sandboxes", state="notready") == 1
    assert not pick(crashed, "clearcri_shared_image_vms")


@pytest.fixture
def host_ksm() -> Iterator[dict[str, str]]:
    """The host's KSM settings, restored after the test whatever happens."""
    if not os.access(KSM / "run", os.W_OK):
        pytest.skip("/sys/kernel/mm/ksm is not writable here")
    saved = {key: (KSM / key).read_text().strip() for key in KSM_KEYS}
    try:
        yield saved
    finally:
        for key in ("pages_to_scan", "sleep_millisecs", "run"):
            (KSM / key).write_text(saved[key] + "\n")


async def test_standby_vms_show_by_base_with_their_memory() -> None:
    daemon = MetricsDaemon(new_root(), standby=1)
    daemon.start()
    default = {"vcpus": "1", "memory_mib": "256"}
    try:
        ready = await scrape_until(
            daemon,
            lambda s: (
                bool(pick(s, "clearcri_standby_vms", **default))
                and one(s, "clearcri_standby_vms", **default) == 1
            ),
            timeout=180,
        )
        assert one(ready, "clearcri_standby_vms", **default) == 1
        assert one(ready, "clearcri_standby_target", **default) == 1
        # an idle warmed VM's QEMU, charged to no pod
        assert one(ready, "clearcri_standby_memory_pss_bytes", **default) > 16 << 20
        # the smallest VM's base has none until one of its pods finds none ready
        assert one(ready, "clearcri_standby_target", vcpus="1", memory_mib="96") == 0
        assert one(ready, "clearcri_standby_taken_total") == 0
        async with daemon.channel() as channel:
            rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
            await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config("sb")))
        taken = await asyncio.to_thread(daemon.scrape)
        assert one(taken, "clearcri_standby_taken_total") == 1
        assert one(taken, "clearcri_standby_vms", **default) == 0
        assert one(taken, "clearcri_sandboxes", state="ready") == 1
        await remove_all(daemon)
    finally:
        cleanup(daemon)


async def test_host_ksm_switch(host_ksm: dict[str, str], image_ref: str) -> None:
    # off: a daemon without host_ksm leaves the host as it is
    (KSM / "run").write_text("0\n")
    plain = MetricsDaemon(new_root())
    plain.start()
    try:
        assert (KSM / "run").read_text().strip() == "0"
        assert one(await asyncio.to_thread(plain.scrape), "clearcri_ksm_run") == 0
    finally:
        cleanup(plain)

    # on: the daemon switches ksmd on with its scan rate; merged pages show per VM
    merging = MetricsDaemon(new_root(), vm="host_ksm = true\nksm_pages_to_scan = 2000")
    merging.start()
    try:
        assert (KSM / "run").read_text().strip() == "1"
        assert (KSM / "pages_to_scan").read_text().strip() == "2000"
        async with merging.channel() as channel:
            rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
            pods = [
                (
                    await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config(n)))
                ).pod_sandbox_id
                for n in ("k1", "k2")
            ]
            deadline = time.monotonic() + 120
            samples: Samples = {}
            while time.monotonic() < deadline:
                samples = await asyncio.to_thread(merging.scrape)
                merged = pick(samples, "clearcri_sandbox_ksm_merged_bytes")
                if len(merged) == 2 and all(v > 0 for v in merged.values()):
                    break
                await asyncio.sleep(2)
            assert one(samples, "clearcri_ksm_run") == 1
            assert one(samples, "clearcri_ksm_pages_sharing") > 0
            assert one(samples, "clearcri_ksm_saved_bytes") > 0
            merged = pick(samples, "clearcri_sandbox_ksm_merged_bytes")
            assert len(merged) == 2 and all(v > 0 for v in merged.values()), merged
            for pod_id in pods:
                await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    finally:
        cleanup(merging)
