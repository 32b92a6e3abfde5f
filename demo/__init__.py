"""`clearcri demo`: boot one pod VM through the sandbox layer, without the daemon, run a
busybox container in it and show it working (boot phases, output, exec, host memory).
Not runtime code: the CLI imports it inside its command."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from agent.protocol import ContainerSpec, ExecSpec
from cri.images.rootfs import build_rootfs_image, make_busybox_tree
from sandbox.api import SandboxSpec
from sandbox.node import SandboxConfig, SandboxHost
from sandbox.vmpod import create_vm_pod, host_memory


async def run_demo(guest_dir: Path, run_root: Path) -> int:
    host = SandboxHost(SandboxConfig(run_root=run_root, guest_dir=guest_dir))
    print(f"accelerator: {host.accel} ({host.accel_reason})")
    work = Path(tempfile.mkdtemp(prefix="clearcri-demo-"))
    try:
        tree = make_busybox_tree(work / "busybox")
        image = build_rootfs_image(tree, work / "busybox.erofs", image_id="busybox")
        sandbox = create_vm_pod(host, SandboxSpec("demo", hostname="demo-pod"))
        try:
            boot = await sandbox.start()
            print(
                f"pod VM ready in {boot.total:.2f} s (qemu {boot.vmm_spawn:.2f}, firmware "
                f"{boot.firmware:.2f}, kernel {boot.kernel:.2f}, init+agent "
                f"{boot.agent_ready:.2f}); guest OS image mapped with DAX: "
                f"{sandbox.agent.ready.dax}"
            )
            spec = ContainerSpec(
                args=["sh", "-c", "echo hello from $(hostname): $(uname -sr); sleep 1000"]
            )
            t0 = time.monotonic()
            await sandbox.create_container("hello", spec, image)
            output = sandbox.agent.subscribe_output("hello")
            await sandbox.start_container("hello")
            async for _channel, data in output:
                print(f"container output ({time.monotonic() - t0:.2f} s): {data.decode().strip()}")
                break
            result = await sandbox.agent.exec_sync("hello", ["ps", "-o", "pid,args"], timeout=10)
            print("exec ps in the container:\n" + result.stdout.decode().rstrip())
            session = await sandbox.exec("hello", ExecSpec(args=["cat", "/proc/meminfo"]))
            async for _channel, data in session:
                print("guest " + data.decode().splitlines()[0])
                break
            await session.wait(10)
            memory = host_memory(sandbox)
            pss = memory.pss if memory is not None else 0
            print(f"qemu PSS on the host: {pss / 2**20:.1f} MiB")
        finally:
            await sandbox.destroy()
        print("pod removed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)
    return 0
