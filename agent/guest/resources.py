"""Resource limits of running containers (UpdateContainerResources): cgroup v2 files,
or the cgroup v1 hierarchies of a host pod."""

from __future__ import annotations

import os

from agent.guest.errors import invalid, not_found

CGROUP_FILES = {
    "cpu_max": "cpu.max",
    "cpu_weight": "cpu.weight",
    "memory_max": "memory.max",
    "memory_swap_max": "memory.swap.max",
    "pids_max": "pids.max",
    "cpuset_cpus": "cpuset.cpus",
    "cpuset_mems": "cpuset.mems",
}


def update_cgroup(cgroup_dir: str | None, values: dict[str, str]) -> None:
    """Write cgroup v2 limits of a running container."""
    if cgroup_dir is None or not os.path.isdir(cgroup_dir):
        raise not_found("the container has no cgroup to update")
    for key, value in values.items():
        name = CGROUP_FILES.get(key)
        if name is None:
            raise invalid(f"unknown resource {key!r}")
        path = os.path.join(cgroup_dir, name)
        if not os.path.exists(path):
            continue  # controller not enabled in this guest
        with open(path, "w") as f:
            f.write(str(value))


def update_cgroup_v1(root: str, cgroup_path: str | None, values: dict[str, str]) -> None:
    """Write the same limits as :func:`update_cgroup` into cgroup v1 hierarchies."""
    if cgroup_path is None or not os.path.isdir(f"{root}/memory{cgroup_path}"):
        raise not_found("the container has no cgroup to update")
    writes: list[tuple[str, str]] = []
    for key, value in values.items():
        if key == "cpu_max":
            quota, _, period = str(value).partition(" ")
            writes.append(("cpu/cpu.cfs_period_us", period or "100000"))
            writes.append(("cpu/cpu.cfs_quota_us", "-1" if quota == "max" else quota))
        elif key == "cpu_weight":
            # the inverse of the shares -> weight mapping of the CRI layer
            shares = 2 + ((int(value) - 1) * 262142) // 9999
            writes.append(("cpu/cpu.shares", str(shares)))
        elif key == "memory_max":
            writes.append(("memory/memory.limit_in_bytes", "-1" if value == "max" else value))
        elif key == "pids_max":
            writes.append(("pids/pids.max", str(value)))
        elif key == "cpuset_cpus":
            writes.append(("cpuset/cpuset.cpus", str(value)))
        elif key == "cpuset_mems":
            writes.append(("cpuset/cpuset.mems", str(value)))
        elif key not in CGROUP_FILES:
            raise invalid(f"unknown resource {key!r}")
    for rel, value in writes:
        controller, _, name = rel.partition("/")
        path = f"{root}/{controller}{cgroup_path}/{name}"
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write(value)
