"""vCPUs and memory hot-plugged into a VM cloned from a smaller template.

The host plugs them before the clone runs (sandbox/hotplug.py). The kernel onlines the
memory as the virtio-mem driver adds it; a hot-added vCPU stays offline until someone
writes its ``online`` file: ``CpuWatcher`` does that as soon as the kernel announces the
vCPU (a uevent), while the host is still reconnecting, and the ``hotplug`` request does
it too for any it finds offline. That request returns once the guest has the vCPUs and
the MemTotal it was asked for, so no container starts in a VM smaller than its pod. It
checks again whenever the kernel reports a memory block or vCPU online (the watcher's
uevents), not only every ``POLL_S``: under TCG a clone's first hot-plug is on its pod's
start, and a poll interval is time the pod waits for nothing.

What the kernel sized from the memory it booted with stays the template's unless
someone raises it: the process and thread limits, file and watch limits, TCP and UDP
memory, conntrack's limit, transparent huge pages (off below 512 MiB). ``grown_limits``
gives each the value the kernel's own boot-time formula gives for the memory the guest
has now, so a clone sized at clone time gets the limits of a VM booted with that size.
Hash tables the kernel allocated at boot (conntrack's too) keep their size.
"""

from __future__ import annotations

import os
import resource
import threading
import time

from agent.guest.errors import OpError
from agent.protocol import DEADLINE_EXCEEDED, HotplugResult

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

CPU_DIR = "/sys/devices/system/cpu"
SYSCTL_DIR = "/proc/sys"
THP_DIR = "/sys/kernel/mm/transparent_hugepage"
POLL_S = 0.02
NETLINK_KOBJECT_UEVENT = 15

#: kernel/fork.c set_max_threads: one thread per 8 of its 16 KiB stacks (x86-64), so
#: per 128 KiB of RAM
KIB_PER_THREAD = 128
NAMESPACE_LIMITS = tuple(
    f"user/max_{kind}_namespaces"
    for kind in ("user", "pid", "uts", "ipc", "net", "mnt", "cgroup", "time")
)
#: fs/notify/inotify: a watch's cost, two inodes and a mark (this kernel's sizes)
INOTIFY_WATCH_COST = 1296
#: mm/huge_memory.c: transparent huge pages are off on guests that boot with less
THP_MIN_KIB = 512 * 1024
#: the kernel's THP defaults (TRANSPARENT_HUGEPAGE_ALWAYS), file by file
THP_DEFAULTS = (
    ("enabled", "always"),
    ("defrag", "madvise"),
    ("khugepaged/defrag", "1"),
    ("use_zero_page", "1"),
)
#: a page's struct page: the memory map a cold boot reserves (out of MemTotal) for its
#: RAM, which for hot-plugged memory comes out of free memory instead
KIB_PER_MAPPED_KIB = 64


