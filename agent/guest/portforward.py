"""Port forwarding in the guest: a TCP connection to a port inside the pod, relayed to the
host as one stream of DATA/CLOSE frames with a byte window each way.

The pod's network namespace is the VM's own, so 127.0.0.1:port (or [::1]:port) reaches
whatever the pod's containers listen on. Imported on first use only.

Per forward: a reader thread (socket -> host, stops while the host's window is used up)
and a writer thread (host -> socket, grants window back after each write).
"""

# try/except/pass is used instead of contextlib.suppress to keep guest imports lean.
# ruff: noqa: SIM105

from __future__ import annotations

import socket
import struct
import threading
from collections import deque

from agent.guest.errors import invalid, precondition
from agent.protocol import (
    CLOSE,
    DATA,
    EVENT,
    EVENT_PORT_FORWARD_CLOSED,
    MAX_DATA_CHUNK,
    PORT_FORWARD_STREAM_BASE,
    PORT_FORWARD_WINDOW,
    STDIN,
    STDOUT,
    WINDOW,
    encode_close,
    encode_data,
    encode_json,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.guest.channel import Writer
    from agent.protocol import Frame

CONNECT_TIMEOUT = 10.0


class Forward:
    def __init__(
        self, owner: PortForwards, stream: int, sock: socket.socket, generation: int
    ) -> None:
        self.owner = owner
        self.writer = owner.writer
        self.stream = stream
        self.sock = sock
        self.generation = generation
        self._cond = threading.Condition()
        self._credit = PORT_FORWARD_WINDOW  # bytes we may still send to the host
        self._incoming: deque[bytes | None] = deque()  # None: end of input
        self._aborted = False
        self._done = 0  # directions finished (2: forget the forward)
        self.error = ""

    def start(self) -> None:
        threading.Thread(target=self._read_loop, name=f"pf-{self.stream}-r", daemon=True).start()
        threading.Thread(target=self._write_loop, name=f"pf-{self.stream}-w", daemon=True).start()

    # ------------------------------------------------------------------ from the host

    def on_frame(self, frame: Frame) -> None:
        if not frame.payload:
            return
        channel = frame.payload[0]
        with self._cond:
            if frame.kind == DATA and channel == STDIN:
                self._incoming.append(frame.payload[1:])
            elif frame.kind == DATA and channel == WINDOW and len(frame.payload) == 5:
                self._credit += struct.unpack(">I", frame.payload[1:])[0]
            elif frame.kind == CLOSE and channel == STDIN:
                if len(frame.payload) > 1 and frame.payload[1] == 1:
                    self._abort_locked()
                else:
                    self._incoming.append(None)
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._abort_locked()
            self._cond.notify_all()

    def _abort_locked(self) -> None:
        if not self._aborted:
            self._aborted = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv()
            except OSError:
                pass

    # ------------------------------------------------------------------ threads

    def _read_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._credit <= 0 and not self._aborted:
                        self._cond.wait()
                    if self._aborted:
                        break
                    size = min(MAX_DATA_CHUNK, self._credit)
                try:
                    chunk = self.sock.recv(size)
                except OSError as exc:
                    if not self._aborted:
                        self.error = f"read from the pod port failed: {exc.strerror or exc}"
                    break
                if not chunk:
                    break
                with self._cond:
                    self._credit -= len(chunk)
                self.writer.send(encode_data(self.stream, STDOUT, chunk))
            self.writer.send(encode_close(self.stream, STDOUT))
        finally:
            self._finish_direction()

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._incoming and not self._aborted:
                        self._cond.wait()
                    if self._aborted:
                        return
                    item = self._incoming.popleft()
                if item is None:
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    self.sock.sendall(item)
                except OSError as exc:
                    if not self._aborted:
                        self.error = f"write to the pod port failed: {exc.strerror or exc}"
                    self.abort()
                    return
                self.writer.send(encode_data(self.stream, WINDOW, struct.pack(">I", len(item))))
        finally:
            self._finish_direction()

    def _finish_direction(self) -> None:
        with self._cond:
            self._done += 1
            last = self._done == 2
        if last:
            try:
                self.sock.close()
            except OSError:
                pass
            self.owner.forget(self)
            message = {"event": EVENT_PORT_FORWARD_CLOSED, "stream": self.stream}
            if self.error:
                message["error"] = self.error
            self.writer.send(encode_json(EVENT, self.stream, message))


class PortForwards:
    """Every open forward, by stream id."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self._lock = threading.Lock()
        self.forwards: dict[int, Forward] = {}

    def open(self, args: dict[str, object], generation: int) -> tuple[dict[str, object], Forward]:
        port = args.get("port")
        stream = args.get("stream")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise invalid(f"bad port {port!r}")
        if not isinstance(stream, int) or not PORT_FORWARD_STREAM_BASE <= stream < 1 << 32:
            raise invalid(f"port-forward stream ids start at {PORT_FORWARD_STREAM_BASE}")
        with self._lock:
            if stream in self.forwards:
                raise invalid(f"stream {stream} is already in use")
        sock, address = _connect(port)
        forward = Forward(self, stream, sock, generation)
        with self._lock:
            self.forwards[stream] = forward
        return {"stream": stream, "address": address}, forward

    def forget(self, forward: Forward) -> None:
        with self._lock:
            if self.forwards.get(forward.stream) is forward:
                del self.forwards[forward.stream]

    def handle_frame(self, frame: Frame) -> None:
        forward = self.forwards.get(frame.stream)
        if forward is not None:
            forward.on_frame(frame)

    def reset_connection(self, generation: int) -> None:
        """A new host connected: the old host's forwards are cut."""
        with self._lock:
            stale = [f for f in self.forwards.values() if f.generation != generation]
        for forward in stale:
            forward.abort()


def _connect(port: int) -> tuple[socket.socket, str]:
    errors = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((host, port))
        except OSError as exc:
            sock.close()
            errors.append(f"{host}: {exc.strerror or exc}")
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        label = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        return sock, label
    raise precondition(f"cannot connect to port {port} in the pod ({'; '.join(errors)})")
