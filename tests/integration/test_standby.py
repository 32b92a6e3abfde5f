"""Standby VMs (sandbox/standby.py): pods of the default shape take over a VM already
running, with the real CNI plugins of a test lab; nothing of a standby VM, taken or not,
stays behind, and a restarted daemon removes the standby VMs an earlier one left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.api import RootfsImage, SandboxSpec
from sandbox.cgroups import VmCgroup, hierarchies
from sandbox.guest import GuestAssets
from sandbox.handlers import Sandboxes
from sandbox.hotplug import expected_mem_total_kib
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost, size_vm
from sandbox.procfs import pid_alive
from sandbox.standby import StandbyPool
from sandbox.vmpod import WARM_UP_DEVICE, create_vm_pod, vm_backend
from tests.integration.test_network import (
    CniLab,
    _http_get,
    _pod_spec,
    _serve,
    lab,
    net_host,
)
from tests.integration.test_template_shapes import _probe

pytestmark = pytest.mark.vm

__all__ = ["lab", "net_host"]  # the CNI lab and its host, used here too

MIB = 1 << 20


@pytest.fixture
async def pool(net_host: SandboxHost) -> AsyncIterator[StandbyPool]:
    pool = StandbyPool(net_host, 1)
    net_host.standby = pool
    pool.start()
    try:
        yield pool
    finally:
        net_host.standby = None
        await pool.close()


async def _ready(pool: StandbyPool, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.2)):
        if pool.ready:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no standby VM within {timeout:.0f} s")


async def _ready_with_netns(pool: StandbyPool) -> tuple[PodSandbox, Path]:
    """The pool's first ready standby VM and its network namespace (which exists)."""
    await _ready(pool)
    standby = pool.ready[0]
    netns = vm_backend(standby).own_netns
    assert netns is not None and netns.exists()
    return standby, netns


def _standby_vms(net_host: SandboxHost) -> list[str]:
    return (
        sorted(p.name for p in net_host.standby_dir.iterdir())
        if net_host.standby_dir.exists()
        else []
    )


@contextlib.asynccontextmanager
async def _burst_pool(
    net_host: SandboxHost, lab: CniLab
) -> AsyncIterator[tuple[StandbyPool, list[PodSandbox]]]:
    """A pool of one standby VM and one more of a base whose pod found none ready; the
    pods a test starts go in the list. Nothing of them or of the pool stays after."""
    pool = StandbyPool(net_host, 1, burst=1)
    net_host.standby = pool
    pool.start()
    pods: list[PodSandbox] = []
    try:
        yield pool, pods
    finally:
        for pod in pods:
            await pod.destroy()
        net_host.standby = None
        await pool.close()
    assert _standby_vms(net_host) == []
    assert lab.leftovers([p.id for p in pods]) == []


async def test_a_pod_takes_over_a_standby_vm_with_its_network_and_cgroup(
    net_host: SandboxHost, pool: StandbyPool, lab: CniLab, busybox_image: RootfsImage
) -> None:
    await _ready(pool)
    standby = pool.ready[0]
    standby_name, standby_pid = vm_backend(standby).machine.name, standby.pid
    parent = f"clearcri-test-standby-{os.urandom(3).hex()}"
    spec = _pod_spec("taker")
    spec = SandboxSpec(spec.sandbox_id, network=spec.network, cgroup_parent=parent)
    pod = create_vm_pod(net_host, spec)
    try:
        assert pool.ready == [] and pool.taken == 1
        await pod.start()
        info = vm_backend(pod).status_info()
        assert info["fromStandby"] is True and info["fromTemplate"] is True
        assert pod.pid == standby_pid
        # the standby's warm-up container is gone from the guest; the OS image it ran on
        # stays plugged in the port after the image slots, which are all the pod's
        assert await pod.agent.list_containers() == []
        backend = vm_backend(pod)
        assert backend.slots == {}
        assert backend.qmp is not None
        plugged = await backend.qmp.execute("qom-list", {"path": "/machine/peripheral"})
        assert WARM_UP_DEVICE in [p["name"] for p in plugged]
        # the run root links the pod's id to the standby's directory
        link = net_host.config.run_root / spec.sandbox_id
        assert link.is_symlink() and link.resolve().name == standby_name
        # the pod's network: CNI's address, the guest NIC, the pod's hostname and hosts
        result = pod.network_result
        assert result is not None and result.ipv4.startswith(lab.prefix4 + ".")
        await _serve(pod, busybox_image, "from-a-standby")
        assert await _http_get(f"http://{result.ipv4}:8080/x") == b"from-a-standby\n"
        shown = await pod.agent.exec_sync("web", ["sh", "-c", "hostname; cat /etc/hosts"])
        assert shown.stdout.decode().startswith(spec.sandbox_id[:63] + "\n")
        assert f"{result.ipv4}\t{spec.sandbox_id[:63]}" in shown.stdout.decode()
        # the VM is in the pod's cgroup (what it held before stays charged where it was:
        # kernels since 6.x no longer move charges, sandbox/standby.py)
        cgroup = vm_backend(pod).cgroup
        assert cgroup.paths and all(parent in str(p) for p in cgroup.paths)
        for line in Path(f"/proc/{pod.pid}/cgroup").read_text().splitlines():
            if line.split(":")[1] in ("memory", "cpu,cpuacct", "pids"):
                assert parent in line, line
        # the pool starts the next standby VM once no pod VM is starting
        await _ready(pool)
        assert pool.ready[0] is not standby
    finally:
        await pod.destroy()
        VmCgroup(tuple(h / parent for h in hierarchies())).remove()
    assert not pid_alive(standby_pid)
    assert not (net_host.config.run_root / spec.sandbox_id).exists()
    assert standby_name not in _standby_vms(net_host)
    await pool.close()
    assert _standby_vms(net_host) == [] and lab.leftovers([spec.sandbox_id]) == []


