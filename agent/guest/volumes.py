"""Files the host copies into the guest for container mounts, and cgroup updates.

There is no shared filesystem between host and VM here, so a CRI mount of a host path
(a ConfigMap, a Secret, /etc/hosts, a termination-log file, an emptyDir) is copied into
the guest at container creation under ``<run>/volumes/<key>/`` and bind-mounted from
there. Copies are snapshots; see docs/rootfs.md.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from agent.guest.errors import invalid, not_found

MAX_TOTAL_BYTES = 64 << 20


def _safe_join(base: str, rel: str) -> str:
    rel = rel.lstrip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise invalid(f"path {rel!r} leaves its volume")
    return os.path.join(base, *parts) if parts else base


def write_files(volumes_dir: str, key: str, entries: list[dict[str, Any]]) -> str:
    """Create ``<volumes_dir>/<key>`` from ``entries`` (type dir, file or symlink, a
    relative path, a mode and base64 data) and return its guest path."""
    if not key or "/" in key or key in (".", ".."):
        raise invalid(f"bad volume key {key!r}")
    base = os.path.join(volumes_dir, key)
    os.makedirs(base, mode=0o755, exist_ok=True)
    total = 0
    for entry in entries:
        path = _safe_join(base, str(entry.get("path", "")))
        kind = entry.get("type", "file")
        mode = int(entry.get("mode", 0o644)) & 0o7777
        uid = int(entry.get("uid", 0))
        gid = int(entry.get("gid", 0))
        if kind == "dir":
            os.makedirs(path, exist_ok=True)
            os.chmod(path, mode or 0o755)
        elif kind == "symlink":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink(str(entry["target"]), path)
            continue
        elif kind == "file":
            data = base64.b64decode(entry.get("data", ""))
            total += len(data)
            if total > MAX_TOTAL_BYTES:
                raise invalid(f"volume {key} is larger than {MAX_TOTAL_BYTES} bytes")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.chmod(path, mode)
        else:
            raise invalid(f"unknown volume entry type {kind!r}")
        os.lchown(path, uid, gid)
    return base


def remove_volumes(volumes_dir: str, keys: list[str]) -> None:
    import shutil

    for key in keys:
        if key and "/" not in key and key not in (".", ".."):
            shutil.rmtree(os.path.join(volumes_dir, key), ignore_errors=True)


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
