"""Per-container figures for ``container_stats`` with ``detail``.

Everything here is read, never estimated: the container's cgroup (v2 unified, or the v1
controller hierarchies of a host pod), /proc of the processes in it, its writable
overlay layer, and /proc/net/dev of the agent's network namespace (the pod's). A
figure the guest cannot read stays None (or out of its dict), so the host can leave it
out instead of reporting a zero that is not true.

Loaded on first use only (not at agent start-up); no typing imports at run time.
"""

# try/except/pass is used instead of contextlib.suppress to keep contextlib out of the
# guest's imports.
# ruff: noqa: SIM105

from __future__ import annotations

import os

from agent.protocol import CgroupLimits, ContainerDetail, DeviceIo, FsUsage, InterfaceStats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.guest.containers import Container
    from agent.guest.settings import Settings

PROC = "/proc"
SYS = "/sys"
#: cgroup v1 writes "unlimited" as the largest page-aligned count; anything this large
#: is no limit (the same cut cAdvisor makes).
UNLIMITED = 1 << 62
#: Interfaces the pod's figures leave out, as cAdvisor does: loopback and the host ends
#: of container links (seen only by host-network pods).
IGNORED_INTERFACE_PREFIXES = ("lo", "veth", "docker", "nerdctl")
PRESSURE_RESOURCES = ("cpu", "memory", "io")
USEC_PER_TICK = 1_000_000 // (os.sysconf("SC_CLK_TCK") or 100)


# ---------------------------------------------------------------------------- readers


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def read_int(path: str) -> int | None:
    """An integer file; None when missing or unreadable (or "max")."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def read_limit(path: str) -> tuple[bool, int | None]:
    """A limit file: (present, value), value None for "max", -1 or an unlimited v1
    figure."""
    text = read_text(path)
    if text is None:
        return False, None
    word = text.strip().split()[0] if text.strip() else ""
    if word in ("max", "-1"):
        return True, None
    try:
        value = int(word)
    except ValueError:
        return False, None
    return True, (None if value >= UNLIMITED else value)


def parse_keyed(text: str | None) -> dict[str, int]:
    """ "key value" lines (cpu.stat, memory.stat, memory.events, cpuacct.stat)."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def read_keyed(path: str) -> dict[str, int]:
    return parse_keyed(read_text(path))


