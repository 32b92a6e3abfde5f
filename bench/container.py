"""`clearcri bench container`: where a pod VM's containers spend their time, step by step.

Each run starts one pod VM (a template clone) through the sandbox layer and times what
kubelet makes it do: the first container's create (image hot-plug, then the guest's
steps) and start, its first line of output, ExecSync `true`, killing a container's
processes, stopping the pod and removing it. The guest reports its own steps
(``ContainerInfo.timings``, ``ExecStarted.timings``). Under TCG a last step flushes the
VM's translated code as the daemon does once a pod idles (sandbox/jit.py) and times the
two execs after it; the QEMU's anonymous memory before and after the flush shows what it
gives back. Medians with min and max over
``--runs``; run it against two guest directories to compare two builds of the agent.
Nothing here asserts a time.

``--standby``: every run starts two pods in turn, one cloned as above and one that takes
over a standby VM (``[vm] standby``, sandbox/standby.py; the pool refills between runs),
and the table has a column for each.

``--tb-sizes 16,32``: a column per TCG translation-cache size (``vm.tcg_tb_size_mib``),
one node (config, templates, standby pool with ``--standby``) each, their pods started
in turn every run; the QEMU's anonymous memory after the execs shows what each size
keeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from agent.protocol import ContainerSpec, ExecSpec
from bench.common import bench_config, busybox_image, drop_templates
from sandbox.api import SandboxSpec
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.standby import StandbyPool
from sandbox.vmpod import create_vm_pod, vm_backend

EXECS_PER_RUN = 5
#: the one row in MiB, not seconds
MEMORY_ROW = "QEMU anon memory after the execs (MiB)"
FLUSHED_MEMORY_ROW = "QEMU anon memory after a JIT flush (MiB)"
MEMORY_ROWS = (MEMORY_ROW, FLUSHED_MEMORY_ROW)
#: How long the bench lets a flushed VM idle before it measures (what the guest
#: translates again on its own: timer ticks, the agent waiting).
FLUSH_SETTLE_S = 2.0


def _anon_mib(pid: int) -> float:
    """RssAnon of a process in MiB (guest pages it wrote, TCG code, heap)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_run(
    host: SandboxHost, image_dir: Path, index: int, samples: dict[str, list[float]]
) -> None:
    image = busybox_image(image_dir)

    def add(name: str, seconds: float) -> None:
        samples[name].append(seconds)

    t0 = time.monotonic()
    sandbox: PodSandbox = create_vm_pod(host, SandboxSpec(f"bench-ctr-{index}"))
    try:
        boot = await sandbox.start()
        add("pod start", time.monotonic() - t0)
        add("  of it: clone", boot.vmm_spawn + boot.restore)
        add("  of it: agent", boot.agent_ready)
        add("  of it: standby take-over", boot.standby)
        t1 = time.monotonic()
        spec = ContainerSpec(args=["sh", "-c", "echo hi; exec sleep 3600"])
        created = await sandbox.create_container("c", spec, image)
        output = sandbox.subscribe_output("c")
        t2 = time.monotonic()
        started = await sandbox.start_container("c")
        t3 = time.monotonic()
        async for _channel, data in output:
            if b"hi" in data:
                break
        t4 = time.monotonic()
        add("create (first container)", t2 - t1)
        for step, seconds in created.timings.items():
            add(f"  create: {step}", seconds)
        add("start", t3 - t2)
        for step, seconds in started.timings.items():
            add(f"  start: {step}", seconds)
        add("start -> first output", t4 - t3)
        add("pod start -> first output", t4 - t0)
        for _ in range(EXECS_PER_RUN):
            t5 = time.monotonic()
            session = await sandbox.exec("c", ExecSpec(args=["true"]))
            t6 = time.monotonic()
            await session.wait(60)
            t7 = time.monotonic()
            add("exec true", t7 - t5)
            add("  exec: start call", t6 - t5)
            for step, seconds in session.timings.items():
                add(f"  exec (guest): {step}", seconds)
            add("  exec: run to exit", t7 - t6)
        if sandbox.process is not None:
            add(MEMORY_ROW, _anon_mib(sandbox.process.pid))
            await _exec_after_flush(sandbox, add)
        t8 = time.monotonic()
        await sandbox.signal_container("c", 9, all_processes=True, timeout=30)
        await sandbox.wait_container("c", timeout=30)
        t9 = time.monotonic()
        add("kill all + wait", t9 - t8)
        await sandbox.stop()
        t10 = time.monotonic()
        add("stop pod", t10 - t9)
    finally:
        t11 = time.monotonic()
        await sandbox.destroy()
        add("remove pod", time.monotonic() - t11)


