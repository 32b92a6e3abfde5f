"""The connection to one guest agent: the socket, framing, the read loop, matching
responses to requests, and the connection's run state.

This layer knows frames and requests, not operations: :class:`AgentTransport` hands
every frame other than a response to ``_on_frame`` and tells ``_on_close`` when the
connection ended, both for a subclass (``AgentClient``) to fill in.

A frame that breaks the protocol (a response or event whose payload does not decode, a
response without an id) closes the connection: from then on nothing the agent sends can
be trusted to answer the right request, so every pending request fails at once with
AgentUnavailable instead of waiting out its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.errors import AgentTimeout, AgentUnavailable, error_from_wire
from agent.protocol import (
    REQUEST,
    RESPONSE,
    SYNC,
    SYNC_MARKER,
    FrameDecoder,
    ProtocolError,
    decode_json,
    encode_json,
)

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


class RunState(enum.Enum):
    """Where a connection is in its life; it only ever moves down this list."""

    #: no connection yet
    IDLE = "idle"
    #: the socket is open (or being opened); the agent has not answered hello yet
    CONNECTING = "connecting"
    #: hello answered: operations may run
    RUNNING = "running"
    #: closing: pending requests are being failed, streams ended
    DISCONNECTING = "disconnecting"
    #: closed for good (``close_reason`` says why); a new connection needs a new client
    CLOSED = "closed"


#: States in which frames may be sent (hello itself is sent while CONNECTING).
_OPEN = frozenset({RunState.CONNECTING, RunState.RUNNING})


class AgentTransport:
    """One connection to one guest agent: requests may run concurrently, each waits for
    its own response. When the connection ends (the agent hung up, broke the protocol,
    or ``close`` was called) every pending request fails at once with AgentUnavailable.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
    ) -> None:
        """Without a reader and writer the transport is IDLE until ``_open``; with them
        (an already connected socket) it is CONNECTING and reading."""
        self._state = RunState.IDLE
        self._close_reason: AgentUnavailable | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._write_lock = asyncio.Lock()
        if (reader is None) != (writer is None):
            raise TypeError("pass both a reader and a writer, or neither")
        if reader is not None and writer is not None:
            self._attach(reader, writer)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def close_reason(self) -> AgentUnavailable | None:
        """Why the connection closed (None while it has not)."""
        return self._close_reason

    def _unavailable(self, what: str = "agent connection") -> AgentUnavailable:
        if self._close_reason is not None:
            return AgentUnavailable(f"{what} closed: {self._close_reason.message}")
        return AgentUnavailable(f"{what} is {self._state.value}")

    def _set_running(self) -> None:
        """The handshake succeeded (called by the subclass after hello)."""
        if self._state is RunState.CONNECTING:
            self._state = RunState.RUNNING

    # ------------------------------------------------------------------ connecting

    async def _open(self, socket_path: Path | str, timeout: float) -> None:
        """Connect to the agent's unix socket, retrying while it is missing or refused
        (the VM is still starting), then write SYNC_MARKER."""
        if self._state is not RunState.IDLE:
            raise self._unavailable()
        self._state = RunState.CONNECTING
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            try:
                with socket_address(Path(socket_path)) as address:
                    reader, writer = await asyncio.open_unix_connection(address, limit=1 << 22)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                last = exc
            except BaseException:
                self._state = RunState.CLOSED
                raise
            if time.monotonic() >= deadline:
                self._close_reason = AgentUnavailable(f"cannot connect to {socket_path}: {last}")
                self._state = RunState.CLOSED
                raise self._close_reason
            await asyncio.sleep(0.02)
        self._attach(reader, writer)

    def _attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._state = RunState.CONNECTING
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _send_sync(self) -> None:
        """Start a connection generation: the guest drops what it had for an earlier host
        and answers with the marker (see PROTOCOL.md, "Connecting")."""
        await self._write(SYNC_MARKER)

    # ------------------------------------------------------------------ sending

    async def _write(self, data: bytes) -> None:
        if self._state not in _OPEN or self._writer is None:
            raise self._unavailable()
        async with self._write_lock:
            self._writer.write(data)
            await self._writer.drain()

    async def send_frame(self, frame: bytes) -> None:
        """Write one encoded frame (AgentUnavailable unless the connection is open)."""
        await self._write(frame)

    async def call(self, op: str, args: dict[str, Any], *, timeout: float | None) -> Any:
        """Send one request; return its result or raise the matching AgentError
        (AgentTimeout after ``timeout`` seconds; None: no limit)."""
        if self._state not in _OPEN:
            raise self._unavailable()
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.send_frame(
                encode_json(REQUEST, 0, {"id": request_id, "op": op, "args": args})
            )
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AgentTimeout(f"{op} got no answer within {timeout} s") from None
        except (ConnectionError, OSError) as exc:
            raise AgentUnavailable(f"{op}: agent connection failed: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)

    # ------------------------------------------------------------------ receiving

    async def _read_loop(self) -> None:
        assert self._reader is not None
        decoder = FrameDecoder()
        error = AgentUnavailable("agent closed the connection")
        try:
            while True:
                data = await self._reader.read(1 << 16)
                if not data:
                    break
                for frame in decoder.feed(data):
                    if frame.kind == RESPONSE:
                        self._on_response(frame.payload)
                    elif frame.kind != SYNC:
                        self._on_frame(frame.kind, frame.stream, frame.payload)
        except asyncio.CancelledError:
            error = AgentUnavailable("agent client closed")
        except ProtocolError as exc:
            error = AgentUnavailable(f"the agent broke the protocol: {exc}")
        except (ConnectionError, OSError) as exc:
            error = AgentUnavailable(f"agent connection lost: {exc}")
        finally:
            self._shutdown(error)

    def _on_response(self, payload: bytes) -> None:
        try:
            message = decode_json(payload)
        except ProtocolError as exc:
            raise ProtocolError(f"undecodable response: {exc}") from exc
        request_id = message.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            raise ProtocolError(f"a response without an id: {payload[:200]!r}")
        future = self._pending.get(request_id)
        if future is None or future.done():
            return  # the answer to a request that gave up waiting
        if message.get("ok"):
            future.set_result(message.get("result"))
        else:
            error = message.get("error")
            future.set_exception(error_from_wire(error if isinstance(error, dict) else {}))

    def _on_frame(self, kind: int, stream: int, payload: bytes) -> None:
        """A DATA, CLOSE or EVENT frame from the agent (ignored here). Raising
        ProtocolError closes the connection."""

    def _on_close(self, error: AgentUnavailable) -> None:
        """The connection ended (pending requests already failed). Nothing here."""

    # ------------------------------------------------------------------ closing

    def _shutdown(self, error: AgentUnavailable) -> None:
        if self._state is RunState.CLOSED:
            return
        self._state = RunState.DISCONNECTING
        if self._close_reason is None:
            self._close_reason = error
        reason = self._close_reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(AgentUnavailable(reason.message))
        self._pending.clear()
        try:
            self._on_close(reason)
        finally:
            if self._writer is not None:
                self._writer.close()
            self._state = RunState.CLOSED

    async def close(self) -> None:
        """Close the connection (the guest keeps running; a new client may connect)."""
        if self._state is RunState.IDLE:
            self._close_reason = AgentUnavailable("agent client closed")
            self._state = RunState.CLOSED
            return
        if self._state in _OPEN:
            self._state = RunState.DISCONNECTING
        task = self._reader_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # a reader cancelled before it ever ran has not shut the connection down
        self._shutdown(AgentUnavailable("agent client closed"))
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
