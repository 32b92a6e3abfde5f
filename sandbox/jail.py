"""The VMM jail: every pod VM's QEMU runs as a user of its own, with no capability it
does not need, in a mount namespace that holds only its own files.

What QEMU sees (sandbox/jail_exec.py builds it before exec): ``/usr`` and the dynamic
loader's cache read-only; the guest kernel, initramfs and OS image read-only at their
own paths; the VM's own directory (``<run_dir>/vmm``: its sockets, console log, pid
file, the pod's share and its hot-plugged images) writable; a template's RAM file; the
device nodes ``null``, ``zero``, ``random``, ``urandom`` (and ``kvm`` where used, with
its group). No /proc, /sys, /etc, /home, /var or /run of the host; no network (its tap
descriptor is passed in); its own IPC namespace.

Who it runs as: a uid and gid of its own from a node-wide range (``[vm] jail_first_id``,
``jail_ids``), one per VM so that one VMM cannot signal or trace another. Capabilities:
none, except for a VM with a 9p share: the four that QEMU's ``passthrough`` model needs
to give files the guest creates their guest owner (``CAP_CHOWN``,
``CAP_DAC_OVERRIDE``, ``CAP_FOWNER``, ``CAP_FSETID``), which reach only what the jail
holds, and every file there but the VM's own is mounted read-only. QEMU's seccomp
filter (``-sandbox on``) stays on top.

What is mounted below the VM's directory after QEMU started (a container's host paths,
an image) reaches the jail by mount propagation: the directory is a mount of its own,
shared, and the jail's view of it a slave; a bind is made read-only before it is
attached, so its copy in the jail is read-only too.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sandbox import mounts
from sandbox.vm import MachineSpec

JAIL_EXEC = Path(__file__).with_name("jail_exec.py")

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
#: What QEMU's 9p ``passthrough`` model needs over the share (and nothing else does).
SHARE_CAPABILITIES = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID)
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
KVM_DEVICE = "/dev/kvm"
#: The host's files every VMM needs, read-only (virtio-mem reads the host's huge page
#: size, and warns on every start without it).
SYSTEM_PATHS = ("/usr", "/etc/ld.so.cache", "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")

#: The first uid/gid of the range jailed VMMs use, and how many; kept above the ranges
#: kubelet gives user-namespace pods by default (from 65536 up, 65536 per pod).
DEFAULT_FIRST_ID = 0x7000_0000
DEFAULT_ID_COUNT = 65536


class JailError(Exception):
    """A VMM cannot be jailed (no id left, a path it needs is missing)."""


@dataclass(frozen=True)
class Jail:
    """Where and as whom one VMM runs."""

    uid: int
    gid: int
    #: an empty directory the jail's root is mounted on (in the jail's namespace only)
    root: Path
    #: the VMM's working directory (its relative socket paths)
    workdir: Path
    readonly: tuple[Path, ...]
    writable: tuple[Path, ...]
    devices: tuple[str, ...] = DEVICES
    groups: tuple[int, ...] = ()
    capabilities: tuple[int, ...] = ()
    #: all of the VMM's memory mergeable by KSM, not only guest RAM (Linux 6.4 or later)
    merge_memory: bool = False
    #: transparent huge pages for the VMM's memory (QEMU asks for them on guest RAM and
    #: its translation buffers); jail_for turns them off under TCG
    huge_pages: bool = True

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside this jail."""
        system = [path for path in SYSTEM_PATHS if os.path.exists(path)]
        # a VMM outside the host's /usr (the guest directory's own build) is bound too
        program = Path(cmd[0])
        if program.is_absolute() and not any(program.is_relative_to(p) for p in system):
            system.append(str(program))
        args = [
            f"uid={self.uid}",
            f"gid={self.gid}",
            f"root={self.root}",
            f"workdir={self.workdir}",
            *(f"readonly={path}" for path in (*system, *self.readonly)),
            *(f"writable={path}" for path in self.writable),
            *(f"device={path}" for path in self.devices),
            *(f"group={gid}" for gid in self.groups),
            *(f"capability={cap}" for cap in self.capabilities),
            *(["merge=1"] if self.merge_memory else []),
            *([] if self.huge_pages else ["thp=off"]),
        ]
        return [sys.executable, "-I", "-S", str(JAIL_EXEC), *args, "--", *cmd]


class VmmIds:
    """The node's range of VMM ids: one per VM that exists (running or not)."""

    def __init__(self, first: int = DEFAULT_FIRST_ID, count: int = DEFAULT_ID_COUNT) -> None:
        if first < 1 or count < 1 or first + count > 2**32 - 1:
            raise JailError(f"bad VMM id range {first} + {count}")
        self.first = first
        self.count = count
        self._used: set[int] = set()

    def allocate(self) -> int:
        for vmm_id in range(self.first, self.first + self.count):
            if vmm_id not in self._used:
                self._used.add(vmm_id)
                return vmm_id
        raise JailError(f"all {self.count} VMM ids are in use")

    def claim(self, vmm_id: int) -> None:
        """Mark an id in use (a VM an earlier daemon made)."""
        self._used.add(vmm_id)

    def release(self, vmm_id: int | None) -> None:
        if vmm_id is not None:
            self._used.discard(vmm_id)


def prepare_vmm_dir(machine: MachineSpec, *, mounts_later: bool) -> None:
    """The VM's own directory, owned by its VMM. With ``mounts_later`` (a pod VM, whose
    host paths and images are bound there while it runs): a mount of its own whose later
    submounts propagate into the jail and nowhere else, and the directory for images."""
    vmm_id = machine.vmm_id
    assert vmm_id is not None
    machine.vmm_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(machine.vmm_dir, vmm_id, vmm_id)
    if mounts_later:
        mounts.own_mount(machine.vmm_dir, shared=True)
        machine.images_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(machine.images_dir, vmm_id, vmm_id)


def jail_for(machine: MachineSpec) -> Jail:
    """The jail of ``machine``'s VMM: the guest kernel, initramfs and OS image
    read-only; its own directory and its RAM file (a template's, which a clone maps
    privately but QEMU 7.2 opens for writing all the same) writable."""
    if machine.vmm_id is None:
        raise JailError(f"VM {machine.name} has no VMM id")
    readonly = (machine.kernel, machine.initrd, machine.os_image)
    writable = (machine.memory_file,) if machine.memory_file is not None else ()
    for path in (*readonly, *writable):
        if not path.exists():
            raise JailError(f"VM {machine.name} needs {path}, which does not exist")
    root = machine.run_dir / "jail"
    root.mkdir(mode=0o700, exist_ok=True)
    devices: tuple[str, ...] = DEVICES
    groups: tuple[int, ...] = ()
    if machine.accel == "kvm":
        devices = (*devices, KVM_DEVICE)
        groups = (os.stat(KVM_DEVICE).st_gid,)
    return Jail(
        uid=machine.vmm_id,
        gid=machine.vmm_id,
        root=root,
        workdir=machine.vmm_dir,
        readonly=readonly,
        writable=(machine.vmm_dir, *writable),
        devices=devices,
        groups=groups,
        capabilities=SHARE_CAPABILITIES if machine.share else (),
        merge_memory=machine.mem_merge,
        # Under TCG huge pages buy nothing (QEMU's own TLB maps 4 KiB pages) and cost a
        # whole 2 MiB page wherever the guest touches a hot-plugged region or QEMU a
        # buffer: 7-8 MiB per clone sized at clone time, 2 MiB per other clone
        # (docs/benchmarks.md). Under KVM they map guest RAM with fewer EPT entries.
        huge_pages=machine.accel == "kvm",
    )
