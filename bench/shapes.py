"""`clearcri bench shapes`: pods of distinct limits against the default shape's clone.

Four ways to start a pod of a size that is not the default's, interleaved in one run
(the same machine, the same minute), each round in turn:

* ``standby``: sized at clone time, a pod that takes over a standby VM of its base (the
  default shape's, or the smallest VM's for pods below the default's memory;
  sandbox/standby.py), what it needs beyond it hot-plugged into the running VM; the pool
  has a standby of the pod's base ready before each such start (the first pod of the
  smallest VM's base, untimed, finds none, which makes the pool keep one of it);
* ``hot-plug``: sized at clone time (``[vm] hotplug = true``, the default): a clone of
  one of the node's bases (the default shape's template, or the smallest VM's for
  pods below the default), its vCPUs and memory hot-plugged;
* ``own template``: a clone of a template of its own shape, built before the timing
  (``[vm] hotplug = false`` once its shape has been seen);
* ``new shape``: ``[vm] hotplug = false`` meeting a shape for the first time (in a
  cluster nearly every distinct limit is one): it waits for its template to be built
  (a cold boot) and is then cloned from it. The limits change every round (2 MiB more),
  so this path never finds a template.

Beside them, pods of the default shape (no limits) from its own template
(``[vm] hotplug = false``), and from the default base with its room for hot-plug
(nothing plugged). Timed: the whole ``PodSandbox.start`` (what the pod
waits for, templates included); and for every pod but the new shapes, from the start
to the first line of output of its first container (a busybox ``echo``, created and
started at once as kubelet does): a clone sized at clone time runs the guest's
hot-plug work before its start returns, the first container's steps then run in a
guest whose kernel paths are partly translated already, so the two figures can
differ. Then each shape's host memory, one idle VM at a time (the PSS of its QEMU),
hot-plugged against its own template's clone.

Medians with min and max; nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent.protocol import ContainerSpec
from bench.boot import pss_kib
from bench.common import bench_config, busybox_image, drop_templates
from sandbox.api import RootfsImage, SandboxSpec
from sandbox.guest import locate_guest
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxConfig, SandboxHost
from sandbox.standby import StandbyPool
from sandbox.vmpod import create_vm_pod, vm_backend

MIB = 1 << 20
CPU_PERIOD_US = 100_000
# What a RuntimeClass adds to a pod's limits here: vm.guest_overhead_mib + 40, the chart's
# before the translation cache grew to 48 MiB (its RuntimeClass adds 208 MiB now); kept,
# so that runs stay comparable: every shape's VM is 40 MiB smaller than the chart's.
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
        return f"{self.vcpus} CPU, {self.memory_limit_mib} Mi"


DEFAULT = Shape(0, 0)
SHAPES = (Shape(1, 64), Shape(2, 128), Shape(1, 384), Shape(2, 640), Shape(2, 1024))
WAYS = ("standby", "hot-plug", "own template", "new shape")
#: Seconds the pool may take to have its next standby VM ready.
STANDBY_READY_S = 120.0


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):6.3f} ({min(values):.3f}-{max(values):.3f})"


def _templates(host: SandboxHost) -> tuple[int, float]:
    """Templates in ``host``'s store and MiB their RAM files hold on tmpfs."""
    assert host.templates is not None
    entries = [p for p in host.templates.root.iterdir() if not p.name.startswith(".")]
    ram = sum((p / "ram").stat().st_blocks * 512 for p in entries if (p / "ram").exists())
    return len(entries), ram / MIB


async def _start(host: SandboxHost, spec: SandboxSpec) -> tuple[PodSandbox, float]:
    sandbox = create_vm_pod(host, spec)
    t0 = time.monotonic()
    try:
        await sandbox.start()
    except BaseException:
        await sandbox.destroy()
        raise
    return sandbox, time.monotonic() - t0


@dataclass(frozen=True)
class Timed:
    """One pod's start: seconds of ``PodSandbox.start``, seconds from the start to its
    first container's first output (None: no container), its VM's vCPUs and MiB."""

    start: float
    first_output: float | None
    size: tuple[int, int]


async def _first_output(sandbox: PodSandbox, image: RootfsImage) -> None:
    """Create and start a container that prints a line, and wait for the line."""
    spec = ContainerSpec(args=["sh", "-c", "echo hi; exec sleep 3600"])
    await sandbox.create_container("c", spec, image)
    output = sandbox.subscribe_output("c")
    await sandbox.start_container("c")
    async for _channel, data in output:
        if b"hi" in data:
            return


