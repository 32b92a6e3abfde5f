"""Pod networking for real: Debian's CNI plugins (bridge, host-local, portmap) on a
test-owned bridge and private subnets, per-pod namespaces, taps, and pod VMs.

Every test uses its own bridge (``cct<hex>``), its own 10.2xx.y.0/24 and fd00:cc.../64
subnets, its own config, IPAM and netns directories under a temporary directory, and
checks that nothing of its pods is left: no namespace, no port on the bridge, no
iptables rule naming the pod, no IPAM reservation. Traffic goes only to the test's own
bridge (whose gateway address is on the host) and to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import ContainerSpec
from sandbox.api import (
    DnsConfig,
    PodNetworkSpec,
    PortMapping,
    RootfsImage,
    SandboxError,
    SandboxSpec,
)
from sandbox.guest import GuestAssets
from sandbox.handlers import Sandboxes
from sandbox.lifecycle import PodSandbox
from sandbox.network import (
    CniPluginError,
    NetworkConfig,
    NetworkManager,
    is_netns_mount,
    run_in_thread,
)
from sandbox.node import SandboxConfig, SandboxHost
from sandbox.procfs import pid_alive
from sandbox.vmpod import create_vm_pod, vm_backend
from tests.integration.conftest import GUEST_DIR

CNI_BIN_DIRS = [Path("/opt/cni/bin"), Path("/usr/lib/cni")]
PORTMAP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")

FAILING_PLUGIN = textwrap.dedent(
    """\
    #!/bin/sh
    # Fails every ADD (after the plugins before it in the chain have run); DEL succeeds.
    cat >/dev/null
    if [ "$CNI_COMMAND" = ADD ]; then
        echo '{"cniVersion":"1.0.0","code":999,"msg":"told to fail by the test"}'
        exit 1
    fi
    exit 0
    """
)


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _have_cni() -> bool:
    return all(any((d / p).exists() for d in CNI_BIN_DIRS) for p in ("bridge", "host-local"))


pytestmark = pytest.mark.skipif(not _have_cni(), reason="CNI plugins are not installed")


class CniLab:
    """A private CNI network: bridge, subnets, config/IPAM/netns directories."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tag = os.urandom(3).hex()
        self.bridge = f"cct{tag}"
        self.name = f"cctest-{tag}"
        routes = _run("ip", "-4", "route", "show", "table", "all")
        while True:
            a, b = random.randint(200, 249), random.randint(0, 255)
            if f"10.{a}.{b}." not in routes:
                break
        self.prefix4 = f"10.{a}.{b}"
        self.subnet4 = f"{self.prefix4}.0/24"
        self.gateway4 = f"{self.prefix4}.1"
        self.subnet6 = f"fd00:cc:{random.randint(0, 0xFFFF):x}:{random.randint(0, 0xFFFF):x}::/64"
        self.conf_dir = root / "net.d"
        self.ipam_dir = root / "ipam"
        self.netns_dir = root / "netns"
        self.bin_dir = root / "bin"
        for d in (self.conf_dir, self.ipam_dir, self.netns_dir, self.bin_dir):
            d.mkdir(parents=True, exist_ok=True)
        failing = self.bin_dir / "cc-fail"
        failing.write_text(FAILING_PLUGIN)
        failing.chmod(0o755)

    def daemon_network(self) -> str:
        """The ``[vm.network]`` keys of a clearcri config that uses this lab."""
        bins = ", ".join(json.dumps(str(d)) for d in [*CNI_BIN_DIRS, self.bin_dir])
        return (
            f"conf_dirs = [{json.dumps(str(self.conf_dir))}]\n"
            f"bin_dirs = [{bins}]\n"
            f"netns_dir = {json.dumps(str(self.netns_dir))}"
        )

    def conflist(
        self, *, v6: bool = True, portmap: bool = True, extra: tuple[dict[str, Any], ...] = ()
    ) -> dict[str, Any]:
        ranges = [[{"subnet": self.subnet4}]]
        routes = [{"dst": "0.0.0.0/0"}]
        if v6:
            ranges.append([{"subnet": self.subnet6}])
            routes.append({"dst": "::/0"})
        plugins: list[dict[str, Any]] = [
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(self.ipam_dir),
                    "ranges": ranges,
                    "routes": routes,
                },
            }
        ]
        if portmap:
            plugins.append(
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
            )
        plugins += extra
        return {"cniVersion": "1.0.0", "name": self.name, "plugins": plugins}

    def write(self, conf: dict[str, Any] | str, filename: str = "10-test.conflist") -> Path:
        for old in self.conf_dir.iterdir():
            old.unlink()
        path = self.conf_dir / filename
        path.write_text(conf if isinstance(conf, str) else json.dumps(conf))
        return path

    def network_config(self) -> NetworkConfig:
        return NetworkConfig(
            conf_dirs=[self.conf_dir],
            bin_dirs=[*CNI_BIN_DIRS, self.bin_dir],
            netns_dir=self.netns_dir,
            plugin_timeout_s=120.0,
        )

    def leftovers(self, pod_ids: list[str]) -> list[str]:
        """Whatever of these pods is still on the host."""
        found = [f"netns {p}" for p in self.netns_dir.iterdir()]
        with contextlib.suppress(subprocess.CalledProcessError):
            ports = _run("ip", "-o", "link", "show", "master", self.bridge).strip()
            if ports:
                found.append(f"bridge ports: {ports}")
        for tool in ("iptables-save", "ip6tables-save"):
            for line in _run(tool).splitlines():
                if any(p in line for p in pod_ids):
                    found.append(f"{tool}: {line}")
        ipam = self.ipam_dir / self.name
        if ipam.is_dir():
            for entry in ipam.iterdir():
                if entry.name.startswith(("last_reserved_ip", "lock")):
                    continue
                text = entry.read_text(errors="replace")
                if any(p in text for p in pod_ids):
                    found.append(f"IPAM {entry.name}: {text.strip()}")
        return found

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "link", "del", self.bridge)


