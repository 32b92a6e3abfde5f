"""Pods of distinct sizes from the node's few templates: each a clone of the base below
its size (the default shape's, or the smallest VM's), its vCPUs and memory hot-plugged,
its guest the size its limits give; a pod of the default shape plugs nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.protocol import ContainerSpec
from bench.overhead import cgroup_charge, memory_cgroup
from sandbox.api import RootfsImage, SandboxSpec
from sandbox.cgroups import VmCgroup, hierarchies
from sandbox.guest import GuestAssets
from sandbox.hotplug import expected_mem_total_kib
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxConfig, SandboxHost, size_vm
from sandbox.template import INFO_FILE, RAM_FILE, template_key
from sandbox.vmpod import create_vm_pod, vm_backend
from tests.integration.conftest import GUEST_DIR

pytestmark = pytest.mark.vm

MIB = 1 << 20
# (vCPUs, memory limit in MiB): five sizes, none the default; 477 MiB (a "500M" limit)
# gives an odd VM size, rounded down to a whole virtio-mem block
SHAPES = ((1, 64), (2, 128), (1, 384), (2, 477), (2, 1024))
PROBE = "nproc; grep MemTotal /proc/meminfo; cat /proc/sys/kernel/threads-max; ulimit -u"


def _pod(name: str, vcpus: int, limit_mib: int, cgroup_parent: str = "") -> SandboxSpec:
    return SandboxSpec(
        name,
        cpu_quota_us=vcpus * 100_000,
        cpu_period_us=100_000,
        memory_limit_bytes=limit_mib * MIB,
        # the chart's RuntimeClass overhead (vm.guest_overhead_mib + QEMU's 80 under TCG)
        memory_budget_bytes=(limit_mib + 208) * MIB,
        cgroup_parent=cgroup_parent,
    )


@pytest.fixture
def template_dir() -> Iterator[Path]:
    # a template directory of this test alone: what it holds is what these pods built
    path = Path(f"/dev/shm/clearcri-test-shapes-{os.getpid()}-{os.urandom(3).hex()}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host(guest_assets: GuestAssets, run_root: Path, template_dir: Path) -> SandboxHost:
    config = SandboxConfig(
        run_root=run_root / "sandboxes",
        guest_dir=GUEST_DIR,
        accel="auto",
        template_dir=template_dir,
        max_vcpus=2,
    )
    return SandboxHost(config, guest_assets)


@pytest.fixture
async def running() -> AsyncIterator[list[PodSandbox]]:
    pods: list[PodSandbox] = []
    yield pods
    for pod in pods:
        await pod.destroy()


async def _probe(pod: PodSandbox, image: RootfsImage) -> tuple[int, int, int, int]:
    """nproc, MemTotal (KiB), threads-max and the process limit a container sees."""
    await pod.create_container("probe", ContainerSpec(args=["sleep", "600"]), image)
    await pod.start_container("probe")
    result = await pod.agent.exec_sync("probe", ["sh", "-c", PROBE], timeout=60)
    lines = result.stdout.decode().split("\n")
    return int(lines[0]), int(lines[1].split()[1]), int(lines[2]), int(lines[3])


async def test_pods_of_five_sizes_are_clones_of_the_bases(
    host: SandboxHost,
    template_dir: Path,
    busybox_image: RootfsImage,
    running: list[PodSandbox],
) -> None:
    assert host.rooms is not None and host.templates is not None
    bases = {template_key(m, host.qemu) for m in host.base_machines()}
    assert len(bases) == 2
    # the default shape: a clone of its own base, nothing plugged
    default = create_vm_pod(host, SandboxSpec("default"))
    running.append(default)
    await default.start()
    machine = vm_backend(default).machine
    assert default.boot.restore > 0 and default.boot.kernel == 0
    assert default.boot.hotplug == 0
    assert (machine.vcpus, machine.memory_mib) == (machine.boot_vcpus, machine.boot_memory_mib)
    assert template_key(machine, host.qemu) in bases
    seen = []
    for i, (vcpus, limit) in enumerate(SHAPES):
        spec = _pod(f"shape{i}", vcpus, limit)
        pod = create_vm_pod(host, spec)
        running.append(pod)
        await pod.start()
        machine = vm_backend(pod).machine
        # a clone: restored, not booted, of a base
        assert pod.boot.restore > 0 and pod.boot.kernel == 0
        assert pod.status_info()["fromTemplate"] is True
        template = host.templates.get(machine)
        assert template is not None and template.key in bases
        assert machine.memory_file == template.directory / RAM_FILE
        assert machine.boot_memory_mib <= machine.memory_mib
        # the size its limits give (memory down to a whole 2 MiB block above the base)
        want_vcpus, want_mib = size_vm(spec, host.config, host.qemu_mib)
        room = host.rooms.room(want_vcpus, want_mib)
        assert room is not None
        assert (machine.vcpus, machine.memory_mib) == (want_vcpus, room.memory_for(want_mib))
        assert machine.memory_mib >= want_mib - 1
        nproc, mem_total, threads, nproc_limit = await _probe(pod, busybox_image)
        assert nproc == want_vcpus
        plugged = (machine.memory_mib - machine.boot_memory_mib) * MIB
        assert mem_total == expected_mem_total_kib(template.mem_total_kib, plugged)
        # what the kernel sized at boot follows the memory the guest has now (a thread
        # per 128 KiB, less what the kernel had in use)
        assert mem_total // 128 * 94 // 100 < threads <= mem_total // 128
        assert nproc_limit == threads // 2
        seen.append((machine.vcpus, machine.memory_mib))
        # only the bases' templates, and nothing half-built, in the directory
        names = sorted(p.name for p in template_dir.iterdir())
        assert set(names) <= bases, names
        assert all((template_dir / name / INFO_FILE).exists() for name in names)
    assert len(set(seen)) == len(SHAPES)
    # both bases served these sizes
    assert sorted(p.name for p in template_dir.iterdir()) == sorted(bases)


async def test_a_clone_holds_what_a_vm_booted_that_big_holds(
    host: SandboxHost, busybox_image: RootfsImage, running: list[PodSandbox]
) -> None:
    """Against a VM booted whole with the same size: the same vCPUs; MemTotal higher by
    the memory map of what was plugged (a cold boot reserves it out of MemTotal, a
    hot-plug takes it from free memory), the kernel's boot-sized limits alike."""
    spec = _pod("bigclone", 2, 1024)
    clone = create_vm_pod(host, spec)
    running.append(clone)
    await clone.start()
    cold_host = SandboxHost(replace(host.config, templates=False), host.assets)
    cold = create_vm_pod(cold_host, replace(spec, sandbox_id="bigcold"))
    running.append(cold)
    await cold.start()
    machine = vm_backend(clone).machine
    assert (vm_backend(cold).machine.vcpus, vm_backend(cold).machine.memory_mib) == (
        machine.vcpus,
        machine.memory_mib,
    )
    assert not vm_backend(cold).machine.sized_at_clone
    c_nproc, c_total, c_threads, _ = await _probe(clone, busybox_image)
    b_nproc, b_total, b_threads, _ = await _probe(cold, busybox_image)
    assert c_nproc == b_nproc == 2
    memory_map = (machine.memory_mib - machine.boot_memory_mib) * 1024 // 64
    assert abs((c_total - memory_map) - b_total) < b_total // 200, (c_total, b_total)
    assert abs(c_threads - b_threads) < b_threads // 100, (c_threads, b_threads)


