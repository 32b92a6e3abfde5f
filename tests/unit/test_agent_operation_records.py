"""The records of mount_image, update_container and configure_network on both sides: the
host's values, the JSON between them (as agents and hosts before the records sent it),
and what the guest's handlers make of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2

from agent.guest import images, resources, system
from agent.guest import network as guest_network
from agent.guest.errors import OpError
from agent.protocol import (
    INVALID_ARGUMENT,
    NOT_FOUND,
    CgroupUpdate,
    ConfiguredInterface,
    ImageSource,
    NetInterface,
)
from cri.runtime import convert
from tests.unit.test_network import FakeNetlink, _fake_sysfs

# ---------------------------------------------------------------------- mount_image


@pytest.mark.parametrize(
    ("source", "wire"),
    [
        (ImageSource(pci_path="0000:00:05.0"), {"pci_path": "0000:00:05.0"}),
        (
            ImageSource(device="/dev/loop0", fstype="erofs"),
            {"device": "/dev/loop0", "fstype": "erofs"},
        ),
        (ImageSource(dir="/srv/rootfs"), {"dir": "/srv/rootfs"}),
        (ImageSource(pci_path="p", timeout=2.5), {"pci_path": "p", "timeout": 2.5}),
    ],
)
def test_an_image_source_goes_on_the_wire_as_before_and_back(
    source: ImageSource, wire: dict[str, Any]
) -> None:
    assert source.to_dict() == wire
    assert images.image_source(wire) == source


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("/dev/loop0", "must be an object"),
        ({}, "exactly one"),
        ({"fstype": "erofs"}, "exactly one"),
        ({"pci_path": "p", "dir": "/d"}, "exactly one"),
        ({"device": 7}, "device must be a string"),
        ({"pci_path": "p", "timeout": "soon"}, "timeout"),
    ],
)
def test_the_guest_refuses_a_source_that_names_no_single_image(raw: object, problem: str) -> None:
    with pytest.raises(OpError, match=problem) as info:
        images.image_source(raw)
    assert info.value.code == INVALID_ARGUMENT


class FakeSystem:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mounts: list[tuple[str, str, str | None, int, str]] = []
        self.waited: list[tuple[str, float]] = []
        monkeypatch.setattr(system, "mount", self.mount)
        monkeypatch.setattr(system, "find_pmem_device", self.find_pmem_device)

    def mount(
        self, source: str, target: str, fstype: str | None, flags: int = 0, data: str = ""
    ) -> None:
        self.mounts.append((source, target, fstype, flags, data))

    def find_pmem_device(self, pci_path: str, *, timeout: float = 5.0) -> str:
        self.waited.append((pci_path, timeout))
        return "/dev/pmem3"


def test_a_pmem_image_is_mounted_with_dax(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystem(monkeypatch)
    images.mount(images.image_source({"pci_path": "0000:00:05.0"}), "/run/i/a")
    assert fake.waited == [("0000:00:05.0", 5.0)]
    assert fake.mounts == [("/dev/pmem3", "/run/i/a", "erofs", system.MS_RDONLY, "dax=always")]


def test_a_device_image_defaults_to_erofs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystem(monkeypatch)
    images.mount(images.image_source({"device": "/dev/loop1"}), "/run/i/b")
    images.mount(
        images.image_source({"device": "/dev/vdb", "fstype": "ext4", "options": "noload"}),
        "/run/i/c",
    )
    ro = system.MS_RDONLY
    assert fake.mounts == [
        ("/dev/loop1", "/run/i/b", "erofs", ro, ""),
        ("/dev/vdb", "/run/i/c", "ext4", ro, "noload"),
    ]


def test_a_directory_image_is_bound_read_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeSystem(monkeypatch)
    images.mount(images.image_source({"dir": str(tmp_path)}), "/run/i/d")
    s = system
    assert fake.mounts == [
        (str(tmp_path), "/run/i/d", None, s.MS_BIND | s.MS_REC, ""),
        ("none", "/run/i/d", None, s.MS_BIND | s.MS_REMOUNT | s.MS_RDONLY, ""),
    ]
    with pytest.raises(OpError, match="is not a directory"):
        images.mount(images.image_source({"dir": str(tmp_path / "absent")}), "/run/i/e")


# ---------------------------------------------------------------------- update_container


def test_cri_resources_become_cgroup_v2_values() -> None:
    update = convert.cgroup_values(
        api_pb2.LinuxContainerResources(
            cpu_quota=50000, cpu_period=100000, cpu_shares=1024, memory_limit_in_bytes=1 << 28
        )
    )
    assert update == CgroupUpdate(cpu_max="50000 100000", cpu_weight="39", memory_max=str(1 << 28))
    # the JSON the host has always sent: only what is set, every value a string
    assert update.to_dict() == {
        "cpu_max": "50000 100000",
        "cpu_weight": "39",
        "memory_max": str(1 << 28),
    }
    assert convert.cgroup_values(api_pb2.LinuxContainerResources()).empty


def test_the_guest_reads_an_update_as_hosts_send_it() -> None:
    assert resources.cgroup_update({"cpu_weight": "39", "pids_max": 64}) == CgroupUpdate(
        cpu_weight="39", pids_max="64"
    )
    for raw, problem in (
        ({"cpu.weight": "39"}, "unknown resource 'cpu.weight'"),
        ({"memory_max": ["1"]}, "not a cgroup value"),
        ("cpu_max", "must be an object"),
    ):
        with pytest.raises(OpError, match=problem) as info:
            resources.cgroup_update(raw)
        assert info.value.code == INVALID_ARGUMENT


def test_an_update_is_written_to_cgroup_v2_files(tmp_path: Path) -> None:
    for name in ("cpu.max", "cpu.weight", "memory.max", "pids.max"):
        (tmp_path / name).write_text("old")
    resources.update_cgroup(str(tmp_path), CgroupUpdate(cpu_max="max 100000", memory_max="4096"))
    assert (tmp_path / "cpu.max").read_text() == "max 100000"
    assert (tmp_path / "memory.max").read_text() == "4096"
    assert (tmp_path / "cpu.weight").read_text() == "old"  # None: left as it is
    assert not (tmp_path / "cpuset.cpus").exists()
    with pytest.raises(OpError) as info:
        resources.update_cgroup(str(tmp_path / "absent"), CgroupUpdate(memory_max="1"))
    assert info.value.code == NOT_FOUND


def test_an_update_is_translated_to_cgroup_v1_files(tmp_path: Path) -> None:
    files = {
        "cpu": ("cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares"),
        "memory": ("memory.limit_in_bytes",),
        "pids": ("pids.max",),
    }
    for controller, names in files.items():
        (tmp_path / controller / "pod" / "c1").mkdir(parents=True)
        for name in names:
            (tmp_path / controller / "pod" / "c1" / name).write_text("old")
    update = CgroupUpdate(cpu_max="max 50000", cpu_weight="39", memory_max="max", pids_max="9")
    resources.update_cgroup_v1(str(tmp_path), "/pod/c1", update)

    def read(rel: str) -> str:
        return (tmp_path / rel).read_text()

    assert read("cpu/pod/c1/cpu.cfs_period_us") == "50000"
    assert read("cpu/pod/c1/cpu.cfs_quota_us") == "-1"
    # weight 39 is what 1024 shares became on the host; the way back rounds down
    assert read("cpu/pod/c1/cpu.shares") == "998"
    assert read("memory/pod/c1/memory.limit_in_bytes") == "-1"
    assert read("pids/pod/c1/pids.max") == "9"


# ---------------------------------------------------------------------- configure_network


def test_the_guest_report_of_a_nic_reads_as_a_configured_interface(tmp_path: Path) -> None:
    sys_net = _fake_sysfs(tmp_path, {"eth0": ("02:11:11:11:11:11", 2)})
    spec = NetInterface(mac="02:00:00:00:00:01", match_mac="02:11:11:11:11:11").to_dict()
    report = guest_network.configure_interface(
        spec,
        FakeNetlink(),  # type: ignore[arg-type]
        sys_net=sys_net,
        timeout=0.1,
    )
    configured: ConfiguredInterface = ConfiguredInterface.from_dict(report)
    assert (configured.name, configured.mac) == ("eth0", "02:00:00:00:00:01")
    assert set(configured.ms) == {"find", "link", "addresses", "routes"}
    assert configured.to_dict() == report