def _read(path: str) -> str | None:
    # plain system calls: the first clone of a pod runs them all on a cold TCG cache
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode().strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _write(path: str, text: str) -> bool:
    try:
        # O_TRUNC as a shell's redirection: sysfs and procfs ignore it
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, text.encode())
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _int(text: str | None) -> int | None:
    try:
        return int(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def parse_cpu_list(text: str) -> set[int]:
    """CPU numbers of a kernel CPU list such as ``0-2,5`` (empty text: none)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus(cpu_dir: str = CPU_DIR) -> set[int]:
    return parse_cpu_list(_read(f"{cpu_dir}/online") or "")


def offline_cpus(cpu_dir: str = CPU_DIR) -> list[int]:
    """Present vCPUs that are offline (hot-added ones until onlined), in order."""
    found = []
    for name in os.listdir(cpu_dir):
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        # cpu0 has no online file; a vCPU being added may not have it yet
        if _read(f"{cpu_dir}/{name}/online") == "0":
            found.append(int(name[3:]))
    return sorted(found)


def online_cpu(cpu: int, cpu_dir: str = CPU_DIR) -> bool:
    """Bring ``cpu`` online (returns once the kernel has); False if it cannot yet."""
    return _write(f"{cpu_dir}/cpu{cpu}/online", "1")


def cpu_added(message: bytes) -> int | None:
    """The vCPU a kernel uevent announces as added (``add@/devices/system/cpu/cpuN``)."""
    head = message.split(b"\0", 1)[0]
    prefix = b"add@/devices/system/cpu/cpu"
    if head.startswith(prefix) and head[len(prefix) :].isdigit():
        return int(head[len(prefix) :])
    return None


def size_changed(message: bytes) -> bool:
    """Whether a kernel uevent says the guest's size may have grown: a memory block or
    a vCPU online (a vCPU the watcher onlines itself reports its own ``online``)."""
    head = message.split(b"\0", 1)[0]
    return head.startswith((b"online@/devices/system/memory/", b"online@/devices/system/cpu/"))


class CpuWatcher:
    """Onlines every vCPU the kernel adds, as udev's rule does on a distribution, and
    sets ``grown`` whenever a memory block or vCPU comes online (``wait_for_size``)."""

    def __init__(self, cpu_dir: str = CPU_DIR) -> None:
        # the C module alone: socket.py would pull enum into the agent's first hello
        import _socket

        self.cpu_dir = cpu_dir
        self.grown = threading.Event()
        self._sock = _socket.socket(
            _socket.AF_NETLINK, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
        )
        self._sock.bind((0, 1))  # the kernel's uevent group
        threading.Thread(target=self._run, name="cpu-hotplug", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                message, (sender, _groups) = self._sock.recvfrom(8192)
            except OSError:
                time.sleep(0.1)  # ENOBUFS after a burst: the hotplug request catches up
                continue
            if sender != 0:  # the kernel's, no one else's
                continue
            cpu = cpu_added(message)
            if cpu is not None:
                online_cpu(cpu, self.cpu_dir)
            elif size_changed(message):
                self.grown.set()


def mem_total_kib(meminfo: str | None = None) -> int:
    """The guest's MemTotal in KiB: from ``sysinfo(2)`` (glibc's physical pages), the
    figure /proc/meminfo prints without the rest of it; or read from ``meminfo``."""
    if meminfo is None:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    text = _read(meminfo) or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def wait_for_size(
    vcpus: int,
    mem_total: int,
    timeout: float,
    *,
    cpu_dir: str = CPU_DIR,
    meminfo: str | None = None,
    grown: threading.Event | None = None,
) -> HotplugResult:
    """Online hot-added vCPUs until ``vcpus`` are online, and wait until MemTotal is at
    least ``mem_total`` KiB; at most ``timeout`` seconds (then DEADLINE_EXCEEDED saying
    what the guest has). Checks again every ``POLL_S``, and at once when ``grown`` is
    set (``CpuWatcher``). Returns the guest's vCPUs, MemTotal and the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if grown is not None:
            grown.clear()  # before looking: a change from now on wakes the wait below
        online = len(online_cpus(cpu_dir))
        if online < vcpus:
            for cpu in offline_cpus(cpu_dir):
                if online >= vcpus:
                    break
                if online_cpu(cpu, cpu_dir):
                    online += 1
        memory = mem_total_kib(meminfo)
        if online >= vcpus and memory >= mem_total:
            return HotplugResult(
                vcpus=online, mem_total_kib=memory, seconds=time.monotonic() - started
            )
        if time.monotonic() > deadline:
            raise OpError(
                DEADLINE_EXCEEDED,
                f"after {timeout:.0f} s the guest has {online} of {vcpus} vCPUs online and "
                f"MemTotal {memory} of {mem_total} KiB",
            )
        if grown is not None:
            grown.wait(POLL_S)
        else:
            time.sleep(POLL_S)


def cold_boot_kib(mem_total: int, template_mem_total: int, offset: int) -> int:
    """The memory a VM booted whole with the RAM this one has now would have counted
    when its kernel sized its limits: the MemTotal now, less the memory map of what was
    plugged (a cold boot reserves it out of MemTotal) and less what the kernel freed
    after sizing (``offset``: its init sections and the initramfs)."""
    plugged = max(0, mem_total - template_mem_total)
    return mem_total - plugged // KIB_PER_MAPPED_KIB - offset


