"""Process stdio in the guest: output pumps to the host and stdin feeders from it."""

# try/except/pass is used instead of contextlib.suppress to keep contextlib out of the
# guest start-up imports.
# ruff: noqa: SIM105

from __future__ import annotations

import errno
import os
import threading
from collections import deque

from agent.protocol import MAX_DATA_CHUNK, encode_close, encode_data

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.guest.channel import Writer

EOT = b"\x04"


class OutputPump:
    """Copy one fd (pipe or pty master) to the host as DATA frames until EOF."""

    def __init__(self, writer: Writer, stream: int, channel: int, fd: int, *, close: bool) -> None:
        self._writer = writer
        self._stream = stream
        self._channel = channel
        self._fd = fd
        self._close = close
        self.thread = threading.Thread(
            target=self._run, name=f"out-{stream}-{channel}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self._fd, MAX_DATA_CHUNK)
                except InterruptedError:
                    continue
                except OSError as exc:
                    # A pty master reads EIO once every slave fd is closed.
                    if exc.errno in (errno.EIO, errno.EBADF):
                        break
                    raise
                if not chunk:
                    break
                self._writer.send_data(
                    self._stream, encode_data(self._stream, self._channel, chunk)
                )
            self._writer.send(encode_close(self._stream, self._channel))
        finally:
            if self._close:
                try:
                    os.close(self._fd)
                except OSError:
                    pass

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


class StdinFeeder:
    """Write host data to a process's stdin without ever blocking the channel reader.

    Data waits in a bounded queue served by a thread; beyond ``max_bytes`` new data is
    dropped (and counted) rather than stalling every other stream.
    """

    def __init__(self, fd: int, *, tty: bool, max_bytes: int = 1 << 20) -> None:
        self._fd = fd
        self._tty = tty
        self._queue: deque[bytes | None] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self.max_bytes = max_bytes
        self.dropped = 0
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._closed:
                return
            if self._queued + len(data) > self.max_bytes:
                self.dropped += len(data)
                return
            self._queue.append(data)
            self._queued += len(data)
            self._ensure_thread()
            self._cond.notify()

    def close(self) -> None:
        """End of input: close the pipe, or send ^D on a terminal."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.append(None)
            self._ensure_thread()
            self._cond.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stdin", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
                if item is not None:
                    self._queued -= len(item)
            if item is None:
                if self._tty:
                    self._write_all(EOT)
                else:
                    try:
                        os.close(self._fd)
                    except OSError:
                        pass
                return
            if not self._write_all(item):
                with self._cond:
                    self._closed = True
                    self._queue.clear()
                return

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except InterruptedError:
                continue
            except OSError:
                return False
        return True


def set_window_size(fd: int, cols: int, rows: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ConsoleReceiver:
    """A unix socket crun connects to (``--console-socket``) to hand over a pty master."""

    def __init__(self, path: str) -> None:
        import socket

        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._sock.settimeout(30.0)
        self.master_fd: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import socket

        try:
            conn, _addr = self._sock.accept()
            with conn:
                conn.settimeout(30.0)
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
                if not fds:
                    raise OSError("crun sent no terminal fd on the console socket")
                self.master_fd = fds[0]
                os.set_inheritable(fds[0], False)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 5.0) -> int:
        self._thread.join(timeout)
        self.close()
        if self.master_fd is None:
            raise OSError(f"no terminal received from crun: {self.error!r}")
        return self.master_fd

    def close(self) -> None:
        import socket

        try:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
            except OSError:
                pass
            self._sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass
