"""Byte transports the protocol layers run on: a TCP connection, or WebSocket messages."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

READ_CHUNK = 64 << 10


class ByteStream(Protocol):
    """An ordered, reliable byte stream."""

    async def read(self) -> bytes:
        """Next bytes; b"" at end of stream (or when the connection broke)."""
        ...

    def write(self, data: bytes) -> None:
        """Queue bytes for sending (never blocks; call ``drain`` for back-pressure)."""
        ...

    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark; raises
        ConnectionError when the connection is gone."""
        ...

    def write_eof(self) -> None:
        """Half-close: nothing more will be sent (reading goes on)."""
        ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class TcpStream:
    """ByteStream over an asyncio stream pair (bytes already read can be pushed back)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes = b""
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._initial = initial

    async def read(self) -> bytes:
        if self._initial:
            data, self._initial = self._initial, b""
            return data
        try:
            return await self.reader.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("connection closed")
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