async def _exec_after_flush(sandbox: PodSandbox, add: Callable[[str, float], None]) -> None:
    """Under TCG: flush the VM's translated code as the daemon does when a pod idles
    (sandbox/jit.py), then what an idle VM holds and what its next execs take."""
    backend = vm_backend(sandbox)
    if backend.machine.accel == "kvm" or backend.qmp is None or sandbox.process is None:
        return
    if not await backend.qmp.flush_translated_code():
        return
    await asyncio.sleep(FLUSH_SETTLE_S)
    add(FLUSHED_MEMORY_ROW, _anon_mib(sandbox.process.pid))
    for name in ("exec true after a JIT flush", "  the exec after that"):
        t0 = time.monotonic()
        session = await sandbox.exec("c", ExecSpec(args=["true"]))
        await session.wait(60)
        add(name, time.monotonic() - t0)


async def run_container_bench(
    *,
    guest_dir: Path,
    runs: int,
    work_dir: Path,
    standby: bool = False,
    tb_sizes: tuple[int, ...] = (),
) -> int:
    base = bench_config(guest_dir, work_dir, templates=True)
    # one node per column: (host, its standby pool or None, whether its pods take one)
    nodes: dict[str, tuple[SandboxHost, StandbyPool | None, bool]] = {}
    if tb_sizes:
        for size in tb_sizes:
            config = dataclasses.replace(
                base, tcg_tb_size_mib=size, run_root=work_dir / f"tb{size}" / "run"
            )
            host = SandboxHost(config)
            nodes[f"tb {size} MiB"] = (host, StandbyPool(host, 1) if standby else None, standby)
    else:
        host = SandboxHost(base)
        pool = StandbyPool(host, 1) if standby else None
        nodes["clone"] = (host, pool, False)
        if standby:
            nodes["standby"] = (host, pool, True)
    first = next(iter(nodes.values()))[0]
    print(f"accelerator: {first.accel} ({first.accel_reason}); guest {first.assets.version}")
    ways = tuple(nodes)
    samples: dict[str, dict[str, list[float]]] = {way: defaultdict(list) for way in ways}
    image_dir = Path(tempfile.mkdtemp(prefix="image-", dir=work_dir))
    pools = {id(pool): pool for _host, pool, _take in nodes.values() if pool is not None}
    try:
        for host in {id(h): h for h, _pool, _take in nodes.values()}.values():
            await one_run(host, image_dir, 0, defaultdict(list))  # its templates are built
        for pool in pools.values():
            pool.start()
        for index in range(1, runs + 1):
            for number, way in enumerate(ways):
                host, pool, take = nodes[way]
                host.standby = None
                if take:
                    assert pool is not None
                    await _standby_ready(pool)
                    host.standby = pool
                await one_run(host, image_dir, index * len(ways) + number, samples[way])
    finally:
        for host, _pool, _take in nodes.values():
            host.standby = None
        for pool in pools.values():
            await pool.close()
        drop_templates(base)
    _print_table(samples, ways, runs)
    return 0


def _print_table(
    samples: dict[str, dict[str, list[float]]], ways: tuple[str, ...], runs: int
) -> None:
    names = list(dict.fromkeys(name for way in ways for name in samples[way]))
    width = max(len(name) for name in names)
    print(
        f"\nms (MiB where the row says), median (min-max) over {runs} runs "
        f"({EXECS_PER_RUN} execs each); last column: last / first"
    )
    print(f"{'':<{width}}  " + "".join(f"{way:>22}" for way in ways))
    for name in names:
        scale = 1 if name in MEMORY_ROWS else 1000
        row = f"{name:<{width}}  "
        for way in ways:
            values = [v * scale for v in samples[way].get(name, [])]
            cell = (
                f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
                if values
                else ""
            )
            row += f"{cell:>22}"
        first, last = samples[ways[0]].get(name), samples[ways[-1]].get(name)
        if len(ways) > 1 and first and last and statistics.median(first) > 0:
            row += f"  {statistics.median(last) / statistics.median(first):5.2f}"
        print(row)


async def _standby_ready(pool: StandbyPool, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pool.ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no standby VM within {timeout:.0f} s")
        await asyncio.sleep(0.1)
