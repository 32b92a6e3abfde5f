"""`clearcri bench container`: where a pod VM's containers spend their time, step by step.

Each run starts one pod VM (a template clone) through the sandbox layer and times what
kubelet makes it do: the first container's create (image hot-plug, then the guest's
steps) and start, its first line of output, ExecSync `true`, killing a container's
processes, stopping the pod and removing it. The guest reports its own steps
(``ContainerInfo.timings``, ``ExecStarted.timings``). Medians with min and max over
``--runs``; run it against two guest directories to compare two builds of the agent.
Nothing here asserts a time.
"""

from __future__ import annotations

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


async def run_container_bench(*, guest_dir: Path, runs: int, work_dir: Path) -> int:
    config = bench_config(guest_dir, work_dir, templates=True)
    host = SandboxHost(config)
    print(f"accelerator: {host.accel} ({host.accel_reason}); guest {host.assets.version}")
    samples: dict[str, list[float]] = defaultdict(list)
    image_dir = Path(tempfile.mkdtemp(prefix="image-", dir=work_dir))
    try:
        await one_run(host, image_dir, 0, defaultdict(list))  # the template is built here
        for index in range(1, runs + 1):
            await one_run(host, image_dir, index, samples)
    finally:
        drop_templates(config)
    width = max(len(name) for name in samples)
    print(f"\n{'ms, median (min-max)':<{width}}  over {runs} runs ({EXECS_PER_RUN} execs each)")
    for name, values in samples.items():
        ms = [v * 1000 for v in values]
        print(f"{name:<{width}}  {statistics.median(ms):7.0f} ({min(ms):.0f}-{max(ms):.0f})")
    return 0
