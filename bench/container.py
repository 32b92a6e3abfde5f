"""`clearcri bench container`: where a pod VM's containers spend their time, step by step.

Each run starts one pod VM (a template clone) through the sandbox layer and times what
kubelet makes it do: the first container's create (image hot-plug, then the guest's
steps) and start, its first line of output, ExecSync `true`, killing a container's
processes, stopping the pod and removing it. The guest reports its own steps
(``ContainerInfo.timings``, ``ExecStarted.timings``). Medians with min and max over
``--runs``; run it against two guest directories to compare two builds of the agent.
Nothing here asserts a time.

``--standby``: every run starts two pods in turn, one cloned as above and one that takes
over a standby VM (``[vm] standby``, sandbox/standby.py; the pool refills between runs),
and the table has a column for each.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from agent.protocol import ContainerSpec, ExecSpec
from bench.common import bench_config, drop_templates
from cri.images.rootfs import build_rootfs_image, make_busybox_tree
from sandbox.api import RootfsImage, SandboxSpec
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.standby import StandbyPool
from sandbox.vmpod import create_vm_pod

EXECS_PER_RUN = 5


async def one_run(
    host: SandboxHost, image_dir: Path, index: int, samples: dict[str, list[float]]
) -> None:
    erofs = image_dir / "busybox.erofs"
    if erofs.exists():
        image = RootfsImage("busybox", erofs)
    else:
        image = build_rootfs_image(
            make_busybox_tree(image_dir / "busybox"), erofs, image_id="busybox"
        )

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


async def run_container_bench(
    *, guest_dir: Path, runs: int, work_dir: Path, standby: bool = False
) -> int:
    config = bench_config(guest_dir, work_dir, templates=True)
    host = SandboxHost(config)
    print(f"accelerator: {host.accel} ({host.accel_reason}); guest {host.assets.version}")
    ways = ("clone", "standby") if standby else ("clone",)
    samples: dict[str, dict[str, list[float]]] = {way: defaultdict(list) for way in ways}
    image_dir = Path(tempfile.mkdtemp(prefix="image-", dir=work_dir))
    pool = StandbyPool(host, 1) if standby else None
    try:
        await one_run(host, image_dir, 0, defaultdict(list))  # the template is built here
        if pool is not None:
            pool.start()
        for index in range(1, runs + 1):
            for number, way in enumerate(ways):
                host.standby = None
                if way == "standby":
                    assert pool is not None
                    await _standby_ready(pool)
                    host.standby = pool
                await one_run(host, image_dir, index * len(ways) + number, samples[way])
    finally:
        host.standby = None
        if pool is not None:
            await pool.close()
        drop_templates(config)
    names = list(dict.fromkeys(name for way in ways for name in samples[way]))
    width = max(len(name) for name in names)
    print(f"\nms, median (min-max) over {runs} runs ({EXECS_PER_RUN} execs each)")
    print(f"{'':<{width}}  " + "".join(f"{way:>22}" for way in ways))
    for name in names:
        row = f"{name:<{width}}  "
        for way in ways:
            ms = [v * 1000 for v in samples[way].get(name, [])]
            cell = f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})" if ms else ""
            row += f"{cell:>22}"
        if standby and samples["clone"].get(name) and samples["standby"].get(name):
            clone = statistics.median(samples["clone"][name])
            if clone > 0:
                row += f"  {statistics.median(samples['standby'][name]) / clone:5.2f}"
        print(row)
    return 0


async def _standby_ready(pool: StandbyPool, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pool.ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no standby VM within {timeout:.0f} s")
        await asyncio.sleep(0.1)
