"""Put a pod VM's host processes under the pod's cgroup parent.

kubelet creates one cgroup per pod (its QoS class, pod overhead and limits) and expects
the runtime to run the pod's processes below it, so that its accounting (cAdvisor) and
limits cover them. For a pod VM those processes are QEMU's: the VM goes into
``<cgroup parent>/clearcri-<sandbox id>`` in every hierarchy the host mounts (cgroup v2,
or each v1 controller), for both the cgroupfs driver (a path) and the systemd driver
(a slice name such as ``kubepods-besteffort-pod123.slice``, expanded to its path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupError(Exception):
    """The VM could not be placed in its pod's cgroup."""


def systemd_slice_path(name: str) -> str:
    """``a-b-c.slice`` → ``a.slice/a-b.slice/a-b-c.slice`` (systemd's slice nesting)."""
    if not name.endswith(".slice"):
        raise CgroupError(f"systemd cgroup parent {name!r} is not a slice (name.slice)")
    stem = name.removesuffix(".slice")
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem or "/" in stem:
        raise CgroupError(f"bad systemd slice name {name!r}")
    parts = stem.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def hierarchies(mounts: Path = Path("/proc/self/mounts")) -> list[Path]:
    """Mount points of the host's cgroup hierarchies (v2 and each v1 controller)."""
    found = []
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
            found.append(Path(fields[1]))
    return found


@dataclass(frozen=True)
class VmCgroup:
    """The cgroup directories one VM was placed in."""

    paths: tuple[Path, ...]

    def remove(self) -> None:
        """Remove the VM's cgroups (once its processes are gone). Idempotent."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError, OSError):
                path.rmdir()


def make_cgroup(root: Path, rel: str) -> list[Path]:
    """Create ``root/rel`` level by level and return the levels it made, top first; a new
    cpuset cgroup (v1) starts with no CPUs or memory nodes, so it inherits its parent's or
    no process could join it."""
    current = root
    made: list[Path] = []
    for part in rel.split("/"):
        parent, current = current, current / part
        if current.is_dir():
            continue
        current.mkdir()
        made.append(current)
        for name in ("cpuset.cpus", "cpuset.mems"):
            mine = current / name
            if mine.exists() and not mine.read_text().strip():
                mine.write_text((parent / name).read_text())
    return made


def parent_path(parent: str, driver: str) -> str:
    """The pod cgroup's own path (relative to a hierarchy's root)."""
    if driver == "systemd":
        return systemd_slice_path(parent)
    if driver != "cgroupfs":
        raise CgroupError(f"unknown cgroup driver {driver!r}")
    clean = parent.strip("/")
    if ".." in clean.split("/"):
        raise CgroupError(f"cgroup parent {parent!r} leaves the cgroup tree")
    return clean


def relative_path(parent: str, driver: str, sandbox_id: str) -> str:
    """The VM's cgroup below the pod's."""
    base = parent_path(parent, driver)
    if driver == "systemd":
        # a scope, as systemd names the units it puts processes in
        return f"{base}/clearcri-{sandbox_id[:32]}.scope"
    return f"{base}/clearcri-{sandbox_id[:32]}" if base else f"clearcri-{sandbox_id[:32]}"


def place(
    pid: int,
    *,
    parent: str,
    driver: str,
    sandbox_id: str,
    roots: list[Path] | None = None,
) -> VmCgroup:
    """Move every thread of ``pid`` into the pod's VM cgroup in every hierarchy. The
    levels of the pod's parent that did not exist are the VM's too (removed with it, once
    empty): kubelet makes the parent first, a bare CRI client may not."""
    rel = relative_path(parent, driver, sandbox_id)
    made: list[Path] = []  # deepest first: the order they are removed in
    try:
        for root in roots if roots is not None else hierarchies():
            path = root / rel
            created = make_cgroup(root, rel)
            made[:0] = [path] + [p for p in reversed(created) if p != path]
            procs = path / "cgroup.procs"
            try:
                procs.write_text(f"{pid}\n")
            except OSError as exc:
                raise CgroupError(f"cannot move qemu ({pid}) into {path}: {exc}") from exc
    except OSError as exc:
        VmCgroup(tuple(made)).remove()
        raise CgroupError(f"cannot create the VM's cgroup {rel}: {exc}") from exc
    except CgroupError:
        VmCgroup(tuple(made)).remove()
        raise
    return VmCgroup(tuple(made))


def cgroups_of(pid: int) -> list[str]:
    """The cgroup paths of ``pid`` as /proc/<pid>/cgroup lists them."""
    try:
        return [
            line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        ]
    except OSError:
        return []


#: At or above this, a cgroup v1 memory limit means "no limit" (the kernel's page
#: counter maximum, rounded to pages).
UNLIMITED_V1 = 1 << 62


def memory_limit(parent: str, driver: str, roots: list[Path] | None = None) -> int | None:
    """The memory limit (bytes) set on the pod's cgroup ``parent`` — what kubelet gives
    the pod: its containers' limits plus its overhead — or None when it has none or the
    host shows none."""
    if not parent:
        return None
    rel = parent_path(parent, driver)
    for _path, value in _memory_limits(rel, ("memory.max", "memory.limit_in_bytes"), roots):
        return value
    return None


def _memory_limits(
    rel: str, names: tuple[str, ...], roots: list[Path] | None
) -> Iterator[tuple[Path, int | None]]:
    """(file, limit in bytes or None for no limit) for each of the cgroup ``rel``'s files
    ``names`` that exists and reads as a limit, hierarchy by hierarchy."""
    for root in roots if roots is not None else hierarchies():
        for name in names:
            path = root / rel / name
            try:
                text = path.read_text().strip()
            except OSError:
                continue
            if text == "max":
                yield path, None
                continue
            try:
                value = int(text)
            except ValueError:
                continue
            yield path, None if value >= UNLIMITED_V1 else value


def raise_memory_limit(
    parent: str, driver: str, floor: int, roots: list[Path] | None = None
) -> bool:
    """Raise the memory limit of the pod's cgroup ``parent`` to at least ``floor`` bytes
    where it is lower (v1: memory and memory+swap, v2: memory.max). True if it did."""
    rel = parent_path(parent, driver)
    raised = False
    # v1: memory+swap first, it may never be below the memory limit
    names = ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "memory.max")
    for path, value in _memory_limits(rel, names, roots):
        if value is None or value >= floor:
            continue
        try:
            path.write_text(f"{floor}\n")
        except OSError as exc:
            raise CgroupError(f"cannot raise {path} to {floor}: {exc}") from exc
        raised = True
    return raised


def pod_memory_budget(
    parent: str,
    driver: str,
    limits_bytes: int,
    overhead_bytes: int,
    roots: list[Path] | None = None,
) -> int:
    """What a pod's VM and QEMU together may use (bytes; 0: no limit): the tighter of the
    limit kubelet set on the pod's cgroup and what CRI says it sets (the containers'
    limits plus the pod overhead, when every container has a limit)."""
    budgets = []
    if limits_bytes > 0:
        budgets.append(limits_bytes + max(overhead_bytes, 0))
    with contextlib.suppress(CgroupError):
        found = memory_limit(parent, driver, roots)
        if found is not None:
            budgets.append(found)
    return min(budgets) if budgets else 0
