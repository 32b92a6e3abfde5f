"""`clearcri bench boot`: boot time against the bare-kernel floor, and host memory per VM;
`clearcri bench density` and `clearcri bench overhead`.

Every figure is measured in the same run as its baseline and printed with medians,
min and max; nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

from sandbox.cgroups import VmCgroup, hierarchies
from sandbox.guest import GuestAssets, locate_guest
from sandbox.pod import PodSandbox, SandboxConfig, SandboxHost, SandboxSpec
from sandbox.vm import MachineSpec, VmProcess, build_command

FLOOR_MARKER = b"clearcri-floor-ready"


def read_kib(path: Path, key: str) -> int:
    """The value in kB of line ``key:`` in a /proc file such as meminfo or smaps_rollup."""
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in {path}")


def mem_available_kib() -> int:
    return read_kib(Path("/proc/meminfo"), "MemAvailable")


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
    cmd = build_command(spec, qemu=host.config.qemu)
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


def _bench_config(guest_dir: Path, work_dir: Path, *, templates: bool) -> SandboxConfig:
    """Sandboxes under ``work_dir``, VM templates in a tmpfs directory of this run."""
    return SandboxConfig(
        run_root=work_dir / "run",
        guest_dir=guest_dir,
        accel="auto",
        templates=templates,
        template_dir=Path(f"/dev/shm/clearcri-bench-templates-{os.getpid()}"),
    )


def _drop_templates(config: SandboxConfig) -> None:
    if config.template_dir is not None:
        shutil.rmtree(config.template_dir, ignore_errors=True)


async def run_boot_bench(*, guest_dir: Path, runs: int, memory_vms: int, work_dir: Path) -> int:
    assets = locate_guest(guest_dir)
    config = _bench_config(guest_dir, work_dir, templates=False)
    try:
        return await _run(config, assets, runs, memory_vms, work_dir)
    finally:
        _drop_templates(config)


async def _run(
    config: SandboxConfig, assets: GuestAssets, runs: int, memory_vms: int, work_dir: Path
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
            sandbox = PodSandbox.create(target, SandboxSpec(f"bench-{prefix}-{i}"))
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
        f"holds {resident / 2**20:.1f} MiB on tmpfs, paid once per node and VM shape):"
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
            sandbox = PodSandbox.create(host, SandboxSpec(f"{prefix}-{i}"))
            sandboxes.append(sandbox)
            await sandbox.start()
        await asyncio.sleep(5)
        pss = sum(pss_kib(s.pid) for s in sandboxes)
        drop = before - mem_available_kib()
    finally:
        for sandbox in sandboxes:
            await sandbox.destroy()
    return pss, drop


# -- density: how many idle pods one node holds ---------------------------------------


def cpu_busy_fraction(seconds: float) -> float:
    """The host's busy CPU share (all cores) over ``seconds``, from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else 0.0


async def run_density_bench(*, guest_dir: Path, pods: int, step: int, work_dir: Path) -> int:
    """Start up to ``pods`` idle pod VMs (template clones, as the daemon does), one at a
    time, and print at every ``step`` pods: the start time of the last ones, the host
    memory each pod costs, the host's CPU busy share and what memory is left. The
    baseline is the first step, measured in the same run; the limit is where a start
    fails or where the figures project that memory runs out."""
    assets = locate_guest(guest_dir)
    config = _bench_config(guest_dir, work_dir, templates=True)
    host = SandboxHost(config, assets)
    assert host.templates is not None
    sandboxes: list[PodSandbox] = []
    try:
        await host.templates.build(
            host.machine_for(SandboxSpec("default"), config.run_root / "default")
        )
        idle_cpu = await asyncio.to_thread(cpu_busy_fraction, 5.0)
        before = mem_available_kib()
        print(f"guest {assets.version}  accel {host.accel}  {config.default_memory_mib} MiB guests")
        print(f"host before: MemAvailable {before / 1024:.0f} MiB, CPU busy {idle_cpu:.1%}")
        print(
            f"{'pods':>5} {'start median (s)':>17} {'start max':>10} {'MiB/pod':>8} "
            f"{'CPU busy':>9} {'MemAvailable MiB':>17}"
        )
        starts: list[float] = []
        limit = ""
        first_median = 0.0
        per_pod_kib = 0.0
        for i in range(pods):
            try:
                sandbox = PodSandbox.create(host, SandboxSpec(f"bench-density-{i}"))
                sandboxes.append(sandbox)
                boot = await sandbox.start()
            except Exception as exc:  # the limit: report it, then clean up
                limit = f"pod {i + 1} did not start: {exc}"
                break
            starts.append(boot.total)
            count = len(starts)
            if count % step == 0 or count == pods:
                await asyncio.sleep(3)
                busy = await asyncio.to_thread(cpu_busy_fraction, 5.0)
                available = mem_available_kib()
                per_pod_kib = (before - available) / count
                recent = starts[-step:]
                median = statistics.median(recent)
                first_median = first_median or median
                print(
                    f"{count:>5} {median:>17.3f} {max(recent):>10.3f} "
                    f"{per_pod_kib / 1024:>8.1f} {busy:>9.1%} {available / 1024:>17.0f}",
                    flush=True,
                )
        if starts:
            last = statistics.median(starts[-step:])
            print(
                f"start time at {len(starts)} pods / at the first {min(step, len(starts))}: "
                f"{last / first_median:.2f}"
            )
            if per_pod_kib > 0:
                left = mem_available_kib()
                print(
                    f"host memory per idle pod: {per_pod_kib / 1024:.1f} MiB (target <= 64); "
                    f"MemAvailable left for ~{left / per_pod_kib:.0f} more such pods"
                )
        print(f"limit: {limit or f'none reached up to {pods} pods'}")
    finally:
        for sandbox in sandboxes:
            with contextlib.suppress(Exception):
                await sandbox.destroy()
        _drop_templates(config)
    return 0


