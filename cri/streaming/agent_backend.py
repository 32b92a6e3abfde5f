"""Adapters from the agent client's handles to the streaming backend protocols.

- :class:`AgentExecStreams` wraps an ``ExecSession`` (``AgentClient.exec``);
- :class:`AgentAttachStreams` wraps a ``ContainerOutput`` (stdin, resize) together with
  the chunks of the container's output the runtime fans out to this attach session;
- :class:`AgentPortForward` wraps a ``PortForwardStream`` (``AgentClient.port_forward``);
- :class:`AgentStreamingBackend` is a complete backend given two look-ups that return
  the :class:`ProcessSource` (the sandbox) of a container or a pod.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Protocol

from agent.errors import AgentError
from agent.protocol import ExecSpec
from agent.streams import ContainerOutput, ExecSession, PortForwardStream
from cri.streaming.errors import BackendError


class ProcessSource(Protocol):
    """Where a container's processes and a pod's ports are reached: the pod's sandbox
    (an agent client serves as well)."""

    async def exec(self, container_id: str, spec: ExecSpec) -> ExecSession: ...

    def subscribe_output(self, container_id: str) -> ContainerOutput: ...

    async def port_forward(self, port: int) -> PortForwardStream: ...


class AgentExecStreams:
    def __init__(self, session: ExecSession) -> None:
        self.session = session

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        async for item in self.session:
            yield item

    async def write_stdin(self, data: bytes) -> None:
        await self.session.write_stdin(data)

    async def close_stdin(self) -> None:
        with contextlib.suppress(AgentError):
            await self.session.close_stdin()

    async def resize(self, cols: int, rows: int) -> None:
        with contextlib.suppress(AgentError):
            await self.session.resize(cols, rows)

    async def wait(self) -> int | None:
        return await self.session.wait()

    async def close(self) -> None:
        """The client left: kill the process if it still runs."""
        if not self.session.exited:
            with contextlib.suppress(AgentError):
                await self.session.kill(9)


async def queue_chunks(
    queue: asyncio.Queue[tuple[int, bytes] | None],
) -> AsyncIterator[tuple[int, bytes]]:
    """Iterate a fan-out queue whose end is marked with None."""
    while (item := await queue.get()) is not None:
        yield item


class AgentAttachStreams:
    """Attach to a running container.

    ``chunks`` is this session's copy of the container's output (the runtime also
    writes it to the CRI log, so it must fan it out rather than hand over the
    ContainerOutput itself); when omitted the ContainerOutput is iterated directly.
    ``on_close`` runs when the session ends (e.g. to unsubscribe the fan-out queue).
    """

    def __init__(
        self,
        control: ContainerOutput,
        chunks: AsyncIterable[tuple[int, bytes]] | None = None,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.control = control
        self.chunks: AsyncIterable[tuple[int, bytes]] = chunks if chunks is not None else control
        self.on_close = on_close
        self._ended = asyncio.Event()
        self._closed = False

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        try:
            async for item in self.chunks:
                yield item
        finally:
            self._ended.set()

    async def write_stdin(self, data: bytes) -> None:
        await self.control.write_stdin(data)

    async def close_stdin(self) -> None:
        # Detach: the container's stdin closes only if it was created with stdin_once.
        with contextlib.suppress(AgentError):
            await self.control.detach_stdin()

    async def resize(self, cols: int, rows: int) -> None:
        with contextlib.suppress(AgentError):
            await self.control.resize(cols, rows)

    async def wait(self) -> int | None:
        await self._ended.wait()
        status = self.control.exit_status
        return status.exit_code if status is not None else None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ended.set()
        if self.on_close is not None:
            self.on_close()


class AgentPortForward:
    def __init__(self, stream: PortForwardStream) -> None:
        self.stream = stream

    async def read(self) -> bytes:
        return await self.stream.read()

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close_write(self) -> None:
        await self.stream.close_write()

    async def close(self) -> None:
        await self.stream.close()


class AgentStreamingBackend:
    """A StreamingBackend on top of agent clients.

    ``container_source(container_id)`` and ``pod_source(sandbox_id)`` return the
    :class:`ProcessSource` holding that container / pod (raising with a message for the
    user when there is none). ``attach_source(container_id)`` optionally returns this
    session's output chunks and a function that unsubscribes them.
    """

    def __init__(
        self,
        container_source: Callable[[str], Awaitable[ProcessSource]],
        pod_source: Callable[[str], Awaitable[ProcessSource]],
        attach_source: Callable[
            [str], tuple[AsyncIterable[tuple[int, bytes]], Callable[[], None]] | None
        ]
        | None = None,
    ) -> None:
        self.container_source = container_source
        self.pod_source = pod_source
        self.attach_source = attach_source

    async def exec(
        self,
        container_id: str,
        cmd: list[str],
        *,
        tty: bool,
        stdin: bool,
        size: tuple[int, int] | None = None,
    ) -> AgentExecStreams:
        source = await self.container_source(container_id)
        cols, rows = size if size is not None else (0, 0)
        spec = ExecSpec(args=cmd, tty=tty, stdin=stdin, cols=cols, rows=rows)
        try:
            session = await source.exec(container_id, spec)
        except AgentError as exc:
            raise BackendError(f"exec in container {container_id}: {exc.message}") from exc
        return AgentExecStreams(session)

    async def attach(self, container_id: str, *, tty: bool, stdin: bool) -> AgentAttachStreams:
        source = await self.container_source(container_id)
        try:
            control = source.subscribe_output(container_id)
        except AgentError as exc:
            raise BackendError(f"attach to container {container_id}: {exc.message}") from exc
        fan_out = self.attach_source(container_id) if self.attach_source is not None else None
        if fan_out is None:
            return AgentAttachStreams(control)
        chunks, unsubscribe = fan_out
        return AgentAttachStreams(control, chunks, on_close=unsubscribe)

    async def port_forward(self, sandbox_id: str, port: int) -> AgentPortForward:
        source = await self.pod_source(sandbox_id)
        try:
            stream = await source.port_forward(port)
        except AgentError as exc:
            raise BackendError(exc.message) from exc
        return AgentPortForward(stream)
