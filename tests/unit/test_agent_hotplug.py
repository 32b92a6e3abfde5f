"""The guest's side of sizing at clone time, on fake /sys and /proc trees: onlining
hot-added vCPUs, waiting for plugged memory, raising what the kernel sized at boot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.guest import hotplug
from agent.guest.errors import OpError
from agent.protocol import DEADLINE_EXCEEDED

# Measured in guests of our kernel (TCG, q35): the 96 MiB template, and VMs booted whole
# with 192 and 1152 MiB, against clones of the template plugged to the same sizes.
TEMPLATE_MEM_TOTAL = 79968
TEMPLATE = {
    "kernel/threads-max": "580",
    "fs/file-max": "8192",
    "fs/inotify/max_user_watches": "8192",
    "fs/epoll/max_user_watches": "16517",
    "net/ipv4/tcp_mem": "849\t1135\t1698",
    "net/ipv4/udp_mem": "1701\t2270\t3402",
    "net/netfilter/nf_conntrack_max": "1024",
    **{name: "290" for name in hotplug.NAMESPACE_LIMITS},
}
COLD = {
    192: {
        "MemTotal": 176200,
        "kernel/threads-max": 1331,
        "fs/file-max": 16976,
        "fs/inotify/max_user_watches": 8192,
        "fs/epoll/max_user_watches": 37932,
        "user/max_user_namespaces": 665,
        "net/ipv4/tcp_mem": 2625,
        "net/ipv4/udp_mem": 5251,
        "net/netfilter/nf_conntrack_max": 1536,
    },
    1152: {
        "MemTotal": 1142216,
        "kernel/threads-max": 8878,
        "fs/file-max": 113544,
        "fs/inotify/max_user_watches": 8978,
        "fs/epoll/max_user_watches": 252994,
        "user/max_user_namespaces": 4439,
        "net/ipv4/tcp_mem": 16702,
        "net/ipv4/udp_mem": 33404,
        "net/netfilter/nf_conntrack_max": 65536,
    },
}
# the clones: MemTotal once plugged, min_free_kbytes the kernel then set
PLUGGED = {192: (178272, 1681), 1152: (1161312, 57732)}


def test_parse_cpu_list() -> None:
    assert hotplug.parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    assert hotplug.parse_cpu_list("0") == {0}
    assert hotplug.parse_cpu_list("") == set()


def test_cpu_added_reads_the_kernel_uevent() -> None:
    assert hotplug.cpu_added(b"add@/devices/system/cpu/cpu3\0ACTION=add\0SUBSYSTEM=cpu\0") == 3
    assert hotplug.cpu_added(b"online@/devices/system/cpu/cpu3\0ACTION=online\0") is None
    assert hotplug.cpu_added(b"add@/devices/system/memory/memory40\0ACTION=add\0") is None
    assert hotplug.cpu_added(b"add@/devices/system/cpu/cpufreq\0") is None


def _sysfs(tmp_path: Path, offline: list[int]) -> Path:
    cpus = tmp_path / "cpu"
    (cpus / "cpu0").mkdir(parents=True)  # the boot vCPU has no online file
    for cpu in offline:
        (cpus / f"cpu{cpu}").mkdir()
        (cpus / f"cpu{cpu}" / "online").write_text("0\n")
    (cpus / "online").write_text("0\n")
    (cpus / "cpufreq").mkdir()
    return cpus


def _meminfo(tmp_path: Path, kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {kib} kB\nMemFree:        1000 kB\n")
    return path


def test_wait_for_size_onlines_the_added_vcpus_it_needs(tmp_path: Path) -> None:
    cpus = _sysfs(tmp_path, offline=[2, 1, 3])
    assert hotplug.offline_cpus(str(cpus)) == [1, 2, 3]
    sized = hotplug.wait_for_size(
        3, 243808, 5.0, cpu_dir=str(cpus), meminfo=str(_meminfo(tmp_path, 243808))
    )
    assert (sized.vcpus, sized.mem_total_kib) == (3, 243808)
    # the lowest ones, no more than asked
    assert [(cpus / f"cpu{n}" / "online").read_text().strip() for n in (1, 2, 3)] == [
        "1",
        "1",
        "0",
    ]


def test_wait_for_size_gives_up_saying_what_the_guest_has(tmp_path: Path) -> None:
    cpus = _sysfs(tmp_path, offline=[])
    with pytest.raises(OpError) as caught:
        hotplug.wait_for_size(
            1, 243808, 0.05, cpu_dir=str(cpus), meminfo=str(_meminfo(tmp_path, 79968))
        )
    assert caught.value.code == DEADLINE_EXCEEDED
    assert (
        "1 of 1 vCPUs" in caught.value.message
        and "MemTotal 79968 of 243808" in caught.value.message
    )


def test_size_changed_is_a_memory_block_or_vcpu_coming_online() -> None:
    assert hotplug.size_changed(b"online@/devices/system/memory/memory40\0ACTION=online\0")
    assert hotplug.size_changed(b"online@/devices/system/cpu/cpu1\0ACTION=online\0")
    assert not hotplug.size_changed(b"add@/devices/system/memory/memory40\0ACTION=add\0")
    assert not hotplug.size_changed(b"online@/devices/virtual/net/eth0\0")


def test_mem_total_without_a_file_is_the_kernels_physical_memory() -> None:
    # sysinfo's total RAM, which is what /proc/meminfo prints as MemTotal
    meminfo = Path("/proc/meminfo").read_text()
    expected = int(meminfo.split("MemTotal:")[1].split()[0])
    assert hotplug.mem_total_kib() == expected


def test_wait_for_size_looks_again_as_soon_as_the_guest_grows(tmp_path: Path) -> None:
    cpus = _sysfs(tmp_path, offline=[])
    meminfo = _meminfo(tmp_path, 79968)
    grown = threading.Event()

    def plugged() -> None:
        time.sleep(0.2)
        meminfo.write_text("MemTotal:       243808 kB\n")
        grown.set()

    threading.Thread(target=plugged).start()
    saved = hotplug.POLL_S
    hotplug.POLL_S = 30.0  # only the wake-up can end the wait in time
    try:
        sized = hotplug.wait_for_size(
            1, 243808, 10.0, cpu_dir=str(cpus), meminfo=str(meminfo), grown=grown
        )
    finally:
        hotplug.POLL_S = saved
    assert sized.mem_total_kib == 243808
    assert sized.seconds < 5.0


def _current(min_free: int) -> dict[str, str]:
    current = dict(TEMPLATE)
    current["vm/min_free_kbytes"] = str(min_free)
    return current


@pytest.mark.parametrize("size", [192, 1152])
def test_limits_grow_to_those_of_a_vm_booted_that_big(size: int) -> None:
    mem_total, min_free = PLUGGED[size]
    raised = hotplug.grown_limits(mem_total, TEMPLATE_MEM_TOTAL, _current(min_free))
    cold = COLD[size]
    for name, want in cold.items():
        if name == "MemTotal":
            continue
        if name == "fs/inotify/max_user_watches" and want == 8192:
            assert name not in raised, "at the kernel's floor, as the template"
            continue
        got = int(raised[name].split()[1 if "_mem" in name else 0])
        # within 0.5% of the cold boot's; TCP/UDP 2% (the clone's watermarks differ),
        # the file limit 1% (the kernel also took off what it had in use at boot)
        tolerance = 0.02 if "_mem" in name else 0.01 if name == "fs/file-max" else 0.005
        assert abs(got - want) <= want * tolerance, (name, got, want)
    for name in hotplug.NAMESPACE_LIMITS:
        assert raised[name] == raised["user/max_user_namespaces"]
    assert "net/netfilter/nf_conntrack_buckets" not in raised, "the table keeps its size"


def test_limits_never_shrink_or_change_without_new_memory() -> None:
    template_mem = TEMPLATE_MEM_TOTAL
    assert hotplug.grown_limits(template_mem, template_mem, _current(1090)) == {}
    current = _current(1681)
    current["kernel/threads-max"] = "580"
    current["fs/file-max"] = "10000000"  # raised by someone: left alone
    raised = hotplug.grown_limits(178272, template_mem, current)
    assert "fs/file-max" not in raised and "kernel/threads-max" in raised
    # no thread limit to read the boot offset from: nothing is guessed
    del current["kernel/threads-max"]
    assert hotplug.grown_limits(178272, template_mem, current) == {}


def _proc(tmp_path: Path) -> tuple[Path, Path]:
    sysctl = tmp_path / "sys"
    for name, value in _current(57732).items():
        path = sysctl / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    thp = tmp_path / "thp"
    (thp / "khugepaged").mkdir(parents=True)
    (thp / "enabled").write_text("always madvise [never]\n")
    for name in ("defrag", "khugepaged/defrag", "use_zero_page"):
        (thp / name).write_text("0\n")
    return sysctl, thp


def test_grow_boot_limits_writes_them_and_turns_huge_pages_on(tmp_path: Path) -> None:
    sysctl, thp = _proc(tmp_path)
    changed = hotplug.grow_boot_limits(
        TEMPLATE_MEM_TOTAL, PLUGGED[1152][0], sysctl_dir=str(sysctl), thp_dir=str(thp)
    )
    assert "transparent_hugepage/enabled" in changed and "kernel/threads-max" in changed
    assert (thp / "enabled").read_text() == "always"
    assert (thp / "defrag").read_text() == "madvise"
    assert int((sysctl / "kernel/threads-max").read_text()) > 8800
    assert (sysctl / "user/max_net_namespaces").read_text() == str(
        int((sysctl / "kernel/threads-max").read_text()) // 2
    )


def test_huge_pages_stay_off_below_512_mib(tmp_path: Path) -> None:
    sysctl, thp = _proc(tmp_path)
    changed = hotplug.grow_boot_limits(
        TEMPLATE_MEM_TOTAL, PLUGGED[192][0], sysctl_dir=str(sysctl), thp_dir=str(thp)
    )
    assert not [name for name in changed if name.startswith("transparent_hugepage")]
    assert (thp / "enabled").read_text() == "always madvise [never]\n"