async def _time(host: SandboxHost, spec: SandboxSpec, image: RootfsImage | None = None) -> Timed:
    t0 = time.monotonic()
    sandbox, seconds = await _start(host, spec)
    try:
        first_output = None
        if image is not None:
            await _first_output(sandbox, image)
            first_output = time.monotonic() - t0
        machine = vm_backend(sandbox).machine
    finally:
        await sandbox.destroy()
    return Timed(seconds, first_output, (machine.vcpus, machine.memory_mib))


async def _time_standby(
    host: SandboxHost, pool: StandbyPool, spec: SandboxSpec, image: RootfsImage
) -> Timed | None:
    """A start that takes over a standby VM of its base, once the pool has one ready
    (None: no base's standby serves it). Its base's first pod found none (an untimed
    start, as a clone), which made the pool keep one of that base."""
    machine = host.machine_for(spec, host.config.run_root / spec.sandbox_id)
    if pool.lane_for(machine) is None:
        return None
    host.standby = pool
    try:
        if not pool.has_ready(machine, networked=False):
            await _time(host, replace(spec, sandbox_id=f"{spec.sandbox_id}-first"))
        deadline = time.monotonic() + STANDBY_READY_S
        while not pool.has_ready(machine, networked=False):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no standby VM ready within {STANDBY_READY_S:.0f} s")
            await asyncio.sleep(0.1)
        taken = pool.taken
        timed = await _time(host, spec, image)
    finally:
        host.standby = None
    return timed if pool.taken > taken else None


async def run_shapes_bench(*, guest_dir: Path, rounds: int, work_dir: Path) -> int:
    assets = locate_guest(guest_dir)
    base = bench_config(guest_dir, work_dir, templates=True)
    configs = {
        "hot-plug": base,
        "own template": _other_store(base, "own", hotplug=False),
        "new shape": _other_store(base, "new", hotplug=False),
    }
    try:
        hosts = {way: SandboxHost(config, assets) for way, config in configs.items()}
        own = hosts["own template"].templates
        assert own is not None
        own.keep = len(SHAPES) + 1  # every shape's template stays
        new = hosts["new shape"].templates
        assert new is not None
        new.keep = 1  # new shapes' templates are not met again
        return await _run(hosts, rounds, busybox_image(work_dir))
    finally:
        for config in configs.values():
            drop_templates(config)


def _other_store(config: SandboxConfig, name: str, *, hotplug: bool) -> SandboxConfig:
    assert config.template_dir is not None
    return replace(
        config,
        hotplug=hotplug,
        template_dir=config.template_dir.with_name(f"{config.template_dir.name}-{name}"),
    )


