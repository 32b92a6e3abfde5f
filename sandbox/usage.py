"""What a pod costs the host, read in one place: a process's memory (PSS, the RSS split,
KSM-merged pages) and CPU time from /proc (a pod VM's QEMU), a cgroup's accounting (a
host pod). The sandboxes (``pod_usage``, ``host_memory``) and the metrics read these."""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from sandbox.api import PodUsage
from sandbox.cgroups import CGROUP_ROOT

PROC = Path("/proc")
PAGE_SIZE = mmap.PAGESIZE
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessMemory:
    pss: int = 0
    rss: int = 0
    pss_anon: int = 0
    pss_file: int = 0
    pss_shmem: int = 0
    rss_anon: int = 0
    rss_file: int = 0
    rss_shmem: int = 0
    ksm_merging: int = 0  # bytes of this process's memory merged by KSM


SMAPS_FIELDS = {
    "Pss": "pss",
    "Rss": "rss",
    "Pss_Anon": "pss_anon",
    "Pss_File": "pss_file",
    "Pss_Shmem": "pss_shmem",
}
STATUS_FIELDS = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}


def read_process_memory(pid: int, proc: Path = PROC) -> ProcessMemory | None:
    """PSS and its split (smaps_rollup), the RSS split (status) and KSM-merged bytes of
    ``pid``; None when it is gone."""
    base = proc / str(pid)
    values: dict[str, int] = {}
    try:
        for name, fields in (("smaps_rollup", SMAPS_FIELDS), ("status", STATUS_FIELDS)):
            for line in (base / name).read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in fields:
                    values[fields[key]] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    with contextlib.suppress(OSError, ValueError):
        values["ksm_merging"] = int((base / "ksm_merging_pages").read_text().strip()) * PAGE_SIZE
    return ProcessMemory(**values)


def process_cpu_ns(pid: int, proc: Path = PROC) -> int | None:
    """utime + stime of ``pid`` in nanoseconds (None when it is gone)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    return ticks * 1_000_000_000 // CLOCK_TICKS


def _keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def read_cgroup_usage(mode: str, parent: str, root: Path = CGROUP_ROOT) -> PodUsage | None:
    """A cgroup's accounting (``mode`` v2, v1, or anything else: none; ``parent`` its
    path below the hierarchy roots): cgroup v2 ``cpu.stat``/``memory.*`` or the v1
    ``cpuacct`` and ``memory`` hierarchies. Working set is usage minus inactive file
    pages, as kubelet computes it. None without cgroups or when they are gone."""
    rel = parent.strip("/")
    try:
        if mode == "v2":
            base = root / rel
            cpu_ns = _keyed(base / "cpu.stat").get("usage_usec", 0) * 1000
            usage = int((base / "memory.current").read_text())
            stat = _keyed(base / "memory.stat")
            inactive, rss = stat.get("inactive_file", 0), stat.get("anon", 0)
        elif mode == "v1":
            cpu_ns = int((root / "cpuacct" / rel / "cpuacct.usage").read_text())
            usage = int((root / "memory" / rel / "memory.usage_in_bytes").read_text())
            stat = _keyed(root / "memory" / rel / "memory.stat")
            inactive, rss = stat.get("total_inactive_file", 0), stat.get("total_rss", 0)
        else:
            return None
    except (OSError, ValueError):
        return None
    return PodUsage(cpu_ns, usage, max(0, usage - inactive), rss)
