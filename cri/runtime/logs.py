"""Container logs on the host in the CRI format.

Each line is ``<RFC3339Nano timestamp> <stdout|stderr> <F|P> <message>``: ``F`` for a
full line, ``P`` for a partial one (a chunk without its newline yet, or a line longer
than the maximum that was split). ReopenContainerLog closes the file and opens the
path again, so a rotated (renamed) file stops growing and a new one is started.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

MAX_LINE = 16 * 1024


def rfc3339_nano(ns: int) -> str:
    """Format a unix time in nanoseconds as RFC 3339 with nanoseconds, UTC."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


class ContainerLog:
    """Writes one container's stdout/stderr into its CRI log file.

    Output arrives in arbitrary chunks per stream; complete lines are written as
    ``F`` records, and an unfinished tail is kept per stream until its newline comes
    (or flushed as ``P`` when it grows past MAX_LINE or the container exits).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self._lock = threading.Lock()
        self.write_errors = 0
        self._open()

    def _open(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # never through a symlink planted where the log goes
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd = os.open(self.path, flags, 0o640)

    def _emit(self, stream: str, tag: str, message: bytes, now_ns: int) -> None:
        if self._fd is None:
            return
        record = f"{rfc3339_nano(now_ns)} {stream} {tag} ".encode() + message + b"\n"
        try:
            os.write(self._fd, record)
        except OSError:
            # A full disk must not stop the container or the daemon; count and go on.
            self.write_errors += 1

    def write(self, stream: str, data: bytes, now_ns: int | None = None) -> None:
        """Add ``data`` from ``stream`` ("stdout" or "stderr")."""
        if stream not in self._pending:
            raise ValueError(f"unknown stream {stream!r}")
        now = now_ns if now_ns is not None else time.time_ns()
        with self._lock:
            buf = self._pending[stream] + data
            while True:
                newline = buf.find(b"\n")
                if newline < 0:
                    break
                line = buf[:newline]
                buf = buf[newline + 1 :]
                while len(line) > MAX_LINE:
                    self._emit(stream, "P", line[:MAX_LINE], now)
                    line = line[MAX_LINE:]
                self._emit(stream, "F", line, now)
            while len(buf) > MAX_LINE:
                self._emit(stream, "P", buf[:MAX_LINE], now)
                buf = buf[MAX_LINE:]
            self._pending[stream] = buf

    def flush(self, now_ns: int | None = None) -> None:
        """Write out unfinished lines as partial records (at container exit)."""
        now = now_ns if now_ns is not None else time.time_ns()
        with self._lock:
            for stream, buf in self._pending.items():
                if buf:
                    self._emit(stream, "P", buf, now)
                    self._pending[stream] = b""

    def reopen(self) -> None:
        """Close the file and open ``path`` anew (after the kubelet renamed it)."""
        with self._lock:
            self._close_fd()
            self._open()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._close_fd()
