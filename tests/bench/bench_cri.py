"""CRI call latencies of clearcri next to Debian's containerd + runc, in the same run.

    PYTHONPATH=. python3 tests/bench/bench_cri.py [--runs 5] [--pods 50] [--calls 200]

Both runtimes get the same offline registry (the conformance image set), the same kind
of CNI bridge network, and the same requests over their CRI sockets: RunPodSandbox,
CreateContainer + StartContainer of a busybox `sleep`, then List/Status call latency
with ``--pods`` pods running. Prints medians (and p50/p99 for the list calls) and the
clearcri / containerd ratios. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.conformance import images
from tests.conformance.run import (
    LOCK_FILE,
    Clearcri,
    Containerd,
    LocalRegistry,
    Runtime,
    build_tools,
    log,
    work_dir,
)

BUSYBOX = "registry.k8s.io/" + images.E2E + "busybox:1.29-2"


def pod_config(name: str, log_dir: Path) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench", uid=f"uid-{name}"),
        hostname=name,
        log_directory=str(log_dir / name),
    )


def container_config(name: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["sleep", "3600"],
        log_path=f"{name}.log",
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    runtime: Runtime, runs: int, pods: int, calls: int, logs: Path
) -> dict[str, float]:
    out: dict[str, float] = {}
    async with grpc.aio.insecure_channel(runtime.endpoint()) as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        img = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await img.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=BUSYBOX)))

        async def one_pod(name: str) -> tuple[str, float, float]:
            config = pod_config(name, logs)
            t0 = time.perf_counter()
            pod = await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))
            t1 = time.perf_counter()
            cid = (
                await rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pod.pod_sandbox_id,
                        config=container_config("c"),
                        sandbox_config=config,
                    )
                )
            ).container_id
            await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
            t2 = time.perf_counter()
            return pod.pod_sandbox_id, t1 - t0, t2 - t1

        async def remove(pod_id: str) -> None:
            await rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

        await remove((await one_pod("warmup"))[0])  # first-use costs are not the figure
        run_times, start_times = [], []
        for i in range(runs):
            pod_id, run_s, start_s = await one_pod(f"run{i}")
            run_times.append(run_s)
            start_times.append(start_s)
            await remove(pod_id)
        out["RunPodSandbox"] = statistics.median(run_times)
        out["Create+Start"] = statistics.median(start_times)

        started = [await one_pod(f"load{i}") for i in range(pods)]
        some_pod, some_ctr = started[0][0], None
        listed = await rt.ListContainers(api_pb2.ListContainersRequest())
        some_ctr = listed.containers[0].id
        requests = {
            "ListPodSandbox": (rt.ListPodSandbox, api_pb2.ListPodSandboxRequest()),
            "ListContainers": (rt.ListContainers, api_pb2.ListContainersRequest()),
            "ContainerStatus": (
                rt.ContainerStatus,
                api_pb2.ContainerStatusRequest(container_id=some_ctr),
            ),
            "PodSandboxStatus": (
                rt.PodSandboxStatus,
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=some_pod),
            ),
        }
        for name, (call, request) in requests.items():
            samples = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await call(request)
                samples.append(time.perf_counter() - t0)
            out[f"{name} p50"] = percentile(samples, 0.5)
            out[f"{name} p99"] = percentile(samples, 0.99)
        for pod_id, _, _ in started:
            await remove(pod_id)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    # the conformance runs use the same bridge and registry port: one at a time
    lock = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    log(f"waiting for {LOCK_FILE}")
    fcntl.flock(lock, fcntl.LOCK_EX)
    build_tools()
    results: dict[str, dict[str, float]] = {}
    with work_dir(False) as work:
        registry = LocalRegistry(work)
        try:
            inputs = images.Inputs(images.DEFAULT_CACHE)
            inputs.prepare()
            images.push_all(registry.host, images.image_set(inputs))
            for cls in (Clearcri, Containerd):
                sub = work / cls.name
                sub.mkdir()
                log(f"measuring {cls.name}")
                runtime = cls(sub, registry.host)
                try:
                    results[cls.name] = asyncio.run(
                        measure(runtime, args.runs, args.pods, args.calls, sub / "logs")
                    )
                finally:
                    runtime.stop()
        finally:
            registry.stop()
    ours, theirs = results["clearcri"], results["containerd"]
    print(f"\nCRI calls, {args.runs} runs, list/status with {args.pods} pods x {args.calls} calls")
    print(f"  {'call':<26} {'clearcri':>10} {'containerd':>11} {'ratio':>7}")
    for key in ours:
        unit = 1000.0
        print(
            f"  {key:<26} {ours[key] * unit:8.1f}ms {theirs[key] * unit:9.1f}ms "
            f"{ours[key] / theirs[key]:7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
