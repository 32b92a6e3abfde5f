"""`clearcri bench boot`: boot time against the bare-kernel floor, and host memory per VM.

Every figure is measured in the same run as its baseline and printed with medians,
min and max; nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench.common import bench_config, drop_templates, mem_available_kib, read_kib
from bench.plots import BootBar, boot_phases_plot, medians, require_matplotlib
from sandbox.api import SandboxSpec
from sandbox.guest import GuestAssets, locate_guest
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxConfig, SandboxHost
from sandbox.vm import MachineSpec, VmProcess, build_command
from sandbox.vmpod import create_vm_pod

FLOOR_MARKER = b"clearcri-floor-ready"


def pss_kib(pid: int) -> int:
    return read_kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss")


async def boot_floor(host: SandboxHost, work_dir: Path, index: int) -> float:
    """Seconds from spawn to the floor initramfs's marker on the console."""
    run_dir = work_dir / f"floor-{index}"
    run_dir.mkdir(parents=True)
    assets = host.assets
    spec = MachineSpec(
        name=f"floor-{index}",
        kernel=assets.kernel,
        initrd=assets.floor_initrd,
        os_image=assets.os_image,
        run_dir=run_dir,
        accel=host.accel,
        image_slots=host.config.image_slots,
        tcg_tb_size_mib=host.config.tcg_tb_size_mib,
    )
    cmd = build_command(spec, qemu=host.qemu)
    t0 = time.monotonic()
    proc = await VmProcess.spawn(cmd, stderr_log=spec.stderr_log, cwd=run_dir)
    try:
        while proc.alive and time.monotonic() - t0 < 60:
            with contextlib.suppress(OSError):
                if FLOOR_MARKER in spec.console_log.read_bytes():
                    return time.monotonic() - t0
            await asyncio.sleep(0.005)
        raise RuntimeError(f"floor boot printed no marker: {spec.console_log.read_bytes()!r}")
    finally:
        proc.kill()
        await proc.wait(10)


def _stats(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.3f}  min {min(values):6.3f}  max {max(values):6.3f}"
    )


async def run_boot_bench(
    *, guest_dir: Path, runs: int, memory_vms: int, work_dir: Path, plot: Path | None = None
) -> int:
    """Print the boot figures; with ``plot``, also draw the median boot phases of each
    kind of start as stacked bars into that PNG file."""
    if plot is not None:
        require_matplotlib()
    assets = locate_guest(guest_dir)
    config = bench_config(guest_dir, work_dir, templates=False)
    try:
        return await _run(config, assets, runs, memory_vms, work_dir, plot)
    finally:
        drop_templates(config)


