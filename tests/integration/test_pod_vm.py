"""Pod VMs for real: boot, containers, exec, signals, crash, re-adoption, cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from agent.protocol import ContainerSpec, ExecSpec, Resources
from sandbox.api import RootfsImage, SandboxError, SandboxSpec, SandboxState
from sandbox.handlers import Sandboxes
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.procfs import pid_alive
from sandbox.vmpod import create_vm_pod, vm_backend
from tests.integration.conftest import qemu_processes

pytestmark = pytest.mark.vm


async def _collect(sandbox: PodSandbox, cid: str) -> tuple[bytes, bytes]:
    out: dict[int, list[bytes]] = {1: [], 2: []}
    async for channel, data in sandbox.agent.subscribe_output(cid):
        out.setdefault(channel, []).append(data)
    return b"".join(out[1]), b"".join(out[2])


def _qemu_pids_named(name: str) -> list[int]:
    return [pid for pid, cmd, _ in qemu_processes() if f"clearcri-{name},".encode() in cmd]


async def test_cold_boot_reports_dax_and_phases(sandbox_host: SandboxHost) -> None:
    sandbox_host.templates = None  # boot the kernel for real
    pod = create_vm_pod(sandbox_host, SandboxSpec("cold1"))
    try:
        await pod.start()
        ready = pod.agent.ready
        assert ready.dax is True, "the guest OS image must be mounted with DAX"
        assert ready.kernel_release
        assert 0 < pod.boot.kernel < pod.boot.total
        assert pod.boot.total > 0 and pod.boot.vmm_spawn > 0 and pod.boot.restore == 0
        assert vm_backend(pod).machine.memory_file is None
        assert pod.state == "ready"
        assert vm_backend(pod).console_tail(), "the serial console is captured"
    finally:
        await pod.destroy()


async def test_clones_of_a_template_are_distinct_pods(
    sandbox_host: SandboxHost, busybox_image: RootfsImage
) -> None:
    assert sandbox_host.templates is not None
    randoms = set()
    for name in ("clone1", "clone2"):
        pod = create_vm_pod(sandbox_host, SandboxSpec(name, hostname=f"host-{name}"))
        try:
            await pod.start()
            assert pod.boot.restore > 0 and pod.boot.kernel == 0
            assert (
                vm_backend(pod).machine.memory_file is not None
                and not vm_backend(pod).machine.memory_shared
            )
            assert pod.agent.ready.dax is True
            spec = ContainerSpec(
                args=["sh", "-c", "hostname; head -c 16 /dev/urandom | od -An -tx1"]
            )
            await pod.create_container("c", spec, busybox_image)
            collector = asyncio.ensure_future(_collect(pod, "c"))
            await pod.start_container("c")
            stdout, _ = await asyncio.wait_for(collector, 60)
            hostname, random_hex = stdout.decode().split("\n", 1)
            assert hostname == f"host-{name}"
            randoms.add(random_hex)
        finally:
            await pod.destroy()
    assert len(randoms) == 2, "clones must not share the template's random state"


async def test_busybox_container_output_and_exit_code(
    pod: PodSandbox, busybox_image: RootfsImage
) -> None:
    spec = ContainerSpec(args=["sh", "-c", "echo hello; echo oops >&2; exit 3"])
    await pod.create_container("c1", spec, busybox_image)
    collector = asyncio.ensure_future(_collect(pod, "c1"))
    await pod.start_container("c1")
    status = await pod.agent.wait_container("c1", timeout=60)
    stdout, stderr = await asyncio.wait_for(collector, 30)
    assert status.exit_code == 3
    assert status.reason == "Error"
    assert stdout == b"hello\n"
    assert stderr == b"oops\n"
    assert status.finished_at_ns >= status.started_at_ns > 0
    await pod.agent.delete_container("c1")
    assert not [c for c in await pod.agent.list_containers() if c.id == "c1"]


async def test_exec_with_and_without_tty(pod: PodSandbox, busybox_image: RootfsImage) -> None:
    await pod.create_container("c1", ContainerSpec(args=["sleep", "1000"]), busybox_image)
    await pod.start_container("c1")
    result = await pod.agent.exec_sync("c1", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")

    spec = ExecSpec(args=["sh", "-c", "tty; stty size"], tty=True, cols=120, rows=40)
    session = await pod.exec("c1", spec)
    chunks = [data async for _channel, data in session]
    assert await session.wait(30) == 0
    text = b"".join(chunks).decode()
    assert "/dev/pts/" in text
    assert "40 120" in text, "the terminal starts with the client's size"
    assert "\0" not in text

    session = await pod.exec("c1", ExecSpec(args=["cat"], stdin=True))
    await session.write_stdin(b"ping through stdin\n")
    await session.close_stdin()
    echoed = b"".join([data async for _channel, data in session])
    assert echoed == b"ping through stdin\n"
    assert await session.wait(30) == 0


async def test_containers_are_laid_out_at_random_while_the_helpers_are_not(
    pod: PodSandbox, busybox_image: RootfsImage
) -> None:
    """Under TCG the agent starts crun and nsexec at fixed addresses (their translated
    code is kept across starts); what they start, the container's processes, gets
    address-space randomization back: the init crun starts, an exec through nsexec and
    a terminal exec through crun."""
    args = ["sh", "-c", "cat /proc/self/personality /proc/cmdline; exec sleep 1000"]
    await pod.create_container("c1", ContainerSpec(args=args), busybox_image)
    output = pod.subscribe_output("c1")
    await pod.start_container("c1")
    text = b""
    async for _channel, data in output:
        text += data
        if b"\n" in text.partition(b"\n")[2]:
            break
    personality, cmdline = text.decode().splitlines()[:2]
    if vm_backend(pod).machine.accel != "kvm":
        assert "clearcri.unrandomized_helpers=1" in cmdline.split()
    assert personality == "00000000", "ADDR_NO_RANDOMIZE (00040000) leaked into the container"
    result = await pod.agent.exec_sync("c1", ["cat", "/proc/self/personality"])
    assert result.stdout == b"00000000\n"
    session = await pod.exec("c1", ExecSpec(args=["cat", "/proc/self/personality"], tty=True))
    chunks = [data async for _channel, data in session]
    assert await session.wait(30) == 0
    assert b"".join(chunks) == b"00000000\r\n"


async def test_an_idle_guest_does_no_proactive_compaction(
    pod: PodSandbox, busybox_image: RootfsImage
) -> None:
    """kcompactd would wake an idle guest every 500 ms to score its memory's
    fragmentation; the guest's init turns that off (compaction on demand stays)."""
    await pod.create_container("c1", ContainerSpec(args=["sleep", "1000"]), busybox_image)
    await pod.start_container("c1")
    result = await pod.agent.exec_sync("c1", ["cat", "/proc/sys/vm/compaction_proactiveness"])
    assert (result.exit_code, result.stdout) == (0, b"0\n")


