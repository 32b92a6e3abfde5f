"""Exec and attach sessions: the Kubernetes "remotecommand" protocols over SPDY streams
(channel.k8s.io, v2..v5.channel.k8s.io) and WebSocket channels (v4/v5.channel.k8s.io).

Both transports are reduced to :class:`CommandChannels`; :func:`run_session` drives a
backend process through them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cri.streaming import spdy, websocket
from cri.streaming.backend import STDERR, STDOUT, ProcessStreams
from cri.streaming.spdy_connection import SpdyConnection, SpdyStream, StreamReset

log = logging.getLogger(__name__)

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
# WebSocket only: every message a text frame, "<channel digit><base64 of the bytes>"
BASE64_V1 = "base64.channel.k8s.io"
BASE64_V4 = "v4.base64.channel.k8s.io"
SPDY_PROTOCOLS = [V5, V4, V3, V2, V1]
WEBSOCKET_PROTOCOLS = [V5, V4, BASE64_V4, V1, BASE64_V1]
BASE64_PROTOCOLS = (BASE64_V1, BASE64_V4)
_VERSIONS = {V1: 1, V2: 2, V3: 3, V4: 4, V5: 5, BASE64_V1: 1, BASE64_V4: 4, "": 1}

# WebSocket channel numbers (first byte of every binary message).
WS_STDIN = 0
WS_STDOUT = 1
WS_STDERR = 2
WS_ERROR = 3
WS_RESIZE = 4
WS_CLOSE = 255  # v5: [255, channel] closes that channel

#: How long the client has to open all its SPDY streams.
STREAM_CREATION_TIMEOUT = 30.0
#: After the process exited, how long to wait for the rest of its output.
OUTPUT_DRAIN_TIMEOUT = 2.0
#: How long a tty exec waits for the client's terminal size before it starts anyway.
INITIAL_SIZE_WAIT = 1.0
#: Largest pending resize JSON accepted.
MAX_RESIZE_BUFFER = 4096


def protocol_version(protocol: str) -> int:
    return _VERSIONS[protocol]


@dataclass(frozen=True)
class CommandOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


# ---------------------------------------------------------------------------- status


def _status(payload: dict[str, object]) -> bytes:
    return json.dumps({"metadata": {}, **payload}, separators=(",", ":")).encode()


def exit_status(version: int, code: int) -> bytes:
    """What the error stream carries when the process exited with ``code``."""
    if code == 0:
        return _status({"status": "Success"}) if version >= 4 else b""
    message = f"command terminated with non-zero exit code: exit code {code}"
    if version < 4:
        return message.encode()
    return _status(
        {
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    )


def failure_status(version: int, message: str) -> bytes:
    """What the error stream carries when the session could not run."""
    if version < 4:
        return message.encode()
    return _status(
        {"status": "Failure", "message": message, "reason": "InternalError", "code": 500}
    )


def success_status(version: int) -> bytes:
    return _status({"status": "Success"}) if version >= 4 else b""


class ResizeDecoder:
    """Splits a stream of JSON objects {"Width": w, "Height": h} into sizes."""

    def __init__(self) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self._buf += data.decode(errors="replace")
        sizes: list[tuple[int, int]] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                break
            try:
                value, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > MAX_RESIZE_BUFFER:
                    raise ValueError("resize message too large or malformed") from None
                self._buf = text
                break
            self._buf = text[end:]
            if isinstance(value, dict):
                width, height = value.get("Width"), value.get("Height")
                if (
                    isinstance(width, int)
                    and isinstance(height, int)
                    and 0 < width < 1 << 16
                    and 0 < height < 1 << 16
                ):
                    sizes.append((width, height))
        return sizes


# ---------------------------------------------------------------------------- channels


class CommandChannels(ABC):
    """The client's side of one session, whatever the transport."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()  # set when the client went away

    @abstractmethod
    async def read_stdin(self) -> bytes:
        """Next stdin bytes; b"" once the client closed its stdin."""

    @abstractmethod
    async def read_resize(self) -> tuple[int, int] | None:
        """Next terminal size; None when no more will come."""

    @abstractmethod
    async def write_output(self, channel: int, data: bytes) -> None:
        """Send stdout (1) or stderr (2); raises ConnectionError if the client is gone."""

    @abstractmethod
    async def finish(self, status: bytes) -> None:
        """End the session: close the output channels, report the status, hang up."""


