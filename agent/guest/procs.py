"""Child processes: one reaper for every child (the agent is PID 1 or a subreaper).

Nothing else in the agent may call wait(): the reaper collects every child, including
orphans re-parented to the agent (container init processes once crun exits), and hands
each status to whoever watches that pid.
"""

# try/except/pass is used instead of contextlib.suppress to keep contextlib out of the
# guest start-up imports.
# ruff: noqa: SIM105

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# Signals the agent may leave ignored (SIGINT as PID 1; SIGPIPE and SIGXFSZ, ignored by
# Python itself): children get the default actions back.
_RESET_SIGNALS = (2, 13, 25)
_MAX_UNCLAIMED = 4096
# With no child, the reaper sleeps until the Spawner starts one; it looks again this
# often for children started otherwise (a host mount's fork, which waits for its own).
# Each look wakes the guest, and idle guests' wake-ups cost the host CPU under TCG.
_NO_CHILD_CHECK_S = 60.0


class Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[int, Callable[[int], None]] = {}
        self._unclaimed: dict[int, int] = {}
        self._children = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def child_started(self) -> None:
        self._children.set()

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(raw_status)`` (in the reaper thread) when pid exits."""
        with self._lock:
            status = self._unclaimed.pop(pid, None)
            if status is None:
                self._watchers[pid] = callback
                return
        callback(status)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """Block until pid exits; return its raw status (None on timeout)."""
        done = threading.Event()
        result: list[int] = []

        def record(status: int) -> None:
            result.append(status)
            done.set()

        self.watch(pid, record)
        if not done.wait(timeout):
            with self._lock:
                if self._watchers.get(pid) is record:
                    del self._watchers[pid]
            if not result:
                return None
        return result[0]

    def _run(self) -> None:
        while True:
            self._children.clear()
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._children.wait(_NO_CHILD_CHECK_S)
                continue
            except InterruptedError:
                continue
            with self._lock:
                callback = self._watchers.pop(pid, None)
                if callback is None:
                    if len(self._unclaimed) >= _MAX_UNCLAIMED:
                        self._unclaimed.pop(next(iter(self._unclaimed)))
                    self._unclaimed[pid] = status
            if callback is not None:
                try:
                    callback(status)
                except Exception as exc:  # a watcher bug must not kill the reaper
                    os.write(
                        2, f"clearcri-agent: exit callback for {pid} failed: {exc!r}\n".encode()
                    )


def decode_status(status: int) -> tuple[int, int]:
    """Raw wait status -> (exit code, signal); a signal death gives code 128 + signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), 0
    return 255, 0


def which(name: str, path: str | None = None) -> str | None:
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    for directory in (path or os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")).split(":"):
        candidate = f"{directory}/{name}"
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


class Spawner:
    """Start programs with posix_spawn (no fork of a threaded Python process)."""

    def __init__(self, reaper: Reaper, env: dict[str, str] | None = None) -> None:
        self.reaper = reaper
        self.env = (
            env
            if env is not None
            else {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        )

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        setsid: bool = False,
    ) -> int:
        """Start argv with the given fds as 0/1/2 (None: /dev/null); return its pid."""
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = []
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            if fd is None:
                actions.append((os.POSIX_SPAWN_OPEN, target, "/dev/null", os.O_RDWR, 0))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            self.env,
            file_actions=actions,
            setsigdef=_RESET_SIGNALS,
            setsid=setsid,
        )
        self.reaper.child_started()
        return pid

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run to completion; return (exit code, stdout, stderr). Output is read fully."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = self.spawn(argv, stdin=stdin, stdout=out_w, stderr=err_w)
        finally:
            os.close(out_w)
            os.close(err_w)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        try:
            _drain({out_r, err_r}, chunks, time.monotonic() + timeout if timeout else None)
        finally:
            os.close(out_r)
            os.close(err_r)
        status = self.reaper.wait(pid, timeout)
        if status is None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            status = self.reaper.wait(pid) or 0
        code, _sig = decode_status(status)
        return code, b"".join(chunks[out_r]), b"".join(chunks[err_r])


def _drain(fds: set[int], chunks: dict[int, list[bytes]], deadline: float | None) -> None:
    import select

    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    open_fds = set(fds)
    while open_fds:
        wait_ms = None
        if deadline is not None:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if wait_ms == 0:
                return
        for fd, _events in poller.poll(wait_ms):
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
