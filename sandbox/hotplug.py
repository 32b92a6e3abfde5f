"""Sizing pod VMs at clone time: a few templates (bases), the rest hot-plugged.

A node's templates have the default pod shape and the smallest pod VM's shape
(``NodeRooms``). Every VM that may be cloned boots (as its template did) with its
base's ``base_vcpus`` vCPUs and ``base_memory_mib`` of RAM, with room for more:
``-smp base,maxcpus=max_vcpus`` (q35's ACPI CPU hot-plug) and a virtio-mem device
whose region (``hotplug_memory_mib``) is anonymous memory of QEMU's, nothing of it
plugged. A clone of a bigger pod adds the
rest once its device state is restored and before it runs: one ``device_add`` per
missing vCPU (ids from ``query-hotpluggable-cpus``) and the virtio-mem device's
``requested-size``. The guest kernel onlines the memory itself (its
``MEMORY_HOTPLUG_DEFAULT_ONLINE``); the agent onlines the vCPUs, and answers the host once
the guest has them all (``hotplug``, agent/PROTOCOL.md).

Nothing here talks to QEMU: the plan of a clone's plug, as numbers and QMP arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1 << 20
#: virtio-mem plugs and the guest onlines memory in blocks of this size (the guest's
#: sub-block is a pageblock, 2 MiB on x86-64), so hot-plugged memory comes in such steps.
VIRTIO_MEM_BLOCK_MIB = 2
#: The guest's memory block (Linux adds hot-plugged memory to itself in these): the
#: virtio-mem region is a whole number of them.
GUEST_MEMORY_BLOCK_MIB = 128
VIRTIO_MEM_ID = "vmem0"
#: The most vCPUs the guest kernel brings up (guestbuild/guest_kernel.config's
#: CONFIG_NR_CPUS): a slot beyond would be plugged but never come online.
GUEST_MAX_VCPUS = 64
#: The most memory a VM grows to: the region and the image slots' address space must
#: fit the 40 physical address bits of TCG's qemu64 CPU (1 TiB).
MAX_MEMORY_MIB = 512 * 1024
#: How far VMs grow by default ([vm] max_clone_memory_mib = 0): the host's memory, but no
#: more than this. Every GiB of a base's region costs each of its VMs ~94 KiB of QEMU's
#: memory (the dirty-page bitmaps QEMU 7.2 keeps and fills for every RAM block), so a
#: region as large as a 512 GiB host's would cost each pod ~47 MiB; pods above the
#: room boot with their whole size instead (no template: one would hold their whole
#: memory on tmpfs).
DEFAULT_MAX_CLONE_MEMORY_MIB = 16 * 1024


class HotplugError(Exception):
    """A clone cannot be given the size it needs."""


def align_down(value: int, step: int) -> int:
    return value // step * step


def align_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(frozen=True)
class HotplugRoom:
    """The room every VM of a node is booted with (its templates' shape): the vCPUs and
    memory it boots with, and at most how many vCPUs and how much memory it can have."""

    base_vcpus: int
    base_memory_mib: int
    max_vcpus: int
    max_memory_mib: int

    @property
    def region_mib(self) -> int:
        """The virtio-mem region: what a VM can have beyond its base memory, in whole
        guest memory blocks."""
        return align_up(max(0, self.max_memory_mib - self.base_memory_mib), GUEST_MEMORY_BLOCK_MIB)

    def memory_for(self, memory_mib: int) -> int:
        """The memory a VM of ``memory_mib`` gets when it is sized at clone time: down
        to a whole number of virtio-mem blocks above the base (never more than asked:
        the VM must fit the pod's budget)."""
        if memory_mib <= self.base_memory_mib:
            return memory_mib
        return self.base_memory_mib + align_down(
            memory_mib - self.base_memory_mib, VIRTIO_MEM_BLOCK_MIB
        )

    def fits(self, vcpus: int, memory_mib: int) -> bool:
        """Whether a VM of this size is a base VM plus what can be hot-plugged."""
        return (
            self.base_vcpus <= vcpus <= self.max_vcpus
            and self.base_memory_mib <= memory_mib <= self.base_memory_mib + self.region_mib
            and (memory_mib - self.base_memory_mib) % VIRTIO_MEM_BLOCK_MIB == 0
        )


@dataclass(frozen=True)
class NodeRooms:
    """The bases a node's VMs are cloned from, and how far each grows.

    A base is a template's shape: a VM boots (is cloned) with the biggest base vCPU
    count and the biggest base memory that do not exceed its own size, and hot-plugs the
    rest. The default shape is a base, so the most common pod (no limits) is a clone of
    a template of its own size and plugs nothing; the smallest pod VM's size is another,
    so a pod below the default is a clone too and plugs what it needs above it."""

    base_vcpus: tuple[int, ...]
    base_memory_mib: tuple[int, ...]
    max_vcpus: int
    max_memory_mib: int

    def room(self, vcpus: int, memory_mib: int) -> HotplugRoom | None:
        """The room a VM of this size is cloned with (None: outside every base's room,
        it gets a template of its own shape)."""
        base_vcpus = max((b for b in self.base_vcpus if b <= vcpus), default=0)
        base_memory = max((b for b in self.base_memory_mib if b <= memory_mib), default=0)
        if not base_vcpus or not base_memory:
            return None
        room = HotplugRoom(
            base_vcpus,
            base_memory,
            max(self.max_vcpus, base_vcpus),
            max(self.max_memory_mib, base_memory),
        )
        return room if room.fits(vcpus, room.memory_for(memory_mib)) else None


def room_for(
    *,
    default_vcpus: int,
    default_memory_mib: int,
    min_memory_mib: int,
    max_vcpus: int,
    max_memory_mib: int,
) -> NodeRooms | None:
    """The bases a node's VMs boot with: the default shape (``default_vcpus``,
    ``default_memory_mib``) and the smallest pod VM (1 vCPU, ``min_memory_mib``), each
    with room up to ``max_vcpus`` and ``max_memory_mib`` (within what the guest can
    use). None when there is nothing to grow into (a one-CPU host whose memory is
    unknown)."""
    max_vcpus = max(min(max_vcpus, GUEST_MAX_VCPUS), 1)
    base_vcpus = tuple(sorted({1, min(max(default_vcpus, 1), max_vcpus)}))
    default_memory = align_down(default_memory_mib, VIRTIO_MEM_BLOCK_MIB)
    smallest = align_down(min(min_memory_mib, default_memory_mib), VIRTIO_MEM_BLOCK_MIB)
    base_memory = tuple(sorted({smallest, default_memory}))
    max_memory = min(max(max_memory_mib, default_memory), MAX_MEMORY_MIB)
    if max_vcpus <= base_vcpus[0] and max_memory <= base_memory[0]:
        return None
    return NodeRooms(base_vcpus, base_memory, max_vcpus, max_memory)


def guest_lpj(cpuinfo: str, guest_hz: int) -> int | None:
    """The delay-loop calibration (``lpj=``) a guest's kernel computes on its boot vCPU,
    from the host's: a vCPU hot-added to a clone calibrates its own delay loop when it
    comes online, which under TCG takes a quarter of a second, unless the kernel was
    given the value. The guest's TSC runs at the host's rate (TCG reads the host's TSC;
    KVM gives guests the host's rate), the host's ``bogomips`` is that rate in units of
    500 kHz, and the guest counts TSC cycles per jiffy. None where the host's
    /proc/cpuinfo (``cpuinfo``) does not tell."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "bogomips":
            try:
                tsc_khz = float(value) * 500
            except ValueError:
                return None
            return round(tsc_khz * 1000 / guest_hz) if tsc_khz > 0 else None
    return None


def plug_bytes(memory_mib: int, base_memory_mib: int) -> int:
    """The virtio-mem ``requested-size`` of a VM of ``memory_mib`` booted with
    ``base_memory_mib``."""
    extra = memory_mib - base_memory_mib
    if extra < 0 or extra % VIRTIO_MEM_BLOCK_MIB:
        raise HotplugError(
            f"{memory_mib} MiB is not {base_memory_mib} MiB plus whole "
            f"{VIRTIO_MEM_BLOCK_MIB} MiB blocks"
        )
    return extra * MIB


def _topology_key(entry: dict[str, Any]) -> tuple[int, ...]:
    props = entry.get("props", {})
    return tuple(
        int(props.get(name, 0))
        for name in ("node-id", "socket-id", "die-id", "core-id", "thread-id")
    )


def cpus_to_plug(hotpluggable: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``device_add`` arguments for ``count`` more vCPUs, from QMP's
    ``query-hotpluggable-cpus``: the free slots (no ``qom-path``) in topology order, each
    with the CPU type and the slot's ids, and a device id of its own (``cpu<n>``, n its
    place in the topology)."""
    ordered = sorted(hotpluggable, key=_topology_key)
    free = [(index, entry) for index, entry in enumerate(ordered) if "qom-path" not in entry]
    if count > len(free):
        raise HotplugError(f"the VM has room for {len(free)} more vCPUs, not {count}")
    plan = []
    for index, entry in free[:count]:
        if int(entry.get("vcpus-count", 1)) != 1:
            raise HotplugError(f"a CPU slot holds {entry['vcpus-count']} vCPUs, not one")
        args: dict[str, Any] = {"driver": str(entry["type"]), "id": f"cpu{index}"}
        args.update(entry.get("props", {}))
        plan.append(args)
    return plan


@dataclass(frozen=True)
class PlugPlan:
    """What one clone plugs: vCPUs beyond its template's, virtio-mem bytes, and the
    MemTotal its guest has once they are online."""

    vcpus: int
    memory_bytes: int
    mem_total_kib: int


def expected_mem_total_kib(template_mem_total_kib: int, plugged_bytes: int) -> int:
    """The guest's MemTotal once ``plugged_bytes`` are online: its template's plus every
    plugged page (the kernel takes the memory map of hot-plugged memory out of free
    memory, not out of MemTotal)."""
    return template_mem_total_kib + plugged_bytes // 1024
