"""Resource limits of running containers (UpdateContainerResources): cgroup v2 files,
or the cgroup v1 hierarchies of a host pod."""

from __future__ import annotations

import os

from agent.guest.errors import invalid, not_found
from agent.protocol import CgroupUpdate

#: CgroupUpdate field -> cgroup v2 file
CGROUP_FILES = {
    "cpu_max": "cpu.max",
    "cpu_weight": "cpu.weight",
    "memory_max": "memory.max",
    "memory_swap_max": "memory.swap.max",
    "pids_max": "pids.max",
    "cpuset_cpus": "cpuset.cpus",
    "cpuset_mems": "cpuset.mems",
}


def cgroup_update(raw: object) -> CgroupUpdate:
    """The CgroupUpdate of a request's ``resources``. Unlike other records, a field this
    agent does not know is refused (INVALID_ARGUMENT): ignoring it would leave a limit
    the host asked for unset."""
    if not isinstance(raw, dict):
        raise invalid("resources must be an object")
    values: dict[str, str] = {}
    for key, value in raw.items():
        if key not in CGROUP_FILES:
            raise invalid(f"unknown resource {key!r}")
        if value is None:
            continue
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise invalid(f"resource {key}: {value!r} is not a cgroup value")
        values[key] = str(value)
    update: CgroupUpdate = CgroupUpdate.from_dict(values)
    return update


def update_cgroup(cgroup_dir: str | None, update: CgroupUpdate) -> None:
    """Write cgroup v2 limits of a running container."""
    if cgroup_dir is None or not os.path.isdir(cgroup_dir):
        raise not_found("the container has no cgroup to update")
    for key, value in update.to_dict().items():
        path = os.path.join(cgroup_dir, CGROUP_FILES[key])
        if not os.path.exists(path):
            continue  # controller not enabled in this guest
        with open(path, "w") as f:
            f.write(value)


def update_cgroup_v1(root: str, cgroup_path: str | None, update: CgroupUpdate) -> None:
    """Write the same limits as :func:`update_cgroup` into cgroup v1 hierarchies."""
    if cgroup_path is None or not os.path.isdir(f"{root}/memory{cgroup_path}"):
        raise not_found("the container has no cgroup to update")
    writes: list[tuple[str, str]] = []
    if update.cpu_max is not None:
        quota, _, period = update.cpu_max.partition(" ")
        writes.append(("cpu/cpu.cfs_period_us", period or "100000"))
        writes.append(("cpu/cpu.cfs_quota_us", "-1" if quota == "max" else quota))
    if update.cpu_weight is not None:
        # the inverse of the shares -> weight mapping of the CRI layer
        try:
            shares = 2 + ((int(update.cpu_weight) - 1) * 262142) // 9999
        except ValueError:
            raise invalid(f"cpu_weight {update.cpu_weight!r} is not a number") from None
        writes.append(("cpu/cpu.shares", str(shares)))
    if update.memory_max is not None:
        memory = update.memory_max
        writes.append(("memory/memory.limit_in_bytes", "-1" if memory == "max" else memory))
    if update.pids_max is not None:
        writes.append(("pids/pids.max", update.pids_max))
    if update.cpuset_cpus is not None:
        writes.append(("cpuset/cpuset.cpus", update.cpuset_cpus))
    if update.cpuset_mems is not None:
        writes.append(("cpuset/cpuset.mems", update.cpuset_mems))
    # memory_swap_max has no v1 file of its own (memsw is memory plus swap)
    for rel, value in writes:
        controller, _, name = rel.partition("/")
        path = f"{root}/{controller}{cgroup_path}/{name}"
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write(value)