def _portmap_chains_present() -> bool:
    return any(c in _run("iptables-save", "-t", "nat") for c in PORTMAP_CHAINS)


def _remove_idle_portmap_chains() -> None:
    """portmap leaves its shared chains behind; remove them if no pod uses them."""
    for save, tool in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        dump = _run(save, "-t", "nat").splitlines()
        if any(line.startswith("-A CNI-DN-") for line in dump):
            continue  # some pod still has a hostPort
        for line in dump:
            if line.startswith("-A ") and any(f"-j {c}" in line for c in PORTMAP_CHAINS):
                chain = line.split()[1]
                if chain not in PORTMAP_CHAINS:
                    subprocess.run(
                        [tool, "-w", "-t", "nat", "-D", *shlex.split(line)[1:]],
                        capture_output=True,
                    )
        for chain in PORTMAP_CHAINS:
            subprocess.run([tool, "-w", "-t", "nat", "-F", chain], capture_output=True)
        for chain in PORTMAP_CHAINS:
            subprocess.run([tool, "-w", "-t", "nat", "-X", chain], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def _portmap_chains() -> Iterator[None]:
    existed = _portmap_chains_present()
    yield
    if not existed:
        _remove_idle_portmap_chains()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[CniLab]:
    lab = CniLab(tmp_path / "cni")
    lab.write(lab.conflist())
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def net_host(guest_assets: GuestAssets, run_root: Path, lab: CniLab) -> SandboxHost:
    config = SandboxConfig(
        run_root=run_root / "sandboxes",
        guest_dir=GUEST_DIR,
        accel="auto",
        network=lab.network_config(),
    )
    return SandboxHost(config, guest_assets)


def _pod_spec(name: str, **kwargs: Any) -> SandboxSpec:
    sandbox_id = f"{name}-{os.urandom(4).hex()}"
    network = PodNetworkSpec(name=name, namespace="nettest", uid=f"uid-{sandbox_id}", **kwargs)
    return SandboxSpec(sandbox_id, network=network)


@contextlib.asynccontextmanager
async def _pod(host: SandboxHost, spec: SandboxSpec) -> AsyncIterator[PodSandbox]:
    sandbox = create_vm_pod(host, spec)
    try:
        await sandbox.start()
        yield sandbox
    finally:
        await sandbox.destroy()


async def _serve(sandbox: PodSandbox, image: RootfsImage, text: str, port: int = 8080) -> None:
    spec = ContainerSpec(
        args=["sh", "-c", f"echo {text} > /tmp/x && exec httpd -f -p {port} -h /tmp"]
    )
    await sandbox.create_container("web", spec, image)
    await sandbox.start_container("web")


async def _http_get(url: str, attempts: int = 60) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=5) as response:
            data: bytes = response.read()
            return data

    error: Exception | None = None
    for _ in range(attempts):
        try:
            return await asyncio.to_thread(get)
        except OSError as exc:
            error = exc
            await asyncio.sleep(0.5)
    raise AssertionError(f"GET {url} kept failing: {error}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -------------------------------------------------------------- without VMs


async def test_tap_carries_frames_both_ways(lab: CniLab) -> None:
    """No VM: read the host's ARP request from the tap, answer it through the tap,
    then receive the host's UDP datagram — both tc redirects at work."""
    manager = NetworkManager(lab.network_config())
    net = manager.for_pod("tap-" + os.urandom(3).hex(), PodNetworkSpec(name="tap"))
    tap = await net.setup()
    assert tap is not None and net.result is not None
    try:
        pod_ip = net.result.ipv4
        pod_mac = bytes.fromhex(net.result.mac.replace(":", ""))
        os.set_blocking(tap.fd, False)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.setblocking(False)
        vnet_hdr = 10  # struct virtio_net_hdr in front of every frame (IFF_VNET_HDR)

        def frames(deadline: float) -> Iterator[bytes]:
            while time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    sender.sendto(b"hello-tap", (pod_ip, 9999))
                try:
                    yield os.read(tap.fd, 65536)[vnet_hdr:]
                except BlockingIOError:
                    time.sleep(0.05)

        got_udp = False
        for frame in frames(time.monotonic() + 15):
            ethertype = struct.unpack("!H", frame[12:14])[0]
            if ethertype == 0x0806 and frame[38:42] == socket.inet_aton(pod_ip):
                # ARP request for the pod: answer as the guest would.
                host_mac, host_ip = frame[22:28], frame[28:32]
                reply = host_mac + pod_mac + b"\x08\x06"
                reply += struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
                reply += pod_mac + socket.inet_aton(pod_ip) + host_mac + host_ip
                os.write(tap.fd, bytes(vnet_hdr) + reply)
            elif ethertype == 0x0800 and frame[14 + 9] == 17 and b"hello-tap" in frame:
                assert frame[:6] == pod_mac
                got_udp = True
                break
        sender.close()
        assert got_udp, "the host's datagram never reached the tap"
    finally:
        tap.close()
        await net.teardown()
    assert lab.leftovers([net.sandbox_id]) == []


async def test_many_network_cycles_leave_nothing(lab: CniLab) -> None:
    manager = NetworkManager(lab.network_config())
    ids = [f"cyc{i}-{os.urandom(3).hex()}" for i in range(20)]
    seen_ips: set[str] = set()
    limit = asyncio.Semaphore(4)

    async def cycle(sandbox_id: str) -> None:
        async with limit:
            net = manager.for_pod(sandbox_id, PodNetworkSpec(name=sandbox_id))
            tap = await net.setup()
            assert tap is not None and net.result is not None
            assert len(net.result.pod_ips) == 2
            seen_ips.add(net.result.ipv4)
            tap.close()
            await net.teardown()
            await net.teardown()  # idempotent

    await asyncio.gather(*(cycle(i) for i in ids))
    assert len(seen_ips) >= 4  # concurrent pods never share an address
    assert lab.leftovers(ids) == []


async def test_check_and_status_with_real_plugins(lab: CniLab) -> None:
    # Debian's portmap (1.1.1) fails CHECK for IPv6 it was never asked to map, so the
    # chain here is bridge + host-local only.
    lab.write(lab.conflist(v6=False, portmap=False))
    manager = NetworkManager(lab.network_config())
    assert manager.status().ready
    assert (await manager.network_status()).ready
    net = manager.for_pod("chk-" + os.urandom(3).hex(), PodNetworkSpec(name="chk"))
    tap = await net.setup()
    assert tap is not None
    try:
        assert await net.check() is True
    finally:
        tap.close()
        await net.teardown()
    assert lab.leftovers([net.sandbox_id]) == []


async def test_del_after_restart_with_config_and_netns_gone(lab: CniLab) -> None:
    """A new daemon tears down a pod from saved state alone: the node's config file
    was deleted and the namespace vanished in the meantime."""
    saved: dict[str, Any] = {}
    spec = PodNetworkSpec(name="rst", port_mappings=[PortMapping("tcp", 80, _free_port())])
    manager = NetworkManager(lab.network_config())
    net = manager.for_pod("rst-" + os.urandom(3).hex(), spec, lambda: saved.update(net.to_state()))
    tap = await net.setup()
    assert tap is not None
    tap.close()
    state = json.loads(json.dumps(saved))
    assert state["phase"] == "attached" and state["result"]["raw"]["ips"]
    assert any(net.sandbox_id in line for line in _run("iptables-save").splitlines())

    for conf in lab.conf_dir.iterdir():
        conf.unlink()
    assert net.netns is not None
    subprocess.run(["umount", str(net.netns)], check=True)
    net.netns.unlink()

    again = NetworkManager(lab.network_config()).for_pod(net.sandbox_id, spec)
    again.restore(state)
    assert again.attached
    await again.teardown()
    assert again.phase == "released"
    assert lab.leftovers([net.sandbox_id]) == []


async def test_failed_add_rolls_back(lab: CniLab) -> None:
    lab.write(lab.conflist(extra=({"type": "cc-fail"},)))
    net = NetworkManager(lab.network_config()).for_pod(
        "rb-" + os.urandom(3).hex(), PodNetworkSpec()
    )
    with pytest.raises(CniPluginError, match="told to fail by the test"):
        await net.setup()
    assert net.phase == "released"
    assert lab.leftovers([net.sandbox_id]) == []


async def test_netns_is_a_real_namespace(lab: CniLab) -> None:
    net = NetworkManager(lab.network_config()).for_pod(
        "ns-" + os.urandom(3).hex(), PodNetworkSpec()
    )
    tap = await net.setup()
    assert tap is not None and net.netns is not None
    try:
        assert is_netns_mount(net.netns)
        out = _run("nsenter", f"--net={net.netns}", "ip", "-o", "link")
        assert " eth0@" in out and " tap0:" in out, out
        # a thread entering the namespace sees the pod's links through netlink
        names = run_in_thread(lambda: [n for _i, n in socket.if_nameindex()], net.netns)
        assert {"eth0", "tap0"} <= set(names)
    finally:
        tap.close()
        await net.teardown()
    assert not net.netns.exists()


# ---------------------------------------------------------------- pod VMs


@pytest.mark.vm
async def test_pod_is_reachable_by_ip_hostport_and_gets_dns(
    net_host: SandboxHost, lab: CniLab, busybox_image: RootfsImage
) -> None:
    host_port = _free_port()
    dns = DnsConfig(["10.96.0.10"], ["nettest.svc.cluster.local", "svc.cluster.local"], ["ndots:5"])
    spec = _pod_spec("web", port_mappings=[PortMapping("tcp", 8080, host_port)], dns=dns)
    async with _pod(net_host, spec) as pod:
        result = pod.network_result
        assert result is not None
        ipv4, ipv6 = result.ipv4, result.ipv6
        assert ipv4.startswith(lab.prefix4 + ".") and ipv6.startswith("fd00:cc:")
        assert result.pod_ips == [ipv4, ipv6]
        saved = json.loads((vm_backend(pod).machine.run_dir / "state.json").read_text())
        assert saved["network"]["phase"] == "attached"
        assert saved["network"]["result"]["mac"] == result.mac

        await _serve(pod, busybox_image, "hello-from-the-pod")
        assert await _http_get(f"http://{ipv4}:8080/x") == b"hello-from-the-pod\n"
        assert await _http_get(f"http://[{ipv6}]:8080/x") == b"hello-from-the-pod\n"
        assert await _http_get(f"http://127.0.0.1:{host_port}/x") == b"hello-from-the-pod\n"

        shown = await pod.agent.exec_sync(
            "web", ["sh", "-c", "cat /etc/resolv.conf; cat /etc/hosts; ip -o link show eth0"]
        )
        text = shown.stdout.decode()
        assert (
            "nameserver 10.96.0.10\n"
            "search nettest.svc.cluster.local svc.cluster.local\n"
            "options ndots:5\n"
        ) in text
        assert f"{ipv4}\t{spec.sandbox_id[:63]}" in text
        assert result.mac in text and "mtu 1500" in text
    assert lab.leftovers([spec.sandbox_id]) == []


@pytest.mark.vm
async def test_two_pods_reach_each_other(
    net_host: SandboxHost, lab: CniLab, busybox_image: RootfsImage
) -> None:
    server_spec, client_spec = _pod_spec("server"), _pod_spec("client")
    async with _pod(net_host, server_spec) as server, _pod(net_host, client_spec) as client:
        await _serve(server, busybox_image, "pod-to-pod")
        await client.create_container("c", ContainerSpec(args=["sleep", "1000"]), busybox_image)
        await client.start_container("c")
        target = server.network_result
        assert target is not None
        for url in (f"http://{target.ipv4}:8080/x", f"http://[{target.ipv6}]:8080/x"):
            for _ in range(60):
                got = await client.agent.exec_sync("c", ["wget", "-q", "-O", "-", url], timeout=30)
                if got.exit_code == 0:
                    break
                await asyncio.sleep(0.5)
            assert got.stdout == b"pod-to-pod\n", (url, got.stderr)
    assert lab.leftovers([server_spec.sandbox_id, client_spec.sandbox_id]) == []


async def _vm_cycles(host: SandboxHost, lab: CniLab, count: int, parallel: int) -> None:
    specs = [_pod_spec(f"cycle{i}") for i in range(count)]
    limit = asyncio.Semaphore(parallel)
    pids: list[int] = []

    async def cycle(spec: SandboxSpec) -> None:
        async with limit, _pod(host, spec) as pod:
            pids.append(pod.pid)
            assert pod.network_result is not None and pod.network_result.ipv4

    await asyncio.gather(*(cycle(s) for s in specs))
    assert not [pid for pid in pids if pid_alive(pid)]
    assert lab.leftovers([s.sandbox_id for s in specs]) == []


@pytest.mark.vm
async def test_pod_cycles_leave_nothing(net_host: SandboxHost, lab: CniLab) -> None:
    await _vm_cycles(net_host, lab, count=20, parallel=4)


@pytest.mark.vm
@pytest.mark.skipif(
    not os.environ.get("CLEARCRI_SLOW_TESTS"), reason="50 pod VMs: set CLEARCRI_SLOW_TESTS=1"
)
async def test_pod_cycles_leave_nothing_50(net_host: SandboxHost, lab: CniLab) -> None:
    await _vm_cycles(net_host, lab, count=50, parallel=4)


@pytest.mark.vm
async def test_missing_config_fails_before_the_vm(net_host: SandboxHost, lab: CniLab) -> None:
    for conf in lab.conf_dir.iterdir():
        conf.unlink()
    assert not net_host.network.status().ready
    spec = _pod_spec("noconf")
    sandbox = create_vm_pod(net_host, spec)
    with pytest.raises(SandboxError, match="no CNI network config found in"):
        await sandbox.start()
    assert sandbox.state == "dead" and sandbox.process is None
    assert lab.leftovers([spec.sandbox_id]) == []
    await sandbox.destroy()


@pytest.mark.vm
async def test_broken_config_and_failing_plugin_roll_back(
    net_host: SandboxHost, lab: CniLab
) -> None:
    lab.write("{ this is not json", "10-broken.conflist")
    spec = _pod_spec("broken")
    sandbox = create_vm_pod(net_host, spec)
    with pytest.raises(SandboxError, match=r"cannot read CNI config .*10-broken\.conflist"):
        await sandbox.start()
    await sandbox.destroy()

    # ADD fails after the bridge plugin made the veth and reserved an address, while
    # the VM is already booting: everything goes, the VM included.
    lab.write(lab.conflist(extra=({"type": "cc-fail"},)))
    spec = _pod_spec("failing")
    sandbox = create_vm_pod(net_host, spec)
    with pytest.raises(SandboxError, match="told to fail by the test"):
        await sandbox.start()
    assert sandbox.state == "dead"
    assert sandbox.process is not None and not sandbox.process.alive
    assert lab.leftovers([spec.sandbox_id]) == []
    await sandbox.destroy()
    assert not vm_backend(sandbox).machine.run_dir.exists()


RESTART_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from sandbox.api import PodNetworkSpec, SandboxSpec
    from sandbox.network import NetworkConfig
    from sandbox.node import SandboxConfig, SandboxHost
    from sandbox.vmpod import create_vm_pod

    async def main() -> None:
        run_root, guest_dir, sandbox_id, network = sys.argv[1:5]
        net = json.loads(network)
        config = SandboxConfig(
            run_root=Path(run_root),
            guest_dir=Path(guest_dir),
            network=NetworkConfig(
                conf_dirs=[Path(p) for p in net["conf_dirs"]],
                bin_dirs=[Path(p) for p in net["bin_dirs"]],
                netns_dir=Path(net["netns_dir"]),
            ),
        )
        spec = SandboxSpec(sandbox_id, network=PodNetworkSpec(name="restart", namespace="t"))
        sandbox = create_vm_pod(SandboxHost(config), spec)
        await sandbox.start()
        await sandbox.close()
        print(sandbox.pid, sandbox.network_result.ipv4, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.vm
async def test_restarted_daemon_removes_the_network(net_host: SandboxHost, lab: CniLab) -> None:
    config = net_host.config
    netconf = config.network
    sandbox_id = "restart-" + os.urandom(3).hex()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RESTART_CHILD,
        str(config.run_root),
        str(config.guest_dir),
        sandbox_id,
        json.dumps(
            {
                "conf_dirs": [str(p) for p in netconf.conf_dirs],
                "bin_dirs": [str(p) for p in netconf.bin_dirs],
                "netns_dir": str(netconf.netns_dir),
            }
        ),
        stdout=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0
    pid_text, ip = out.decode().split()
    # The node's network config changes while no daemon runs; DEL uses the saved one.
    lab.write(lab.conflist(v6=False, portmap=False), "20-other.conflist")

    sandbox = await Sandboxes(net_host).adopt(sandbox_id)
    try:
        assert sandbox.state == "ready"
        assert sandbox.network_result is not None and sandbox.network_result.ipv4 == ip
        got = await _http_get_or_none(f"http://{ip}:1/")
        assert got is None  # reachable address, nothing listening: refused, not a timeout
    finally:
        await sandbox.destroy()
    assert not pid_alive(int(pid_text))
    assert lab.leftovers([sandbox_id]) == []


async def _http_get_or_none(url: str) -> bytes | None:
    def get() -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=20) as response:
                data: bytes = response.read()
                return data
        except ConnectionRefusedError:
            return None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                return None
            raise

    return await asyncio.to_thread(get)