def parse_pressure(text: str | None) -> dict[str, int]:
    """A PSI file ("some avg10=0.00 avg60=0.00 avg300=0.00 total=123") -> {"some": 123,
    "full": ...} in microseconds."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key == "total":
                try:
                    out[parts[0]] = int(value)
                except ValueError:
                    pass
    return out


def parse_io_stat(text: str | None) -> list[DeviceIo]:
    """cgroup v2 io.stat: "259:1 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0"."""
    out: list[DeviceIo] = []
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts:
            continue
        major, sep, minor = parts[0].partition(":")
        if not sep or not major.isdigit() or not minor.isdigit():
            continue
        values: dict[str, int] = {}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            try:
                values[key] = int(value)
            except ValueError:
                continue
        out.append(
            DeviceIo(
                major=int(major),
                minor=int(minor),
                read_bytes=values.get("rbytes", 0),
                write_bytes=values.get("wbytes", 0),
                reads=values.get("rios", 0),
                writes=values.get("wios", 0),
            )
        )
    return out


def parse_blkio(bytes_text: str | None, ops_text: str | None) -> list[DeviceIo]:
    """cgroup v1 blkio "8:0 Read 4096" lines (bytes and operations files)."""
    devices: dict[tuple[int, int], DeviceIo] = {}
    for text, kind in ((bytes_text, "bytes"), (ops_text, "ops")):
        for line in (text or "").splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[1] not in ("Read", "Write"):
                continue
            major, sep, minor = parts[0].partition(":")
            if not sep or not major.isdigit() or not minor.isdigit():
                continue
            try:
                value = int(parts[2])
            except ValueError:
                continue
            key = (int(major), int(minor))
            entry = devices.setdefault(key, DeviceIo(major=key[0], minor=key[1]))
            if kind == "bytes":
                if parts[1] == "Read":
                    entry.read_bytes = value
                else:
                    entry.write_bytes = value
            elif parts[1] == "Read":
                entry.reads = value
            else:
                entry.writes = value
    return list(devices.values())


def parse_net_dev(text: str | None) -> list[InterfaceStats]:
    """/proc/net/dev, without loopback and container link ends."""
    out: list[InterfaceStats] = []
    for line in (text or "").splitlines()[2:]:
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not name or name.startswith(IGNORED_INTERFACE_PREFIXES):
            continue
        try:
            v = [int(x) for x in rest.split()]
        except ValueError:
            continue
        if len(v) < 12:
            continue
        out.append(
            InterfaceStats(
                name=name,
                rx_bytes=v[0],
                rx_packets=v[1],
                rx_errors=v[2],
                rx_dropped=v[3],
                tx_bytes=v[8],
                tx_packets=v[9],
                tx_errors=v[10],
                tx_dropped=v[11],
            )
        )
    return out


def parse_open_files_soft(text: str | None) -> int | None:
    """The soft "Max open files" of a /proc/<pid>/limits text (None when unlimited)."""
    for line in (text or "").splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files") :].split()
            if fields and fields[0].isdigit():
                return int(fields[0])
            return None
    return None


def device_name(major: int, minor: int) -> str:
    """/dev name of a block device from sysfs ("" when it has none)."""
    for line in (read_text(f"{SYS}/dev/block/{major}:{minor}/uevent") or "").splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            return f"/dev/{value}"
    return ""


def mount_source(path: str, mountinfo: str | None = None) -> str:
    """Source of the mount holding ``path`` (longest mount point above it)."""
    if mountinfo is None:
        mountinfo = read_text(f"{PROC}/self/mountinfo")
    best, source = -1, ""
    for line in (mountinfo or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        tail = line.split(" - ", 1)[1].split()
        if len(tail) < 2:
            continue
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, source = len(point), tail[1]
    return source


# ---------------------------------------------------------------------------- processes


def cgroup_members(directory: str, name: str) -> list[int]:
    """Ids in ``name`` (cgroup.procs, cgroup.threads or tasks) of a cgroup and every
    cgroup below it."""
    found: list[int] = []
    for root, _dirs, _files in os.walk(directory):
        for line in (read_text(f"{root}/{name}") or "").split():
            if line.isdigit():
                found.append(int(line))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (for a container without a cgroup)."""
    if not pid or not os.path.isdir(f"{PROC}/{pid}"):
        return []
    seen = [pid]
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = os.listdir(f"{PROC}/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            for child in (read_text(f"{PROC}/{current}/task/{tid}/children") or "").split():
                if child.isdigit() and int(child) not in seen:
                    seen.append(int(child))
                    pending.append(int(child))
    return seen


def open_files(pids: list[int]) -> tuple[int, int]:
    """Open file descriptors and sockets among them, over ``pids``."""
    fds = sockets = 0
    for pid in pids:
        base = f"{PROC}/{pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            continue  # gone meanwhile
        fds += len(names)
        for name in names:
            try:
                if os.readlink(f"{base}/{name}").startswith("socket:"):
                    sockets += 1
            except OSError:
                continue
    return fds, sockets


def thread_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"{PROC}/{pid}/task"))
        except OSError:
            continue
    return total


# ---------------------------------------------------------------------------- cgroups


