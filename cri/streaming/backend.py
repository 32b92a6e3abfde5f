"""What the streaming server needs from the runtime: processes to talk to and TCP ports.

The CRI runtime implements :class:`StreamingBackend`; the streaming server turns each
upgraded HTTP connection into one call to it. ``cri.streaming.agent_backend`` adapts the
agent client's objects to these protocols.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

STDOUT = 1
STDERR = 2


class ProcessStreams(Protocol):
    """The stdio of one exec'd process, or of a container being attached to."""

    def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """(channel, bytes) chunks, channel 1 (stdout) or 2 (stderr); ends once the
        process exited (exec) or the container exited (attach) and output is drained."""
        ...

    async def write_stdin(self, data: bytes) -> None:
        """Feed stdin; may wait (back-pressure) but must not buffer without bound."""
        ...

    async def close_stdin(self) -> None:
        """The client finished its input. For attach this detaches stdin (the container
        keeps its stdin unless it was created with stdin_once)."""
        ...

    async def resize(self, cols: int, rows: int) -> None:
        """New terminal size (tty sessions only)."""
        ...

    async def wait(self) -> int | None:
        """Exit code of the process (exec), or of the container (attach; None when the
        exit status is unknown)."""
        ...

    async def close(self) -> None:
        """The client went away: kill the exec'd process / detach from the container.
        Idempotent; called at the end of every session."""
        ...


class ByteChannel(Protocol):
    """One TCP connection to a port inside the pod."""

    async def read(self) -> bytes:
        """Next chunk; b"" once the pod side closed its end."""
        ...

    async def write(self, data: bytes) -> None:
        """Send bytes (waits while the pod side is slow)."""
        ...

    async def close_write(self) -> None:
        """Half-close: the client will send nothing more."""
        ...

    async def close(self) -> None:
        """Close both directions; idempotent."""
        ...


class StreamingBackend(Protocol):
    """Implemented by the CRI runtime. Raise ``BackendError`` (or any exception) when the
    session cannot start; its message is shown to the client."""

    async def exec(
        self,
        container_id: str,
        cmd: list[str],
        *,
        tty: bool,
        stdin: bool,
        size: tuple[int, int] | None = None,
    ) -> ProcessStreams:
        """``size``: (cols, rows) of the client's terminal, when it sent one before the
        process starts (tty sessions)."""
        ...

    async def attach(self, container_id: str, *, tty: bool, stdin: bool) -> ProcessStreams: ...

    async def port_forward(self, sandbox_id: str, port: int) -> ByteChannel: ...
