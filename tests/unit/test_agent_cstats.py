"""The guest's per-container figures (agent/guest/cstats.py) on fake cgroup v2 and v1
trees, a fake /proc and a real writable-layer directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.guest import cstats
from agent.guest.containers import Container
from agent.guest.settings import Settings
from agent.protocol import ContainerSpec, ContainerStats, DeviceIo, StatsReport

V2_FILES = {
    "cpu.stat": (
        "usage_usec 3344153\nuser_usec 2057962\nsystem_usec 1286190\nnr_periods 18\n"
        "nr_throttled 15\nthrottled_usec 1032273\nnr_bursts 0\nburst_usec 0\n"
    ),
    "cpu.max": "20000 100000\n",
    "cpu.weight": "39\n",
    "memory.stat": (
        "anon 163840\nfile 16384\nkernel 356352\nkernel_stack 32768\nfile_mapped 8192\n"
        "inactive_file 0\nslab 198832\npgfault 1183\npgmajfault 2\n"
    ),
    "memory.current": "331776\n",
    "memory.peak": "770048\n",
    "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
    "memory.swap.current": "0\n",
    "memory.swap.max": "0\n",
    "memory.min": "0\n",
    "memory.max": "67108864\n",
    "pids.max": "max\n",
    "io.stat": "259:1 rbytes=4096 wbytes=512 rios=1 wios=2 dbytes=0 dios=0\n",
    "cpu.pressure": (
        "some avg10=10.86 avg60=1.96 avg300=0.41 total=2439126\n"
        "full avg10=10.68 avg60=1.93 avg300=0.40 total=1421405\n"
    ),
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "io.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=3\n",
    "hugetlb.2MB.current": "4194304\n",
    "hugetlb.2MB.max": "max\n",
    "cgroup.procs": "10\n11\n",
    "cgroup.threads": "10\n11\n12\n",
}

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
  eth0:    5000      40    1    2    0     0          0         0     3000      30    3    4    0     0       0          0
vethab12:     7       1    0    0    0     0          0         0        7       1    0    0    0     0       0          0
"""  # noqa: E501

LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 4096                 files
Max processes             823                  823                  processes
"""

MOUNTINFO = (
    "22 1 0:20 / / ro,relatime - erofs /dev/pmem0 ro\n"
    "23 22 0:21 / /run rw,nosuid,nodev - tmpfs tmpfs rw,mode=755\n"
    "24 22 0:22 / /run/clearcri/images/x ro - erofs /dev/pmem1 ro\n"
)


def write_tree(base: Path, files: dict[str, str]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (base / name).write_text(text)


def fake_process(proc: Path, pid: int, threads: int, fds: dict[str, str]) -> None:
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    for tid in range(threads):
        (base / "task" / str(pid + tid)).mkdir(parents=True)
    for fd, target in fds.items():
        os.symlink(target, base / "fd" / fd)
    (base / "limits").write_text(LIMITS)


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc"
    fake_process(root, 10, 2, {"0": "/dev/null", "1": "pipe:[5]", "3": "socket:[77]"})
    fake_process(root, 11, 1, {"0": "/dev/null", "4": "socket:[78]"})
    (root / "self").mkdir()
    (root / "self" / "mountinfo").write_text(MOUNTINFO)
    (root / "net").mkdir()
    (root / "net" / "dev").write_text(NET_DEV)
    (root / "meminfo").write_text("MemTotal: 1000 kB\nSwapTotal:        0 kB\n")
    sys_dir = tmp_path / "sys"
    (sys_dir / "dev" / "block" / "259:1").mkdir(parents=True)
    (sys_dir / "dev" / "block" / "259:1" / "uevent").write_text(
        "MAJOR=259\nMINOR=1\nDEVNAME=pmem1\nDEVTYPE=disk\n"
    )
    monkeypatch.setattr(cstats, "PROC", str(root))
    monkeypatch.setattr(cstats, "SYS", str(sys_dir))
    return root


def make_container(tmp_path: Path, *, pid: int = 10) -> Container:
    bundle = tmp_path / "run" / "containers" / "c1"
    container = Container("c1", ContainerSpec(args=["sleep", "1"]), 1, str(bundle))
    upper = Path(container.upper)
    (upper / "var" / "lib" / "mydisktest").mkdir(parents=True)
    for i in range(3):
        (upper / "var" / "lib" / "mydisktest" / f"f{i}").write_text("hi\n")
    os.link(upper / "var" / "lib" / "mydisktest" / "f0", upper / "hardlink")
    container.state = "running"
    container.pid = pid
    return container


def test_v2_cgroup_figures(tmp_path: Path, proc: Path) -> None:
    cg = tmp_path / "cgroup" / "clearcri" / "c1"
    write_tree(cg, V2_FILES)
    write_tree(cg / "sub", {"cgroup.procs": "13\n", "cgroup.threads": "13\n"})
    container = make_container(tmp_path)
    container.cgroup_dir = str(cg)
    settings = Settings(run_dir=str(tmp_path / "run"), cgroup_root=str(tmp_path / "cgroup"))
    d = cstats.container_detail(container, settings)

    assert d.cgroup == "v2"
    assert (d.cpu_user_usec, d.cpu_system_usec) == (2057962, 1286190)
    assert (d.cpu_periods, d.cpu_throttled_periods, d.cpu_throttled_usec) == (18, 15, 1032273)
    assert (d.memory_rss, d.memory_cache, d.memory_mapped_file) == (163840, 16384, 8192)
    assert (d.memory_kernel, d.memory_max_usage, d.memory_swap) == (356352, 770048, 0)
    assert (d.memory_failcnt, d.oom_kills) == (4, 1)
    assert (d.pgfault, d.pgfault_hierarchy, d.pgmajfault, d.pgmajfault_hierarchy) == (
        1183,
        1183,
        2,
        2,
    )
    assert d.hugetlb_usage == {"2MB": 4194304}
    assert d.hugetlb_max_usage == {}  # cgroup v2 keeps no peak for huge pages
    assert d.pressure_usec == {
        "cpu_some": 2439126,
        "cpu_full": 1421405,
        "memory_some": 0,
        "memory_full": 0,
        "io_some": 7,
        "io_full": 3,
    }
    assert d.io == [
        DeviceIo(
            major=259, minor=1, device="/dev/pmem1", read_bytes=4096, write_bytes=512, reads=1,
            writes=2,
        )
    ]  # fmt: skip
    limits = d.limits
    assert limits is not None
    assert (limits.cpu_weight, limits.cpu_shares) == (39, None)
    assert (limits.cpu_period_usec, limits.cpu_quota_usec) == (100000, 20000)
    assert (limits.memory_max, limits.memory_swap_max) == (64 << 20, 64 << 20)
    assert (limits.memory_reservation, limits.pids_max) == (0, None)
    # pids 10 and 11 in the cgroup, 13 in a child cgroup (gone from /proc: no files)
    assert (d.processes, d.threads, d.threads_max) == (3, 4, 0)
    assert (d.file_descriptors, d.sockets) == (5, 2)
    assert d.ulimits_soft == {"max_open_files": 1024}
    fs = d.fs
    assert fs is not None
    assert fs.device == "/dev/pmem0"  # tmp_path is below "/" in the fake mountinfo
    assert fs.inodes_used == 1 + 3 + 3  # upper, var/lib/mydisktest, 3 files (f0 linked twice)
    assert fs.usage_bytes > 0 and fs.capacity_bytes >= fs.usage_bytes
    assert fs.inodes_total >= fs.inodes_free


def test_v2_unlimited_and_missing_files(tmp_path: Path, proc: Path) -> None:
    cg = tmp_path / "cgroup" / "c1"
    write_tree(
        cg,
        {
            "cpu.stat": "usage_usec 5\nuser_usec 3\nsystem_usec 2\n",
            "cpu.max": "max 100000\n",
            "memory.max": "max\n",
            "pids.max": "100\n",
            "memory.stat": "anon 1\nfile 2\nkernel_stack 10\npagetables 20\nslab 30\n",
            "cgroup.procs": "",
        },
    )
    container = make_container(tmp_path)
    container.cgroup_dir = str(cg)
    d = cstats.container_detail(container, Settings(run_dir=str(tmp_path / "run")))
    limits = d.limits
    assert limits is not None
    assert (limits.cpu_quota_usec, limits.cpu_period_usec) == (None, 100000)
    assert (limits.memory_max, limits.memory_swap_max, limits.pids_max) == (None, None, 100)
    assert d.threads_max == 100
    # no throttling figures without a cpu.stat that has them, no peak without memory.peak
    assert (d.cpu_periods, d.memory_max_usage, d.memory_failcnt) == (None, None, None)
    assert d.memory_kernel == 60  # the parts of an older kernel's memory.stat
    assert d.memory_swap == 0  # no memory.swap.current, but the system has no swap
    assert d.pressure_usec == {} and d.io == [] and d.hugetlb_usage == {}
    assert (d.processes, d.file_descriptors) == (0, 0)


def test_swap_unknown_when_unaccounted_and_swap_exists(tmp_path: Path, proc: Path) -> None:
    (proc / "meminfo").write_text("SwapTotal:  1024 kB\n")
    cg = tmp_path / "cgroup" / "c1"
    write_tree(cg, {"memory.stat": "anon 1\n", "memory.max": "4096\n"})
    container = make_container(tmp_path)
    container.cgroup_dir = str(cg)
    d = cstats.container_detail(container, Settings(run_dir=str(tmp_path / "run")))
    assert d.memory_swap is None
    assert d.limits is not None and d.limits.memory_swap_max is None


def test_v1_cgroup_figures(tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "cgroup"
    path = "/clearcri/c1"
    huge = 1 << 63
    write_tree(root / f"cpuacct{path}", {"cpuacct.stat": "user 150\nsystem 50\n"})
    write_tree(
        root / f"cpu{path}",
        {
            "cpu.stat": "nr_periods 10\nnr_throttled 3\nthrottled_time 2500000000\n",
            "cpu.shares": "1024\n",
            "cpu.cfs_period_us": "100000\n",
            "cpu.cfs_quota_us": "-1\n",
        },
    )
    write_tree(
        root / f"memory{path}",
        {
            "memory.stat": (
                "cache 10\nrss 20\nmapped_file 5\npgfault 7\npgmajfault 1\ntotal_cache 100\n"
                "total_rss 200\ntotal_mapped_file 50\ntotal_pgfault 70\ntotal_pgmajfault 9\n"
                "total_swap 4096\n"
            ),
            "memory.usage_in_bytes": "300\n",
            "memory.max_usage_in_bytes": "900\n",
            "memory.failcnt": "6\n",
            "memory.kmem.usage_in_bytes": "40\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            "memory.limit_in_bytes": "67108864\n",
            "memory.memsw.limit_in_bytes": f"{huge}\n",
            "memory.soft_limit_in_bytes": f"{huge}\n",
            "cgroup.procs": "10\n",
        },
    )
    write_tree(root / f"pids{path}", {"pids.max": "max\n", "cgroup.procs": "10\n11\n"})
    write_tree(root / f"pids{path}", {"tasks": "10\n11\n12\n"})
    write_tree(
        root / f"hugetlb{path}",
        {"hugetlb.2MB.usage_in_bytes": "0\n", "hugetlb.2MB.max_usage_in_bytes": "2097152\n"},
    )
    write_tree(
        root / f"blkio{path}",
        {
            "blkio.throttle.io_service_bytes_recursive": (
                "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Total 12288\nTotal 12288\n"
            ),
            "blkio.throttle.io_serviced_recursive": "8:0 Read 1\n8:0 Write 2\n",
        },
    )
    container = make_container(tmp_path)
    container.cgroup_path = path
    settings = Settings(run_dir=str(tmp_path / "run"), cgroup_mode="v1", cgroup_root=str(root))
    d = cstats.container_detail(container, settings)
    assert d.cgroup == "v1"
    assert d.cpu_user_usec == 150 * cstats.USEC_PER_TICK
    assert d.cpu_system_usec == 50 * cstats.USEC_PER_TICK
    assert (d.cpu_periods, d.cpu_throttled_periods, d.cpu_throttled_usec) == (10, 3, 2_500_000)
    assert (d.memory_cache, d.memory_rss, d.memory_mapped_file) == (100, 200, 50)
    assert (d.pgfault, d.pgmajfault, d.pgfault_hierarchy, d.pgmajfault_hierarchy) == (
        7,
        1,
        70,
        9,
    )
    assert (d.memory_swap, d.memory_max_usage, d.memory_failcnt) == (4096, 900, 6)
    assert (d.memory_kernel, d.oom_kills) == (40, 2)
    assert d.hugetlb_usage == {"2MB": 0}
    assert d.hugetlb_max_usage == {"2MB": 2097152}
    assert d.io == [
        DeviceIo(major=8, minor=0, read_bytes=4096, write_bytes=8192, reads=1, writes=2)
    ]
    limits = d.limits
    assert limits is not None
    assert (limits.cpu_shares, limits.cpu_weight) == (1024, None)
    assert (limits.cpu_period_usec, limits.cpu_quota_usec) == (100000, None)
    assert (limits.memory_max, limits.memory_swap_max, limits.memory_reservation) == (
        64 << 20,
        None,
        None,
    )
    assert (d.processes, d.threads, d.threads_max) == (2, 3, 0)
    assert d.pressure_usec == {}


def test_without_cgroup_the_process_tree_counts(tmp_path: Path, proc: Path) -> None:
    (proc / "10" / "task" / "10" / "children").write_text("11 ")
    (proc / "10" / "task" / "11" / "children").write_text("")
    (proc / "11" / "task" / "11" / "children").write_text("")
    container = make_container(tmp_path)
    settings = Settings(run_dir=str(tmp_path / "run"), cgroup_mode="disabled")
    d = cstats.container_detail(container, settings)
    assert d.cgroup == "" and d.limits is None
    assert (d.processes, d.threads, d.file_descriptors, d.sockets) == (2, 3, 5, 2)
    assert d.cpu_user_usec is None and d.memory_rss is None
    # an exited container has no processes to count
    container.exited.set()
    d = cstats.container_detail(container, settings)
    assert (d.processes, d.threads, d.ulimits_soft) == (0, 0, {})


def test_interfaces_leave_out_loopback_and_link_ends(proc: Path) -> None:
    (eth0,) = cstats.interfaces()
    assert eth0.name == "eth0"
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (5000, 40, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (3000, 30, 3, 4)


def test_parsers() -> None:
    assert cstats.parse_pressure("some avg10=1 total=5\nfull avg10=0 total=2\n") == {
        "some": 5,
        "full": 2,
    }
    assert cstats.parse_pressure(None) == {}
    assert cstats.parse_open_files_soft("Max open files  unlimited  unlimited  files\n") is None
    assert cstats.read_limit("/nonexistent/x") == (False, None)
    assert cstats.mount_source("/run/clearcri/containers/c1/layer/upper", MOUNTINFO) == "tmpfs"
    assert cstats.mount_source("/run/clearcri/images/x/bin", MOUNTINFO) == "/dev/pmem1"
    assert cstats.mount_source("/etc", MOUNTINFO) == "/dev/pmem0"
    assert cstats.parse_io_stat("bogus\n8:0 rbytes=1 wbytes=2 rios=3 wios=4\n") == [
        DeviceIo(major=8, minor=0, read_bytes=1, write_bytes=2, reads=3, writes=4)
    ]


def test_detail_round_trips_through_the_wire(tmp_path: Path, proc: Path) -> None:
    cg = tmp_path / "cgroup" / "c1"
    write_tree(cg, V2_FILES)
    container = make_container(tmp_path)
    container.cgroup_dir = str(cg)
    detail = cstats.container_detail(container, Settings(run_dir=str(tmp_path / "run")))
    report = StatsReport(
        containers=[ContainerStats(id="c1", detail=detail)], interfaces=cstats.interfaces()
    )
    wire = json.loads(json.dumps(report.to_dict()))
    assert StatsReport.from_dict(wire) == report
    # an older host ignores what it does not know; an older agent sends no detail
    old = StatsReport.from_dict({"containers": [{"id": "c1", "cpu_usage_usec": 1}]})
    assert old.containers[0].detail is None and old.interfaces == []