async def test_signal_stops_container(pod: PodSandbox, busybox_image: RootfsImage) -> None:
    await pod.create_container("c1", ContainerSpec(args=["sleep", "1000"]), busybox_image)
    await pod.start_container("c1")
    await pod.agent.signal_container("c1", signal.SIGKILL)
    status = await pod.agent.wait_container("c1", timeout=60)
    assert status.signal == signal.SIGKILL
    assert status.exit_code == 128 + signal.SIGKILL


async def test_two_containers_share_the_pod_network(
    pod: PodSandbox, busybox_image: RootfsImage
) -> None:
    server = ContainerSpec(args=["sh", "-c", "echo pod-shared > /tmp/x; httpd -f -p 8080 -h /tmp"])
    await pod.create_container("web", server, busybox_image)
    await pod.start_container("web")
    await pod.create_container("client", ContainerSpec(args=["sleep", "1000"]), busybox_image)
    await pod.start_container("client")
    for _ in range(50):
        result = await pod.agent.exec_sync(
            "client", ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/x"], timeout=20
        )
        if result.exit_code == 0:
            break
        await asyncio.sleep(0.2)
    assert result.stdout == b"pod-shared\n", result.stderr
    # one image slot serves both containers of the same image
    assert list(vm_backend(pod).slots.values()) == ["busybox"]


async def test_a_full_writable_layer_leaves_exec_and_neighbours_working(
    pod: PodSandbox, busybox_image: RootfsImage
) -> None:
    """Each container's writable layer is a filesystem of its own in the guest: filling
    one gives ENOSPC there alone, not in the agent's run dir (exec) or a neighbour."""
    for cid in ("filler", "neighbour"):
        await pod.create_container(cid, ContainerSpec(args=["sleep", "1000"]), busybox_image)
        await pod.start_container(cid)
    fill = await pod.agent.exec_sync(
        "filler",
        ["sh", "-c", "dd if=/dev/zero of=/fill bs=1M 2>&1; df -k / | tail -1"],
        timeout=120,
    )
    assert b"No space left on device" in fill.stdout, fill.stdout
    assert fill.stdout.split()[-2] == b"100%", fill.stdout
    for cid in ("filler", "neighbour"):
        result = await pod.agent.exec_sync(cid, ["sh", "-c", "echo ok"], timeout=30)
        assert (result.exit_code, result.stdout) == (0, b"ok\n"), result
    result = await pod.agent.exec_sync(
        "neighbour", ["sh", "-c", "dd if=/dev/zero of=/f bs=1M count=8 2>&1 && df -k / | tail -1"]
    )
    assert result.exit_code == 0 and result.stdout.split()[-2] != b"100%", result.stdout
    # a limited container's layer holds at most its memory limit
    limited = ContainerSpec(args=["sleep", "1000"])
    limited.resources = Resources(memory_limit=64 << 20)
    await pod.create_container("limited", limited, busybox_image)
    await pod.start_container("limited")
    size = await pod.agent.exec_sync("limited", ["sh", "-c", "df -k / | tail -1"])
    assert size.stdout.split()[1] == str(64 << 10).encode(), size.stdout


