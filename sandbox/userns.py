"""A user namespace with a pod's id mappings, held open by a file descriptor: what an
idmapped bind (``mount_setattr(MOUNT_ATTR_IDMAP)``) needs to show host files to a pod in
a user namespace with the ids its containers see them by."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator

#: How long the helper process may take to enter its new namespace.
START_TIMEOUT_S = 5.0


class UserNamespaceError(Exception):
    pass


def with_creator(mappings: list[list[int]], creator: int = 0) -> list[list[int]]:
    """``mappings`` plus one that maps host id ``creator`` (QEMU's own: the jailed VMM's
    id, or root), so that QEMU can create files through an idmapped mount (creation
    needs the creator's ids mapped): the file starts owned by an id above every range
    of the pod, and gets its owner by the chown that follows (QEMU's passthrough)."""
    if any(outer <= creator < outer + length for _, outer, length in mappings):
        return mappings
    spare = max((inner + length for inner, _, length in mappings), default=0)
    if spare >= 2**32 - 1:
        return mappings
    return [*mappings, [spare, creator, 1]]


def _map_lines(mappings: list[list[int]]) -> str:
    return "".join(f"{inner} {outer} {length}\n" for inner, outer, length in mappings)


@contextlib.contextmanager
def mapped_user_namespace(
    uid_mappings: list[list[int]], gid_mappings: list[list[int]], *, creator: int = 0
) -> Iterator[int]:
    """A descriptor of a new user namespace with these mappings (container id, host id,
    length; see ``with_creator``), valid inside the ``with`` block. A short-lived ``unshare --user``
    process makes the namespace; the daemon writes its maps, as root of the parent
    namespace may, and keeps a descriptor of it."""
    helper = subprocess.Popen(
        ["unshare", "--user", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fd = -1
    try:
        own = os.readlink("/proc/self/ns/user")
        ns_link = f"/proc/{helper.pid}/ns/user"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if os.readlink(ns_link) != own:
                    break
            except FileNotFoundError:
                pass
            if helper.poll() is not None or time.monotonic() > deadline:
                raise UserNamespaceError("cannot create a user namespace (unshare --user)")
            time.sleep(0.002)
        try:
            with open(f"/proc/{helper.pid}/uid_map", "w") as f:
                f.write(_map_lines(with_creator(uid_mappings, creator)))
            with open(f"/proc/{helper.pid}/gid_map", "w") as f:
                f.write(_map_lines(with_creator(gid_mappings, creator)))
        except OSError as exc:
            raise UserNamespaceError(f"cannot write the id mappings: {exc.strerror}") from exc
        fd = os.open(ns_link, os.O_RDONLY | os.O_CLOEXEC)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        helper.kill()
        helper.wait()
