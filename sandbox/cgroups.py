"""Cgroups on the host: a pod VM's host processes under the pod's cgroup parent, a host
pod's tree (made, killed, removed), the one parser of kubelet's cgroup parents.

kubelet creates one cgroup per pod (its QoS class, pod overhead and limits) and expects
the runtime to run the pod's processes below it, so that its accounting (cAdvisor) and
limits cover them. For a pod VM those processes are QEMU's: the VM goes into
``<cgroup parent>/clearcri-<sandbox id>`` in every hierarchy the host mounts (cgroup v2,
or each v1 controller), for both the cgroupfs driver (a path) and the systemd driver
(a slice name such as ``kubepods-besteffort-pod123.slice``, expanded to its path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox.api import SandboxError

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupError(SandboxError):
    """The VM could not be placed in its pod's cgroup."""


def systemd_slice_path(name: str) -> str:
    """``a-b-c.slice`` → ``a.slice/a-b.slice/a-b-c.slice`` (systemd's slice nesting)."""
    if name == "-.slice":  # the root slice
        return ""
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


def parent_problem(parent: str, driver: str) -> str | None:
    """What is wrong with a pod's cgroup parent (kubelet's, from a CRI request), or None."""
    if not parent:
        return None
    if len(parent.encode()) > 4096 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in parent):
        return f"cgroup parent {parent[:60]!r} is too long or holds a control character"
    try:
        parent_path(parent, driver)
    except CgroupError as exc:
        return str(exc)
    return None


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
    move_charges: bool = False,
) -> VmCgroup:
    """Move every thread of ``pid`` into the pod's VM cgroup in every hierarchy. The
    levels of the pod's parent that did not exist are the VM's too (removed with it, once
    empty): kubelet makes the parent first, a bare CRI client may not. ``move_charges``:
    the memory ``pid`` already holds is charged to the pod from now on (cgroup v1
    leaves it with the cgroup it was charged in unless asked; v2 never moves it)."""
    rel = relative_path(parent, driver, sandbox_id)
    made: list[Path] = []  # deepest first: the order they are removed in
    try:
        for root in roots if roots is not None else hierarchies():
            path = root / rel
            created = make_cgroup(root, rel)
            made[:0] = [path] + [p for p in reversed(created) if p != path]
            procs = path / "cgroup.procs"
            if move_charges:
                with contextlib.suppress(OSError):
                    (path / "memory.move_charge_at_immigrate").write_text("3\n")
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


# ------------------------------------------------------------------ a host pod's tree


def cgroup_layout(root: Path = CGROUP_ROOT) -> str:
    """ "v2" (unified), "hybrid" (v1 controllers plus a v2 mount at unified/), "v1",
    or "none"."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "memory" / "cgroup.procs").exists():
        return "hybrid" if (root / "unified" / "cgroup.controllers").exists() else "v1"
    return "none"


def pod_tree_path(parent: str, driver: str, sandbox_id: str) -> str:
    """The absolute cgroup path of a host pod's tree (its containers and agent) from
    kubelet's ``cgroup_parent`` (see parent_path; the systemd driver's slices are driven
    with crun's cgroupfs manager, so no systemd is needed). No parent, or the root
    slice: ``/clearcri/<sandbox id>``."""
    path = parent_path(parent, driver) if parent else ""
    return f"/{path}" if path else f"/clearcri/{sandbox_id}"


def hierarchies_under(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every cgroup hierarchy mounted under ``root`` (the root itself for v2)."""
    if (root / "cgroup.procs").exists():
        return [root]
    out = []
    with contextlib.suppress(OSError):
        for entry in sorted(root.iterdir()):
            real = not entry.is_symlink() and entry.name != "unified"
            if real and (entry / "cgroup.procs").exists():
                out.append(entry)
    return out


def missing_cgroup_dirs(path: str, root: Path = CGROUP_ROOT) -> list[str]:
    """The components of ``path`` that do not exist yet (outermost first), checked in the
    memory hierarchy (or the v2 root): what removing the pod should remove again."""
    hierarchies = hierarchies_under(root)
    probe = next((h for h in hierarchies if h.name == "memory"), None) or (
        hierarchies[0] if hierarchies else None
    )
    if probe is None:
        return []
    missing = []
    current = ""
    for part in [p for p in path.split("/") if p]:
        current += "/" + part
        if not (probe / current.lstrip("/")).exists():
            missing.append(current)
    return missing


def kill_cgroup_tree(path: str, root: Path = CGROUP_ROOT, rounds: int = 20) -> int:
    """SIGKILL every process in the cgroup ``path`` and below (every hierarchy);
    returns how many were signalled. Blocking."""
    killed = 0
    for _ in range(rounds):
        pids: set[int] = set()
        for hierarchy in hierarchies_under(root):
            base = hierarchy / path.lstrip("/")
            for dirpath, _dirs, _files in os.walk(base):
                with contextlib.suppress(OSError, ValueError):
                    text = Path(dirpath, "cgroup.procs").read_text()
                    pids.update(int(x) for x in text.split())
        pids.discard(os.getpid())
        if not pids:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    return killed


def remove_cgroup_tree(path: str, root: Path = CGROUP_ROOT, *, keep_base: bool = False) -> None:
    """rmdir every cgroup below ``path`` (and ``path`` itself unless ``keep_base``) in
    every hierarchy. Blocking."""
    for hierarchy in hierarchies_under(root):
        base = hierarchy / path.lstrip("/")
        if not base.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
            if keep_base and Path(dirpath) == base:
                continue
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
