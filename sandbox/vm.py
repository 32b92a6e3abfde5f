"""The qemu-lite machine: command line and process supervision for one pod VM.

The machine is q35 with everything optional switched off (no SATA, SMBus, USB, vmport,
graphics, default devices or user config), qboot firmware and a direct PVH kernel boot.
Devices are exactly: the guest OS image as a read-only virtio-pmem device (DAX), a
virtio-serial port for the agent, the serial console into a file, and empty PCIe root
ports where container images are hot-plugged later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.protocol import AGENT_PORT_NAME, SHARE_TAG
from sandbox.api import align_up
from sandbox.hotplug import VIRTIO_MEM_BLOCK_MIB, VIRTIO_MEM_ID
from sandbox.procfs import read_cmdline

QEMU_BINARY = "qemu-system-x86_64"
QBOOT_ROM = Path("/usr/share/qemu/qboot.rom")

# Kernel parameters that cut boot time on a machine with no legacy devices.
FAST_BOOT_CMDLINE = (
    "console=ttyS0 quiet panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
    "tsc=reliable no_timer_check noreplace-smp rcupdate.rcu_expedited=1 "
    "cryptomgr.notests random.trust_cpu=on swiotlb=noforce"
)

# Address of the first hot-plug root port on pcie.0; one root port per slot,
# multifunction ports packed eight per PCI device.
FIRST_HOTPLUG_DEVICE = 0x08
# Image slots a VM can have: root ports fill devices 0x08-0x1e (q35's LPC bridge is
# 0x1f), eight functions each, and the last port is a standby's warm-up's.
MAX_IMAGE_SLOTS = (0x1F - FIRST_HOTPLUG_DEVICE) * 8 - 1
#: The largest TCG translation cache QEMU takes on an x86-64 host (it clamps above).
MAX_TCG_TB_SIZE_MIB = 2048
# The guest OS image always sits at this address so it is /dev/pmem0.
OS_IMAGE_ADDR = "0x03"
AGENT_SERIAL_ADDR = "0x04"
# The pod's shared directory (virtio-9p); 0x05 is the NIC's.
SHARE_ADDR = "0x06"
# Room in the guest-physical address space for hot-plugged persistent memory.
HOTPLUG_ADDRESS_SPACE_MIB = 64 * 1024
# The virtio-mem device of a VM sized at clone time (sandbox/hotplug.py).
VIRTIO_MEM_ADDR = "0x07"


@dataclass(frozen=True)
class MachineSpec:
    """Everything that decides one VM's command line."""

    name: str
    kernel: Path
    initrd: Path
    os_image: Path
    run_dir: Path
    vcpus: int = 1
    memory_mib: int = 256
    accel: str = "tcg"
    tcg_tb_size_mib: int = 48
    image_slots: int = 4
    mem_merge: bool = True
    sandbox_filter: bool = True
    extra_cmdline: str = ""
    # "pmem": the OS image is mapped with DAX (the product). "blk": the same image on
    # a plain virtio-blk disk, only for the memory benchmark's comparison.
    os_image_mode: str = "pmem"
    # Guest RAM in a file (VM templates): the template maps it shared and saves the
    # device state next to it; clones map it private (copy-on-write) and restore.
    memory_file: Path | None = None
    memory_shared: bool = False
    incoming: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # A virtio-9p device exporting share_dir (the pod's volumes, see sandbox/share.py).
    share: bool = False
    # The uid and gid of a jailed VMM (sandbox/jail.py); None: QEMU runs as the daemon
    # does, with its files directly in run_dir (VMs of daemons before the jail).
    vmm_id: int | None = None
    # Sized at clone time (sandbox/hotplug.py): the VM boots, as its template did, with
    # base_vcpus vCPUs and base_memory_mib of RAM, room for max_vcpus vCPUs and a
    # virtio-mem device of hotplug_memory_mib; what vcpus and memory_mib ask beyond is
    # hot-plugged. 0 (all four): the VM boots with all of vcpus and memory_mib.
    base_vcpus: int = 0
    base_memory_mib: int = 0
    max_vcpus: int = 0
    hotplug_memory_mib: int = 0

    @property
    def boot_vcpus(self) -> int:
        """vCPUs on QEMU's command line."""
        return self.base_vcpus or self.vcpus

    @property
    def boot_memory_mib(self) -> int:
        """RAM on QEMU's command line (the template's RAM file, for a clone)."""
        return self.base_memory_mib or self.memory_mib

    @property
    def sized_at_clone(self) -> bool:
        return self.base_vcpus > 0 or self.base_memory_mib > 0

    def booted_whole(self) -> MachineSpec:
        """The same VM booting with all of its vCPUs and memory, no room for more (a
        cold boot, when there is no template to clone)."""
        return replace(self, base_vcpus=0, base_memory_mib=0, max_vcpus=0, hotplug_memory_mib=0)

    @property
    def vmm_dir(self) -> Path:
        """Everything QEMU itself creates or opens by path below the run directory."""
        return self.run_dir / "vmm" if self.vmm_id is not None else self.run_dir

    @property
    def share_dir(self) -> Path:
        return self.vmm_dir / "share"

    @property
    def images_dir(self) -> Path:
        """Where a jailed VMM finds the images hot-plugged into its VM."""
        return self.vmm_dir / "images"

    @property
    def qmp_socket(self) -> Path:
        return self.vmm_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.vmm_dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.vmm_dir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.vmm_dir / "qemu.pid"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / "qemu.log"


