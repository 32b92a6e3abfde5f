"""The streams of an agent connection: container output, exec sessions and port
forwards, and the table that routes the guest's DATA, CLOSE and EVENT frames to them.

A stream is numbered by the guest (containers and execs, from 1) or by the host (port
forwards, from ``PORT_FORWARD_STREAM_BASE``). Everything here runs in the connection's
event loop; the frames arrive from its read loop (agent/transport.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from agent.errors import AgentError, AgentTimeout, AgentUnavailable, NotFound
from agent.events import AgentEvent
from agent.protocol import (
    CLOSE,
    DATA,
    EVENT,
    EVENT_CONTAINER_EXITED,
    EVENT_EXEC_EXITED,
    EVENT_PORT_FORWARD_CLOSED,
    MAX_DATA_CHUNK,
    PORT_FORWARD_STREAM_BASE,
    PORT_FORWARD_WINDOW,
    STDIN,
    STDOUT,
    WINDOW,
    ContainerInfo,
    ExecStarted,
    ExitStatus,
    encode_close,
    encode_data,
    encode_frame,
)


class StreamPeer(Protocol):
    """What streams need of the connection: sending frames and making requests."""

    output_buffer_bytes: int

    async def send_frame(self, frame: bytes) -> None: ...

    async def request(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any: ...


class OutputQueue:
    """Bounded queue of (channel, bytes) chunks; drops the oldest when full."""

    def __init__(self, max_bytes: int) -> None:
        self._items: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self.max_bytes = max_bytes
        self.dropped_bytes = 0
        self.ended = False
        self._wakeup = asyncio.Event()

    def put(self, channel: int, data: bytes) -> None:
        if self.ended:
            return
        self._items.append((channel, data))
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _ch, old = self._items.popleft()
            self._bytes -= len(old)
            self.dropped_bytes += len(old)
        self._wakeup.set()

    def end(self) -> None:
        self.ended = True
        self._wakeup.set()

    async def get(self) -> tuple[int, bytes] | None:
        while not self._items:
            if self.ended:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        channel, data = self._items.popleft()
        self._bytes -= len(data)
        return channel, data

    async def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        while True:
            item = await self.get()
            if item is None:
                return
            yield item


class ContainerOutput:
    """A container's stdout/stderr as an async iterator of (channel, bytes).

    Iteration ends after the container exited and its output was drained.
    """

    def __init__(self, streams: Streams, container_id: str, stream: int) -> None:
        self.container_id = container_id
        self.stream = stream
        self._streams = streams
        self.queue = OutputQueue(streams.peer.output_buffer_bytes)
        self.exit_status: ExitStatus | None = None

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self.queue.__aiter__()

    async def write_stdin(self, data: bytes) -> None:
        await self._streams.send_stdin(self.stream, data)

    async def close_stdin(self) -> None:
        await self._streams.peer.send_frame(encode_close(self.stream, STDIN))

    async def detach_stdin(self) -> None:
        """Stop attaching without closing stdin (unless the container has stdin_once)."""
        await self._streams.peer.send_frame(encode_frame(CLOSE, self.stream, bytes((STDIN, 1))))

    async def resize(self, cols: int, rows: int) -> None:
        await self._streams.peer.request(
            "resize", {"stream": self.stream, "cols": cols, "rows": rows}
        )

    def close(self) -> None:
        self._streams.outputs.pop(self.stream, None)
        self.queue.end()


class ExecSession:
    """A process started with ``AgentClient.exec``."""

    def __init__(self, streams: Streams, container_id: str, started: ExecStarted) -> None:
        self._streams = streams
        self.container_id = container_id
        self.stream = started.stream
        self.pid = started.pid
        #: the guest's steps of starting it (ExecStarted.timings)
        self.timings = dict(started.timings)
        self.queue = OutputQueue(streams.peer.output_buffer_bytes)
        self._exit: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        """(channel, bytes) chunks until the process exited and its output was drained."""
        return self.queue.__aiter__()

    async def write_stdin(self, data: bytes) -> None:
        await self._streams.send_stdin(self.stream, data)

    async def close_stdin(self) -> None:
        if not self._exit.done():
            await self._streams.peer.send_frame(encode_close(self.stream, STDIN))

    async def resize(self, cols: int, rows: int) -> None:
        await self._streams.peer.request(
            "resize", {"stream": self.stream, "cols": cols, "rows": rows}
        )

    async def kill(self, signal: int = 9) -> None:
        if self._exit.done():
            return
        with contextlib.suppress(NotFound):
            await self._streams.peer.request(
                "signal_exec", {"stream": self.stream, "signal": signal}
            )

    async def wait(self, timeout: float | None = None) -> int:
        """The exit code (128 + signal for a signal death)."""
        try:
            code, _signal = await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise AgentTimeout(f"exec in {self.container_id} still running") from None
        return code

    @property
    def exited(self) -> bool:
        return self._exit.done()

    @property
    def signal(self) -> int:
        return self._exit.result()[1] if self._exit.done() and not self._exit.exception() else 0

    def _finish(self, code: int, signal: int) -> None:
        if not self._exit.done():
            self._exit.set_result((code, signal))
        self.queue.end()

    def _fail(self, exc: BaseException) -> None:
        if not self._exit.done():
            self._exit.set_exception(exc)
            self._exit.exception()  # mark retrieved: a caller may never wait
        self.queue.end()


class PortForwardStream:
    """A TCP connection to a port inside the guest, from ``AgentClient.port_forward``.

    Each direction has a window of PORT_FORWARD_WINDOW bytes: ``write`` waits while the
    guest has not written earlier data to the socket yet, and the guest stops reading
    the socket while this side has not consumed what it sent.
    """

    def __init__(self, streams: Streams, stream: int, port: int) -> None:
        self._streams = streams
        self.stream = stream
        self.port = port
        self.address = ""
        self.error: str | None = None
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._closed = False
        self._readable = asyncio.Event()
        self._send_credit = PORT_FORWARD_WINDOW
        self._credit = asyncio.Event()
        self._consumed = 0  # read by the caller, not yet granted back to the guest
        self.finished = asyncio.Event()  # the guest released the connection

    async def read(self) -> bytes:
        """Next bytes from the pod; b"" once it closed its side (or the forward ended)."""
        while not self._chunks:
            if self._eof or self._closed:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._consumed += len(data)
        if self._consumed >= PORT_FORWARD_WINDOW // 4 and not self.finished.is_set():
            grant, self._consumed = self._consumed, 0
            with contextlib.suppress(AgentError):
                await self._streams.peer.send_frame(
                    encode_data(self.stream, WINDOW, grant.to_bytes(4, "big"))
                )
        return data

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_DATA_CHUNK):
            chunk = data[start : start + MAX_DATA_CHUNK]
            while self._send_credit < len(chunk):
                if self.finished.is_set() or self._closed:
                    raise ConnectionResetError(f"port-forward to port {self.port} ended")
                self._credit.clear()
                await self._credit.wait()
            if self.finished.is_set() or self._closed:
                raise ConnectionResetError(f"port-forward to port {self.port} ended")
            self._send_credit -= len(chunk)
            await self._streams.peer.send_frame(encode_data(self.stream, STDIN, chunk))

    async def close_write(self) -> None:
        """Half-close: the pod's socket sees end of input."""
        if not self.finished.is_set() and not self._closed:
            with contextlib.suppress(AgentError):
                await self._streams.peer.send_frame(encode_close(self.stream, STDIN))

    async def close(self) -> None:
        """Close both directions (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        if not self.finished.is_set():
            with contextlib.suppress(AgentError):
                await self._streams.peer.send_frame(
                    encode_frame(CLOSE, self.stream, bytes((STDIN, 1)))
                )

    def _wake(self) -> None:
        self._readable.set()
        self._credit.set()

    def _on_frame(self, kind: int, payload: bytes, event: AgentEvent | None) -> None:
        if event is not None:
            if event.kind == EVENT_PORT_FORWARD_CLOSED:
                error = event.data.get("error")
                self.error = str(error) if error else None
                self._lost()
            return
        if not payload:
            return
        channel = payload[0]
        if kind == DATA and channel == STDOUT:
            self._chunks.append(payload[1:])
            self._readable.set()
        elif kind == DATA and channel == WINDOW and len(payload) == 5:
            self._send_credit += int.from_bytes(payload[1:], "big")
            self._credit.set()
        elif kind == CLOSE and channel == STDOUT:
            self._eof = True
            self._readable.set()

    def _lost(self) -> None:
        self._eof = True
        self.finished.set()
        self._streams.forwards.pop(self.stream, None)
        self._wake()


#: A frame held for a stream not claimed yet: a DATA payload or a decoded event.
_Held = bytes | AgentEvent


class Streams:
    """The connection's streams by id, and the routing of the guest's stream frames.

    Frames that arrive for a stream nobody claimed yet are held (boundedly): an exec's
    first output, and even its exit, can be read in the same batch as the reply that
    names its stream.
    """

    EARLY_STREAMS = 64
    EARLY_BYTES = 1 << 20

    def __init__(self, peer: StreamPeer, publish: Callable[[AgentEvent], None]) -> None:
        self.peer = peer
        self._publish = publish
        self.execs: dict[int, ExecSession] = {}
        self.outputs: dict[int, ContainerOutput] = {}
        self.container_streams: dict[str, int] = {}
        self.forwards: dict[int, PortForwardStream] = {}
        self._early: dict[int, list[_Held]] = {}
        self._forward_ids = itertools.count(PORT_FORWARD_STREAM_BASE)

    # ------------------------------------------------------------------ routing

    def dispatch(self, kind: int, stream: int, payload: bytes, event: AgentEvent | None) -> None:
        """Route one DATA, CLOSE or EVENT frame (``event``: an EVENT frame's decoded
        payload). Frames of unknown streams are held or dropped, never an error."""
        if stream >= PORT_FORWARD_STREAM_BASE:
            forward = self.forwards.get(stream)
            if forward is not None:
                forward._on_frame(kind, payload, event)
        elif event is not None:
            if event.kind == EVENT_EXEC_EXITED and event.stream not in self.execs:
                self._hold(event.stream, event)
                return
            self._on_event(event)
        elif kind == DATA and payload:
            target = self.execs.get(stream) or self.outputs.get(stream)
            if target is not None:
                target.queue.put(payload[0], payload[1:])
            else:
                self._hold(stream, payload)
        # CLOSE frames from the guest only mark the end of one channel; the exit event
        # that follows ends the stream.

    def _on_event(self, event: AgentEvent) -> None:
        if event.kind == EVENT_EXEC_EXITED:
            session = self.execs.pop(event.stream, None)
            if session is not None:
                session._finish(event.int_field("exit_code", 255), event.int_field("signal"))
        elif event.kind == EVENT_CONTAINER_EXITED:
            output = self.outputs.pop(event.stream, None)
            if output is not None:
                output.exit_status = event.exit_status
                output.queue.end()
        self._publish(event)

    def _hold(self, stream: int, item: _Held) -> None:
        held = self._early.get(stream)
        if held is None:
            if len(self._early) >= self.EARLY_STREAMS:
                self._early.pop(next(iter(self._early)))
            held = self._early[stream] = []
        size = sum(len(h) for h in held if isinstance(h, bytes))
        if isinstance(item, AgentEvent) or size + len(item) <= self.EARLY_BYTES:
            held.append(item)

    def _claim(self, stream: int) -> None:
        for item in self._early.pop(stream, []):
            if isinstance(item, AgentEvent):
                self.dispatch(EVENT, stream, b"", item)
            else:
                self.dispatch(DATA, stream, item, None)

    def close(self, reason: str) -> None:
        """The connection closed (``reason``): execs fail with AgentUnavailable, every
        stream ends."""
        for session in self.execs.values():
            session._fail(AgentUnavailable(reason))
        self.execs.clear()
        for output in self.outputs.values():
            output.queue.end()
        self.outputs.clear()
        for forward in list(self.forwards.values()):
            forward._lost()
        self._early.clear()

    # ------------------------------------------------------------------ streams

    async def send_stdin(self, stream: int, data: bytes) -> None:
        for start in range(0, len(data), MAX_DATA_CHUNK):
            chunk = data[start : start + MAX_DATA_CHUNK]
            await self.peer.send_frame(encode_data(stream, STDIN, chunk))

    def track(self, info: ContainerInfo) -> None:
        """Know a container's output stream (and buffer its output while it runs)."""
        self.container_streams[info.id] = info.stream
        if info.state != "exited" and info.stream not in self.outputs:
            self.outputs[info.stream] = ContainerOutput(self, info.id, info.stream)
            self._claim(info.stream)

    def forget(self, container_id: str) -> None:
        """The container was deleted: its output ends."""
        stream = self.container_streams.pop(container_id, None)
        if stream is not None:
            output = self.outputs.pop(stream, None)
            if output is not None:
                output.queue.end()

    def subscribe_output(self, container_id: str) -> ContainerOutput:
        stream = self.container_streams.get(container_id)
        if stream is None:
            raise NotFound(f"container {container_id!r} is unknown: call list_containers")
        output = self.outputs.get(stream)
        if output is None or output.queue.ended:
            output = ContainerOutput(self, container_id, stream)
            self.outputs[stream] = output
        return output

    def add_exec(self, container_id: str, started: ExecStarted) -> ExecSession:
        session = ExecSession(self, container_id, started)
        self.execs[started.stream] = session
        self._claim(started.stream)
        return session

    def open_forward(self, port: int) -> PortForwardStream:
        """A new port-forward stream, listening before its request is sent (so that
        nothing the guest sends for it can arrive for an unknown stream)."""
        forward = PortForwardStream(self, next(self._forward_ids), port)
        self.forwards[forward.stream] = forward
        return forward
