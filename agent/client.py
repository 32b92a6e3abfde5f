"""Host side of the agent channel: an asyncio client for one pod VM's agent."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from agent.protocol import (
    ALREADY_EXISTS,
    CLOSE,
    DATA,
    DEADLINE_EXCEEDED,
    EVENT,
    EVENT_CONTAINER_EXITED,
    EVENT_EXEC_EXITED,
    EVENT_PORT_FORWARD_CLOSED,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    MAX_DATA_CHUNK,
    NOT_FOUND,
    PORT_FORWARD_STREAM_BASE,
    PORT_FORWARD_WINDOW,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    STDIN,
    STDOUT,
    SYNC,
    SYNC_MARKER,
    UNAVAILABLE,
    UNKNOWN_OP,
    WINDOW,
    CodedError,
    ContainerInfo,
    ContainerSpec,
    ExecSpec,
    ExecStarted,
    ExitStatus,
    FrameDecoder,
    NetInterface,
    PortForwardStarted,
    ProtocolError,
    ReadyInfo,
    StatsReport,
    decode_json,
    encode_close,
    encode_data,
    encode_frame,
    encode_json,
)

# ---------------------------------------------------------------------------- errors


SUN_PATH_MAX = 107


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address to connect() to the unix socket ``path``, however long it is.

    A path past the sun_path limit is reached through /proc/self/fd of an O_PATH
    descriptor of its directory, held open for the duration of the connect.
    """
    text = str(path)
    if len(text.encode()) <= SUN_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# Operations that may rightly take as long as a workload runs.
UNBOUNDED_OPS = frozenset({"wait_container"})