def slot_root_port(slot: int) -> tuple[str, str]:
    """The (device id, guest PCI address) of hot-plug slot ``slot``."""
    dev, fn = divmod(slot, 8)
    return f"slot{slot}", f"0000:00:{FIRST_HOTPLUG_DEVICE + dev:02x}.{fn}"


def os_image_backing_size(spec: MachineSpec) -> int:
    """Bytes of the guest OS image's persistent-memory backing: the file rounded up to
    the alignment virtio-pmem needs."""
    return align_up(spec.os_image.stat().st_size)


def warm_up_root_port(spec: MachineSpec) -> tuple[str, str]:
    """The (device id, guest PCI address) of the root port after the image slots. A
    standby VM hot-plugs the guest OS image there once (sandbox/standby.py), so that
    the guest's hot-plug path runs before a pod's first image comes; pods' images never
    go there."""
    return slot_root_port(spec.image_slots)


def virtio_mem_args(region_mib: int) -> list[str]:
    """The virtio-mem device of a VM sized at clone time, nothing plugged: its region is
    QEMU's anonymous memory, private, so a clone's plugged memory is its own, costs
    nothing until the guest touches it and then counts in its cgroup. (``reserve=off``
    would keep the region out of the host's commit accounting, but QEMU then reads
    /proc/sys, which the jail does not show; the region is never bigger than the host's
    memory, which the kernel's default overcommit heuristic and kubelet's
    ``vm.overcommit_memory = 1`` both allow.)"""
    if region_mib == 0:
        return []
    return [
        "-object",
        f"memory-backend-ram,id={VIRTIO_MEM_ID}-mem,size={region_mib}M",
        "-device",
        f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_ID}-mem,"
        f"block-size={VIRTIO_MEM_BLOCK_MIB}M,requested-size=0,bus=pcie.0,addr={VIRTIO_MEM_ADDR}",
    ]