async def _run(
    config: SandboxConfig,
    assets: GuestAssets,
    runs: int,
    memory_vms: int,
    work_dir: Path,
    plot: Path | None,
) -> int:
    host = SandboxHost(config, assets)
    clone_host = SandboxHost(replace(config, templates=True), assets)
    # the same template, QEMU not jailed: what the jail costs a clone's start
    unjailed_host = SandboxHost(replace(config, templates=True, jail=False), assets)
    assert clone_host.templates is not None
    print(f"guest {assets.version}  kernel {assets.kernel_version}  accel {host.accel}")
    print(f"  ({host.accel_reason})")
    floors: list[float] = []
    phases: dict[str, list[float]] = {
        "vmm_spawn": [],
        "firmware": [],
        "kernel": [],
        "agent_ready": [],
        "total": [],
    }
    clone_phases: dict[str, list[float]] = {
        "vmm_spawn": [],
        "restore": [],
        "agent_ready": [],
        "hotplug": [],
        "total": [],
    }
    unjailed_phases: dict[str, list[float]] = {name: [] for name in clone_phases}
    template = await clone_host.templates.build(
        clone_host.machine_for(SandboxSpec("default"), config.run_root / "default")
    )
    for i in range(runs):
        floors.append(await boot_floor(host, work_dir, i))
        for target, collect, prefix in (
            (host, phases, "cold"),
            (clone_host, clone_phases, "clone"),
            (unjailed_host, unjailed_phases, "unjailed"),
        ):
            sandbox = create_vm_pod(target, SandboxSpec(f"bench-{prefix}-{i}"))
            try:
                boot = await sandbox.start()
            finally:
                await sandbox.destroy()
            for name in collect:
                collect[name].append(getattr(boot, name))
    print(f"\nboot, {runs} runs each, seconds (spawn -> agent ready)")
    print(f"  floor (same kernel, trivial /init)  {_stats(floors)}")
    print("  cold boot (no template):")
    for name, values in phases.items():
        print(f"    {name:<32} {_stats(values)}")
    resident = template.ram_file.stat().st_blocks * 512
    print(
        f"  from a VM template (built once in {template.boot_seconds:.2f} s; its RAM file "
        f"holds {resident / 2**20:.1f} MiB on tmpfs, paid once per node; the guest's size "
        "hot-plugged where it is more than the template's):"
    )
    for name, values in clone_phases.items():
        print(f"    {name:<32} {_stats(values)}")
    print("  from the same template, QEMU not jailed ([vm] jail = false):")
    for name, values in unjailed_phases.items():
        print(f"    {name:<32} {_stats(values)}")
    jail_ratio = statistics.median(clone_phases["total"]) / statistics.median(
        unjailed_phases["total"]
    )
    print(f"  ratio jailed / unjailed clone: {jail_ratio:.2f}")
    floor = statistics.median(floors)
    print(f"  ratio cold / floor:     {statistics.median(phases['total']) / floor:.2f}")
    print(
        f"  ratio template / floor: {statistics.median(clone_phases['total']) / floor:.2f}"
        "  (target <= 1.15)"
    )
    if plot is not None:

        def bar(label: str, samples: dict[str, list[float]]) -> BootBar:
            parts = medians({k: v for k, v in samples.items() if k != "total"})
            return BootBar(label, parts, statistics.median(samples["total"]))

        boot_phases_plot(
            [
                BootBar("floor\n(same kernel,\ntrivial /init)", {"floor": floor}, floor),
                bar("cold boot\n(no template)", phases),
                bar("template clone", clone_phases),
                bar("template clone,\nQEMU not jailed", unjailed_phases),
            ],
            plot,
            title=(
                f"clearcri bench boot: spawn to agent ready, median of {runs} runs, "
                f"{config.default_memory_mib} MiB guests, accel {host.accel}"
            ),
        )
        print(f"  plot: {plot}")

    print(f"\nhost memory per idle VM ({config.default_memory_mib} MiB guests)")
    variants = {
        "template": clone_host,
        "pmem": host,
        "blk": SandboxHost(replace(config, os_image_mode="blk"), assets),
    }
    for mode, mode_host in variants.items():
        for count in sorted({1, memory_vms}):
            pss, drop = await measure_memory(mode_host, count, f"bench-mem-{mode}")
            print(
                f"  {mode:<8} {count:>3} VMs: PSS {pss / count / 1024:7.1f} MiB/VM, "
                f"MemAvailable drop {drop / count / 1024:7.1f} MiB/VM "
                f"({drop / 1024:7.1f} MiB total)"
            )
    return 0


async def measure_memory(host: SandboxHost, count: int, prefix: str) -> tuple[int, int]:
    """Total qemu PSS and MemAvailable drop (KiB) with ``count`` idle VMs."""
    before = mem_available_kib()
    sandboxes: list[PodSandbox] = []
    try:
        for i in range(count):
            sandbox = create_vm_pod(host, SandboxSpec(f"{prefix}-{i}"))
            sandboxes.append(sandbox)
            await sandbox.start()
        await asyncio.sleep(5)
        pss = sum(pss_kib(s.pid) for s in sandboxes)
        drop = before - mem_available_kib()
    finally:
        for sandbox in sandboxes:
            await sandbox.destroy()
    return pss, drop
