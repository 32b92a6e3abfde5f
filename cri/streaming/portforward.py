"""Port forwarding: the Kubernetes "portforward.k8s.io" protocol over SPDY (also when
tunnelled in WebSocket), and the older WebSocket channel framing.

SPDY: for every forwarded connection the client opens an error stream and a data stream
carrying the same ``port`` and ``requestID`` headers. Once both are there we open a TCP
connection to that port inside the pod and relay bytes; a failure is written as text on
the error stream. When the pod side closes, the data and error streams get FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from cri.streaming import spdy, websocket
from cri.streaming.backend import ByteChannel
from cri.streaming.spdy_connection import SpdyConnection, SpdyStream, StreamReset

log = logging.getLogger(__name__)

PROTOCOL = "portforward.k8s.io"
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
WEBSOCKET_PROTOCOLS = ["v4.channel.k8s.io", PROTOCOL]

#: How long the second stream of a pair may take to arrive.
PAIR_TIMEOUT = 30.0
#: After the pod side closed, how long the client may keep sending.
CLOSE_GRACE = 5.0

Opener = Callable[[int], Awaitable[ByteChannel]]


def parse_port(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


class _Pair:
    def __init__(self, request_id: str, port: int) -> None:
        self.request_id = request_id
        self.port = port
        self.data: SpdyStream | None = None
        self.error: SpdyStream | None = None
        self.timer: asyncio.TimerHandle | None = None


class SpdyPortForwarder:
    """Serves the streams of one SPDY port-forward connection."""

    def __init__(self, conn: SpdyConnection, open_channel: Opener, describe: str) -> None:
        self.conn = conn
        self.open_channel = open_channel
        self.describe = describe  # e.g. "pod <id>", used in error messages
        self._pending: dict[str, _Pair] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.forwarded = 0

    def on_stream(self, stream: SpdyStream) -> None:
        kind = (stream.header("streamtype") or "").lower()
        port = parse_port(stream.header("port"))
        if kind not in ("data", "error") or port is None:
            stream.reset(spdy.PROTOCOL_ERROR)
            return
        request_id = stream.header("requestid")
        if request_id is None:
            # Clients older than requestID opened the error stream, then the data stream.
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        pair = self._pending.get(request_id)
        if pair is None:
            pair = self._pending[request_id] = _Pair(request_id, port)
            pair.timer = asyncio.get_running_loop().call_later(
                PAIR_TIMEOUT, self._expire, request_id
            )
        if getattr(pair, kind) is not None or pair.port != port:
            stream.reset(spdy.PROTOCOL_ERROR)
            return
        setattr(pair, kind, stream)
        if pair.data is not None and pair.error is not None:
            del self._pending[request_id]
            if pair.timer is not None:
                pair.timer.cancel()
            task = asyncio.get_running_loop().create_task(
                self._forward(pair.data, pair.error, port)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _expire(self, request_id: str) -> None:
        pair = self._pending.pop(request_id, None)
        if pair is not None:
            for stream in (pair.data, pair.error):
                if stream is not None:
                    stream.reset(spdy.CANCEL)

    async def _forward(self, data: SpdyStream, error: SpdyStream, port: int) -> None:
        self.forwarded += 1
        try:
            channel = await self.open_channel(port)
        except Exception as exc:
            message = f"error forwarding port {port} to {self.describe}: {exc}"
            log.info("streaming: %s", message)
            with contextlib.suppress(ConnectionError):
                await error.write(message.encode())
                await error.close()
                await data.close()
            return
        try:
            await relay_spdy(data, channel)
        finally:
            with contextlib.suppress(ConnectionError):
                await error.close()
            await channel.close()

    async def run(self) -> None:
        """Serve until the connection ends; then stop every forward."""
        try:
            await self.conn.closed.wait()
        finally:
            for pair in self._pending.values():
                if pair.timer is not None:
                    pair.timer.cancel()
            self._pending.clear()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def relay_spdy(data: SpdyStream, channel: ByteChannel) -> None:
    """Copy both ways until the pod side closed (then give the client a moment to
    finish) or the client reset the stream."""

    async def upstream() -> None:  # client -> pod
        try:
            while chunk := await data.read():
                await channel.write(chunk)
            await channel.close_write()
        except StreamReset:
            pass

    async def downstream() -> None:  # pod -> client
        while chunk := await channel.read():
            await data.write(chunk)
        await data.close()

    up = asyncio.ensure_future(upstream())
    down = asyncio.ensure_future(downstream())
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if down in done:
            # The pod finished; client-go resets the data stream once it read everything.
            await asyncio.wait({up}, timeout=CLOSE_GRACE)
        else:
            await down
    except (ConnectionError, OSError) as exc:
        log.debug("streaming: port-forward relay ended: %r", exc)
    finally:
        for task in (up, down):
            task.cancel()
        results = await asyncio.gather(up, down, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, ConnectionError | OSError):
                log.info("streaming: port-forward relay failed: %r", result)


# ---------------------------------------------------------------------------- WebSocket


async def serve_websocket_channels(
    ws: websocket.WebSocketConnection, ports: list[int], open_channel: Opener, describe: str
) -> None:
    """The older WebSocket port-forward: for port i, channel 2i carries data and 2i+1
    errors; each channel's first server message is the port (uint16, little-endian).
    One TCP connection per port for the life of the WebSocket."""
    channels: dict[int, ByteChannel] = {}
    for index, port in enumerate(ports):
        head = port.to_bytes(2, "little")
        await ws.send_binary(bytes((2 * index,)) + head)
        await ws.send_binary(bytes((2 * index + 1,)) + head)

    async def downstream(index: int, port: int) -> None:
        try:
            channel = await open_channel(port)
        except Exception as exc:
            message = f"error forwarding port {port} to {describe}: {exc}"
            with contextlib.suppress(ConnectionError):
                await ws.send_binary(bytes((2 * index + 1,)) + message.encode())
            return
        channels[index] = channel
        while chunk := await channel.read():
            for start in range(0, len(chunk), spdy.SEND_CHUNK):
                await ws.send_binary(bytes((2 * index,)) + chunk[start : start + spdy.SEND_CHUNK])

    readers = [asyncio.ensure_future(downstream(i, p)) for i, p in enumerate(ports)]
    all_done = asyncio.ensure_future(asyncio.wait(readers))
    try:
        while True:
            receiver = asyncio.ensure_future(ws.receive())
            await asyncio.wait({receiver, all_done}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():
                # Every pod connection ended: the session is over.
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
                break
            message = receiver.result()
            if message is None:
                break
            if message.opcode != websocket.BINARY or not message.data:
                continue
            number = message.data[0]
            if number % 2 == 0 and (channel := channels.get(number // 2)) is not None:
                await channel.write(message.data[1:])
    finally:
        all_done.cancel()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels.values():
            await channel.close()
        await ws.close()