# -- overhead: what a pod VM costs its pod cgroup beyond the guest's RAM ----------------

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


def qemu_own_anon_kib(pid: int, guest_ram_bytes: int) -> int:
    """Anonymous memory of a QEMU process outside the guest's RAM mapping (KiB): its
    heap, TCG code buffer, device state and thread stacks."""
    total = 0
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, _, end = head.partition("-")
            size = int(end, 16) - int(start, 16)
        elif head == "Anonymous:" and size != guest_ram_bytes:
            total += int(line.split()[1])
    return total


async def run_overhead_bench(*, guest_dir: Path, sizes: list[int], work_dir: Path) -> int:
    """Boot a pod VM (a template clone, as pods start) of each size in ``sizes`` (MiB)
    under a memory cgroup of its own, fill its guest until the guest's OOM killer acts,
    and print what the cgroup was charged, idle and at the peak, and QEMU's own
    anonymous memory (outside the guest's RAM): what a pod's cgroup budget must leave
    room for beyond the guest (``vm.qemu_overhead_mib``)."""
    from agent.protocol import ContainerSpec
    from sandbox.rootfs import build_rootfs_image, make_busybox_tree

    assets = locate_guest(guest_dir)
    # each VM exactly its size: no guest overhead on top, no budget below
    config = replace(
        _bench_config(guest_dir, work_dir, templates=True),
        guest_overhead_mib=0,
        min_memory_mib=min(sizes),
    )
    host = SandboxHost(config, assets)
    parent = f"clearcri-bench-{os.getpid()}"
    tree = make_busybox_tree(work_dir / "busybox")
    image = build_rootfs_image(tree, work_dir / "busybox.erofs", image_id="busybox")
    print(f"guest {assets.version}  accel {host.accel}  tb-size {config.tcg_tb_size_mib} MiB")
    print(
        f"{'VM MiB':>7} {'guest MemTotal':>15} {'idle charge':>12} {'peak charge':>12} "
        f"{'peak - VM':>10} {'QEMU own':>9}   (MiB, charged to the VM's memory cgroup; "
        "QEMU own: its anonymous memory outside guest RAM)"
    )
    overheads: list[float] = []
    guest_floor: list[float] = []
    try:
        for size in sizes:
            spec = SandboxSpec(
                f"bench-ovh-{size}", memory_limit_bytes=size * MIB, cgroup_parent=parent
            )
            sandbox = PodSandbox.create(host, spec)
            try:
                await sandbox.start()
                cgroup = memory_cgroup(sandbox.cgroup.paths)
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
                overhead = peak / MIB - sandbox.machine.memory_mib
                own = qemu_own_anon_kib(sandbox.pid, sandbox.machine.memory_mib * MIB) / 1024
                overheads.append(own)
                guest_floor.append(sandbox.machine.memory_mib - total)
                print(
                    f"{sandbox.machine.memory_mib:>7} {total:>15.1f} {idle / MIB:>12.1f} "
                    f"{peak / MIB:>12.1f} {overhead:>10.1f} {own:>9.1f}",
                    flush=True,
                )
            finally:
                await sandbox.destroy()
    finally:
        _drop_templates(config)
        VmCgroup(tuple(hierarchy / parent for hierarchy in hierarchies())).remove()
    if overheads:
        print(
            f"QEMU's own anonymous memory with the guest full: max {max(overheads):.1f} MiB, "
            f"median {statistics.median(overheads):.1f} MiB"
        )
        print(
            f"guest RAM the kernel keeps for itself (VM - MemTotal): max {max(guest_floor):.1f} MiB"
        )
    return 0