async def test_killed_qemu_is_reported_dead_and_cleaned(sandbox_host: SandboxHost) -> None:
    sandbox = create_vm_pod(sandbox_host, SandboxSpec("crash1"))
    await sandbox.start()
    died = asyncio.Event()
    sandbox.on_exit(lambda _s: died.set())
    os.kill(sandbox.pid, signal.SIGKILL)
    await asyncio.wait_for(died.wait(), 10)
    assert sandbox.state == "dead"
    assert "signal 9" in sandbox.exit_reason
    with pytest.raises(SandboxError, match="not running"):
        _ = sandbox.agent
    await sandbox.destroy()
    assert not vm_backend(sandbox).machine.run_dir.exists()


async def test_failed_boot_leaves_nothing(sandbox_host: SandboxHost) -> None:
    sandbox_host.qemu = "/bin/false"
    sandbox = create_vm_pod(sandbox_host, SandboxSpec("fail1"))
    with pytest.raises(SandboxError, match="failed to start"):
        await sandbox.start()
    assert sandbox.state == "dead"
    await sandbox.destroy()
    assert not vm_backend(sandbox).machine.run_dir.exists()


ADOPT_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agent.protocol import ContainerSpec
    from sandbox.api import RootfsImage, SandboxSpec
    from sandbox.node import SandboxConfig, SandboxHost
    from sandbox.vmpod import create_vm_pod

    async def main() -> None:
        run_root, guest_dir, image = sys.argv[1], sys.argv[2], sys.argv[3]
        config = SandboxConfig(run_root=Path(run_root), guest_dir=Path(guest_dir))
        host = SandboxHost(config)
        sandbox = create_vm_pod(host, SandboxSpec("adopt1"))
        await sandbox.start()
        await sandbox.create_container(
            "keep", ContainerSpec(args=["sleep", "1000"]), RootfsImage("busybox", Path(image))
        )
        await sandbox.start_container("keep")
        await sandbox.close()
        print(sandbox.pid, flush=True)

    asyncio.run(main())
    """
)


async def test_new_process_readopts_running_vm(
    sandbox_host: SandboxHost, busybox_image: RootfsImage
) -> None:
    config = sandbox_host.config
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ADOPT_CHILD,
        str(config.run_root),
        str(config.guest_dir),
        str(busybox_image.path),
        stdout=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0
    pid = int(out.split()[-1])
    assert pid_alive(pid), "the VM must outlive the process that started it"

    sandbox = await Sandboxes(sandbox_host).adopt("adopt1")
    try:
        assert sandbox.state == "ready"
        assert sandbox.pid == pid
        running = {c.id: c.state for c in await sandbox.agent.list_containers()}
        assert running == {"keep": "running"}
        result = await sandbox.agent.exec_sync("keep", ["echo", "still here"], timeout=20)
        assert result.stdout == b"still here\n"
    finally:
        await sandbox.destroy()
    assert not pid_alive(pid)
    assert not (config.run_root / "adopt1").exists()


async def test_adopting_a_dead_vm_reports_it(sandbox_host: SandboxHost) -> None:
    sandbox = create_vm_pod(sandbox_host, SandboxSpec("gone1"))
    await sandbox.start()
    pid = sandbox.pid
    await sandbox.close()
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not pid_alive(pid):
            break
        await asyncio.sleep(0.05)
    adopted = await Sandboxes(sandbox_host).adopt("gone1")
    assert adopted.state == "dead"
    assert "exited" in adopted.exit_reason
    await adopted.destroy()


async def test_a_vm_left_stopping_is_stopped_on_adoption(sandbox_host: SandboxHost) -> None:
    """The daemon died inside StopPodSandbox (state file "stopping", VM still up): the
    next daemon finishes the stop instead of leaving the VM running for ever."""
    sandbox = create_vm_pod(sandbox_host, SandboxSpec("halfstop1"))
    await sandbox.start()
    pid = sandbox.pid
    await sandbox.close()
    sandbox.state = SandboxState.STOPPING
    sandbox.save()
    adopted = await Sandboxes(sandbox_host).adopt("halfstop1")
    assert adopted.state == "stopped"
    assert not pid_alive(pid)
    await adopted.destroy()
    assert _qemu_pids_named("halfstop1") == []
    assert not vm_backend(adopted).machine.run_dir.exists()


async def test_destroy_leaves_no_process_socket_or_file(
    sandbox_host: SandboxHost, busybox_image: RootfsImage
) -> None:
    sandbox = create_vm_pod(sandbox_host, SandboxSpec("clean1"))
    await sandbox.start()
    await sandbox.create_container("c", ContainerSpec(args=["sleep", "100"]), busybox_image)
    await sandbox.start_container("c")
    pid = sandbox.pid
    await sandbox.destroy()
    await sandbox.destroy()  # idempotent
    assert not pid_alive(pid)
    assert _qemu_pids_named("clean1") == []
    assert not vm_backend(sandbox).machine.run_dir.exists()
    assert list(sandbox_host.config.run_root.iterdir()) == []
