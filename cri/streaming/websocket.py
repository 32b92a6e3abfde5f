"""WebSocket (RFC 6455), server side: frame codec (sans I/O) and an asyncio connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
from dataclasses import dataclass

from cri.streaming.transport import ByteStream

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
CONTROL_OPCODES = frozenset({CLOSE, PING, PONG})
DATA_OPCODES = frozenset({TEXT, BINARY})

# Close codes.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

#: Largest message (after reassembling fragments) accepted from a client.
MAX_MESSAGE = 1 << 20


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR data with the 4-byte masking key (masking and unmasking are the same)."""
    n = len(data)
    if n == 0:
        return b""
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One frame. Servers send unmasked frames; ``mask`` is for clients (and tests)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = struct.pack(">BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack(">BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack(">BBQ", first, mask_bit | 127, n)
    if mask is not None:
        return header + mask + apply_mask(payload, mask)
    return header + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack(">H", code) + reason.encode()[:120]


class WebSocketError(Exception):
    """A protocol violation; ``code`` is the close code to send before disconnecting."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Message:
    opcode: int
    data: bytes


class FrameParser:
    """Incremental parser. Returns complete messages (fragments reassembled) and control
    frames (which may arrive between the fragments of a message)."""

    def __init__(self, *, require_mask: bool = True, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.require_mask = require_mask
        self.max_message = max_message
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self._fragment_size = 0

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 2:
                first, second = buf[pos], buf[pos + 1]
                fin = bool(first & 0x80)
                if first & 0x70:
                    raise WebSocketError(PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
                opcode = first & 0x0F
                masked = bool(second & 0x80)
                length = second & 0x7F
                offset = 2
                if length == 126:
                    if len(buf) - pos < 4:
                        break
                    (length,) = struct.unpack_from(">H", buf, pos + 2)
                    offset = 4
                elif length == 127:
                    if len(buf) - pos < 10:
                        break
                    (length,) = struct.unpack_from(">Q", buf, pos + 2)
                    offset = 10
                    if length >> 63:
                        raise WebSocketError(PROTOCOL_ERROR, "64-bit length with the top bit set")
                if opcode in CONTROL_OPCODES:
                    if length > 125:
                        raise WebSocketError(PROTOCOL_ERROR, "control frame longer than 125 bytes")
                    if not fin:
                        raise WebSocketError(PROTOCOL_ERROR, "fragmented control frame")
                elif opcode not in DATA_OPCODES and opcode != CONTINUATION:
                    raise WebSocketError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if self.require_mask and not masked:
                    raise WebSocketError(PROTOCOL_ERROR, "client frames must be masked")
                if self._fragment_size + length > self.max_message:
                    raise WebSocketError(
                        MESSAGE_TOO_BIG, f"message larger than {self.max_message} bytes"
                    )
                mask_len = 4 if masked else 0
                total = offset + mask_len + length
                if len(buf) - pos < total:
                    break
                payload = bytes(buf[pos + offset + mask_len : pos + total])
                if masked:
                    payload = apply_mask(payload, bytes(buf[pos + offset : pos + offset + 4]))
                pos += total
                self._frame(opcode, fin, payload, out)
        finally:
            del buf[:pos]
        return out

    def _frame(self, opcode: int, fin: bool, payload: bytes, out: list[Message]) -> None:
        if opcode in CONTROL_OPCODES:
            if opcode == CLOSE and len(payload) == 1:
                raise WebSocketError(PROTOCOL_ERROR, "close payload of one byte")
            out.append(Message(opcode, payload))
            return
        if opcode == CONTINUATION:
            if not self._fragments:
                raise WebSocketError(PROTOCOL_ERROR, "continuation without a message")
        elif self._fragments:
            raise WebSocketError(PROTOCOL_ERROR, "new message before the last one ended")
        else:
            self._fragment_opcode = opcode
        self._fragments.append(payload)
        self._fragment_size += len(payload)
        if fin:
            data = b"".join(self._fragments)
            self._fragments = []
            self._fragment_size = 0
            if self._fragment_opcode == TEXT:
                try:
                    data.decode()
                except UnicodeDecodeError as exc:
                    raise WebSocketError(INVALID_PAYLOAD, "text message is not UTF-8") from exc
            out.append(Message(self._fragment_opcode, data))


class WebSocketConnection:
    """Server end of an upgraded connection. ``receive`` answers pings itself; only one
    task may call it at a time."""

    def __init__(self, transport: ByteStream, *, max_message: int = MAX_MESSAGE) -> None:
        self.transport = transport
        self._parser = FrameParser(max_message=max_message)
        self._pending: list[Message] = []
        self._close_sent = False
        self._reading = False
        self.close_code: int | None = None  # the client's close code, once received
        self.closed = asyncio.Event()

    async def receive(self) -> Message | None:
        """Next data message; None once the connection is closed (by either side)."""
        self._reading = True
        try:
            return await self._receive()
        finally:
            self._reading = False

    async def _receive(self) -> Message | None:
        while True:
            while self._pending:
                message = self._pending.pop(0)
                if message.opcode == PING:
                    self._send_nowait(encode_frame(PONG, message.data))
                elif message.opcode == PONG:
                    continue
                elif message.opcode == CLOSE:
                    self.close_code = (
                        struct.unpack(">H", message.data[:2])[0] if message.data else 1005
                    )
                    if not self._close_sent:
                        self._send_nowait(encode_frame(CLOSE, close_payload(NORMAL_CLOSURE)))
                        self._close_sent = True
                        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                            await asyncio.wait_for(self.transport.drain(), 5.0)
                    self._finish()
                    return None
                else:
                    return message
            if self.closed.is_set():
                return None
            data = await self.transport.read()
            if not data:
                self._finish()
                return None
            try:
                self._pending = self._parser.feed(data)
            except WebSocketError as exc:
                self._send_nowait(encode_frame(CLOSE, close_payload(exc.code, str(exc))))
                self._close_sent = True
                self._finish()
                return None

    def _send_nowait(self, frame: bytes) -> None:
        if not self._close_sent and not self.closed.is_set():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.transport.write(frame)

    def send_nowait(self, opcode: int, data: bytes) -> None:
        if self._close_sent or self.closed.is_set():
            raise ConnectionResetError("WebSocket closed")
        self.transport.write(encode_frame(opcode, data))

    async def send(self, opcode: int, data: bytes) -> None:
        self.send_nowait(opcode, data)
        await self.transport.drain()

    async def send_binary(self, data: bytes) -> None:
        await self.send(BINARY, data)

    async def close(
        self, code: int = NORMAL_CLOSURE, reason: str = "", linger: float = 2.0
    ) -> None:
        """Send a close frame (once) and wait up to ``linger`` seconds for the client's
        close frame (reading and dropping what comes before it); then close."""
        if not self._close_sent and not self.closed.is_set():
            self._send_nowait(encode_frame(CLOSE, close_payload(code, reason)))
            self._close_sent = True
            with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
                await asyncio.wait_for(self.transport.drain(), 5.0)
        if not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                if self._reading:
                    await asyncio.wait_for(self.closed.wait(), linger)
                else:
                    await asyncio.wait_for(self._drop_until_closed(), linger)
        self._finish()

    async def _drop_until_closed(self) -> None:
        while await self.receive() is not None:
            pass

    def _finish(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.transport.close()


class WebSocketByteStream:
    """A ByteStream made of the binary messages of a WebSocket (SPDY tunnelled in
    WebSocket, as client-go's port-forward does)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def read(self) -> bytes:
        while True:
            message = await self.ws.receive()
            if message is None:
                return b""
            if message.opcode != BINARY:
                await self.ws.close(UNSUPPORTED_DATA, "binary messages only")
                return b""
            if message.data:
                return message.data

    def write(self, data: bytes) -> None:
        self.ws.send_nowait(BINARY, bytes(data))

    async def drain(self) -> None:
        await self.ws.transport.drain()

    def write_eof(self) -> None:
        """Send the close frame; the client answers with its own, which ends reading."""
        if not self.ws._close_sent:
            self.ws._send_nowait(encode_frame(CLOSE, close_payload(NORMAL_CLOSURE)))
            self.ws._close_sent = True

    def close(self) -> None:
        self.write_eof()
        self.ws._finish()

    async def wait_closed(self) -> None:
        await self.ws.transport.wait_closed()
