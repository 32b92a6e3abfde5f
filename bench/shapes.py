"""`clearcri bench shapes`: how fast pods of distinct limits start, against the default
shape's clone.

Every round starts one pod of the default shape (no limits) and one pod of each of five
distinct limits, interleaved, each stopped before the next starts. The limits change a
little every round (2 MiB more memory each time), as the limits of pods in a cluster do:
no round meets a shape an earlier round saw. Timed: the whole ``PodSandbox.start`` (what
the pod waits for, templates included). Then one pod of each shape runs at once, idle,
and each one's host memory (PSS of its QEMU) is read.

Medians with min and max; nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.boot import pss_kib
from bench.common import bench_config, drop_templates
from sandbox.api import SandboxSpec
from sandbox.guest import locate_guest
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.vmpod import create_vm_pod, vm_backend

MIB = 1 << 20
CPU_PERIOD_US = 100_000
# What the chart's RuntimeClass adds to a pod's limits (vm.guest_overhead_mib + 40).
POD_OVERHEAD_MIB = 168


@dataclass(frozen=True)
class Shape:
    """A pod's limits: vCPUs (its CPU limit, whole CPUs) and memory limit in MiB
    (0: no limits, the default shape)."""

    vcpus: int
    memory_limit_mib: int

    def spec(self, sandbox_id: str, extra_mib: int = 0) -> SandboxSpec:
        if self.memory_limit_mib == 0:
            return SandboxSpec(sandbox_id)
        limit = (self.memory_limit_mib + extra_mib) * MIB
        return SandboxSpec(
            sandbox_id,
            cpu_quota_us=self.vcpus * CPU_PERIOD_US,
            cpu_period_us=CPU_PERIOD_US,
            memory_limit_bytes=limit,
            memory_budget_bytes=limit + POD_OVERHEAD_MIB * MIB,
        )

    @property
    def label(self) -> str:
        if self.memory_limit_mib == 0:
            return "default (no limits)"
        return f"{self.vcpus} CPU, {self.memory_limit_mib} Mi limit"


DEFAULT = Shape(0, 0)
SHAPES = (Shape(1, 64), Shape(2, 128), Shape(1, 384), Shape(2, 640), Shape(2, 1024))


def _stats(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.3f}  min {min(values):6.3f}  max {max(values):6.3f}"
    )


def _templates(host: SandboxHost) -> list[Path]:
    assert host.templates is not None
    return [p for p in host.templates.root.iterdir() if not p.name.startswith(".")]


async def _start(host: SandboxHost, spec: SandboxSpec) -> tuple[PodSandbox, float]:
    sandbox = create_vm_pod(host, spec)
    t0 = time.monotonic()
    try:
        await sandbox.start()
    except BaseException:
        await sandbox.destroy()
        raise
    return sandbox, time.monotonic() - t0


async def run_shapes_bench(*, guest_dir: Path, rounds: int, work_dir: Path) -> int:
    assets = locate_guest(guest_dir)
    config = bench_config(guest_dir, work_dir, templates=True)
    host = SandboxHost(config, assets)
    try:
        return await _run(host, rounds)
    finally:
        drop_templates(config)


async def _run(host: SandboxHost, rounds: int) -> int:
    assert host.templates is not None
    print(f"guest {host.assets.version}  accel {host.accel}")
    warm = host.warm_up()
    assert warm is not None
    await warm
    print(f"template of the default shape built; template dir: {len(_templates(host))} entry")
    times: dict[Shape, list[float]] = {shape: [] for shape in (DEFAULT, *SHAPES)}
    sizes: dict[Shape, tuple[int, int]] = {}
    for r in range(rounds):
        line = [f"round {r + 1}:"]
        for i, shape in enumerate(SHAPES):
            for current in (DEFAULT, shape):
                name = f"bench-shape-{r}-{i}-{'d' if current is DEFAULT else 's'}"
                sandbox, seconds = await _start(host, current.spec(name, extra_mib=2 * r))
                machine = vm_backend(sandbox).machine
                sizes[current] = (machine.vcpus, machine.memory_mib)
                await sandbox.destroy()
                times[current].append(seconds)
                if current is not DEFAULT:
                    line.append(f"{machine.vcpus}x{machine.memory_mib}M {seconds:.2f}s")
        print("  ".join(line), flush=True)
    print(f"\npod start, {rounds} rounds, seconds (the whole PodSandbox.start):")
    for shape, values in times.items():
        vcpus, memory = sizes[shape]
        print(f"  {shape.label:<22} VM {vcpus} vCPU {memory:>5} MiB  {_stats(values)}")
    entries = _templates(host)
    ram = sum((p / "ram").stat().st_blocks * 512 for p in entries if (p / "ram").exists())
    print(
        f"template dir at the end: {len(entries)} entries, their RAM files "
        f"{ram / MIB:.1f} MiB on tmpfs"
    )

    print("\nhost memory, one idle pod of each shape running at once (PSS of its QEMU, MiB):")
    running: list[tuple[Shape, PodSandbox]] = []
    try:
        for i, shape in enumerate((DEFAULT, *SHAPES)):
            sandbox, _ = await _start(host, shape.spec(f"bench-shape-mem-{i}"))
            running.append((shape, sandbox))
        await asyncio.sleep(5)
        for shape, sandbox in running:
            machine = vm_backend(sandbox).machine
            print(
                f"  {shape.label:<22} VM {machine.vcpus} vCPU {machine.memory_mib:>5} MiB  "
                f"PSS {pss_kib(sandbox.pid) / 1024:7.1f}"
            )
    finally:
        for _, sandbox in running:
            await sandbox.destroy()
    return 0