async def test_a_bigger_pod_grows_the_standby_and_a_smaller_one_starts_its_own_vm(
    net_host: SandboxHost, pool: StandbyPool, busybox_image: RootfsImage
) -> None:
    await _ready(pool)
    standby = pool.ready[0]
    # below the standby's memory: the smallest VM's base, a VM of its own
    small = _pod_spec("small")
    small = SandboxSpec(
        small.sandbox_id,
        network=small.network,
        memory_limit_bytes=64 * MIB,
        memory_budget_bytes=232 * MIB,
    )
    pod = create_vm_pod(net_host, small)
    try:
        await pod.start()
        assert vm_backend(pod).status_info()["fromStandby"] is False
        assert pool.ready == [standby]
    finally:
        await pod.destroy()
    # two vCPUs and more memory: the standby's base, the rest plugged into the running VM
    sized = _pod_spec("sized")
    sized = SandboxSpec(
        sized.sandbox_id,
        network=sized.network,
        cpu_quota_us=200_000,
        cpu_period_us=100_000,
        memory_limit_bytes=384 * MIB,
        memory_budget_bytes=552 * MIB,
    )
    pod = create_vm_pod(net_host, sized)
    try:
        assert pool.ready == [] and pool.taken == 1
        await pod.start()
        assert vm_backend(pod).status_info()["fromStandby"] is True
        assert pod.pid == standby.pid and pod.boot.hotplug > 0
        machine = vm_backend(pod).machine
        want = size_vm(sized, net_host.config, net_host.qemu_mib)
        assert (machine.vcpus, machine.memory_mib) == want and want[0] == 2 and want[1] > 256
        assert net_host.templates is not None
        template = net_host.templates.get(machine)
        assert template is not None
        nproc, mem_total, threads, _ = await _probe(pod, busybox_image)
        assert nproc == 2
        plugged = (machine.memory_mib - machine.boot_memory_mib) * MIB
        assert mem_total == expected_mem_total_kib(template.mem_total_kib, plugged)
        assert mem_total // 128 * 94 // 100 < threads <= mem_total // 128
    finally:
        await pod.destroy()
    assert not pid_alive(standby.pid)


async def test_pods_below_the_default_take_a_standby_of_their_base_once_one_came(
    net_host: SandboxHost, lab: CniLab, busybox_image: RootfsImage
) -> None:
    def small(name: str) -> SandboxSpec:
        spec = _pod_spec(name)
        return SandboxSpec(
            spec.sandbox_id,
            network=spec.network,
            memory_limit_bytes=64 * MIB,
            memory_budget_bytes=232 * MIB,
        )

    async with _burst_pool(net_host, lab) as (pool, pods):
        await _ready(pool)
        # the first finds no standby of its base (the smallest VM's) and starts as a clone
        first = create_vm_pod(net_host, small("first"))
        pods.append(first)
        await first.start()
        assert vm_backend(first).status_info()["fromStandby"] is False
        assert pool.missed == 1 and pool.size == 2
        machine = vm_backend(first).machine
        for _ in range(int(240 / 0.2)):
            if pool.has_ready(machine, networked=True):
                break
            await asyncio.sleep(0.2)
        assert pool.has_ready(machine, networked=True), "no standby VM of the smallest base"
        # the next takes it, grown to its size in the running VM
        second = create_vm_pod(net_host, small("second"))
        pods.append(second)
        await second.start()
        assert vm_backend(second).status_info()["fromStandby"] is True
        grown = vm_backend(second).machine
        assert (grown.vcpus, grown.memory_mib) == (machine.vcpus, machine.memory_mib)
        assert grown.boot_memory_mib < 256 and second.boot.hotplug > 0
        assert net_host.templates is not None
        template = net_host.templates.get(grown)
        assert template is not None
        nproc, mem_total, _, _ = await _probe(second, busybox_image)
        plugged = (grown.memory_mib - grown.boot_memory_mib) * MIB
        assert nproc == 1 and mem_total == expected_mem_total_kib(template.mem_total_kib, plugged)
        # the pod's network works as after a boot
        result = second.network_result
        assert result is not None and result.ipv4.startswith(lab.prefix4 + ".")
        await _serve(second, busybox_image, "from-a-small-standby")
        assert await _http_get(f"http://{result.ipv4}:8080/x") == b"from-a-small-standby\n"


