"""Benchmark: exec round trips and port-forward throughput through the streaming server,
driven by the client-go test client (tests/streaming_client, built into ~/.cache/clearcri).

- exec: ``exec true`` end to end (token URL -> HTTP upgrade -> SPDY or WebSocket streams
  -> process -> exit status), one client process running the execs back to back, so
  client start-up is not counted; median and p90 over --execs.
- port-forward: bytes pulled from (download) and pushed to (upload) a TCP server behind
  the forward, MB/s, median over --runs.

Backends: ``local`` runs processes and connects to TCP servers on this host; ``vm`` boots
one pod VM (TCG here) with a busybox container and goes through the agent.

    PYTHONPATH=. python3 tests/bench/bench_streaming.py [--backend local|vm|both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cri_api.v1 import api_pb2

from cri.streaming import StreamingBackend, StreamingServer
from tests.streaming_client import build_client
from tests.streaming_client.local_backend import LocalBackend

if TYPE_CHECKING:
    from sandbox.api import RootfsImage
    from sandbox.lifecycle import PodSandbox


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_exec(
    client: Path, server: StreamingServer, container_id: str, count: int, ws: bool
) -> list[float]:
    proc = await asyncio.create_subprocess_exec(
        str(client),
        "exec-loop",
        *(["-ws"] if ws else []),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    times: list[float] = []
    request = api_pb2.ExecRequest(container_id=container_id, cmd=["true"], stdout=True, stderr=True)
    for _ in range(count + 2):  # two warm-up runs
        proc.stdin.write((server.url_for_exec(request) + "\n").encode())
        await proc.stdin.drain()
        code, seconds = (await proc.stdout.readline()).decode().split()[:2]
        if code != "0":
            raise RuntimeError(f"exec failed: {code}")
        times.append(float(seconds))
    proc.stdin.close()
    await proc.wait()
    return times[2:]


async def port_forward(
    client: Path, server: StreamingServer, sandbox_id: str, port: int
) -> tuple[asyncio.subprocess.Process, int]:
    url = server.url_for_port_forward(
        api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id, port=[port])
    )
    proc = await asyncio.create_subprocess_exec(
        str(client),
        "portforward",
        "-url",
        url,
        "-remote",
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, int(line.split()[1])


async def download(local: int, size: int) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    writer.write(f"GET /big HTTP/1.0\r\n\r\nSEND {size}\n".encode())
    writer.write_eof()
    got = 0
    while chunk := await reader.read(1 << 20):
        got += len(chunk)
    writer.close()
    if got < size:
        raise RuntimeError(f"download got {got} of {size} bytes")
    return size / (time.perf_counter() - start) / 1e6


async def upload(local: int, size: int) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    writer.write(b"SINK\n")
    block = os.urandom(1 << 20)
    for _ in range(size >> 20):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read(-1)
    writer.close()
    if int(answer or b"0") != size:
        raise RuntimeError(f"upload: the server got {answer!r} of {size} bytes")
    return size / (time.perf_counter() - start) / 1e6


async def local_data_server() -> tuple[asyncio.Server, int]:
    """'SEND n' -> n bytes; 'SINK' -> counts what arrives, answers the count."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readline()
        if head.startswith(b"GET"):
            while await reader.readline() not in (b"\r\n", b""):
                pass
            head = await reader.readline()
        if head.startswith(b"SEND"):
            size = int(head.split()[1])
            block = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                writer.write(block)
                await writer.drain()
        else:
            total = 0
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
            writer.write(str(total).encode())
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def run_suite(
    label: str,
    client: Path,
    backend: StreamingBackend,
    container_id: str,
    sandbox_id: str,
    port: int,
    args: argparse.Namespace,
    can_upload: bool,
) -> None:
    async with StreamingServer(backend, "127.0.0.1", 0) as server:
        for ws in (False, True):
            times = await bench_exec(client, server, container_id, args.execs, ws)
            name = "websocket" if ws else "spdy"
            print(
                f"{label:6} exec true ({name:9}): median {statistics.median(times) * 1e3:7.1f} ms"
                f"  p90 {percentile(times, 0.9) * 1e3:7.1f} ms  (n={len(times)})"
            )
        proc, local = await port_forward(client, server, sandbox_id, port)
        try:
            size = args.mb << 20
            down = [await download(local, size) for _ in range(args.runs)]
            print(
                f"{label:6} port-forward download: median {statistics.median(down):7.1f} MB/s"
                f"  ({args.mb} MiB x {args.runs})"
            )
            if can_upload:
                up = [await upload(local, size) for _ in range(args.runs)]
                print(
                    f"{label:6} port-forward upload:   median {statistics.median(up):7.1f} MB/s"
                    f"  ({args.mb} MiB x {args.runs})"
                )
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            await proc.wait()


async def bench_local(client: Path, args: argparse.Namespace) -> None:
    backend = LocalBackend()
    srv, port = await local_data_server()
    try:
        await run_suite("local", client, backend, "c", "p", port, args, True)
    finally:
        srv.close()
        await backend.close()


@contextlib.asynccontextmanager
async def pod_vm() -> AsyncIterator[tuple[PodSandbox, RootfsImage]]:
    from cri.images.rootfs import build_rootfs_image, make_busybox_tree
    from sandbox.api import SandboxSpec
    from sandbox.guest import DEFAULT_GUEST_DIR
    from sandbox.node import SandboxConfig, SandboxHost
    from sandbox.vmpod import create_vm_pod

    guest_dir = Path(os.environ.get("CLEARCRI_GUEST_DIR", str(DEFAULT_GUEST_DIR)))
    work = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    host = SandboxHost(SandboxConfig(run_root=work / "run", guest_dir=guest_dir))
    tree = make_busybox_tree(work / "busybox")
    image = build_rootfs_image(tree, work / "busybox.erofs", image_id="busybox")
    sandbox = create_vm_pod(host, SandboxSpec("bench-" + os.urandom(3).hex()))
    try:
        await sandbox.start()
        yield sandbox, image
    finally:
        await sandbox.destroy()
        shutil.rmtree(work, ignore_errors=True)


async def bench_vm(client: Path, args: argparse.Namespace) -> None:
    from agent.client import AgentClient
    from agent.protocol import ContainerSpec
    from cri.streaming.agent_backend import AgentStreamingBackend

    async with pod_vm() as (sandbox, image):
        script = (
            f"mkdir -p /tmp/w; dd if=/dev/zero of=/tmp/w/big bs=1M count={args.mb} 2>/dev/null;"
            " exec httpd -f -p 8080 -h /tmp/w"
        )
        await sandbox.create_container("web", ContainerSpec(args=["sh", "-c", script]), image)
        await sandbox.start_container("web")
        agent = sandbox.agent
        fetch = ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/big"]
        for _ in range(100):
            result = await agent.exec_sync("web", fetch, timeout=60)
            if result.exit_code == 0:
                break
            await asyncio.sleep(0.3)

        async def agent_for(_id: str) -> AgentClient:
            return agent

        backend = AgentStreamingBackend(agent_for, agent_for)
        await run_suite("vm", client, backend, "web", "pod", 8080, args, False)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--backend", choices=["local", "vm", "both"], default="both")
    parser.add_argument("--execs", type=int, default=30)
    parser.add_argument("--mb", type=int, default=64, help="MiB per port-forward transfer")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    client = build_client()
    if args.backend in ("local", "both"):
        await bench_local(client, args)
    if args.backend in ("vm", "both"):
        await bench_vm(client, args)


if __name__ == "__main__":
    asyncio.run(main())
