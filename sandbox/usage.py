"""What a host pod costs the node: its cgroup's accounting (a pod VM's cost is its QEMU
process's, sandbox/procfs.py)."""

from __future__ import annotations

from pathlib import Path

from sandbox.api import PodUsage
from sandbox.cgroups import CGROUP_ROOT


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
