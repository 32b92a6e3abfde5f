"""`clearcri bench overhead`: what a pod VM costs its pod cgroup beyond the guest's RAM."""

from __future__ import annotations

import asyncio
import os
import statistics
from dataclasses import replace
from pathlib import Path

from bench.common import bench_config, busybox_image, drop_templates
from sandbox.api import SandboxSpec
from sandbox.cgroups import VmCgroup, hierarchies
from sandbox.guest import locate_guest
from sandbox.node import SandboxHost
from sandbox.vmpod import create_vm_pod, vm_backend

MIB = 1 << 20
# Processes that each hold 32 MiB in a shell variable until the guest runs out of memory.
FILL_GUEST = (
    "for i in $(seq {count}); do "
    "sh -c 'x=$(head -c 33554432 /dev/zero | tr \"\\0\" a); sleep 600' & done; sleep {wait}"
)


def memory_cgroup(paths: tuple[Path, ...]) -> Path | None:
    """The memory controller's directory among a VM's cgroups (v1 or v2)."""
    for path in paths:
        if (path / "memory.max_usage_in_bytes").exists() or (path / "memory.peak").exists():
            return path
    return None


def cgroup_charge(path: Path) -> tuple[int, int]:
    """(current, peak) bytes charged to a memory cgroup."""
    if (path / "memory.max_usage_in_bytes").exists():
        current = int((path / "memory.usage_in_bytes").read_text())
        return current, int((path / "memory.max_usage_in_bytes").read_text())
    current = int((path / "memory.current").read_text())
    return current, int((path / "memory.peak").read_text())


def qemu_own_anon_kib(pid: int, guest_ram_bytes: set[int]) -> int:
    """Anonymous memory of a QEMU process outside the guest's RAM mappings (KiB, those
    of the sizes in ``guest_ram_bytes``: its boot RAM and a virtio-mem region): its heap,
    TCG code buffer, device state and thread stacks."""
    total = 0
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, _, end = head.partition("-")
            size = int(end, 16) - int(start, 16)
        elif head == "Anonymous:" and size not in guest_ram_bytes:
            total += int(line.split()[1])
    return total


def translated_code_kib(info_jit: str) -> int | None:
    """The translated code in use (KiB) in HMP's ``info jit`` text (``gen code size
    USED/SIZE``); None without TCG."""
    for line in info_jit.splitlines():
        if line.startswith("gen code size"):
            used = line.split()[-1].split("/")[0]
            return int(used) // 1024 if used.isdigit() else None
    return None


async def run_overhead_bench(*, guest_dir: Path, sizes: list[int], work_dir: Path) -> int:
    """Boot a pod VM (a template clone, as pods start) of each size in ``sizes`` (MiB)
    under a memory cgroup of its own, fill its guest until the guest's OOM killer acts,
    and print what the cgroup was charged, idle and at the peak, and QEMU's own
    anonymous memory (outside the guest's RAM): what a pod's cgroup budget must leave
    room for beyond the guest (``vm.qemu_overhead_mib``)."""
    from agent.protocol import ContainerSpec

    assets = locate_guest(guest_dir)
    # each VM exactly its size: no guest overhead on top, no budget below
    config = replace(
        bench_config(guest_dir, work_dir, templates=True),
        guest_overhead_mib=0,
        min_memory_mib=min(sizes),
    )
    host = SandboxHost(config, assets)
    parent = f"clearcri-bench-{os.getpid()}"
    image = busybox_image(work_dir)
    print(f"guest {assets.version}  accel {host.accel}  tb-size {config.tcg_tb_size_mib} MiB")
    print(
        f"{'VM MiB':>7} {'guest MemTotal':>15} {'idle charge':>12} {'peak charge':>12} "
        f"{'peak - VM':>10} {'QEMU own':>9} {'of it code':>11}   (MiB, charged to the VM's "
        "memory cgroup; QEMU own: its anonymous memory outside guest RAM; code: the "
        "translated code in use)"
    )
    overheads: list[float] = []
    beside_code: list[float] = []
    guest_floor: list[float] = []
    try:
        for size in sizes:
            spec = SandboxSpec(
                f"bench-ovh-{size}", memory_limit_bytes=size * MIB, cgroup_parent=parent
            )
            sandbox = create_vm_pod(host, spec)
            try:
                await sandbox.start()
                cgroup = memory_cgroup(vm_backend(sandbox).cgroup.paths)
                if cgroup is None:
                    raise RuntimeError("the host has no memory cgroup controller")
                await sandbox.create_container(
                    "probe", ContainerSpec(args=["sleep", "3600"]), image
                )
                await sandbox.start_container("probe")
                await asyncio.sleep(3)
                idle, _ = cgroup_charge(cgroup)
                meminfo = await sandbox.agent.exec_sync(
                    "probe", ["cat", "/proc/meminfo"], timeout=30
                )
                total = int(meminfo.stdout.split(b"MemTotal:")[1].split()[0]) / 1024
                count = size // 32 + 4
                await sandbox.create_container(
                    "fill",
                    ContainerSpec(args=["sh", "-c", FILL_GUEST.format(count=count, wait=600)]),
                    image,
                )
                await sandbox.start_container("fill")
                # filled when the charge stops growing
                last = -1
                for _ in range(120):
                    await asyncio.sleep(2)
                    current, peak = cgroup_charge(cgroup)
                    if current == last:
                        break
                    last = current
                _, peak = cgroup_charge(cgroup)
                machine = vm_backend(sandbox).machine
                memory_mib = machine.memory_mib
                overhead = peak / MIB - memory_mib
                ram = {machine.boot_memory_mib * MIB, machine.hotplug_memory_mib * MIB}
                own = qemu_own_anon_kib(sandbox.pid, ram) / 1024
                qmp = vm_backend(sandbox).qmp
                code_kib = None
                if qmp is not None and machine.accel != "kvm":
                    info = await qmp.execute("human-monitor-command", {"command-line": "info jit"})
                    code_kib = translated_code_kib(str(info))
                overheads.append(own)
                guest_floor.append(memory_mib - total)
                code = "" if code_kib is None else f"{code_kib / 1024:.1f}"
                if code_kib is not None:
                    beside_code.append(own - code_kib / 1024)
                print(
                    f"{memory_mib:>7} {total:>15.1f} {idle / MIB:>12.1f} "
                    f"{peak / MIB:>12.1f} {overhead:>10.1f} {own:>9.1f} {code:>11}",
                    flush=True,
                )
            finally:
                await sandbox.destroy()
    finally:
        drop_templates(config)
        VmCgroup(tuple(hierarchy / parent for hierarchy in hierarchies())).remove()
    if overheads:
        print(
            f"QEMU's own anonymous memory with the guest full: max {max(overheads):.1f} MiB, "
            f"median {statistics.median(overheads):.1f} MiB"
        )
        print(
            f"guest RAM the kernel keeps for itself (VM - MemTotal): max {max(guest_floor):.1f} MiB"
        )
    if beside_code:
        print(
            f"QEMU's own memory beside its translated code (what vm.qemu_overhead_mib is "
            f"for; the code has vm.tcg_tb_size_mib): max {max(beside_code):.1f} MiB"
        )
    return 0