async def test_plugged_memory_is_charged_to_the_pod_cgroup(
    host: SandboxHost, busybox_image: RootfsImage, running: list[PodSandbox]
) -> None:
    parent = f"clearcri-test-shapes-{os.urandom(3).hex()}"
    try:
        pod = create_vm_pod(host, _pod("charged", 1, 1024, cgroup_parent=parent))
        running.append(pod)
        await pod.start()
        cgroup = memory_cgroup(vm_backend(pod).cgroup.paths)
        assert cgroup is not None, "the host has no memory cgroup controller"
        before, _ = cgroup_charge(cgroup)
        # 480 MiB written to the container's layer (tmpfs in the guest, half its memory
        # at most): far more than the template's 256 MiB base, so most of it lands in
        # hot-plugged memory
        fill = "dd if=/dev/zero of=/tmp/f bs=1M count=480 2>/dev/null; sleep 600"
        await pod.create_container("fill", ContainerSpec(args=["sh", "-c", fill]), busybox_image)
        await pod.start_container("fill")
        grown = 0
        for _ in range(120):
            await asyncio.sleep(1)
            grown = cgroup_charge(cgroup)[0] - before
            if grown >= 440 * MIB:
                break
        assert grown >= 440 * MIB, f"the pod cgroup grew by {grown // MIB} MiB only"
    finally:
        for pod in running:
            await pod.destroy()
        running.clear()
        VmCgroup(tuple(h / parent for h in hierarchies())).remove()


async def test_a_pod_above_the_room_boots_whole_without_a_template(
    host: SandboxHost,
    template_dir: Path,
    busybox_image: RootfsImage,
    running: list[PodSandbox],
) -> None:
    """Bases grow no further than vm.max_clone_memory_mib: a bigger pod boots cold with
    its whole size, and no template of its shape (which would hold its whole memory on
    tmpfs) is made."""
    capped = SandboxHost(replace(host.config, max_clone_memory_mib=512), host.assets)
    assert capped.rooms is not None and capped.rooms.max_memory_mib == 512
    spec = _pod("above", 2, 640)
    pod = create_vm_pod(capped, spec)
    running.append(pod)
    await pod.start()
    machine = vm_backend(pod).machine
    assert not machine.sized_at_clone
    assert pod.boot.restore == 0 and pod.boot.kernel > 0
    assert pod.status_info()["fromTemplate"] is False
    want_vcpus, want_mib = size_vm(spec, capped.config, capped.qemu_mib)
    assert (machine.vcpus, machine.memory_mib) == (want_vcpus, want_mib)
    nproc, mem_total, _, _ = await _probe(pod, busybox_image)
    assert nproc == 2 and mem_total > (want_mib - 128) * 1024
    assert not template_dir.exists() or list(template_dir.iterdir()) == []
