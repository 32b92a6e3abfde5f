"""A StreamingBackend that runs real processes on this host (exec: a subprocess with pipes
or a pty; attach: long-running "containers" started by the test; port-forward: a TCP
connection to 127.0.0.1:port)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
from collections.abc import AsyncIterator

from agent.guest.stdio import set_window_size
from cri.streaming.errors import BackendError

_END = (0, b"")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class LocalProcess:
    """ProcessStreams over an asyncio subprocess."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.proc: asyncio.subprocess.Process | None = None
        self.master: int | None = None
        self._output: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(64)
        self._readers: list[asyncio.Task[None]] = []
        self.resizes: list[tuple[int, int]] = []
        self.initial_size: tuple[int, int] | None = None
        self.stdin_closed = False
        self.closed = False

    @classmethod
    async def start(
        cls, cmd: list[str], *, tty: bool, stdin: bool, size: tuple[int, int] | None = None
    ) -> LocalProcess:
        self = cls(tty)
        self.initial_size = size
        try:
            if tty:
                master, slave = pty.openpty()
                self.master = master
                if size is not None:
                    set_window_size(master, *size)
                self.proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
                )
                os.close(slave)
                self._readers.append(asyncio.ensure_future(self._read_pty(master)))
            else:
                self.proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
                assert self.proc.stdout is not None and self.proc.stderr is not None
                self._readers.append(asyncio.ensure_future(self._read_pipe(1, self.proc.stdout)))
                self._readers.append(asyncio.ensure_future(self._read_pipe(2, self.proc.stderr)))
        except OSError as exc:
            raise BackendError(f"cannot run {cmd[0]!r}: {exc.strerror}") from exc
        return self

    async def _read_pipe(self, channel: int, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            await self._output.put((channel, data))

    async def _read_pty(self, master: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.run_in_executor(None, os.read, master, 65536)
            except OSError:  # EIO once the slave side is closed everywhere
                return
            if not data:
                return
            await self._output.put((1, data))

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        finisher = asyncio.ensure_future(self._finish_output())
        try:
            while (item := await self._output.get()) != _END:
                yield item
        finally:
            finisher.cancel()

    async def _finish_output(self) -> None:
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self._output.put(_END)

    async def write_stdin(self, data: bytes) -> None:
        assert self.proc is not None
        if self.master is not None:
            os.write(self.master, data)
        elif self.proc.stdin is not None:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()

    async def close_stdin(self) -> None:
        assert self.proc is not None
        self.stdin_closed = True
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.write(self.master, b"\x04")
        elif self.proc.stdin is not None:
            self.proc.stdin.close()

    async def resize(self, cols: int, rows: int) -> None:
        self.resizes.append((cols, rows))
        if self.master is not None:
            set_window_size(self.master, cols, rows)

    async def wait(self) -> int | None:
        assert self.proc is not None
        return _exit_code(await self.proc.wait())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None


class LocalContainer:
    """A long-running process that attach sessions connect to (pipes, no tty)."""

    def __init__(self, process: LocalProcess) -> None:
        self.process = process
        self.subscribers: list[asyncio.Queue[tuple[int, bytes]]] = []
        self.exit_code: int | None = None
        self._pump = asyncio.ensure_future(self._fan_out())

    async def _fan_out(self) -> None:
        async for item in self.process.output():
            for queue in list(self.subscribers):
                await queue.put(item)
        self.exit_code = await self.process.wait()
        for queue in list(self.subscribers):
            await queue.put(_END)


class Attachment:
    def __init__(self, container: LocalContainer) -> None:
        self.container = container
        self.queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(64)
        container.subscribers.append(self.queue)
        self.detached = False

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        while (item := await self.queue.get()) != _END:
            yield item

    async def write_stdin(self, data: bytes) -> None:
        await self.container.process.write_stdin(data)

    async def close_stdin(self) -> None:
        self.detached = True  # like a container without stdin_once: stdin stays open

    async def resize(self, cols: int, rows: int) -> None:
        await self.container.process.resize(cols, rows)

    async def wait(self) -> int | None:
        return await self.container.process.wait()

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.container.subscribers.remove(self.queue)


class TcpChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        try:
            return await self.reader.read(65536)
        except ConnectionError:
            return b""

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close_write(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class LocalBackend:
    """exec runs ``cmd`` on this host; container ids only matter for attach."""

    def __init__(self) -> None:
        self.processes: list[LocalProcess] = []
        self.containers: dict[str, LocalContainer] = {}
        self.forwards: list[TcpChannel] = []

    async def add_container(self, container_id: str, cmd: list[str]) -> LocalContainer:
        process = await LocalProcess.start(cmd, tty=False, stdin=True)
        container = self.containers[container_id] = LocalContainer(process)
        return container

    async def exec(
        self,
        container_id: str,
        cmd: list[str],
        *,
        tty: bool,
        stdin: bool,
        size: tuple[int, int] | None = None,
    ) -> LocalProcess:
        if container_id == "missing":
            raise BackendError(f"container {container_id!r} not found")
        process = await LocalProcess.start(cmd, tty=tty, stdin=stdin, size=size)
        self.processes.append(process)
        return process

    async def attach(self, container_id: str, *, tty: bool, stdin: bool) -> Attachment:
        container = self.containers.get(container_id)
        if container is None:
            raise BackendError(f"container {container_id!r} not found")
        return Attachment(container)

    async def port_forward(self, sandbox_id: str, port: int) -> TcpChannel:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        channel = TcpChannel(reader, writer)
        self.forwards.append(channel)
        return channel

    async def close(self) -> None:
        for process in self.processes:
            await process.close()
        for container in self.containers.values():
            await container.process.close()
