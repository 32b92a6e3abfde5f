"""A pod VM's shared directory: the host paths its containers mount, seen live in the
guest over one virtio-9p device.

The VM's 9p device exports one directory per pod, ``<run_dir>/share``, and nothing
else. Each host path a container mounts (emptyDir, ConfigMap, Secret, projected token,
hostPath, /etc/hosts, the termination-log file) is bind-mounted into that directory
under a key of its own; the agent mounts the share once in the guest (the first time a
container names it, after any template restore) and binds ``<share>/<key>`` into the
container. Reads and writes go to the host's own files, in both directions, at once.

Isolation: the export root is the share directory. Unjailed, it is a private mount of
its own (no bind made here propagates anywhere else); under a jailed VMM
(sandbox/jail.py) it lies in the VM's own directory, whose mount propagates to the
jail and nowhere else. Every bind is made read-only and given its propagation before
it is attached, so the jail's copy is the same. QEMU's local 9p backend resolves every path
relative to the export root without following symlinks on the host, so a guest
cannot walk out with ``..`` or a symlink; what a container sees is what its pod's
mounts hold. Making a bind is a mount syscall: the daemon never reads what it shares,
so /proc, FIFOs or devices cannot block it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from agent.protocol import GUEST_SHARE_DIR
from sandbox import mounts
from sandbox.userns import UserNamespaceError, mapped_user_namespace

KEY_RE = re.compile(r"^[0-9a-z][0-9a-z._-]{0,127}$")

#: Propagation modes a share can honour. A mount made in the guest cannot reach the
#: host, so "rshared" (Bidirectional) is refused by the caller.
PROPAGATIONS = ("rprivate", "rslave")


#: A pod's user namespace mappings: (uid mappings, gid mappings), each a list of
#: [container id, host id, length].
IdMappings = tuple[list[list[int]], list[list[int]]]


class ShareError(Exception):
    """A host path could not be shared (missing, refused by the kernel, ...)."""


def guest_path(key: str) -> str:
    """Where the guest sees the share entry ``key``."""
    return f"{GUEST_SHARE_DIR}/{key}"


class PodShare:
    """The directory a pod VM's 9p device exports. ``vmm_id``: the jailed QEMU's own id
    (None: QEMU runs as root)."""

    def __init__(self, root: Path, vmm_id: int | None = None) -> None:
        self.root = root
        self.vmm_id = vmm_id

    def create(self) -> None:
        """Make the export root. Unjailed: a private mount of its own, so that binds
        below it neither propagate out nor receive mounts from elsewhere. Jailed: a
        directory of the VM's own, which already propagates to the jail alone.
        Idempotent."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        if self.vmm_id is None:
            mounts.own_mount(self.root, shared=False)

    def bind(
        self,
        key: str,
        source: Path,
        *,
        readonly: bool,
        propagation: str,
        id_mappings: IdMappings | None = None,
    ) -> str:
        """Bind the host's ``source`` (with its submounts) into the share as ``key``
        and return its guest path. ``propagation``: rprivate or rslave (mounts the host
        makes below ``source`` later appear in the guest). With ``id_mappings`` (a pod
        in a user namespace: its uid and gid mappings) the bind is idmapped: a file the
        host's uid U owns appears owned by U's mapped id, so the containers see it
        owned by U, and what they create belongs to their own ids on the host."""
        if not KEY_RE.match(key):
            raise ShareError(f"bad share key {key!r}")
        if propagation not in PROPAGATIONS:
            raise ShareError(f"a pod VM's share cannot carry {propagation} propagation")
        target = self.root / key
        try:
            st = os.stat(source)  # follows symlinks, as a bind mount does
        except OSError as exc:
            raise ShareError(f"host path {source}: {exc.strerror}") from exc
        try:
            if stat.S_ISDIR(st.st_mode):
                target.mkdir(mode=0o755)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        except FileExistsError:
            raise ShareError(f"share key {key} is in use") from None
        try:
            if id_mappings is None:
                mounts.attach_clone(source, target, readonly=readonly, propagation=propagation)
            else:
                creator = self.vmm_id or 0
                with mapped_user_namespace(*id_mappings, creator=creator) as userns:
                    mounts.attach_clone(
                        source,
                        target,
                        readonly=readonly,
                        propagation=propagation,
                        userns_fd=userns,
                    )
        except (OSError, UserNamespaceError) as exc:
            self._remove_entry(target)
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ShareError(f"cannot share host path {source}: {reason}") from exc
        return guest_path(key)

    def unbind(self, keys: list[str]) -> None:
        """Remove the entries ``keys`` (unknown keys are ignored)."""
        for key in keys:
            if KEY_RE.match(key):
                self._remove_entry(self.root / key)

    def keys(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir())
        except FileNotFoundError:
            return []

    @staticmethod
    def _remove_entry(target: Path) -> None:
        mounts.unmount_under(target)
        if mounts.mounts_under(target):
            raise ShareError(f"{target} is still mounted")
        with contextlib.suppress(FileNotFoundError):
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            else:
                target.unlink()