class AgentError(CodedError):
    """A failed agent call; ``code`` is one of the protocol error codes."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotFound(AgentError):
    code = NOT_FOUND


class AlreadyExists(AgentError):
    code = ALREADY_EXISTS


class InvalidArgument(AgentError):
    code = INVALID_ARGUMENT


class FailedPrecondition(AgentError):
    code = FAILED_PRECONDITION


class Internal(AgentError):
    code = INTERNAL


class AgentTimeout(AgentError):
    code = DEADLINE_EXCEEDED


class AgentUnavailable(AgentError):
    """The channel is closed or the agent never answered."""

    code = UNAVAILABLE


class UnknownOperation(AgentError):
    code = UNKNOWN_OP


_ERRORS: dict[str, type[AgentError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        Internal,
        AgentTimeout,
        AgentUnavailable,
        UnknownOperation,
    )
}


def error_from_wire(error: dict[str, Any]) -> AgentError:
    code = str(error.get("code", INTERNAL))
    message = str(error.get("message", "agent error"))
    cls = _ERRORS.get(code, AgentError)
    return cls(message, code=code)


# ---------------------------------------------------------------------------- events


class AgentEvent:
    """An event from the guest: ``kind`` (e.g. "container_exited") and its fields."""

    __slots__ = ("data", "kind")

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.kind = kind
        self.data = data

    @property
    def container_id(self) -> str | None:
        value = self.data.get("container_id")
        return value if isinstance(value, str) else None

    @property
    def exit_status(self) -> ExitStatus | None:
        status = self.data.get("status")
        if isinstance(status, dict):
            result: ExitStatus = ExitStatus.from_dict(status)
            return result
        return None

    def __repr__(self) -> str:
        return f"AgentEvent({self.kind!r}, {self.data!r})"


_END = object()


class _OutputQueue:
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

    def __init__(self, client: AgentClient, container_id: str, stream: int) -> None:
        self.container_id = container_id
        self.stream = stream
        self._client = client
        self.queue = _OutputQueue(client.output_buffer_bytes)
        self.exit_status: ExitStatus | None = None

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self.queue.__aiter__()

    async def write_stdin(self, data: bytes) -> None:
        await self._client._send_stdin(self.stream, data)

    async def close_stdin(self) -> None:
        await self._client._send_frame(encode_close(self.stream, STDIN))

    async def detach_stdin(self) -> None:
        """Stop attaching without closing stdin (unless the container has stdin_once)."""
        await self._client._send_frame(encode_frame(CLOSE, self.stream, bytes((STDIN, 1))))

    async def resize(self, cols: int, rows: int) -> None:
        await self._client.request("resize", {"stream": self.stream, "cols": cols, "rows": rows})

    def close(self) -> None:
        self._client._outputs.pop(self.stream, None)
        self.queue.end()


class ExecSession:
    """A process started with ``AgentClient.exec``."""

    def __init__(self, client: AgentClient, container_id: str, started: ExecStarted) -> None:
        self._client = client
        self.container_id = container_id
        self.stream = started.stream
        self.pid = started.pid
        self.queue = _OutputQueue(client.output_buffer_bytes)
        self._exit: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        """(channel, bytes) chunks until the process exited and its output was drained."""
        return self.queue.__aiter__()

    async def write_stdin(self, data: bytes) -> None:
        await self._client._send_stdin(self.stream, data)

    async def close_stdin(self) -> None:
        if not self._exit.done():
            await self._client._send_frame(encode_close(self.stream, STDIN))

    async def resize(self, cols: int, rows: int) -> None:
        await self._client.request("resize", {"stream": self.stream, "cols": cols, "rows": rows})

    async def kill(self, signal: int = 9) -> None:
        if self._exit.done():
            return
        with contextlib.suppress(NotFound):
            await self._client.request("signal_exec", {"stream": self.stream, "signal": signal})

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

    def __init__(self, client: AgentClient, stream: int, port: int) -> None:
        self._client = client
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
                await self._client._send_frame(
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
            await self._client._send_frame(encode_data(self.stream, STDIN, chunk))

    async def close_write(self) -> None:
        """Half-close: the pod's socket sees end of input."""
        if not self.finished.is_set() and not self._closed:
            with contextlib.suppress(AgentError):
                await self._client._send_frame(encode_close(self.stream, STDIN))

    async def close(self) -> None:
        """Close both directions (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        if not self.finished.is_set():
            with contextlib.suppress(AgentError):
                await self._client._send_frame(encode_frame(CLOSE, self.stream, bytes((STDIN, 1))))

    def _wake(self) -> None:
        self._readable.set()
        self._credit.set()

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == EVENT:
            try:
                message = decode_json(payload)
            except ProtocolError:
                return
            if message.get("event") == EVENT_PORT_FORWARD_CLOSED:
                self.error = message.get("error") or None
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
        self._client._forwards.pop(self.stream, None)
        self._wake()


class ExecResult:
    __slots__ = ("exit_code", "stderr", "stdout", "timed_out")

    def __init__(self, exit_code: int, stdout: bytes, stderr: bytes, timed_out: bool) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    def __repr__(self) -> str:
        return (
            f"ExecResult(exit_code={self.exit_code}, stdout={self.stdout!r}, "
            f"stderr={self.stderr!r}, timed_out={self.timed_out})"
        )


# ---------------------------------------------------------------------------- client


class AgentClient:
    """One connection to one guest agent.

    Requests may run concurrently; each waits for its own response. If the connection
    drops, every pending request fails at once with AgentUnavailable.
    """

    output_buffer_bytes = 4 << 20
    default_timeout = 60.0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._execs: dict[int, ExecSession] = {}
        self._outputs: dict[int, ContainerOutput] = {}
        self._container_streams: dict[str, int] = {}
        self._early: dict[int, list[tuple[int, bytes]]] = {}
        self._forwards: dict[int, PortForwardStream] = {}
        self._forward_ids = itertools.count(PORT_FORWARD_STREAM_BASE)
        self._subscribers: list[asyncio.Queue[AgentEvent | None]] = []
        self._callbacks: list[Callable[[AgentEvent], None]] = []
        self._write_lock = asyncio.Lock()
        self._closed: BaseException | None = None
        self._synced = asyncio.Event()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        self.ready: ReadyInfo = ReadyInfo(agent_version="", protocol_version=0)

    # ------------------------------------------------------------------ connect

    @classmethod
    async def connect(cls, socket_path: Path | str, *, timeout: float = 30.0) -> AgentClient:
        """Connect (retrying while the socket is missing or refused), say hello."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            try:
                with socket_address(Path(socket_path)) as address:
                    reader, writer = await asyncio.open_unix_connection(address, limit=1 << 22)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"cannot connect to {socket_path}: {last}")
            await asyncio.sleep(0.02)
        client = cls(reader, writer)
        try:
            await client._hello(max(0.1, deadline - time.monotonic()))
        except BaseException:
            await client.close()
            raise
        return client

    async def _hello(self, timeout: float) -> None:
        async with self._write_lock:
            self._writer.write(SYNC_MARKER)
        try:
            result = await self.request(
                "hello", {"protocol_version": PROTOCOL_VERSION}, timeout=timeout
            )
        except AgentTimeout:
            raise AgentUnavailable(
                f"the agent did not answer hello within {timeout:.1f} s"
            ) from None
        ready: ReadyInfo = ReadyInfo.from_dict(result)
        if ready.protocol_version != PROTOCOL_VERSION:
            raise AgentUnavailable(
                f"agent speaks protocol {ready.protocol_version}, host {PROTOCOL_VERSION}"
            )
        self.ready = ready

    # ------------------------------------------------------------------ plumbing

    async def _send_frame(self, frame: bytes) -> None:
        if self._closed is not None:
            raise AgentUnavailable(f"agent connection closed: {self._closed}")
        async with self._write_lock:
            self._writer.write(frame)
            await self._writer.drain()

    async def _send_stdin(self, stream: int, data: bytes) -> None:
        for start in range(0, len(data), MAX_DATA_CHUNK):
            await self._send_frame(encode_data(stream, STDIN, data[start : start + MAX_DATA_CHUNK]))

    async def request(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request; return its result or raise the matching AgentError.

        Without a ``timeout``, every operation but ``wait_container`` (which waits for a
        container's exit by design) is bounded by ``default_timeout``: a frozen or
        broken guest fails the call instead of hanging its caller."""
        if timeout is None and op not in UNBOUNDED_OPS:
            timeout = self.default_timeout
        if self._closed is not None:
            raise AgentUnavailable(f"agent connection closed: {self._closed}")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send_frame(
                encode_json(REQUEST, 0, {"id": request_id, "op": op, "args": args or {}})
            )
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AgentTimeout(f"{op} got no answer within {timeout} s") from None
        except (ConnectionError, OSError) as exc:
            raise AgentUnavailable(f"{op}: agent connection failed: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        error: BaseException = AgentUnavailable("agent closed the connection")
        try:
            while True:
                data = await self._reader.read(1 << 16)
                if not data:
                    break
                for frame in decoder.feed(data):
                    if frame.kind == SYNC:
                        self._synced.set()
                    else:
                        self._dispatch(frame.kind, frame.stream, frame.payload)
        except asyncio.CancelledError:
            error = AgentUnavailable("agent client closed")
        except (ConnectionError, OSError) as exc:
            error = AgentUnavailable(f"agent connection lost: {exc}")
        finally:
            self._shutdown(error)

    def _dispatch(self, kind: int, stream: int, payload: bytes) -> None:
        if kind == RESPONSE:
            try:
                message = decode_json(payload)
            except ProtocolError:
                return
            future = self._pending.get(message.get("id", -1))
            if future is None or future.done():
                return
            if message.get("ok"):
                future.set_result(message.get("result"))
            else:
                future.set_exception(error_from_wire(message.get("error") or {}))
        elif stream >= PORT_FORWARD_STREAM_BASE:
            forward = self._forwards.get(stream)
            if forward is not None:
                forward._on_frame(kind, payload)
        elif kind == DATA and payload:
            target = self._execs.get(stream) or self._outputs.get(stream)
            if target is not None:
                target.queue.put(payload[0], payload[1:])
            else:
                self._hold_early(stream, kind, payload)
        elif kind == EVENT:
            try:
                message = decode_json(payload)
            except ProtocolError:
                return
            event = AgentEvent(str(message.get("event", "")), message)
            if event.kind == EVENT_EXEC_EXITED and int(message.get("stream", 0)) not in self._execs:
                self._hold_early(int(message.get("stream", 0)), kind, payload)
                return
            self._handle_event(event)
        # CLOSE frames from the guest only mark the end of one channel; the exit event
        # that follows ends the stream.

    _EARLY_STREAMS = 64
    _EARLY_BYTES = 1 << 20

    def _hold_early(self, stream: int, kind: int, payload: bytes) -> None:
        """Keep frames of a stream not claimed yet: an exec's first output and even its
        exit can be read in the same batch as the reply that names the stream."""
        held = self._early.get(stream)
        if held is None:
            if len(self._early) >= self._EARLY_STREAMS:
                self._early.pop(next(iter(self._early)))
            held = self._early[stream] = []
        if sum(len(p) for _k, p in held) + len(payload) <= self._EARLY_BYTES or kind == EVENT:
            held.append((kind, payload))

    def _claim_early(self, stream: int) -> None:
        for kind, payload in self._early.pop(stream, []):
            self._dispatch(kind, stream, payload)

    def _handle_event(self, event: AgentEvent) -> None:
        if event.kind == EVENT_EXEC_EXITED:
            session = self._execs.pop(int(event.data.get("stream", 0)), None)
            if session is not None:
                session._finish(
                    int(event.data.get("exit_code", 255)), int(event.data.get("signal", 0))
                )
        elif event.kind == EVENT_CONTAINER_EXITED:
            output = self._outputs.pop(int(event.data.get("stream", 0)), None)
            if output is not None:
                output.exit_status = event.exit_status
                output.queue.end()
        for queue in list(self._subscribers):
            queue.put_nowait(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # a subscriber's bug must not stop the reader
                continue

    def _shutdown(self, error: BaseException) -> None:
        if self._closed is None:
            self._closed = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(AgentUnavailable(str(error)))
        self._pending.clear()
        for session in self._execs.values():
            session._fail(AgentUnavailable(str(error)))
        self._execs.clear()
        for output in self._outputs.values():
            output.queue.end()
        self._outputs.clear()
        for forward in list(self._forwards.values()):
            forward._lost()
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self) -> None:
        """Close the connection (the guest keeps running; a new client may connect)."""
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ events

    async def events(self) -> AsyncIterator[AgentEvent]:
        """Every event from now on (container exits, OOM kills, output drops)."""
        queue: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.remove(queue)

    def on_event(self, callback: Callable[[AgentEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every event; returns a function that unregisters it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def subscribe_output(self, container_id: str) -> ContainerOutput:
        """The container's output from now on (buffered from creation when created by
        this client). Requires the container to be known: created by this client or seen
        in ``list_containers``."""
        stream = self._container_streams.get(container_id)
        if stream is None:
            raise NotFound(f"container {container_id!r} is unknown: call list_containers")
        output = self._outputs.get(stream)
        if output is None or output.queue.ended:
            output = ContainerOutput(self, container_id, stream)
            self._outputs[stream] = output
        return output

    def _track(self, info: ContainerInfo) -> None:
        self._container_streams[info.id] = info.stream
        if info.state != "exited" and info.stream not in self._outputs:
            self._outputs[info.stream] = ContainerOutput(self, info.id, info.stream)
            self._claim_early(info.stream)

    # ------------------------------------------------------------------ operations

    async def ping(self) -> int:
        result = await self.request("ping", {}, timeout=10.0)
        return int(result["time_ns"])

    async def set_pod_config(
        self,
        *,
        hostname: str | None = None,
        resolv_conf: str | None = None,
        hosts: str | None = None,
    ) -> None:
        args: dict[str, Any] = {}
        if hostname is not None:
            args["hostname"] = hostname
        if resolv_conf is not None:
            args["resolv_conf"] = resolv_conf
        if hosts is not None:
            args["hosts"] = hosts
        await self.request("set_pod_config", args)

    async def sync_clock(self, unix_ns: int | None = None) -> int:
        """Set the guest clock (default: the host's now); returns the correction in ns."""
        result = await self.request("sync_clock", {"unix_ns": unix_ns or time.time_ns()})
        return int(result["offset_ns"])

    async def configure_network(
        self, interfaces: list[NetInterface] | list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Give guest NICs their MAC, MTU, addresses and routes (see NetInterface);
        returns [{"name", "mac", "ms"}] of the configured NICs ("ms": guest time of
        each step)."""
        records = [
            i if isinstance(i, NetInterface) else NetInterface.from_dict(i) for i in interfaces
        ]
        result = await self.request(
            "configure_network", {"interfaces": [r.to_dict() for r in records]}, timeout=60.0
        )
        return [dict(i) for i in result["interfaces"]]

    async def mount_image(self, image_id: str, source: dict[str, Any]) -> str:
        """Mount an image read-only at <run>/images/<image_id>; source is
        {"pci_path": ...}, {"device": ..., "fstype": ...} or {"dir": ...}."""
        result = await self.request("mount_image", {"image_id": image_id, "source": source})
        return str(result["path"])

    async def unmount_image(self, image_id: str) -> None:
        await self.request("unmount_image", {"image_id": image_id})

    async def create_container(self, container_id: str, spec: ContainerSpec) -> ContainerInfo:
        result = await self.request(
            "create_container", {"container_id": container_id, "spec": spec.to_dict()}
        )
        info: ContainerInfo = ContainerInfo.from_dict(result)
        self._track(info)
        return info

    async def start_container(self, container_id: str) -> ContainerInfo:
        result = await self.request("start_container", {"container_id": container_id})
        info: ContainerInfo = ContainerInfo.from_dict(result)
        return info

    async def signal_container(
        self,
        container_id: str,
        signal: int = 15,
        *,
        all_processes: bool = False,
        timeout: float | None = None,
    ) -> None:
        await self.request(
            "signal_container",
            {"container_id": container_id, "signal": signal, "all": all_processes},
            timeout=timeout,
        )

    async def wait_container(
        self, container_id: str, *, timeout: float | None = None
    ) -> ExitStatus:
        args: dict[str, Any] = {"container_id": container_id}
        if timeout is not None:
            args["timeout"] = timeout
        result = await self.request(
            "wait_container", args, timeout=None if timeout is None else timeout + 10.0
        )
        status: ExitStatus = ExitStatus.from_dict(result)
        return status

    async def delete_container(self, container_id: str, *, force: bool = False) -> None:
        await self.request("delete_container", {"container_id": container_id, "force": force})
        stream = self._container_streams.pop(container_id, None)
        if stream is not None:
            output = self._outputs.pop(stream, None)
            if output is not None:
                output.queue.end()

    async def list_containers(self) -> list[ContainerInfo]:
        result = await self.request("list_containers", {})
        infos: list[ContainerInfo] = [ContainerInfo.from_dict(item) for item in result]
        for info in infos:
            self._track(info)
        return infos

    async def container_stats(
        self, container_id: str | None = None, *, detail: bool = False, timeout: float | None = None
    ) -> StatsReport:
        """Cgroup figures of one or every container and the guest's memory and CPU; with
        ``detail``, every container's full figures (``ContainerDetail``) and the pod's
        network interfaces too (slower: the guest walks /proc and writable layers)."""
        args: dict[str, Any] = {"container_id": container_id or ""}
        if detail:
            args["detail"] = True
        result = await self.request("container_stats", args, timeout=timeout)
        report: StatsReport = StatsReport.from_dict(result)
        return report

    async def exec(
        self, container_id: str, spec: ExecSpec, *, timeout: float | None = None
    ) -> ExecSession:
        result = await self.request(
            "exec", {"container_id": container_id, "spec": spec.to_dict()}, timeout=timeout
        )
        started: ExecStarted = ExecStarted.from_dict(result)
        session = ExecSession(self, container_id, started)
        self._execs[started.stream] = session
        self._claim_early(started.stream)
        return session

    #: After an exec that did not start within its budget, how long to wait for its late
    #: start so that it can be killed before the call returns.
    late_start_grace = 10.0

    async def exec_sync(
        self,
        container_id: str,
        args: list[str],
        *,
        timeout: float | None = None,
        env: list[str] | None = None,
        cwd: str = "",
        stdin: bytes | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run to completion and collect its output: at most ``max_output`` bytes of each
        stream are kept, the rest is read and dropped (the process is never held up).

        ``timeout`` is one budget for starting and running: when it runs out (even while
        the guest is still starting the process) the result is ``timed_out`` and the process
        is dead before this returns. The guest is told the same limit, so a process this
        side could not reach is still killed there."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        spec = ExecSpec(args=args, env=env or [], cwd=cwd, stdin=stdin is not None, timeout=timeout)
        starting = asyncio.ensure_future(self.exec(container_id, spec))
        try:
            session = await asyncio.wait_for(asyncio.shield(starting), remaining())
        except TimeoutError:
            await self._kill_late_start(starting)
            return ExecResult(-1, b"", b"", True)
        chunks: dict[int, list[bytes]] = {1: [], 2: []}
        kept = {1: 0, 2: 0}

        async def collect() -> None:
            async for channel, data in session:
                if channel not in kept:
                    continue
                if max_output is not None:
                    data = data[: max(0, max_output - kept[channel])]
                if data:
                    chunks[channel].append(data)
                    kept[channel] += len(data)

        collector = asyncio.ensure_future(collect())
        timed_out = False
        try:
            if stdin is not None:
                await asyncio.wait_for(self._feed_stdin(session, stdin), remaining())
            code = await session.wait(remaining())
        except (AgentTimeout, TimeoutError):
            timed_out = True
            await session.kill(9)
            code = await session.wait(10.0)
        await collector
        return ExecResult(code, b"".join(chunks[1]), b"".join(chunks[2]), timed_out)

    @staticmethod
    async def _feed_stdin(session: ExecSession, data: bytes) -> None:
        await session.write_stdin(data)
        await session.close_stdin()

    async def _kill_late_start(self, starting: asyncio.Future[ExecSession]) -> None:
        """An exec whose start outlived its budget: kill it once it has started."""
        try:
            session = await asyncio.wait_for(starting, self.late_start_grace)
        except (AgentError, TimeoutError):
            return  # it never started here; the guest's own limit kills a late one
        with contextlib.suppress(AgentError):
            await session.kill(9)
            await session.wait(10.0)

    async def reseed(self, entropy: bytes) -> None:
        """Give the guest kernel fresh randomness (after a restore from a template)."""
        import base64

        await self.request("reseed", {"entropy": base64.b64encode(entropy).decode()})

    async def update_container(self, container_id: str, resources: dict[str, str]) -> None:
        """Write cgroup v2 limits (cpu_max, cpu_weight, memory_max, pids_max, cpuset_*)."""
        await self.request(
            "update_container", {"container_id": container_id, "resources": resources}
        )

    async def port_forward(self, port: int, *, timeout: float = 20.0) -> PortForwardStream:
        """Open a TCP connection to 127.0.0.1:port (or [::1]:port) inside the guest."""
        stream = next(self._forward_ids)
        forward = PortForwardStream(self, stream, port)
        self._forwards[stream] = forward
        try:
            result = await self.request(
                "port_forward", {"port": port, "stream": stream}, timeout=timeout
            )
        except BaseException:
            self._forwards.pop(stream, None)
            raise
        started: PortForwardStarted = PortForwardStarted.from_dict(result)
        forward.address = started.address
        return forward

    async def shutdown(self, *, grace: float = 10.0) -> None:
        """Stop every container (SIGTERM, grace, SIGKILL) and power the VM off."""
        await self.request("shutdown", {"grace": grace}, timeout=grace + 30.0)
