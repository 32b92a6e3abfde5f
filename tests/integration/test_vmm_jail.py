"""A pod VM's QEMU runs jailed: its own uid, no capability but its share's, a root
holding only its own files, and everything still works through it."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from agent.protocol import ContainerSpec, Mount
from sandbox.api import RootfsImage, SandboxSpec
from sandbox.jail import SHARE_CAPABILITIES, jail_for
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.vmpod import create_vm_pod, vm_backend

pytestmark = pytest.mark.vm


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _mask(caps: tuple[int, ...]) -> int:
    return sum(1 << cap for cap in caps)


async def test_the_vmm_runs_as_its_own_user_without_capabilities(pod: PodSandbox) -> None:
    vmm_id = vm_backend(pod).machine.vmm_id
    assert vmm_id is not None and vmm_id != 0
    status = _status(pod.pid)
    assert status["Uid"].split() == [str(vmm_id)] * 4
    assert status["Gid"].split() == [str(vmm_id)] * 4
    assert status["Groups"] == ""
    expected = _mask(SHARE_CAPABILITIES) if vm_backend(pod).machine.share else 0
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == expected, field
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2", "QEMU's own seccomp filter stays on"
    for ns in ("mnt", "net", "ipc"):
        assert os.readlink(f"/proc/{pod.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")


async def test_the_vmm_sees_only_its_own_files(sandbox_host: SandboxHost, pod: PodSandbox) -> None:
    root = Path(f"/proc/{pod.pid}/root")
    machine = vm_backend(pod).machine
    for needed in (machine.kernel, machine.os_image, machine.qmp_socket, Path("/usr/bin")):
        assert (root / needed.relative_to("/")).exists(), needed
    for hidden in (
        Path("/etc/passwd"),
        Path("/proc/sys"),
        Path("/root"),
        machine.run_dir / "state.json",
        machine.run_dir / "qemu.log",
    ):
        assert not (root / hidden.relative_to("/")).exists(), hidden
    # what QEMU reads of the host's settings is there: it starts without a warning
    assert machine.stderr_log.read_text().strip() == ""
    # of the run root, only the way to its own directory is there
    run_root = root / sandbox_host.config.run_root.relative_to("/")
    assert [p.name for p in run_root.iterdir()] == [pod.id]
    assert [p.name for p in (run_root / pod.id).iterdir()] == ["vmm"]
    # another pod's VMM has another id and another root
    other = create_vm_pod(sandbox_host, SandboxSpec("jail-other"))
    try:
        await other.start()
        assert vm_backend(other).machine.vmm_id not in (None, machine.vmm_id)
        assert not (root / vm_backend(other).machine.vmm_dir.relative_to("/")).exists()
    finally:
        await other.destroy()


async def test_a_process_in_the_vmm_jail_cannot_reach_the_host(pod: PodSandbox) -> None:
    """As QEMU would if it were taken over: the same jail, the same id and capabilities."""
    jail = jail_for(vm_backend(pod).machine)
    probe = (
        "cat /etc/shadow; cat /etc/passwd; ls /proc/1; touch /usr/x; touch /x; "
        f"mount -t tmpfs t {vm_backend(pod).machine.vmm_dir}; kill -0 1; id -u; "
        f"echo ok > {vm_backend(pod).machine.vmm_dir}/probe"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        jail.command(["sh", "-c", probe]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.strip() == str(vm_backend(pod).machine.vmm_id)
    err = done.stderr
    assert "/etc/shadow: No such file" in err and "/etc/passwd: No such file" in err
    assert "/proc/1" in err
    assert "'/usr/x': Read-only file system" in err and "'/x': Read-only file system" in err
    assert "must be superuser to use mount" in err
    assert "kill: Operation not permitted" in err
    assert (vm_backend(pod).machine.vmm_dir / "probe").read_text() == "ok\n"


async def test_volumes_and_images_reach_the_jailed_vmm(
    pod: PodSandbox, busybox_image: RootfsImage, tmp_path: Path
) -> None:
    """Binds made after QEMU started (a container's host paths, its image) appear in
    the jail, read-only where asked; files the container's root writes are root's on
    the host and a user's files keep their owner."""
    assert vm_backend(pod).share is not None, "the guest kernel must have 9p (clearcri guest build)"
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "mine").write_text("x")
    os.chown(volume / "mine", 1234, 1234)
    ro_volume = tmp_path / "ro"
    ro_volume.mkdir()
    rw_path = await vm_backend(pod).share_host_path(
        "c-0", volume, readonly=False, propagation="rprivate"
    )
    ro_path = await vm_backend(pod).share_host_path(
        "c-1", ro_volume, readonly=True, propagation="rprivate"
    )
    script = (
        "echo made > /v/new && mkdir /v/d && chown 2000:2000 /v/d && "
        "stat -c %u /v/mine && echo no > /r/x; echo rc=$?"
    )
    spec = ContainerSpec(
        args=["sh", "-c", script],
        mounts=[
            Mount(destination="/v", source=rw_path, options=["rbind", "rw"]),
            Mount(destination="/r", source=ro_path, options=["rbind", "ro"]),
        ],
    )
    await pod.create_container("jailvol", spec, busybox_image)
    out: list[bytes] = []

    async def collect() -> None:
        async for _, data in pod.agent.subscribe_output("jailvol"):
            out.append(data)

    collector = asyncio.ensure_future(collect())
    await pod.start_container("jailvol")
    await asyncio.wait_for(collector, 60)
    text = b"".join(out).decode()
    assert "1234" in text and "rc=1" in text, text
    assert (volume / "new").read_text() == "made\n"
    assert (volume / "new").stat().st_uid == 0
    assert (volume / "d").stat().st_uid == 2000
    assert not (ro_volume / "x").exists()
    jail_root = Path(f"/proc/{pod.pid}/root")
    image_bind = jail_root / vm_backend(pod).machine.images_dir.relative_to("/") / "img0"
    assert image_bind.stat().st_size == busybox_image.path.stat().st_size
    # the jail's copies of the binds are mounts of its own namespace, read-only where
    # the host's are, and go when the host's bind goes
    jail_mounts = Path(f"/proc/{pod.pid}/mountinfo")
    entries = {
        fields[4]: fields[5].split(",")
        for fields in (line.split() for line in jail_mounts.read_text().splitlines())
    }
    share = vm_backend(pod).machine.share_dir
    assert "ro" in entries[str(share / "c-1")] and "rw" in entries[str(share / "c-0")]
    await pod.agent.delete_container("jailvol", force=True)
    await pod.unshare_host_paths(["c-0", "c-1"])
    left = jail_mounts.read_text()
    assert str(share / "c-0") not in left and str(share / "c-1") not in left
