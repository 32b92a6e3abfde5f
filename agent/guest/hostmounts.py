"""Host paths for the containers of a host pod, cloned from the host's mount namespace.

A host pod's agent lives in a mount namespace of its own (its image mounts, overlays and
the pod's /dev/shm stay out of the host's), created when the pod started. Bind-mounting
a host path from there would show the container the host's mounts *as they were then*:
a volume mounted by kubelet later, a tmpfs under a hostPath, or a mount that should
propagate (``rslave``/``rshared``) would be missing.

So each host-path mount of a container is cloned from the host's namespace at container
creation: a forked child joins the host namespace (the agent keeps a descriptor of it),
clones the path's whole mount tree with ``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)``,
returns to the agent's namespace and attaches the clone at a staging point in the
container's bundle with ``move_mount``. The clone keeps the source's propagation: a
clone of a shared mount is its peer, so with the container's ``rslave``/``rshared``
options host mounts reach the container (and back, for ``rshared``) as under runc on the
host. The fork is needed because a thread cannot change mount namespace while other
threads share its filesystem context.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat

from agent.mountapi import (
    AT_RECURSIVE,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
    MountApiError,
    libc,
    move_mount,
    open_tree,
    raw_syscall,
    set_idmap,
)

CLONE_NEWNS = 0x00020000


class HostMountError(MountApiError):
    pass


def _clone_in_child(
    host_ns: int, agent_ns: int, source: str, target: str, userns_fd: int | None
) -> str | None:
    """Runs in the forked child. Returns an error message or None."""
    lib = libc()
    if lib.setns(host_ns, CLONE_NEWNS) != 0:
        return f"join the host's mount namespace: {os.strerror(ctypes.get_errno())}"
    try:
        tree = open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
        if userns_fd is not None:
            set_idmap(tree, userns_fd, recursive=True)
    except HostMountError as exc:
        return f"host path: {exc.strerror}"
    is_dir = stat.S_ISDIR(os.fstat(tree).st_mode)
    if lib.setns(agent_ns, CLONE_NEWNS) != 0:
        return f"return to the agent's mount namespace: {os.strerror(ctypes.get_errno())}"
    try:
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a"):
                pass
    except OSError as exc:
        return f"create mount point {target}: {exc}"
    try:
        move_mount(tree, target)
    except HostMountError as exc:
        return f"{source}: {exc.strerror}"
    return None


#: What the child writes first on success; anything else is an error message.
_DONE = b"\0"


def clone_host_path(host_ns: int, source: str, target: str, userns_path: str | None = None) -> None:
    """Mount the host's ``source`` (its whole mount tree, as the host sees it now) at
    ``target`` in the agent's namespace. ``target`` is created as a directory or file.
    With ``userns_path`` (the pod's user namespace) the clone is idmapped by it.

    The child reports through a pipe, not its exit status: the agent reaps every child
    itself (it is PID 1 or a subreaper), so the status may be gone before we ask."""
    if not source.startswith("/"):
        raise HostMountError(f"host path {source!r} is not absolute")
    raw_syscall()  # resolve libc in the parent, not after fork
    agent_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    userns = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC) if userns_path else None
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                os.close(r)
                error = _clone_in_child(host_ns, agent_ns, source, target, userns)
                os.write(w, _DONE if error is None else error.encode()[:4000])
            except BaseException as exc:
                os.write(w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        with contextlib.suppress(ChildProcessError):  # reaped by the agent's reaper
            os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        os.close(agent_ns)
        if userns is not None:
            os.close(userns)
    report = b"".join(chunks)
    if report != _DONE:
        raise HostMountError(report.decode(errors="replace") or "the clone child died")