class SpdyCommandChannels(CommandChannels):
    def __init__(self, conn: SpdyConnection, streams: dict[str, SpdyStream]) -> None:
        super().__init__()
        self.conn = conn
        self.closed = conn.closed
        self.streams = streams
        self._resize = ResizeDecoder()
        self._sizes: list[tuple[int, int]] = []

    async def read_stdin(self) -> bytes:
        stream = self.streams.get("stdin")
        if stream is None:
            return b""
        try:
            return await stream.read()
        except StreamReset:
            return b""

    async def read_resize(self) -> tuple[int, int] | None:
        stream = self.streams.get("resize")
        if stream is None:
            return None
        while not self._sizes:
            try:
                data = await stream.read()
            except StreamReset:
                return None
            if not data:
                return None
            try:
                self._sizes.extend(self._resize.feed(data))
            except ValueError:
                stream.reset(spdy.PROTOCOL_ERROR)
                return None
        return self._sizes.pop(0)

    async def write_output(self, channel: int, data: bytes) -> None:
        stream = self.streams.get("stdout" if channel == STDOUT else "stderr")
        if stream is not None:
            await stream.write(data)

    async def finish(self, status: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            for name in ("stdout", "stderr"):
                if (stream := self.streams.get(name)) is not None:
                    await stream.close()
            error = self.streams.get("error")
            if error is not None:
                if status:
                    await error.write(status)
                await error.close()
        await self.conn.close()


class WebSocketCommandChannels(CommandChannels):
    """Channels multiplexed over one WebSocket; runs its own reader task. Each message
    is a channel number then bytes: a binary frame (channel.k8s.io and its v4/v5), or a
    text frame of an ASCII digit then base64 (the base64 protocols)."""

    STDIN_QUEUE = 8

    def __init__(
        self, ws: websocket.WebSocketConnection, version: int, *, base64_frames: bool = False
    ) -> None:
        super().__init__()
        self.ws = ws
        self.version = version
        self.base64_frames = base64_frames
        self._stdin: asyncio.Queue[bytes] = asyncio.Queue(self.STDIN_QUEUE)
        self._stdin_closed = False
        self._sizes: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(64)
        self._resize = ResizeDecoder()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message is None:
                    break
                decoded = self._decode(message)
                if decoded is None:
                    continue
                channel, payload = decoded
                if channel == WS_STDIN and payload and not self._stdin_closed:
                    await self._stdin.put(payload)
                elif channel == WS_RESIZE:
                    try:
                        sizes = self._resize.feed(payload)
                    except ValueError:
                        continue
                    for size in sizes:
                        if not self._sizes.full():
                            self._sizes.put_nowait(size)
                elif channel == WS_CLOSE and self.version >= 5 and payload[:1] == b"\x00":
                    await self._end_stdin()
        finally:
            await self._end_stdin()
            if not self._sizes.full():
                self._sizes.put_nowait(None)
            self.closed.set()

    def _decode(self, message: websocket.Message) -> tuple[int, bytes] | None:
        if not message.data:
            return None
        if not self.base64_frames:
            if message.opcode != websocket.BINARY:
                return None
            return message.data[0], message.data[1:]
        if message.opcode != websocket.TEXT or not 0x30 <= message.data[0] <= 0x39:
            return None
        try:
            return message.data[0] - 0x30, base64.b64decode(message.data[1:], validate=True)
        except binascii.Error:
            return None

    async def _send(self, channel: int, data: bytes) -> None:
        if self.base64_frames:
            await self.ws.send(websocket.TEXT, bytes((0x30 + channel,)) + base64.b64encode(data))
        else:
            await self.ws.send_binary(bytes((channel,)) + data)

    async def announce(self, opts: CommandOptions) -> None:
        """Before v4, the server's first message is an empty one on its lowest writable
        channel: clients of those protocols wait for it to know the session is open."""
        if self.version >= 4:
            return
        channel = WS_STDOUT if opts.stdout else WS_STDERR if opts.stderr else WS_ERROR
        with contextlib.suppress(ConnectionError):
            await self._send(channel, b"")

    async def _end_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._stdin.put(b"")

    async def read_stdin(self) -> bytes:
        return await self._stdin.get()

    async def read_resize(self) -> tuple[int, int] | None:
        return await self._sizes.get()

    async def write_output(self, channel: int, data: bytes) -> None:
        ws_channel = WS_STDOUT if channel == STDOUT else WS_STDERR
        for start in range(0, len(data), spdy.SEND_CHUNK):
            await self._send(ws_channel, data[start : start + spdy.SEND_CHUNK])

    async def finish(self, status: bytes) -> None:
        if status:
            with contextlib.suppress(ConnectionError):
                await self._send(WS_ERROR, status)
        await self.ws.close(websocket.NORMAL_CLOSURE)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def collect_spdy_streams(
    conn: SpdyConnection,
    incoming: asyncio.Queue[SpdyStream],
    expected: set[str],
    timeout: float = STREAM_CREATION_TIMEOUT,
) -> dict[str, SpdyStream]:
    """Wait until the client opened one stream of every expected type."""
    streams: dict[str, SpdyStream] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    closed = asyncio.ensure_future(conn.closed.wait())
    try:
        while not expected.issubset(streams):
            getter = asyncio.ensure_future(incoming.get())
            done, _ = await asyncio.wait(
                {getter, closed},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if getter not in done:
                getter.cancel()
                if closed in done:
                    raise ConnectionResetError("client left before opening its streams")
                missing = sorted(expected - set(streams))
                raise TimeoutError(f"timed out waiting for streams {missing}")
            stream = getter.result()
            kind = (stream.header("streamtype") or "").lower()
            if kind not in expected or kind in streams:
                stream.reset(spdy.REFUSED_STREAM)
                continue
            streams[kind] = stream
    finally:
        closed.cancel()
    return streams


def expected_streams(opts: CommandOptions, version: int) -> set[str]:
    expected = {"error"}
    if opts.stdin:
        expected.add("stdin")
    if opts.stdout:
        expected.add("stdout")
    if opts.stderr and not opts.tty:
        expected.add("stderr")
    if opts.tty and version >= 3:
        expected.add("resize")
    return expected


# ---------------------------------------------------------------------------- session


async def first_size(channels: CommandChannels, wait: float) -> tuple[int, int] | None:
    """The client's terminal size, when it sends one within ``wait`` seconds: kubectl
    and crictl send it as soon as the streams are open, but only after the session
    started, so without this wait a tty process's first TIOCGWINSZ would see 0x0."""
    try:
        return await asyncio.wait_for(channels.read_resize(), wait)
    except TimeoutError:
        return None


async def run_session(
    channels: CommandChannels,
    start: Callable[[tuple[int, int] | None], Awaitable[ProcessStreams]],
    opts: CommandOptions,
    version: int,
    *,
    attach: bool = False,
) -> int | None:
    """Start the process and relay until it ends or the client leaves. Returns the exit
    code reported to the client (None if the session never got that far). A tty exec
    starts with the client's first terminal size (see first_size)."""
    size = None
    if opts.tty and not attach and version >= 3:
        size = await first_size(channels, INITIAL_SIZE_WAIT)
    try:
        process = await start(size)
    except Exception as exc:
        log.info("streaming: cannot start session: %s", exc)
        message = str(exc) or type(exc).__name__
        await channels.finish(failure_status(version, message))
        return None

    async def pump_output() -> None:
        client_gone = False
        async for channel, data in process.output():
            if client_gone or not data:
                continue
            if opts.tty:
                channel = STDOUT
            if (channel == STDOUT and not opts.stdout) or (channel == STDERR and not opts.stderr):
                continue
            try:
                await channels.write_output(channel, data)
            except ConnectionError:
                client_gone = True  # keep draining so the process never blocks on us

    async def pump_stdin() -> None:
        while True:
            data = await channels.read_stdin()
            if not data:
                await process.close_stdin()
                return
            await process.write_stdin(data)

    async def pump_resize() -> None:
        while (size := await channels.read_resize()) is not None:
            with contextlib.suppress(Exception):
                await process.resize(*size)

    output = asyncio.ensure_future(pump_output())
    helpers = []
    if opts.stdin:
        helpers.append(asyncio.ensure_future(pump_stdin()))
    if opts.tty:
        helpers.append(asyncio.ensure_future(pump_resize()))
    waiter = asyncio.ensure_future(process.wait())
    gone = asyncio.ensure_future(channels.closed.wait())
    code: int | None = None
    try:
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            code = waiter.result()
            # The process ended: collect the rest of its output, then report.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(output), OUTPUT_DRAIN_TIMEOUT)
            if not output.done():
                output.cancel()
            elif output.exception() is not None:
                log.info("streaming: output relay failed: %r", output.exception())
            if attach:
                status = success_status(version)
            else:
                status = exit_status(version, code if code is not None else 0)
            for task in helpers:
                task.cancel()
            await channels.finish(status)
        else:
            await channels.finish(b"")
    finally:
        gone.cancel()
        tasks: list[asyncio.Future[Any]] = [output, waiter, *helpers]
        for future in tasks:
            future.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await process.close()
    return code