def vmm_identity(qemu: str) -> str:
    """The VMM binary ``qemu`` names (a path, or a name on PATH) as its path, size and
    modification time: a rebuilt VMM is another VMM (a template's saved state is only
    restored by the QEMU that saved it)."""
    path = shutil.which(qemu) or qemu
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def build_command(spec: MachineSpec, *, qemu: str = QEMU_BINARY) -> list[str]:
    """The qemu command line for ``spec``."""
    vcpus, memory_mib = spec.boot_vcpus, spec.boot_memory_mib
    if vcpus < 1:
        raise ValueError("a VM needs at least one vCPU")
    if memory_mib < 64:
        raise ValueError("a VM needs at least 64 MiB of memory")
    if spec.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {spec.accel!r}")
    if spec.hotplug_memory_mib % VIRTIO_MEM_BLOCK_MIB:
        raise ValueError(f"the virtio-mem region must be whole {VIRTIO_MEM_BLOCK_MIB} MiB blocks")
    os_size = os_image_backing_size(spec)
    maxmem = memory_mib + spec.hotplug_memory_mib + HOTPLUG_ADDRESS_SPACE_MIB
    smp = str(vcpus)
    if spec.max_vcpus > vcpus:
        smp += f",maxcpus={spec.max_vcpus}"
    machine = "q35,sata=off,smbus=off,usb=off,vmport=off,graphics=off"
    machine += f",mem-merge={'on' if spec.mem_merge else 'off'}"
    accel = "kvm" if spec.accel == "kvm" else f"tcg,tb-size={spec.tcg_tb_size_mib}"
    cmdline = FAST_BOOT_CMDLINE
    if spec.accel != "kvm":
        # translated code is kept per guest address: helpers at fixed addresses are
        # translated once per VM (agent/guest/system.py start_helpers_unrandomized)
        cmdline += " clearcri.unrandomized_helpers=1"
    if spec.os_image_mode == "blk":
        cmdline += " clearcri.root=/dev/vda"
        os_device = [
            "-drive",
            f"file={spec.os_image},if=none,id=osimg,format=raw,readonly=on",
            "-device",
            f"virtio-blk-pci,drive=osimg,id=osimg-dev,bus=pcie.0,addr={OS_IMAGE_ADDR}",
        ]
    elif spec.os_image_mode == "pmem":
        os_device = [
            "-object",
            f"memory-backend-file,id=osimg,mem-path={spec.os_image},size={os_size},"
            "share=on,readonly=on",
            "-device",
            f"virtio-pmem-pci,memdev=osimg,id=osimg-dev,bus=pcie.0,addr={OS_IMAGE_ADDR}",
        ]
    else:
        raise ValueError(f"os_image_mode must be pmem or blk, not {spec.os_image_mode!r}")
    if spec.extra_cmdline:
        cmdline += " " + spec.extra_cmdline
    cmd = [
        qemu,
        "-name",
        f"clearcri-{spec.name},debug-threads=off",
        "-M",
        machine,
        "-accel",
        accel,
        "-cpu",
        # Without RDRAND the guest's entropy pool takes ~3 s under TCG to be ready and
        # the first Python process blocks on it.
        "host" if spec.accel == "kvm" else "qemu64,+rdrand",
        "-bios",
        str(QBOOT_ROM),
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-smp",
        smp,
        "-m",
        f"{memory_mib}M,slots=1,maxmem={maxmem}M",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        cmdline,
        # first in the device memory area, whose start is 1 GiB aligned: the region the
        # guest adds memory blocks from starts on a block boundary
        *virtio_mem_args(spec.hotplug_memory_mib),
        *os_device,
        "-device",
        f"virtio-serial-pci,id=vser0,bus=pcie.0,addr={AGENT_SERIAL_ADDR}",
        "-chardev",
        # qemu runs in vmm_dir: relative socket paths stay under the 108-byte limit
        # of unix socket addresses however deep run_dir is.
        f"socket,id=agent,path={spec.agent_socket.name},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev",
        f"file,id=console,path={spec.console_log}",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{spec.qmp_socket.name},server=on,wait=off",
        "-pidfile",
        str(spec.pidfile),
    ]
    # the image slots, and one more for a standby's warm-up (warm_up_root_port)
    for slot in range(spec.image_slots + 1):
        dev_id, pci = slot_root_port(slot)
        dev, fn = pci.rsplit(":", 1)[1].split(".")
        multi = ",multifunction=on" if fn == "0" else ""
        cmd += [
            "-device",
            f"pcie-root-port,id={dev_id},bus=pcie.0,chassis={slot + 1},addr=0x{dev}.{fn}{multi}",
        ]
    if spec.share:
        cmd += [
            "-fsdev",
            # passthrough: files the guest creates belong to its ids on the host;
            # remap: bind mounts of other filesystems below the root keep unique inodes
            f"local,id=share,path={spec.share_dir},security_model=passthrough,multidevs=remap",
            "-device",
            f"virtio-9p-pci,fsdev=share,mount_tag={SHARE_TAG},bus=pcie.0,addr={SHARE_ADDR}",
        ]
    if spec.memory_file is not None:
        cmd += [
            "-object",
            f"memory-backend-file,id=ram0,mem-path={spec.memory_file},"
            f"size={memory_mib}M,share={'on' if spec.memory_shared else 'off'}",
            "-machine",
            "memory-backend=ram0",
        ]
    if spec.incoming:
        cmd += ["-incoming", "defer"]
    cmd += spec.extra_args
    if spec.sandbox_filter:
        cmd += [
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]
    return cmd


