"""Volumes kubelet writes atomically (ConfigMap, Secret, projected, downward API), kept
in step inside the guest so that inotify fires in the container when they change.

The pod's 9p share shows the host's files live, but a 9p client hears nothing of
changes made on the host: a program in the container that watches its ConfigMap with
inotify would never wake up. For these read-only volumes the container therefore gets
a guest copy on tmpfs (beside its bundle) that this module keeps in step with the share:
twice a second it reads the share's ``..data`` link (one 9p round trip per volume) and,
when kubelet has swapped in a new version, replays kubelet's own steps on the copy —
the new timestamped directory, a ``..data_tmp`` link renamed over ``..data``, the
user-visible links, the old version removed — so the container sees the same inotify
events as a process on the host would.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time

from agent.guest.errors import invalid

DATA = "..data"
DATA_TMP = "..data_tmp"
#: How often the share is checked for a new version (seconds).
POLL_INTERVAL = 0.5


def _copy_tree(source: str, dest: str) -> None:
    """Copy ``source`` to ``dest`` with modes and owners (symlinks as symlinks)."""
    st = os.lstat(source)
    os.mkdir(dest, stat.S_IMODE(st.st_mode) | 0o700)
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(dest, name)
        entry = os.lstat(src)
        if stat.S_ISDIR(entry.st_mode):
            _copy_tree(src, dst)
            continue
        if stat.S_ISLNK(entry.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(entry.st_mode):
            shutil.copyfile(src, dst, follow_symlinks=False)
            os.chmod(dst, stat.S_IMODE(entry.st_mode))
        else:
            continue  # kubelet writes only files, directories and links
        os.lchown(dst, entry.st_uid, entry.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    os.lchown(dest, st.st_uid, st.st_gid)


def _replace_link(directory: str, name: str, target: str) -> None:
    """Point ``directory/name`` at ``target`` by renaming a new link over it."""
    tmp = os.path.join(directory, f"{name}.clearcri-tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, os.path.join(directory, name))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def sync(source: str, mirror: str) -> bool:
    """Bring ``mirror`` to the version ``source`` shows; True when anything changed."""
    version = os.readlink(os.path.join(source, DATA))
    if not version.startswith("..") or "/" in version or version in ("..", DATA, DATA_TMP):
        raise ValueError(f"{source}/{DATA} points at {version!r}")
    changed = False
    if not os.path.isdir(mirror):
        st = os.stat(source)
        os.makedirs(mirror)
        os.chmod(mirror, stat.S_IMODE(st.st_mode))
        changed = True
    current = os.readlink(os.path.join(mirror, DATA)) if os.path.islink(f"{mirror}/{DATA}") else ""
    if current != version:
        staged = os.path.join(mirror, version)
        _remove(staged)
        _copy_tree(os.path.join(source, version), staged)
        _replace_link(mirror, DATA, version)  # kubelet's ..data_tmp -> ..data rename
        changed = True
    names = {n for n in os.listdir(source) if not n.startswith("..")}
    for name in sorted(names):
        path = os.path.join(source, name)
        if os.path.islink(path):
            target = os.readlink(path)
            mine = os.path.join(mirror, name)
            if not os.path.islink(mine) or os.readlink(mine) != target:
                _replace_link(mirror, name, target)
                changed = True
    for name in os.listdir(mirror):
        stale_name = not name.startswith("..") and name not in names
        old_version = name.startswith("..") and name not in (DATA, version)
        if stale_name or old_version:
            _remove(os.path.join(mirror, name))
            changed = True
    return changed


class WatchedVolumes:
    """The guest copies of a pod's atomically written volumes and their poller."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self._pairs: dict[str, str] = {}  # mirror -> source
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, source: str, mirror: str) -> None:
        """Make ``mirror`` a copy of ``source`` and keep it in step from now on."""
        try:
            sync(source, mirror)
        except (OSError, ValueError) as exc:
            raise invalid(f"cannot follow volume {source}: {exc}") from exc
        with self._lock:
            self._pairs[mirror] = source
            # none yet, it stopped (nothing was followed), or it died
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="watched-volumes", daemon=True
                )
                self._thread.start()

    def remove_under(self, prefix: str) -> None:
        """Forget the copies below ``prefix`` (a container's bundle being removed)."""
        top = prefix.rstrip("/") + "/"
        with self._lock:
            for mirror in [m for m in self._pairs if m.startswith(top)]:
                del self._pairs[mirror]

    def poll_once(self) -> int:
        """Sync every copy once; returns how many changed."""
        with self._lock:
            pairs = list(self._pairs.items())
        changed = 0
        for mirror, source in pairs:
            try:
                changed += sync(source, mirror)
            except Exception:
                # the pod is going away, kubelet is mid-write, or anything else: this
                # thread follows every watched volume of the VM, so whatever one raises,
                # the others stay in step and this one is tried next round
                continue
        return changed

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._pairs:
                    # nothing to follow: no wake-ups for an idle pod; add() starts anew
                    self._thread = None
                    return
            self.poll_once()
