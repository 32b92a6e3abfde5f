"""Throughput of a pod VM's shared host paths (virtio-9p) next to the same work on the
host and on the container's own rootfs, and how fast a ConfigMap update is seen.

    PYTHONPATH=. python3 tests/bench/bench_volumes.py [--runs 5] [--guest-dir DIR]

One clearcri daemon (busybox image from a local registry, no network), one pod, one
container with a hostPath mount. The same busybox shell snippets run (a) on the host in
a host directory (the host's busybox-static), (b) in the container on the shared host
path, (c) in the container on its rootfs (overlay on the guest's tmpfs). Each snippet
times itself with ``/proc/uptime`` (10 ms resolution) so the exec round trip is not
counted. ConfigMap
latency: the host swaps ``..data`` as kubelet does while the container reads the key in
a loop; the figure is from the swap until the file the container writes when it sees
the new value appears on the host (one more 9p round trip than the update itself).
Medians with min/max; ratios against the host. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cri_api.v1 import api_pb2, api_pb2_grpc

from sandbox.mounts import remove_tree
from tests.atomic_writer import write_version
from tests.integration.cri_daemon import CriDaemon
from tests.registry import RegistryServer, busybox_layer, push_image

SEQ_MIB = 64
SMALL_FILES = 1000

SNIPPETS = {
    f"write {SEQ_MIB} MiB": (
        "rm -f {dir}/seq; read s _ < /proc/uptime; "
        f"dd if=/dev/zero of={{dir}}/seq bs=1M count={SEQ_MIB} conv=fsync 2>/dev/null; "
        "read e _ < /proc/uptime; echo $s $e"
    ),
    f"read {SEQ_MIB} MiB": (
        "read s _ < /proc/uptime; dd if={dir}/seq of=/dev/null bs=1M 2>/dev/null; "
        "read e _ < /proc/uptime; echo $s $e"
    ),
    f"create {SMALL_FILES} files": (
        "rm -rf {dir}/small; mkdir {dir}/small; read s _ < /proc/uptime; i=0; "
        f"while [ $i -lt {SMALL_FILES} ]; do echo x > {{dir}}/small/$i; i=$((i+1)); done; "
        "read e _ < /proc/uptime; echo $s $e"
    ),
}


def _elapsed(output: str) -> float:
    """Seconds between the two uptimes a snippet printed last."""
    start, end = output.split()[-2:]
    return float(end) - float(start)


def _host_run(script: str) -> float:
    out = subprocess.run(
        ["busybox", "sh", "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return _elapsed(out)


async def _exec(rt: api_pb2_grpc.RuntimeServiceStub, cid: str, script: str) -> str:
    response = await rt.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=300)
    )
    if response.exit_code != 0:
        raise RuntimeError(f"{script!r}: {response.stderr.decode()}")
    return str(response.stdout.decode())


async def measure(daemon: CriDaemon, image: str, work: Path, runs: int) -> dict[str, list[float]]:
    shared = work / "shared"
    shared.mkdir()
    host_dir = work / "host"
    host_dir.mkdir()
    configmap = work / "configmap"
    configmap.mkdir()
    write_version(configmap, "0", {"key": "v0"})
    results: dict[str, list[float]] = {}
    async with daemon.channel() as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)))
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="bench-volumes", namespace="bench", uid="u"),
            log_directory=str(work / "logs"),
        )
        pod = await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))
        try:
            ctr = api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name="bench"),
                image=api_pb2.ImageSpec(image=image),
                command=["sleep", "3600"],
            )
            ctr.mounts.add(host_path=str(shared), container_path="/shared")
            ctr.mounts.add(host_path=str(configmap), container_path="/config", readonly=True)
            cid = (
                await rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pod.pod_sandbox_id, config=ctr, sandbox_config=config
                    )
                )
            ).container_id
            await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
            await _exec(rt, cid, "mkdir -p /rootfs-dir")
            for _ in range(runs):
                for name, snippet in SNIPPETS.items():
                    results.setdefault(f"{name}: host", []).append(
                        _host_run(snippet.format(dir=host_dir))
                    )
                    for where, path in (("shared host path", "/shared"), ("rootfs", "/rootfs-dir")):
                        out = await _exec(rt, cid, snippet.format(dir=path))
                        results.setdefault(f"{name}: {where}", []).append(_elapsed(out))
            for run in range(runs):
                expected = f"v{run + 1}"
                seen = shared / f"seen-{run}"
                loop = (
                    f'while [ "$(cat /config/key)" != "{expected}" ]; do :; done; '
                    f"echo seen > /shared/{seen.name}"
                )
                waiter = asyncio.ensure_future(_exec(rt, cid, loop))
                await asyncio.sleep(1.0)  # the loop is running in the container
                t0 = time.perf_counter()
                await asyncio.to_thread(write_version, configmap, str(run + 1), {"key": expected})
                while not seen.exists():
                    await asyncio.sleep(0.001)
                results.setdefault("ConfigMap swap seen in the container", []).append(
                    time.perf_counter() - t0
                )
                await waiter
        finally:
            await rt.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.pod_sandbox_id)
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--guest-dir", default="/var/lib/clearcri/guest")
    args = parser.parse_args(argv)
    if shutil.which("busybox") is None:
        print("busybox is needed on the host (apt-get install busybox-static)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cc-bench-vol-", dir="/tmp"))
    (work / "daemon").mkdir()
    registry = RegistryServer(work / "registry")
    daemon = CriDaemon(work / "daemon", Path(args.guest_dir), template_dir=work / "templates")
    try:
        image = f"{registry.host}/bench/busybox:1"
        asyncio.run(push_image(registry.host, "bench/busybox", ["1"], [busybox_layer()]))
        daemon.start()
        results = asyncio.run(measure(daemon, image, work, args.runs))
    finally:
        daemon.stop()
        registry.stop()
        remove_tree(work)
    print(f"\nshared host paths (virtio-9p, cache=none), {args.runs} runs, seconds")
    for name, values in results.items():
        median = statistics.median(values)
        line = f"  {name:<44} median {median:7.3f}  min {min(values):7.3f}  max {max(values):7.3f}"
        op = name.split(":")[0]
        host = results.get(f"{op}: host")
        if host and not name.endswith(": host"):
            line += f"  x host {median / statistics.median(host):6.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
