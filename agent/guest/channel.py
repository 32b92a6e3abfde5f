"""The guest end of the host channel: port discovery and the single frame writer."""

from __future__ import annotations

import os
import threading
import time
from collections import deque

from agent.protocol import (
    AGENT_PORT_NAME,
    EVENT,
    EVENT_OUTPUT_DROPPED,
    SYNC_MARKER,
    encode_json,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

VIRTIO_PORTS = "/sys/class/virtio-ports"


def find_port(name: str = AGENT_PORT_NAME, *, sysfs: str = VIRTIO_PORTS) -> str | None:
    """Return /dev/vportNpM of the virtio-serial port with this name, or None."""
    try:
        entries = os.listdir(sysfs)
    except FileNotFoundError:
        return None
    for entry in sorted(entries):
        try:
            with open(f"{sysfs}/{entry}/name") as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


def open_port(name: str = AGENT_PORT_NAME, *, wait: float = 10.0) -> int:
    """Open the named port read-write (once: a second open fails with EBUSY)."""
    deadline = time.monotonic() + wait
    while True:
        path = find_port(name)
        if path is not None and os.path.exists(path):
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"virtio port {name!r} not found in {VIRTIO_PORTS}")
        time.sleep(0.01)


class _Entry:
    __slots__ = ("data", "generation", "stream")

    def __init__(self, data: bytes, stream: int, generation: int) -> None:
        self.data = data
        self.stream = stream  # > 0 for droppable stdio data
        self.generation = generation  # > 0: valid only for that connection


class Writer:
    """The only thread that writes to the port.

    Frames leave in the order they were queued. Responses are tied to the connection
    (generation) of their request and are discarded if the host reconnected meanwhile.
    Events and stdio data survive reconnections. Stdio DATA frames are the only ones that
    may be dropped: when more than ``max_data_bytes`` of them are waiting (host slow or
    absent) the oldest go first and the loss is reported with an ``output_dropped`` event.
    While no host is connected nothing is written (QEMU would throw it away).
    """

    def __init__(
        self,
        fd: int,
        *,
        max_data_bytes: int = 4 << 20,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._fd = fd
        self._queue: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._data_bytes = 0
        self.max_data_bytes = max_data_bytes
        self._dropped: dict[int, list[int]] = {}  # stream -> [frames, bytes]
        self.dropped_total = 0
        self.connected = False
        self.generation = 0
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producers

    def send(self, frame: bytes, *, generation: int = 0) -> None:
        """Queue a control frame (response or event); never dropped while connected."""
        with self._cond:
            if generation and generation != self.generation:
                return
            self._queue.append(_Entry(frame, 0, generation))
            self._cond.notify()

    def send_data(self, stream: int, frame: bytes) -> None:
        """Queue a stdio DATA frame; the oldest such frames are dropped on overflow."""
        with self._cond:
            self._queue.append(_Entry(frame, stream, 0))
            self._data_bytes += len(frame)
            if self._data_bytes > self.max_data_bytes:
                self._drop_oldest_data()
            self._cond.notify()

    def resync(self, generation: int) -> None:
        """A new host said hello: forget its predecessor's replies, echo the marker."""
        with self._cond:
            self.generation = generation
            kept = deque(e for e in self._queue if not e.generation or e.generation == generation)
            kept.appendleft(_Entry(SYNC_MARKER, 0, 0))
            self._queue = kept
            self.connected = True
            self._cond.notify()

    def set_connected(self, connected: bool) -> None:
        with self._cond:
            self.connected = connected
            if not connected:
                # Replies to a host that is gone are useless; events and data stay.
                self._queue = deque(e for e in self._queue if not e.generation)
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until the queue is empty (or timeout); True when flushed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self.connected:
                    return not self._queue
                self._cond.wait(min(left, 0.05))
        return True

    # ------------------------------------------------------------------ internals

    _busy = False

    def _drop_oldest_data(self) -> None:
        kept: deque[_Entry] = deque()
        queue = self._queue
        while queue and self._data_bytes > self.max_data_bytes:
            entry = queue.popleft()
            if entry.stream > 0:
                self._data_bytes -= len(entry.data)
                counts = self._dropped.setdefault(entry.stream, [0, 0])
                counts[0] += 1
                counts[1] += len(entry.data)
                self.dropped_total += 1
            else:
                kept.append(entry)
        kept.extend(queue)
        self._queue = kept

    def _next(self) -> _Entry:
        with self._cond:
            while True:
                self._busy = False
                if self.connected and self._queue:
                    entry = self._queue.popleft()
                    if entry.stream > 0:
                        self._data_bytes -= len(entry.data)
                    if entry.generation and entry.generation != self.generation:
                        continue
                    self._busy = True
                    return entry
                if self.connected and self._dropped:
                    dropped, self._dropped = self._dropped, {}
                    for stream, (frames, nbytes) in dropped.items():
                        message = {
                            "event": EVENT_OUTPUT_DROPPED,
                            "stream": stream,
                            "frames": frames,
                            "bytes": nbytes,
                        }
                        self._queue.append(_Entry(encode_json(EVENT, stream, message), 0, 0))
                    continue
                self._cond.notify_all()
                self._cond.wait()

    def _run(self) -> None:
        while True:
            entry = self._next()
            view = memoryview(entry.data)
            while view:
                try:
                    written = os.write(self._fd, view)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    time.sleep(0.005)
                    continue
                except OSError as exc:
                    if self._on_error is not None:
                        self._on_error(exc)
                    time.sleep(0.05)
                    break
                view = view[written:]