async def _run(hosts: dict[str, SandboxHost], rounds: int, image: RootfsImage) -> int:
    plug, own = hosts["hot-plug"], hosts["own template"]
    print(f"guest {plug.assets.version}  accel {plug.accel}")
    rooms = plug.rooms
    assert rooms is not None
    print(
        f"hot-plug bases: {', '.join(f'{v} vCPU' for v in rooms.base_vcpus)} x "
        f"{', '.join(f'{m} MiB' for m in rooms.base_memory_mib)}, up to {rooms.max_vcpus} "
        f"vCPUs and {rooms.max_memory_mib} MiB"
    )
    # the templates every timed start finds: the hot-plug one, each shape's own
    started = time.monotonic()
    for i, shape in enumerate((DEFAULT, *SHAPES)):
        for host in (plug, own):
            await _time(host, shape.spec(f"bench-warm-{i}"), image)
    print(f"templates built ({time.monotonic() - started:.1f} s)", flush=True)

    times: dict[tuple[Shape, str], list[float]] = {}
    outputs: dict[tuple[Shape, str], list[float]] = {}
    sizes: dict[Shape, tuple[int, int]] = {}

    def record(shape: Shape, way: str, timed: Timed | None) -> None:
        if timed is None:
            return
        times.setdefault((shape, way), []).append(timed.start)
        if timed.first_output is not None:
            outputs.setdefault((shape, way), []).append(timed.first_output)
        if way == "hot-plug":
            sizes[shape] = timed.size

    # the hot-plug host's standby pool, given to the host for the standby starts only
    pool = StandbyPool(plug, 1, burst=1)
    pool.start()
    try:
        for r in range(rounds):
            line = [f"round {r + 1}:"]
            for i, shape in enumerate(SHAPES):
                name = f"bench-shape-{r}-{i}"
                record(DEFAULT, "own template", await _time(own, DEFAULT.spec(f"{name}-d"), image))
                record(DEFAULT, "hot-plug", await _time(plug, DEFAULT.spec(f"{name}-dp"), image))
                timed = await _time_standby(plug, pool, DEFAULT.spec(f"{name}-ds"), image)
                record(DEFAULT, "standby", timed)
                for way in WAYS:
                    spec = shape.spec(
                        f"{name}-{way[0]}", extra_mib=2 * r if way == "new shape" else 0
                    )
                    if way == "standby":
                        record(shape, way, await _time_standby(plug, pool, spec, image))
                    elif way == "new shape":
                        record(shape, way, await _time(hosts[way], spec))
                    else:
                        record(shape, way, await _time(hosts[way], spec, image))
                line.append(
                    "/".join(
                        f"{times[(shape, way)][-1]:.2f}" if (shape, way) in times else "-"
                        for way in WAYS
                    )
                    + f" ({shape.label})"
                )
            print("  ".join(line), flush=True)
    finally:
        await pool.close()

    print(f"\npod start, seconds, median (min-max) of {rounds} rounds (PodSandbox.start):")
    header = f"  {'pod':<22} {'VM':<14}" + "".join(f"{way:>22}" for way in WAYS)
    print(header)
    reference = statistics.median(times[(DEFAULT, "own template")])
    for shape in (DEFAULT, *SHAPES):
        vcpus, memory = sizes[shape]
        row = f"  {shape.label:<22} {vcpus} vCPU {memory:>5} MiB"
        for way in WAYS:
            values = times.get((shape, way))
            row += f"{_stats(values) if values else '':>22}"
        print(row)
    print(f"  the default shape's clone (own template): {reference:.3f} s; each row against it:")
    for shape in SHAPES:
        ratios = "  ".join(
            f"{way} {statistics.median(times[(shape, way)]) / reference:.2f}"
            for way in WAYS
            if (shape, way) in times
        )
        print(f"    {shape.label:<22} {ratios}")
    _print_first_output(outputs, rounds)
    for way, host in hosts.items():
        count, ram = _templates(host)
        print(f"  templates ({way}): {count}, RAM files {ram:.1f} MiB on tmpfs")

    print("\nhost memory of one idle VM at a time (PSS of its QEMU after 5 s, MiB):")
    for i, shape in enumerate((DEFAULT, *SHAPES)):
        row = f"  {shape.label:<22} {sizes[shape][0]} vCPU {sizes[shape][1]:>5} MiB"
        for way, host in (("hot-plug", plug), ("own template", own)):
            sandbox, _ = await _start(host, shape.spec(f"bench-mem-{way[0]}-{i}"))
            try:
                await asyncio.sleep(5)
                row += f"   {way} {pss_kib(sandbox.pid) / 1024:6.1f}"
            finally:
                await sandbox.destroy()
        print(row, flush=True)
    return 0


def _print_first_output(outputs: dict[tuple[Shape, str], list[float]], rounds: int) -> None:
    ways = [way for way in WAYS if any((shape, way) in outputs for shape in SHAPES)]
    print(
        f"\npod start -> its first container's first output, seconds, median (min-max) of "
        f"{rounds} rounds:"
    )
    print(f"  {'pod':<22}" + "".join(f"{way:>22}" for way in ways))
    for shape in (DEFAULT, *SHAPES):
        row = f"  {shape.label:<22}"
        for way in ways:
            values = outputs.get((shape, way))
            row += f"{_stats(values) if values else '':>22}"
        print(row)
    reference = statistics.median(outputs[(DEFAULT, "own template")])
    plugged = statistics.median(outputs[(DEFAULT, "hot-plug")])
    print(
        f"  the default shape's clone (own template): {reference:.3f} s, each row against it; "
        f"in brackets, hot-plug against the default shape's clone of its base ({plugged:.3f} s):"
    )
    for shape in SHAPES:
        ratios = "  ".join(
            f"{way} {statistics.median(outputs[(shape, way)]) / reference:.2f}"
            for way in ways
            if (shape, way) in outputs
        )
        if (shape, "hot-plug") in outputs:
            ratios += f"  ({statistics.median(outputs[(shape, 'hot-plug')]) / plugged:.2f})"
        print(f"    {shape.label:<22} {ratios}")