def grown_limits(
    mem_total: int, template_mem_total: int, current: Mapping[str, str]
) -> dict[str, str]:
    """The sysctls (paths below /proc/sys) a guest booted with ``template_mem_total``
    KiB and now holding ``mem_total`` gets raised to: each what the kernel's boot-time
    formula gives for ``mem_total``, where that is more than ``current`` (the values
    now, as the template's boot left them; ``vm/min_free_kbytes`` read after the memory
    and huge pages are online). The kernel sized them before it freed its init memory
    and the initramfs: that offset is the template's MemTotal less what its
    thread limit accounts for, and is taken off ``mem_total`` too."""
    base_threads = _int(current.get("kernel/threads-max"))
    if not base_threads or mem_total <= template_mem_total:
        return {}
    offset = max(0, template_mem_total - base_threads * KIB_PER_THREAD)
    boot = cold_boot_kib(mem_total, template_mem_total, offset)
    threads = max(20, boot // KIB_PER_THREAD)
    wanted: dict[str, int | tuple[int, int, int]] = {
        "kernel/threads-max": threads,
        "fs/file-max": max(8192, boot // 10),  # fs/file_table.c: 10% of RAM in KiB
        # fs/notify/inotify: RAM/100 over a watch's cost, within [8192, 1048576]
        "fs/inotify/max_user_watches": min(
            1048576, max(8192, (boot // 4 // 100) * 4096 // INOTIFY_WATCH_COST)
        ),
    }
    for name in NAMESPACE_LIMITS:
        wanted[name] = threads // 2  # kernel/fork.c: half the thread limit each
    base_epoll = _int(current.get("fs/epoll/max_user_watches"))
    if base_epoll:
        # fs/eventpoll.c: RAM/25 over an item's cost: in proportion to RAM
        wanted["fs/epoll/max_user_watches"] = base_epoll * boot // (template_mem_total - offset)
    min_free = _int(current.get("vm/min_free_kbytes")) or 0
    # net/ipv4: memory above the high watermarks (1.5 times min_free_kbytes), in pages,
    # over 16 for TCP and 8 for UDP
    free_buffer_pages = max(0, boot - min_free * 3 // 2) // 4
    for name, divisor in (("net/ipv4/tcp_mem", 16), ("net/ipv4/udp_mem", 8)):
        limit = max(128, free_buffer_pages // divisor)
        wanted[name] = (limit // 4 * 3, limit, limit // 4 * 3 * 2)
    if "net/netfilter/nf_conntrack_max" in current:
        # net/netfilter/nf_conntrack_core.c: as many connections as the table it sizes
        # (an 8-byte bucket per 128 KiB of RAM, in whole pages of buckets). The table
        # itself keeps the template's size (resizing it waits for an RCU grace period
        # on every vCPU): longer chains, the same limit.
        pages = boot // 4
        if pages > 4 * 262144:
            wanted["net/netfilter/nf_conntrack_max"] = 262144
        elif pages > 262144:
            wanted["net/netfilter/nf_conntrack_max"] = 65536
        else:
            buckets = pages * 4096 // 16384 // 8
            wanted["net/netfilter/nf_conntrack_max"] = max(1024, -(-buckets // 512) * 512)
    raised: dict[str, str] = {}
    for name, value in wanted.items():
        have = current.get(name)
        if have is None:
            continue
        now = [int(v) for v in have.split()]
        new = list(value) if isinstance(value, tuple) else [value]
        if len(now) == len(new) and new[0] > now[0]:
            raised[name] = " ".join(str(v) for v in new)
    return raised


def grow_boot_limits(
    template_mem_total: int,
    mem_total: int,
    *,
    sysctl_dir: str = SYSCTL_DIR,
    thp_dir: str = THP_DIR,
) -> list[str]:
    """Raise what the kernel sized from its boot memory to what ``mem_total`` KiB gives
    (``grown_limits``); also turn transparent huge pages on as a VM booted that big has
    them, and give the agent (so every process it starts later) the process and pending
    signal limits of such a VM. Returns what changed."""
    changed = []
    threads_now = _int(_read(f"{sysctl_dir}/kernel/threads-max")) or 0
    offset = max(0, template_mem_total - threads_now * KIB_PER_THREAD)
    if (
        cold_boot_kib(mem_total, template_mem_total, offset) >= THP_MIN_KIB
        and template_mem_total - offset < THP_MIN_KIB
        and "[never]" in (_read(f"{thp_dir}/enabled") or "")
    ):
        for name, value in THP_DEFAULTS:
            if _write(f"{thp_dir}/{name}", value):
                changed.append(f"transparent_hugepage/{name}")
    names = (
        "kernel/threads-max",
        "fs/file-max",
        "fs/inotify/max_user_watches",
        "fs/epoll/max_user_watches",
        "vm/min_free_kbytes",
        "net/ipv4/tcp_mem",
        "net/ipv4/udp_mem",
        "net/netfilter/nf_conntrack_max",
        *NAMESPACE_LIMITS,
    )
    current: dict[str, str] = {}
    for name in names:
        text = _read(f"{sysctl_dir}/{name}")
        if text is not None:
            current[name] = text
    raised = grown_limits(mem_total, template_mem_total, current)
    for name, value in raised.items():
        if _write(f"{sysctl_dir}/{name}", value):
            changed.append(name)
    threads = _int(raised.get("kernel/threads-max"))
    if threads:
        half = threads // 2
        for limit, name in (
            (resource.RLIMIT_NPROC, "RLIMIT_NPROC"),
            (resource.RLIMIT_SIGPENDING, "RLIMIT_SIGPENDING"),
        ):
            hard = resource.getrlimit(limit)[1]
            if hard != resource.RLIM_INFINITY and hard < half:
                resource.setrlimit(limit, (half, half))
                changed.append(name)
    return changed
