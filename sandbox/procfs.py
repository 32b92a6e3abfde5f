"""What a process costs the node, read from /proc in one place: its memory (PSS, the
RSS split, KSM-merged pages) and CPU time. A pod VM's cost is its QEMU process's; the
sandboxes (``pod_usage``) and the metrics read it here (cri/ through sandbox/api.py).
Also whether a process still runs and its command line, for the VMs and the supervisor."""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

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


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for its reaper counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