def _v2(detail: ContainerDetail, cg: str) -> None:
    detail.cgroup = "v2"
    cpu = read_keyed(f"{cg}/cpu.stat")
    detail.cpu_user_usec = cpu.get("user_usec")
    detail.cpu_system_usec = cpu.get("system_usec")
    detail.cpu_periods = cpu.get("nr_periods")
    detail.cpu_throttled_periods = cpu.get("nr_throttled")
    detail.cpu_throttled_usec = cpu.get("throttled_usec")

    memory = read_keyed(f"{cg}/memory.stat")
    if memory:
        detail.memory_cache = memory.get("file")
        detail.memory_rss = memory.get("anon")
        detail.memory_mapped_file = memory.get("file_mapped")
        if "kernel" in memory:
            detail.memory_kernel = memory["kernel"]
        elif "slab" in memory:  # kernels before "kernel" was added (5.18)
            kernel_parts = ("kernel_stack", "pagetables", "percpu", "vmalloc", "slab")
            detail.memory_kernel = sum(memory.get(k, 0) for k in kernel_parts)
        # memory.stat counts the cgroup's whole subtree: both scopes are that figure
        detail.pgfault = detail.pgfault_hierarchy = memory.get("pgfault")
        detail.pgmajfault = detail.pgmajfault_hierarchy = memory.get("pgmajfault")
    detail.memory_max_usage = read_int(f"{cg}/memory.peak")
    swap = read_int(f"{cg}/memory.swap.current")
    detail.memory_swap = swap if swap is not None else _swap_when_unaccounted()
    events = read_keyed(f"{cg}/memory.events")
    detail.memory_failcnt = events.get("max")
    detail.oom_kills = events.get("oom_kill")

    try:
        names = os.listdir(cg)
    except OSError:
        names = []
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] == "current":
            value = read_int(f"{cg}/{name}")
            if value is not None:
                detail.hugetlb_usage[parts[1]] = value
    for resource in PRESSURE_RESOURCES:
        for kind, total in parse_pressure(read_text(f"{cg}/{resource}.pressure")).items():
            detail.pressure_usec[f"{resource}_{kind}"] = total
    detail.io = parse_io_stat(read_text(f"{cg}/io.stat"))

    limits = CgroupLimits()
    limits.cpu_weight = read_int(f"{cg}/cpu.weight")
    cpu_max = (read_text(f"{cg}/cpu.max") or "").split()
    if len(cpu_max) == 2 and cpu_max[1].isdigit():
        limits.cpu_period_usec = int(cpu_max[1])
        limits.cpu_quota_usec = int(cpu_max[0]) if cpu_max[0].isdigit() else None
    _present, limits.memory_max = read_limit(f"{cg}/memory.max")
    swap_present, swap_max = read_limit(f"{cg}/memory.swap.max")
    if limits.memory_max is not None and swap_present and swap_max is not None:
        limits.memory_swap_max = limits.memory_max + swap_max
    elif limits.memory_max is not None and not swap_present and _no_swap():
        limits.memory_swap_max = limits.memory_max  # no swap to add
    _present, limits.memory_reservation = read_limit(f"{cg}/memory.min")
    pids_present, limits.pids_max = read_limit(f"{cg}/pids.max")
    detail.limits = limits
    if pids_present:
        detail.threads_max = limits.pids_max or 0
    detail.threads = len(cgroup_members(cg, "cgroup.threads"))


def _v1(detail: ContainerDetail, root: str, path: str) -> None:
    detail.cgroup = "v1"

    def f(controller: str, name: str) -> str:
        return f"{root}/{controller}{path}/{name}"

    acct = read_keyed(f("cpuacct", "cpuacct.stat"))
    if "user" in acct:
        detail.cpu_user_usec = acct["user"] * USEC_PER_TICK
    if "system" in acct:
        detail.cpu_system_usec = acct["system"] * USEC_PER_TICK
    cpu = read_keyed(f("cpu", "cpu.stat"))
    detail.cpu_periods = cpu.get("nr_periods")
    detail.cpu_throttled_periods = cpu.get("nr_throttled")
    if "throttled_time" in cpu:
        detail.cpu_throttled_usec = cpu["throttled_time"] // 1000

    memory = read_keyed(f("memory", "memory.stat"))
    usage = read_int(f("memory", "memory.usage_in_bytes"))
    if memory:
        detail.memory_cache = memory.get("total_cache")
        detail.memory_rss = memory.get("total_rss")
        detail.memory_mapped_file = memory.get("total_mapped_file")
        detail.pgfault = memory.get("pgfault")
        detail.pgmajfault = memory.get("pgmajfault")
        detail.pgfault_hierarchy = memory.get("total_pgfault")
        detail.pgmajfault_hierarchy = memory.get("total_pgmajfault")
        if "total_swap" in memory:
            detail.memory_swap = memory["total_swap"]
    if detail.memory_swap is None:
        memsw = read_int(f("memory", "memory.memsw.usage_in_bytes"))
        if memsw is not None and usage is not None:
            detail.memory_swap = max(0, memsw - usage)
        else:
            detail.memory_swap = _swap_when_unaccounted()
    detail.memory_max_usage = read_int(f("memory", "memory.max_usage_in_bytes"))
    detail.memory_failcnt = read_int(f("memory", "memory.failcnt"))
    detail.memory_kernel = read_int(f("memory", "memory.kmem.usage_in_bytes"))
    detail.oom_kills = read_keyed(f("memory", "memory.oom_control")).get("oom_kill")

    hugetlb = f"{root}/hugetlb{path}"
    try:
        names = os.listdir(hugetlb)
    except OSError:
        names = []
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "hugetlb":
            if parts[2] == "usage_in_bytes":
                target = detail.hugetlb_usage
            elif parts[2] == "max_usage_in_bytes":
                target = detail.hugetlb_max_usage
            else:
                continue
            value = read_int(f"{hugetlb}/{name}")
            if value is not None:
                target[parts[1]] = value
    io = parse_blkio(
        read_text(f("blkio", "blkio.throttle.io_service_bytes_recursive")),
        read_text(f("blkio", "blkio.throttle.io_serviced_recursive")),
    )
    detail.io = io or parse_blkio(
        read_text(f("blkio", "blkio.io_service_bytes_recursive")),
        read_text(f("blkio", "blkio.io_serviced_recursive")),
    )

    limits = CgroupLimits()
    limits.cpu_shares = read_int(f("cpu", "cpu.shares"))
    limits.cpu_period_usec = read_int(f("cpu", "cpu.cfs_period_us"))
    _present, limits.cpu_quota_usec = read_limit(f("cpu", "cpu.cfs_quota_us"))
    _present, limits.memory_max = read_limit(f("memory", "memory.limit_in_bytes"))
    memsw_present, memsw_max = read_limit(f("memory", "memory.memsw.limit_in_bytes"))
    if memsw_present:
        limits.memory_swap_max = memsw_max
    elif _no_swap():
        limits.memory_swap_max = limits.memory_max  # no swap to add
    _present, limits.memory_reservation = read_limit(f("memory", "memory.soft_limit_in_bytes"))
    pids_present, limits.pids_max = read_limit(f("pids", "pids.max"))
    detail.limits = limits
    if pids_present:
        detail.threads_max = limits.pids_max or 0
    detail.threads = len(cgroup_members(f"{root}/pids{path}", "tasks")) or None


