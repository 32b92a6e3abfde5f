"""One SPDY/3.1 connection on asyncio: streams opened by the client, served by a handler.

The client (kubectl, crictl, client-go) opens every stream; this side answers each
SYN_STREAM with a SYN_REPLY at once, answers every PING, and never sends SETTINGS or
WINDOW_UPDATE. There is no SPDY flow control in the Kubernetes clients, so back-pressure
comes from TCP: when a stream's inbound buffer is full the connection stops reading
from the socket until the consumer catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from cri.streaming import spdy
from cri.streaming.transport import ByteStream

log = logging.getLogger(__name__)

#: Bytes buffered per stream before the connection stops reading the socket.
STREAM_BUFFER = 1 << 20
#: Streams open at once on one connection; more are refused.
MAX_STREAMS = 256


class StreamReset(ConnectionError):
    """The stream was reset (by the peer, or because the connection ended)."""


class SpdyStream:
    def __init__(self, conn: SpdyConnection, stream_id: int, headers: spdy.Headers) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self.remote_closed = False  # peer sent FIN
        self.local_closed = False  # we sent FIN
        self.reset_status: int | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value.split("\0", 1)[0]
        return None

    def __repr__(self) -> str:
        return f"SpdyStream({self.id}, {self.header('streamtype')!r})"

    # ------------------------------------------------------------------ reading

    async def read(self) -> bytes:
        """Next chunk from the peer; b"" after its FIN. Raises StreamReset."""
        while not self._chunks:
            if self.reset_status is not None:
                raise StreamReset(f"stream {self.id} reset ({self.reset_status})")
            if self.remote_closed:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered < STREAM_BUFFER:
            self._space.set()
        return data

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while len(out) <= limit:
            chunk = await self.read()
            if not chunk:
                break
            out += chunk
        return bytes(out[:limit])

    def _feed(self, data: bytes) -> None:
        if self.remote_closed or self.reset_status is not None:
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered >= STREAM_BUFFER:
                self._space.clear()
        self._readable.set()

    def _feed_eof(self) -> None:
        self.remote_closed = True
        self._readable.set()
        self._space.set()

    def _on_reset(self, status: int, *, discard: bool = True) -> None:
        if self.reset_status is None:
            self.reset_status = status
        if discard:
            self._chunks.clear()
            self._buffered = 0
        self._readable.set()
        self._space.set()

    # ------------------------------------------------------------------ writing

    async def write(self, data: bytes) -> None:
        """Send data (split into frames); waits while the socket is backed up."""
        if self.local_closed or self.reset_status is not None:
            raise StreamReset(f"stream {self.id} is closed for writing")
        view = memoryview(data)
        for start in range(0, len(view), spdy.SEND_CHUNK):
            await self.conn._send(spdy.data_frame(self.id, view[start : start + spdy.SEND_CHUNK]))

    async def close(self) -> None:
        """Send FIN (idempotent; ignored once the stream or connection is gone)."""
        if self.local_closed or self.reset_status is not None:
            return
        self.local_closed = True
        with contextlib.suppress(ConnectionError):
            await self.conn._send(spdy.data_frame(self.id, b"", fin=True))
        self.conn._maybe_forget(self)

    def reset(self, status: int = spdy.CANCEL) -> None:
        if self.reset_status is not None:
            return
        self._on_reset(status)
        self.conn._send_nowait(spdy.rst_stream_frame(self.id, status))
        self.conn._forget(self)


class SpdyConnection:
    """Serves one SPDY connection until the peer leaves or ``close`` is called.

    ``on_stream`` is called (synchronously, in the reader) for every new stream after it
    was accepted and replied to.
    """

    def __init__(
        self,
        transport: ByteStream,
        on_stream: Callable[[SpdyStream], None],
        *,
        max_streams: int = MAX_STREAMS,
        parser: spdy.FrameParser | None = None,
    ) -> None:
        self.transport = transport
        self.on_stream = on_stream
        self.max_streams = max_streams
        self.streams: dict[int, SpdyStream] = {}
        self._parser = parser or spdy.FrameParser()
        self._compressor = spdy.HeaderCompressor()
        self._last_id = 0
        self._closed = False
        self.closed = asyncio.Event()
        self.error: str | None = None
        self.pings_answered = 0

    # ------------------------------------------------------------------ sending

    async def _send(self, frame: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("SPDY connection closed")
        self.transport.write(frame)
        await self.transport.drain()

    def _send_nowait(self, frame: bytes) -> None:
        if not self._closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.transport.write(frame)

    def _forget(self, stream: SpdyStream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]

    def _maybe_forget(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._forget(stream)

    # ------------------------------------------------------------------ reading

    async def run(self) -> None:
        """Read and dispatch frames until the connection ends; then reset every stream."""
        try:
            while not self._closed:
                data = await self.transport.read()
                if not data:
                    break
                try:
                    frames = self._parser.feed(data)
                except spdy.SpdyError as exc:
                    self.error = str(exc)
                    log.info("spdy: closing connection: %s", exc)
                    self._send_nowait(spdy.goaway_frame(self._last_id, exc.status))
                    break
                for frame in frames:
                    await self._dispatch(frame)
                    if self._closed:
                        break
        finally:
            self._shutdown()

    async def _dispatch(self, frame: spdy.Frame) -> None:
        kind = frame.kind
        if kind == spdy.DATA:
            stream = self.streams.get(frame.stream_id)
            if stream is None or stream.remote_closed:
                if frame.stream_id > self._last_id or frame.stream_id == 0:
                    self._send_nowait(spdy.rst_stream_frame(frame.stream_id, spdy.INVALID_STREAM))
                elif stream is not None:
                    stream.reset(spdy.STREAM_ALREADY_CLOSED)
                return
            # Back-pressure: stop reading the socket while this stream is full.
            while not stream._space.is_set() and not self._closed:
                await stream._space.wait()
            stream._feed(frame.data)
            if frame.fin:
                stream._feed_eof()
                self._maybe_forget(stream)
        elif kind == spdy.SYN_STREAM:
            self._on_syn_stream(frame)
        elif kind == spdy.RST_STREAM:
            stream = self.streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._on_reset(frame.status)
        elif kind == spdy.PING:
            # Client pings have odd ids; answer them. Even ids would be answers to pings
            # of ours, and we send none.
            if frame.ping_id % 2 == 1:
                self._send_nowait(spdy.ping_frame(frame.ping_id))
                self.pings_answered += 1
        elif kind == spdy.GOAWAY:
            # The client will open no more streams; the open ones finish normally.
            pass
        elif kind == spdy.HEADERS and frame.fin and frame.stream_id in self.streams:
            stream = self.streams[frame.stream_id]
            stream._feed_eof()
            self._maybe_forget(stream)
        # SYN_REPLY (we open no streams), SETTINGS and WINDOW_UPDATE are ignored.

    def _on_syn_stream(self, frame: spdy.Frame) -> None:
        sid = frame.stream_id
        if sid == 0 or sid % 2 == 0 or sid <= self._last_id:
            # Stream ids from the client are odd and increasing.
            self._send_nowait(spdy.rst_stream_frame(sid, spdy.PROTOCOL_ERROR))
            return
        self._last_id = sid
        if len(self.streams) >= self.max_streams:
            self._send_nowait(spdy.rst_stream_frame(sid, spdy.REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, frame.headers)
        self.streams[sid] = stream
        self._send_nowait(spdy.syn_reply_frame(self._compressor, sid, []))
        if frame.fin:
            stream._feed_eof()
        try:
            self.on_stream(stream)
        except Exception:
            log.exception("spdy: stream handler failed")
            stream.reset(spdy.INTERNAL_ERROR)

    def _shutdown(self) -> None:
        self._closed = True
        for stream in list(self.streams.values()):
            # What the peer sent before leaving can still be read.
            stream._on_reset(spdy.CANCEL, discard=False)
        self.streams.clear()
        self.closed.set()

    async def close(self, *, goaway: bool = True, linger: float = 2.0) -> None:
        """Say GOAWAY, flush, half-close and give the peer ``linger`` seconds to hang up
        (closing with unread input would make the kernel reset the connection and the
        client could lose the last frames); then close the transport."""
        if not self._closed:
            if goaway:
                self._send_nowait(spdy.goaway_frame(self._last_id, spdy.GOAWAY_OK))
            with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
                await asyncio.wait_for(self.transport.drain(), 5.0)
            self.transport.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), linger)
        self._closed = True
        self.transport.close()
        for stream in list(self.streams.values()):
            stream._on_reset(spdy.CANCEL, discard=False)
        self.closed.set()
