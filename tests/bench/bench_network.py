"""Benchmark: pod networking (CNI bridge + host-local + portmap, tap into the VM).

Prints, on a private test bridge and subnet:

* pod start with and without a network (medians over --runs, alternating), and the
  phases of the network setup: namespace + tap before QEMU starts, CNI ADD and the tap
  join (both overlap the guest's boot), and the guest NIC configuration;
* TCP throughput host → pod (upload to ``nc``), pod → host (HTTP download of a big
  file from busybox ``httpd``) and pod → pod (``wget`` in one pod from the other);
* round trips: TCP echo host → pod (1 byte each way over one connection), ICMP
  host → pod and pod → pod.

The same host → pod figures are measured against a plain network namespace on the
same CNI network with busybox running in it and no VM: what a runc container on this
network would see. containerd itself is not run (no runc baseline beyond that).

    PYTHONPATH=. python3 tests/bench/bench_network.py [--runs 5] [--mb 32]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.protocol import ContainerSpec
from cri.images.rootfs import build_rootfs_image, make_busybox_tree
from sandbox.api import PodNetworkSpec, RootfsImage, SandboxSpec
from sandbox.guest import DEFAULT_GUEST_DIR
from sandbox.network import CniInvocation, CniRunner, create_netns, remove_netns
from sandbox.node import SandboxConfig, SandboxHost
from sandbox.vmpod import create_vm_pod
from tests.integration.test_network import (
    CniLab,
    _portmap_chains_present,
    _remove_idle_portmap_chains,
)

HTTP_PORT, SINK_PORT, ECHO_PORT = 8080, 5001, 7007


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def server_script(mb: int) -> str:
    return (
        f"dd if=/dev/zero of=/tmp/big bs=1M count={mb} 2>/dev/null; echo ok > /tmp/small; "
        f"httpd -p {HTTP_PORT} -h /tmp; "
        f"nc -ll -p {ECHO_PORT} -e cat & "
        f"while true; do nc -l -p {SINK_PORT} > /dev/null; done"
    )


# ------------------------------------------------------------------ host-side probes


def download(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    total = 0
    with urllib.request.urlopen(url, timeout=120) as response:
        while chunk := response.read(1 << 20):
            total += len(chunk)
    return total, time.perf_counter() - started


def upload(host: str, port: int, size: int) -> float:
    block = bytes(1 << 20)
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=120) as conn:
        sent = 0
        while sent < size:
            conn.sendall(block)
            sent += len(block)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    return time.perf_counter() - started


def tcp_echo_rtt(host: str, port: int, count: int = 200) -> float:
    """Median round trip of one byte over one TCP connection, in ms."""
    samples = []
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            conn.sendall(b"x")
            if not conn.recv(1):
                raise RuntimeError("echo server closed the connection")
            samples.append((time.perf_counter() - started) * 1000)
    return median(samples[5:])


def parse_ping(text: str) -> float:
    match = re.search(r"= [\d.]+/([\d.]+)/", text)
    return float(match.group(1)) if match else float("nan")


def host_ping(ip: str, count: int = 20) -> float:
    out = subprocess.run(
        ["busybox", "ping", "-q", "-c", str(count), "-i", "0.2", ip],
        capture_output=True,
        text=True,
    ).stdout
    return parse_ping(out)


async def retry(fn: Callable[[], Awaitable[object]], attempts: int = 60) -> None:
    for _ in range(attempts):
        try:
            await fn()
            return
        except OSError:
            await asyncio.sleep(0.5)
    await fn()


async def host_probes(ip: str, mb: int) -> dict[str, float]:
    await retry(lambda: asyncio.to_thread(download, f"http://{ip}:{HTTP_PORT}/small"))
    size, seconds = await asyncio.to_thread(download, f"http://{ip}:{HTTP_PORT}/big")
    up = await asyncio.to_thread(upload, ip, SINK_PORT, mb << 20)
    return {
        "pod→host MB/s (HTTP download)": size / seconds / 1e6,
        "host→pod MB/s (nc upload)": (mb << 20) / up / 1e6,
        "host→pod TCP echo RTT ms": await asyncio.to_thread(tcp_echo_rtt, ip, ECHO_PORT),
        "host→pod ICMP RTT ms": await asyncio.to_thread(host_ping, ip),
    }


# ---------------------------------------------------------------------- scenarios


def new_spec(name: str, network: bool) -> SandboxSpec:
    sandbox_id = f"bench-{name}"
    net = PodNetworkSpec(name=name, namespace="bench", uid=sandbox_id) if network else None
    return SandboxSpec(sandbox_id, network=net)


async def start_times(host: SandboxHost, runs: int) -> None:
    totals: dict[bool, list[float]] = {False: [], True: []}
    phases: dict[str, list[float]] = {}
    for run in range(runs):
        for network in (False, True):
            sandbox = create_vm_pod(host, new_spec(f"start{run}{int(network)}", network))
            started = time.perf_counter()
            try:
                await sandbox.start()
                totals[network].append(time.perf_counter() - started)
                if sandbox.network is not None:
                    for key, value in sandbox.network.timings.items():
                        phases.setdefault(key, []).append(value)
            finally:
                await sandbox.destroy()
    plain, networked = median(totals[False]), median(totals[True])
    print(f"pod start (PodSandbox.start), median of {runs}:")
    print(f"  without network        {plain:7.3f} s")
    print(f"  with CNI network       {networked:7.3f} s   (+{networked - plain:.3f} s)")
    labels = {
        "prepare": "netns + tap, before QEMU",
        "cni_add": "CNI ADD (overlaps boot)",
        "join": "tc redirects (overlaps boot)",
        "guest": "guest NIC configuration",
    }
    for key, label in labels.items():
        print(f"  {label:<30} {median(phases.get(key, [])) * 1000:7.1f} ms")


async def vm_traffic(host: SandboxHost, image: RootfsImage, mb: int) -> dict[str, float]:
    a = create_vm_pod(host, new_spec("a", True))
    b = create_vm_pod(host, new_spec("b", True))
    try:
        await asyncio.gather(a.start(), b.start())
        for pod in (a, b):
            await pod.create_container(
                "srv", ContainerSpec(args=["sh", "-c", server_script(mb)]), image
            )
            await pod.start_container("srv")
        assert a.network_result is not None
        ip_a = a.network_result.ipv4
        results = await host_probes(ip_a, mb)
        await b.agent.exec_sync(
            "srv", ["wget", "-q", "-O", "/dev/null", f"http://{ip_a}:{HTTP_PORT}/small"], timeout=60
        )
        timed = await b.agent.exec_sync(
            "srv",
            ["sh", "-c", f"time wget -q -O /dev/null http://{ip_a}:{HTTP_PORT}/big"],
            timeout=300,
        )
        match = re.search(r"real\s+(\d+)m\s*([\d.]+)s", timed.stderr.decode())
        if match:
            seconds = int(match.group(1)) * 60 + float(match.group(2))
            results["pod→pod MB/s (wget)"] = (mb << 20) / seconds / 1e6
        pinged = await b.agent.exec_sync(
            "srv", ["ping", "-q", "-c", "20", "-i", "0.2", ip_a], timeout=60
        )
        results["pod→pod ICMP RTT ms"] = parse_ping(pinged.stdout.decode())
        return results
    finally:
        await asyncio.gather(a.destroy(), b.destroy())


async def netns_baseline(lab: CniLab, busybox: Path, mb: int, work: Path) -> dict[str, float]:
    """busybox in a plain namespace on the same CNI network: no VM, no tap."""
    conf = lab.network_config()
    from sandbox.network import load_conf_list

    conflist = load_conf_list(conf.conf_dirs)
    netns = conf.netns_dir / "bench-baseline"
    runner = CniRunner(conf.bin_dirs)
    invocation = CniInvocation("bench-baseline", str(netns), "eth0", "IgnoreUnknown=1", {})
    await asyncio.to_thread(create_netns, netns)
    server: subprocess.Popen[bytes] | None = None
    try:
        result = await runner.add(conflist, invocation)
        root = work / "baseline"
        root.mkdir()
        script = server_script(mb).replace("/tmp", str(root))
        server = subprocess.Popen(
            [
                shutil.which("nsenter") or "nsenter",
                f"--net={netns}",
                str(busybox),
                "sh",
                "-c",
                script,
            ],
            env={"PATH": str(work / "bin")},
            start_new_session=True,
        )
        return await host_probes(result.ipv4, mb)
    finally:
        if server is not None:
            subprocess.run(["pkill", "-KILL", "-s", str(server.pid)], check=False)
            server.wait()
        await runner.delete(conflist, invocation, None)
        await asyncio.to_thread(remove_netns, netns)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--guest-dir", type=Path, default=DEFAULT_GUEST_DIR)
    args = parser.parse_args()

    chains_existed = _portmap_chains_present()
    work = Path(tempfile.mkdtemp(prefix="cc-bench-net-", dir="/tmp"))
    lab = CniLab(work / "cni")
    lab.write(lab.conflist(v6=False))
    try:
        tree = make_busybox_tree(work / "tree")
        image = build_rootfs_image(tree, work / "busybox.erofs", image_id="busybox")
        (work / "bin").mkdir()
        for applet in ("sh", "dd", "echo", "httpd", "nc", "cat"):
            (work / "bin" / applet).symlink_to(tree / "bin" / "busybox")
        config = SandboxConfig(
            run_root=work / "run", guest_dir=args.guest_dir, network=lab.network_config()
        )
        host = SandboxHost(config)
        print(f"accel={host.accel}  bridge={lab.bridge}  subnet={lab.subnet4}  file={args.mb} MiB")
        await start_times(host, args.runs)
        vm = await vm_traffic(host, image, args.mb)
        base = await netns_baseline(lab, tree / "bin" / "busybox", args.mb, work)
        print(f"{'traffic':<34} {'pod VM':>10} {'netns, no VM':>14}")
        for key, value in vm.items():
            other = base.get(key)
            other_text = f"{other:14.2f}" if other is not None else f"{'-':>14}"
            print(f"  {key:<32} {value:10.2f} {other_text}")
    finally:
        lab.close()
        if not chains_existed:
            _remove_idle_portmap_chains()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