def _no_swap() -> bool:
    return _swap_total() == 0


def _swap_total() -> int | None:
    for line in (read_text(f"{PROC}/meminfo") or "").splitlines():
        if line.startswith("SwapTotal:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _swap_when_unaccounted() -> int | None:
    """Swap use of a cgroup without swap accounting: 0 where the system has no swap at
    all, unknown otherwise."""
    return 0 if _no_swap() else None


# ---------------------------------------------------------------------------- filesystem


def layer_usage(directory: str) -> tuple[int, int]:
    """Bytes allocated (512-byte blocks, each hard-linked file once) and inodes used
    by a directory tree, its root included."""
    try:
        st = os.lstat(directory)
    except OSError:
        return 0, 0
    usage, inodes = st.st_blocks * 512, 1
    seen: set[tuple[int, int]] = set()
    pending = [directory]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            usage += st.st_blocks * 512
            inodes += 1
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
    return usage, inodes


def fs_usage(upper: str) -> FsUsage | None:
    if not os.path.isdir(upper):
        return None
    try:
        vfs = os.statvfs(upper)
    except OSError:
        return None
    usage, inodes = layer_usage(upper)
    return FsUsage(
        device=mount_source(os.path.realpath(upper)),
        usage_bytes=usage,
        inodes_used=inodes,
        capacity_bytes=vfs.f_blocks * vfs.f_frsize,
        inodes_total=vfs.f_files,
        inodes_free=vfs.f_ffree,
    )


# ---------------------------------------------------------------------------- entry points


def container_detail(container: Container, settings: Settings) -> ContainerDetail:
    """Every figure of one container the guest can read."""
    detail = ContainerDetail()
    pids: list[int] | None = None
    if (
        settings.cgroup_mode == "v2"
        and container.cgroup_dir
        and os.path.isdir(container.cgroup_dir)
    ):
        _v2(detail, container.cgroup_dir)
        pids = cgroup_members(container.cgroup_dir, "cgroup.procs")
    elif settings.cgroup_mode == "v1" and container.cgroup_path is not None:
        root = settings.cgroup_root
        if os.path.isdir(f"{root}/memory{container.cgroup_path}"):
            _v1(detail, root, container.cgroup_path)
            pids = cgroup_members(f"{root}/pids{container.cgroup_path}", "cgroup.procs")
            if not pids:
                pids = cgroup_members(f"{root}/memory{container.cgroup_path}", "cgroup.procs")
    alive = container.state == "running" and not container.exited.is_set()
    if pids is None:
        pids = process_tree(container.pid) if alive else []
        detail.threads = thread_count(pids)
    detail.processes = len(pids)
    if detail.threads is None:
        detail.threads = thread_count(pids)
    detail.file_descriptors, detail.sockets = open_files(pids)
    if alive and container.pid:
        soft = parse_open_files_soft(read_text(f"{PROC}/{container.pid}/limits"))
        if soft is not None:
            detail.ulimits_soft["max_open_files"] = soft
    for io in detail.io:
        io.device = device_name(io.major, io.minor)
    detail.fs = fs_usage(container.upper)
    return detail


def interfaces() -> list[InterfaceStats]:
    """Counters of the agent's network namespace (the pod's)."""
    return parse_net_dev(read_text(f"{PROC}/net/dev"))
