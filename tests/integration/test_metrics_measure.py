"""Memory per idle pod as the exporter reports it (docs/metrics.md, "Measured").

Not a check: runs only with CLEARCRI_MEASURE=1 and prints a table. Each pod is a VM
with one busybox container running `sleep`; after the pods settle, /metrics is
scraped. Environment: CLEARCRI_MEASURE_PODS (default "1,4"), CLEARCRI_MEASURE_SETTLE
(seconds, default 20), CLEARCRI_MEASURE_KSM=1 to switch the host's KSM on for the run
(pages_to_scan 2000; the host's settings are restored).

    CLEARCRI_MEASURE=1 python3 -m pytest -s tests/integration/test_metrics_measure.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.integration.test_metrics_daemon import (
    KSM,
    KSM_KEYS,
    MetricsDaemon,
    Samples,
    cleanup,
    image_ref,  # noqa: F401
    new_root,
    one,
    pick,
    run_pod_with_container,
)
from tests.registry import registry  # noqa: F401

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not os.environ.get("CLEARCRI_MEASURE"), reason="set CLEARCRI_MEASURE=1"),
]

MIB = 1 << 20


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def report(n: int, samples: Samples, host_drop: int) -> str:
    pss = list(pick(samples, "clearcri_sandbox_memory_pss_bytes").values())
    anon = list(pick(samples, "clearcri_sandbox_memory_rss_bytes", kind="anon").values())
    avail = list(pick(samples, "clearcri_sandbox_guest_memory_available_bytes").values())
    lines = [
        f"pods={n}",
        f"  PSS per pod MiB: mean {statistics.mean(pss) / MIB:.1f} "
        f"min {min(pss) / MIB:.1f} max {max(pss) / MIB:.1f} sum {sum(pss) / MIB:.1f}",
        f"  RSS anon per pod MiB: mean {statistics.mean(anon) / MIB:.1f}",
        f"  guest MemAvailable per pod MiB: mean {statistics.mean(avail) / MIB:.1f}",
        f"  host MemAvailable drop MiB: {host_drop / MIB:.1f} "
        f"({host_drop / n / MIB:.1f} per pod; other VMs on the host add noise)",
    ]
    for kind in ("os", "container"):
        vms = one(samples, "clearcri_shared_image_vms", kind=kind)
        size = one(samples, "clearcri_shared_image_size_bytes", kind=kind)
        resident = one(samples, "clearcri_shared_image_resident_bytes", kind=kind)
        saved = one(samples, "clearcri_shared_image_saved_bytes", kind=kind)
        lines.append(
            f"  {kind} image: vms {vms:.0f} size {size / MIB:.1f} MiB resident "
            f"{resident / MIB:.1f} MiB saved {saved / MIB:.1f} MiB"
        )
    if pick(samples, "clearcri_ksm_run"):
        lines.append(
            f"  KSM run {one(samples, 'clearcri_ksm_run'):.0f} saved "
            f"{one(samples, 'clearcri_ksm_saved_bytes') / MIB:.1f} MiB"
        )
    return "\n".join(lines)


async def measure(daemon: MetricsDaemon, n: int, image: str, settle: float) -> str:
    base = mem_available()
    async with daemon.channel() as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)))
        pods = [(await run_pod_with_container(rt, f"idle{i}", image))[0] for i in range(n)]
        await asyncio.sleep(settle)
        samples = await asyncio.to_thread(daemon.scrape)
        text = report(n, samples, base - mem_available())
        for pod_id in pods:
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    return text


async def test_measure_idle_pods(image_ref: str) -> None:  # noqa: F811
    counts = [int(x) for x in os.environ.get("CLEARCRI_MEASURE_PODS", "1,4").split(",")]
    settle = float(os.environ.get("CLEARCRI_MEASURE_SETTLE", "20"))
    use_ksm = os.environ.get("CLEARCRI_MEASURE_KSM") == "1"
    saved_ksm = {key: (KSM / key).read_text().strip() for key in KSM_KEYS} if use_ksm else {}
    vm = "host_ksm = true\nksm_pages_to_scan = 2000" if use_ksm else ""
    daemon = MetricsDaemon(new_root(), vm=vm)
    daemon.start()
    out = []
    try:
        for n in counts:
            started = time.monotonic()
            out.append(await measure(daemon, n, image_ref, settle))
            out.append(f"  ({time.monotonic() - started:.0f} s)")
    finally:
        cleanup(daemon)
        for key in ("pages_to_scan", "sleep_millisecs", "run"):
            if key in saved_ksm:
                (KSM / key).write_text(saved_ksm[key] + "\n")
    print("\n" + "\n".join(out))
