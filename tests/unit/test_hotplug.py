"""Sizing pod VMs at clone time, without booting: the room every VM boots with, what a
clone plugs, the command line, the template key, the machine a pod gets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sandbox import node as node_module
from sandbox.api import SandboxSpec
from sandbox.hotplug import (
    DEFAULT_MAX_CLONE_MEMORY_MIB,
    HotplugError,
    HotplugRoom,
    NodeRooms,
    cpus_to_plug,
    expected_mem_total_kib,
    guest_lpj,
    plug_bytes,
    room_for,
)
from sandbox.node import size_vm
from sandbox.template import template_key
from sandbox.vm import HOTPLUG_ADDRESS_SPACE_MIB, MachineSpec, build_command
from sandbox.vmpod import VmBackend
from tests.unit.fake_guest import fake_host

MIB = 1 << 20

# What QEMU 7.2 answered query-hotpluggable-cpus with for -smp 1,maxcpus=2 (q35, TCG).
QEMU_72_CPUS: list[dict[str, Any]] = [
    {
        "props": {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0},
        "vcpus-count": 1,
        "type": "qemu64-x86_64-cpu",
    },
    {
        "props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0},
        "vcpus-count": 1,
        "qom-path": "/machine/unattached/device[0]",
        "type": "qemu64-x86_64-cpu",
    },
]


def _slots(count: int, used: int = 1) -> list[dict[str, Any]]:
    slots: list[dict[str, Any]] = []
    for core in reversed(range(count)):  # QEMU lists the highest first
        slot: dict[str, Any] = {
            "props": {"socket-id": 0, "core-id": core, "thread-id": 0},
            "vcpus-count": 1,
            "type": "host-x86_64-cpu",
        }
        if core < used:
            slot["qom-path"] = f"/machine/unattached/device[{core}]"
        slots.append(slot)
    return slots


def test_bases_are_the_default_shape_and_the_smallest_vm() -> None:
    rooms = room_for(
        default_vcpus=1,
        default_memory_mib=256,
        min_memory_mib=96,
        max_vcpus=8,
        max_memory_mib=24105,
    )
    assert rooms == NodeRooms((1,), (96, 256), 8, 24105)
    assert rooms is not None
    # the default shape is a base of its own: it plugs nothing
    assert rooms.room(1, 256) == HotplugRoom(1, 256, 8, 24105)
    # below the default: the smallest VM's base, the rest plugged
    assert rooms.room(1, 192) == HotplugRoom(1, 96, 8, 24105)
    assert rooms.room(2, 96) == HotplugRoom(1, 96, 8, 24105)
    # above: the default's base
    assert rooms.room(4, 1152) == HotplugRoom(1, 256, 8, 24105)
    # each base's virtio-mem region is whole guest memory blocks up to the host's memory
    default, smallest = rooms.room(1, 256), rooms.room(1, 96)
    assert default is not None and smallest is not None
    assert default.region_mib == 23936 and default.region_mib % 128 == 0
    assert smallest.region_mib == 24064
    # beyond the room, or below the smallest VM: a template of its own shape
    assert rooms.room(9, 256) is None
    assert rooms.room(1, 30000) is None
    assert rooms.room(1, 64) is None
    # a default of 2 vCPUs is a base too, and 1-vCPU pods keep theirs
    two = room_for(
        default_vcpus=2, default_memory_mib=512, min_memory_mib=96, max_vcpus=4, max_memory_mib=4096
    )
    assert two is not None and two.base_vcpus == (1, 2)
    assert two.room(2, 512) == HotplugRoom(2, 512, 4, 4096)
    assert two.room(1, 512) == HotplugRoom(1, 512, 4, 4096)
    assert two.room(3, 200) == HotplugRoom(2, 96, 4, 4096)
    # an odd size rounds down to a whole virtio-mem block
    odd = room_for(
        default_vcpus=1, default_memory_mib=97, min_memory_mib=101, max_vcpus=2, max_memory_mib=4096
    )
    assert odd is not None and odd.base_memory_mib == (96,)
    # nothing to grow into
    assert (
        room_for(
            default_vcpus=1, default_memory_mib=96, min_memory_mib=96, max_vcpus=1, max_memory_mib=0
        )
        is None
    )
    # no more than the guest kernel brings up, or than TCG's 40 address bits hold
    big = room_for(
        default_vcpus=1,
        default_memory_mib=256,
        min_memory_mib=96,
        max_vcpus=192,
        max_memory_mib=2**21,
    )
    assert big is not None and (big.max_vcpus, big.max_memory_mib) == (64, 512 * 1024)


def test_memory_rounds_down_to_whole_blocks_above_the_base() -> None:
    room = HotplugRoom(1, 96, 2, 4096)
    assert room.memory_for(256) == 256
    assert room.memory_for(605) == 604  # a 500M limit: 477 MiB + 128
    assert room.memory_for(96) == 96
    assert room.fits(2, 604)
    assert not room.fits(3, 604), "more vCPUs than the room"
    assert not room.fits(1, 605), "not whole blocks"
    assert not room.fits(1, 96 + room.region_mib + 2), "more memory than the room"


def test_plug_bytes() -> None:
    assert plug_bytes(256, 96) == 160 * MIB
    assert plug_bytes(96, 96) == 0
    with pytest.raises(HotplugError, match="whole"):
        plug_bytes(257, 96)
    with pytest.raises(HotplugError):
        plug_bytes(64, 96)


def test_cpus_to_plug_takes_free_slots_in_topology_order() -> None:
    assert cpus_to_plug(QEMU_72_CPUS, 1) == [
        {
            "driver": "qemu64-x86_64-cpu",
            "id": "cpu1",
            "core-id": 1,
            "thread-id": 0,
            "node-id": 0,
            "socket-id": 0,
        }
    ]
    plan = cpus_to_plug(_slots(4), 3)
    assert [args["core-id"] for args in plan] == [1, 2, 3]
    assert [args["id"] for args in plan] == ["cpu1", "cpu2", "cpu3"]
    assert cpus_to_plug(_slots(4), 0) == []
    with pytest.raises(HotplugError, match="room for 3 more vCPUs, not 4"):
        cpus_to_plug(_slots(4), 4)
    # slots already used by an earlier plug are skipped
    assert [args["core-id"] for args in cpus_to_plug(_slots(4, used=2), 2)] == [2, 3]


def test_expected_mem_total_counts_every_plugged_page() -> None:
    # measured: a 96 MiB template's guest had 79968 KiB, plugged to 256 MiB 243808 KiB
    assert expected_mem_total_kib(79968, 160 * MIB) == 243808


def _spec(tmp_path: Path, **kw: object) -> MachineSpec:
    image = tmp_path / "os.img"
    image.write_bytes(b"\0" * 3_000_000)
    return MachineSpec(
        name="pod1",
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        os_image=image,
        run_dir=tmp_path / "run",
        **kw,  # type: ignore[arg-type]
    )


def _opts(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd) if part == flag]


def test_a_vm_sized_at_clone_boots_the_base_with_room(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        vcpus=2,
        memory_mib=1152,
        base_vcpus=1,
        base_memory_mib=96,
        max_vcpus=4,
        hotplug_memory_mib=4096,
        memory_file=tmp_path / "ram",
    )
    cmd = build_command(spec)
    assert _opts(cmd, "-smp") == ["1,maxcpus=4"]
    assert _opts(cmd, "-m") == [f"96M,slots=1,maxmem={96 + 4096 + HOTPLUG_ADDRESS_SPACE_MIB}M"]
    objects = _opts(cmd, "-object")
    assert "memory-backend-ram,id=vmem0-mem,size=4096M" in objects
    assert any(o.startswith("memory-backend-file,id=ram0,") and "size=96M" in o for o in objects)
    devices = _opts(cmd, "-device")
    vmem = next(i for i, d in enumerate(devices) if d.startswith("virtio-mem-pci"))
    assert "requested-size=0" in devices[vmem] and "block-size=2M" in devices[vmem]
    # first in the device memory area, before the OS image
    assert vmem < next(i for i, d in enumerate(devices) if d.startswith("virtio-pmem-pci"))
    # the same VM booted whole: no room, its whole size on the command line
    whole = build_command(spec.booted_whole())
    assert _opts(whole, "-smp") == ["2"]
    assert _opts(whole, "-m")[0].startswith("1152M,")
    assert not any(o.startswith("memory-backend-ram") for o in _opts(whole, "-object"))


def test_a_vm_without_room_is_todays(tmp_path: Path) -> None:
    cmd = build_command(_spec(tmp_path, vcpus=2, memory_mib=512))
    assert _opts(cmd, "-smp") == ["2"]
    assert _opts(cmd, "-m") == [f"512M,slots=1,maxmem={512 + HOTPLUG_ADDRESS_SPACE_MIB}M"]
    assert not any(d.startswith("virtio-mem") for d in _opts(cmd, "-device"))


def test_the_template_key_leaves_out_what_is_plugged(tmp_path: Path) -> None:
    for name in ("vmlinux", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    room = {"base_vcpus": 1, "base_memory_mib": 96, "max_vcpus": 2, "hotplug_memory_mib": 4096}
    small = _spec(tmp_path, vcpus=1, memory_mib=192, **room)
    big = replace(small, vcpus=2, memory_mib=1152)
    assert template_key(small, "qemu") == template_key(big, "qemu")
    assert template_key(small, "qemu") != template_key(replace(small, max_vcpus=4), "qemu")
    assert template_key(small, "qemu") != template_key(
        replace(small, hotplug_memory_mib=8192), "qemu"
    )
    # without room, a template per shape, as before
    alone = small.booted_whole()
    assert template_key(alone, "qemu") != template_key(replace(alone, memory_mib=256), "qemu")


def _pod(vcpus: int, limit_mib: int) -> SandboxSpec:
    return SandboxSpec(
        "p",
        cpu_quota_us=vcpus * 100_000,
        cpu_period_us=100_000,
        memory_limit_bytes=limit_mib * MIB,
        memory_budget_bytes=(limit_mib + 208) * MIB,
    )


def test_pods_are_cloned_from_the_base_below_their_size(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    assert host.rooms is not None
    machines = [
        host.machine_for(spec, tmp_path / "p")
        for spec in (SandboxSpec("d"), _pod(1, 64), _pod(2, 128), _pod(4, 1024), _pod(3, 477))
    ]
    assert [(m.boot_vcpus, m.boot_memory_mib, m.max_vcpus) for m in machines] == [
        (1, 256, 4),
        (1, 96, 4),
        (1, 256, 4),
        (1, 256, 4),
        (1, 256, 4),
    ]
    keys = [template_key(m, "qemu") for m in machines]
    assert len(set(keys)) == 2
    # the default pod's template is the default base: it plugs nothing
    assert keys[0] == keys[2] == keys[3] == keys[4]
    # each gets what size_vm gives its limits (an odd size rounded down to a block)
    assert [(m.vcpus, m.memory_mib) for m in machines] == [
        (1, 256),
        (1, 192),
        (2, 256),
        (4, 1152),
        (3, 604),
    ]
    assert size_vm(_pod(3, 477), host.config, host.qemu_mib) == (3, 605)
    # the templates warmed up at start: the default base's first, then the smallest's
    bases = host.base_machines()
    assert [template_key(m, "qemu") for m in bases] == [keys[0], keys[1]]
    assert [(m.vcpus, m.memory_mib) for m in bases] == [(1, 256), (1, 96)]
    assert fake_host(tmp_path, hotplug=False).base_machines()[0].sized_at_clone is False
    assert len(fake_host(tmp_path, hotplug=False).base_machines()) == 1


def test_no_room_without_hotplug_templates_or_for_extra_args(tmp_path: Path) -> None:
    assert fake_host(tmp_path, hotplug=False).rooms is None
    assert fake_host(tmp_path, templates=False).rooms is None
    host = fake_host(tmp_path)
    odd = replace(_pod(2, 477), extra_args=["-S"])
    machine = host.machine_for(odd, tmp_path / "p")
    assert not machine.sized_at_clone
    assert (machine.vcpus, machine.memory_mib) == (2, 605)


def test_hot_added_vcpus_are_given_the_boot_vcpus_delay_calibration(tmp_path: Path) -> None:
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 1996.249\nbogomips\t: 3992.49\nclflush size\t: 64\n"
    # measured: the guest (100 Hz) calibrated lpj=19962490 on this host
    assert guest_lpj(cpuinfo, 100) == 19962450
    assert guest_lpj(cpuinfo, 250) == 7984980
    assert guest_lpj("processor\t: 0\n", 100) is None
    host = fake_host(tmp_path)
    host.lpj = 19962450
    assert host.machine_for(_pod(2, 128), tmp_path / "p").extra_cmdline == "lpj=19962450"
    # a VM that boots whole calibrates as before
    assert (
        host.machine_for(replace(_pod(2, 128), extra_args=["-S"]), tmp_path / "q").extra_cmdline
        == ""
    )


def test_vms_grow_to_the_hosts_memory_within_a_cap_and_bigger_pods_boot_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each GiB of room costs every VM of a base QEMU memory: by default no more than
    # DEFAULT_MAX_CLONE_MEMORY_MIB, whatever the host has
    monkeypatch.setattr(node_module, "host_memory_mib", lambda: 512 * 1024)
    host = fake_host(tmp_path)
    assert host.rooms is not None and host.rooms.max_memory_mib == DEFAULT_MAX_CLONE_MEMORY_MIB
    monkeypatch.setattr(node_module, "host_memory_mib", lambda: 4096)
    assert fake_host(tmp_path).rooms.max_memory_mib == 4096  # type: ignore[union-attr]
    capped = fake_host(tmp_path, max_clone_memory_mib=1024)
    assert capped.rooms is not None and capped.rooms.max_memory_mib == 1024
    inside = capped.machine_for(_pod(1, 512), tmp_path / "in")
    above = capped.machine_for(_pod(1, 2048), tmp_path / "out")
    assert inside.sized_at_clone and not above.sized_at_clone
    assert above.memory_mib == 2048 + capped.config.guest_overhead_mib


async def test_a_pod_above_the_room_boots_without_a_template(tmp_path: Path) -> None:
    """A template of its own shape would hold the pod's whole memory on tmpfs (the RAM
    file is allocated whole), so a pod above every base's room boots cold."""
    host = fake_host(tmp_path, max_clone_memory_mib=1024)
    assert host.templates is not None
    above = VmBackend(host, host.machine_for(_pod(1, 2048), tmp_path / "p"), _pod(1, 2048))
    assert await above._template() is None
    assert host.templates._building == {}