class VmProcess:
    """One qemu process: spawned by us or adopted from an earlier daemon.

    Exit is noticed at once through a pidfd registered on the event loop, for our own
    children and for adopted processes alike; our own children are reaped then, with
    their exit status. Not through asyncio's subprocesses: Python 3.11's child watcher
    keeps a thread per running child, blocked in ``waitpid``, so a node of 500 pods had
    500 threads in the daemon for its VMs.
    """

    def __init__(self, pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._proc = proc
        self._exited = asyncio.get_running_loop().create_future()
        self.returncode: int | None = None
        self._pidfd: int | None = None
        self._on_exit: list[Callable[[VmProcess], None]] = []
        self._watch()

    @classmethod
    async def spawn(
        cls, cmd: list[str], *, stderr_log: Path, cwd: Path, pass_fds: tuple[int, ...] = ()
    ) -> VmProcess:
        """Start qemu (``cmd``: its command line, or one that ends by exec'ing it);
        ``pass_fds`` stay open in it under the same numbers (a tap fd)."""
        with stderr_log.open("ab") as err:
            # vfork and exec: returns in a millisecond or two, as asyncio's would
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=cwd,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        return cls(proc.pid, proc)

    @classmethod
    def adopt(cls, pid: int, expect_name: str) -> VmProcess | None:
        """Adopt a running qemu by pid, only if its command line names ``expect_name``."""
        cmd = read_cmdline(pid)
        if not cmd or not any(expect_name in part for part in cmd):
            return None
        return cls(pid)

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._mark_exited(self._reap())
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._pidfd_ready)

    def _reap(self) -> int | None:
        """Our own child's exit status (negative: the signal that ended it), once it has
        exited; None for an adopted process (its parent reaps it)."""
        return self._proc.poll() if self._proc is not None else None

    def _pidfd_ready(self) -> None:
        self._mark_exited(self._reap())

    def _mark_exited(self, code: int | None) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._exited.done():
            return
        self.returncode = code
        self._exited.set_result(code)
        for callback in list(self._on_exit):
            callback(self)

    def on_exit(self, callback: Callable[[VmProcess], None]) -> None:
        if self._exited.done():
            callback(self)
        else:
            self._on_exit.append(callback)

    @property
    def alive(self) -> bool:
        return not self._exited.done()

    async def wait(self, timeout: float | None = None) -> int | None:
        return await asyncio.wait_for(asyncio.shield(self._exited), timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    async def kill_and_wait(self, timeout: float = 10.0) -> None:
        """SIGKILL the process (if it still runs) and wait up to ``timeout`` for its end."""
        self.kill(signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await self.wait(timeout)


KSM_DIR = Path("/sys/kernel/mm/ksm")


def configure_host_ksm(pages_to_scan: int = 0, ksm_dir: Path = KSM_DIR) -> str:
    """Switch the host's KSM on (``run`` = 1) and, if ``pages_to_scan`` > 0, set how many
    pages ksmd scans per wake-up. QEMU marks guest RAM mergeable (``mem-merge=on``);
    without ksmd running nothing is merged. Where the host has no KSM or refuses the
    write (a read-only /sys in a container), nothing changes. Returns what happened,
    for the log; raises nothing."""
    run = ksm_dir / "run"
    if not run.exists():
        return f"host KSM not available ({ksm_dir} missing); guest memory is not merged"
    try:
        if pages_to_scan > 0:
            (ksm_dir / "pages_to_scan").write_text(f"{pages_to_scan}\n")
        if run.read_text().strip() != "1":
            run.write_text("1\n")
    except OSError as exc:
        return f"host KSM left as it is: cannot write {ksm_dir}: {exc.strerror or exc}"
    scan = (ksm_dir / "pages_to_scan").read_text().strip()
    return f"host KSM on (pages_to_scan={scan})"