async def test_a_standby_vm_killed_is_replaced_and_leaves_nothing(
    net_host: SandboxHost, pool: StandbyPool
) -> None:
    dead, netns = await _ready_with_netns(pool)
    os.kill(dead.pid, signal.SIGKILL)  # the host's OOM killer, a crash: no pod asked
    for _ in range(int(120 / 0.2)):
        if pool.ready and pool.ready[0] is not dead:
            break
        await asyncio.sleep(0.2)
    assert pool.ready and pool.ready[0] is not dead, "the dead standby VM was not replaced"
    assert _standby_vms(net_host) == [pool.ready[0].id]
    assert not netns.exists()


async def test_pods_without_network_take_a_standby_with_its_tap(
    net_host: SandboxHost, pool: StandbyPool
) -> None:
    _, netns = await _ready_with_netns(pool)
    # a pod without a network takes the standby with its tap, which leads nowhere
    plain = create_vm_pod(net_host, SandboxSpec(f"nonet-{os.urandom(3).hex()}"))
    try:
        await plain.start()
        assert vm_backend(plain).status_info()["fromStandby"] is True
        assert plain.network_result is None
        await plain.agent.ping()
    finally:
        await plain.destroy()
    assert not netns.exists(), "the standby's namespace goes with the pod that took it"


async def test_a_restarted_daemon_removes_the_standby_vms_no_pod_took(
    guest_assets: GuestAssets, net_host: SandboxHost, pool: StandbyPool, lab: CniLab
) -> None:
    await _ready(pool)
    spec = _pod_spec("kept")
    pod = create_vm_pod(net_host, spec)
    await pod.start()
    await _ready(pool)
    left = pool.ready[0]
    left_pid, left_netns = left.pid, vm_backend(left).own_netns
    assert left_netns is not None and left_netns.exists()
    # the daemon goes away without a word: its VMs keep running, its connections go
    pool.ready.clear()
    await pool.close()
    await left.close()
    await pod.close()
    assert pid_alive(left_pid)

    again = SandboxHost(net_host.config, guest_assets)
    removed = await StandbyPool(again, 1).remove_abandoned()
    assert removed == 1
    assert not pid_alive(left_pid) and not left_netns.exists()
    assert _standby_vms(again) == [vm_backend(pod).machine.name]
    adopted = await Sandboxes(again).adopt(spec.sandbox_id)
    try:
        assert adopted.state == "ready"
        await adopted.agent.ping()
    finally:
        await adopted.destroy()
    assert _standby_vms(again) == [] and lab.leftovers([spec.sandbox_id]) == []
    assert not pid_alive(pod.pid)


async def test_a_node_without_networking_serves_pods_with_a_network_spec(
    guest_assets: GuestAssets, net_host: SandboxHost
) -> None:
    """Networking off: the standby has no tap of its own, and a pod that asks for a
    network (a sandbox-layer caller; the CRI layer gives none then) takes it over as a
    clone of it would start, without CNI."""
    config = replace(net_host.config, network=replace(net_host.config.network, enabled=False))
    host = SandboxHost(config, guest_assets)
    pool = StandbyPool(host, 1)
    host.standby = pool
    pool.start()
    try:
        await _ready(pool)
        assert vm_backend(pool.ready[0]).own_netns is None
        pod = create_vm_pod(host, _pod_spec("offline"))
        try:
            await pod.start()
            assert vm_backend(pod).status_info()["fromStandby"] is True
            assert pod.network_result is None
        finally:
            await pod.destroy()
    finally:
        host.standby = None
        await pool.close()
    assert _standby_vms(host) == []


async def test_pods_that_find_no_standby_ready_make_the_pool_keep_two(
    net_host: SandboxHost, lab: CniLab
) -> None:
    async with _burst_pool(net_host, lab) as (pool, pods):
        await _ready(pool)
        # two pods back to back: the first takes the standby, the second finds none
        for name in ("first", "second"):
            pod = create_vm_pod(net_host, _pod_spec(name))
            pods.append(pod)
            await pod.start()
        taken = [vm_backend(p).status_info()["fromStandby"] for p in pods]
        assert taken == [True, False] and pool.missed == 1 and pool.size == 2
        for _ in range(int(240 / 0.2)):
            if len(pool.ready) == 2:
                break
            await asyncio.sleep(0.2)
        assert len(pool.ready) == 2, "the pool did not make two standby VMs"
        assert len(_standby_vms(net_host)) == 3  # the first pod's and the two ready
