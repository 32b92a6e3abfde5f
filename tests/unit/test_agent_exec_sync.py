"""exec_sync's one budget for start and run, against a scripted agent on a socket pair.

kubelet gives an exec probe one timeout and counts only DEADLINE_EXCEEDED as a probe
timeout, so a slow start must time out like a slow command, and the process must be
dead by the time the call returns.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.client import AgentClient
from agent.protocol import (
    EVENT,
    EVENT_EXEC_EXITED,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    STDOUT,
    SYNC,
    SYNC_MARKER,
    FrameDecoder,
    decode_json,
    encode_data,
    encode_json,
)

STREAM = 7


class ScriptedAgent:
    """Answers hello, starts an exec after ``start_delay`` s, exits it after ``run_for`` s
    (None: runs until killed), and records when it was killed."""

    def __init__(self, start_delay: float, run_for: float | None, chunks: int = 1) -> None:
        self.start_delay = start_delay
        self.run_for = run_for
        self.chunks = chunks  # how many times "out" is written
        self.specs: list[dict[str, Any]] = []
        self.killed_at: float | None = None
        self.exited = False
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        decoder = FrameDecoder()
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.kind == SYNC:
                    self._writer.write(SYNC_MARKER)
                elif frame.kind == REQUEST:
                    task = asyncio.create_task(self._handle(decode_json(frame.payload)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    def _send(self, frame: bytes) -> None:
        assert self._writer is not None
        self._writer.write(frame)

    def _reply(self, request_id: int, result: dict[str, Any]) -> None:
        self._send(encode_json(RESPONSE, 0, {"id": request_id, "ok": True, "result": result}))

    def _exit(self, code: int, signal: int) -> None:
        if not self.exited:
            self.exited = True
            event = {"event": EVENT_EXEC_EXITED, "stream": STREAM, "exit_code": code}
            self._send(encode_json(EVENT, STREAM, {**event, "signal": signal}))

    async def _handle(self, message: dict[str, Any]) -> None:
        op, request_id = message["op"], message["id"]
        if op == "hello":
            self._reply(
                request_id, {"agent_version": "scripted", "protocol_version": PROTOCOL_VERSION}
            )
        elif op == "exec":
            self.specs.append(message["args"]["spec"])
            await asyncio.sleep(self.start_delay)
            self._reply(request_id, {"stream": STREAM, "pid": 42})
            for _ in range(self.chunks):
                self._send(encode_data(STREAM, STDOUT, b"out"))
            if self.run_for is not None:
                await asyncio.sleep(self.run_for)
                self._exit(0, 0)
        elif op == "signal_exec":
            self.killed_at = asyncio.get_running_loop().time()
            self._reply(request_id, {})
            self._exit(137, 9)


async def connect(agent: ScriptedAgent) -> AsyncIterator[AgentClient]:
    host, guest = socket.socketpair()
    server = asyncio.create_task(agent.serve(guest))
    reader, writer = await asyncio.open_unix_connection(sock=host)
    client = AgentClient(reader, writer)
    await client._hello(5.0)
    try:
        yield client
    finally:
        await client.close()
        server.cancel()


@pytest.fixture
async def slow_start() -> AsyncIterator[tuple[ScriptedAgent, AgentClient]]:
    agent = ScriptedAgent(start_delay=1.5, run_for=0.1)
    async for client in connect(agent):
        yield agent, client


@pytest.fixture
async def slow_run() -> AsyncIterator[tuple[ScriptedAgent, AgentClient]]:
    agent = ScriptedAgent(start_delay=0.6, run_for=None)
    async for client in connect(agent):
        yield agent, client


async def test_a_start_slower_than_the_timeout_times_out_and_is_killed(
    slow_start: tuple[ScriptedAgent, AgentClient],
) -> None:
    agent, client = slow_start
    result = await client.exec_sync("c1", ["true"], timeout=0.5)
    assert result.timed_out
    # it started late: killed before the call returned, not left to run
    assert agent.killed_at is not None
    assert agent.exited


async def test_start_and_run_share_one_budget(
    slow_run: tuple[ScriptedAgent, AgentClient],
) -> None:
    agent, client = slow_run
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await client.exec_sync("c1", ["sleep", "60"], timeout=1.0)
    assert result.timed_out
    assert agent.killed_at is not None
    # the kill came when the one budget ran out (start 0.6 s + run), not 1.0 s after start
    assert agent.killed_at - began < 1.5
    assert result.stdout == b"out"


async def test_the_guest_is_told_the_same_limit(
    slow_start: tuple[ScriptedAgent, AgentClient],
) -> None:
    agent, client = slow_start
    agent.start_delay = 0.0
    result = await client.exec_sync("c1", ["true"], timeout=3.0)
    assert not result.timed_out and result.exit_code == 0
    assert agent.specs[0]["timeout"] == 3.0


async def test_output_past_the_limit_is_dropped_not_kept() -> None:
    """A command printing without end once took the daemon to 2 GB: what ExecSync
    keeps is bounded, the rest is read and dropped while the process runs on."""
    agent = ScriptedAgent(start_delay=0.0, run_for=0.1, chunks=1000)
    async for client in connect(agent):
        result = await client.exec_sync("c1", ["yes"], timeout=10.0, max_output=10)
        assert not result.timed_out and result.exit_code == 0
        assert result.stdout == b"outoutoutou"[:10]
        agent.exited = False
        result = await client.exec_sync("c1", ["yes"], timeout=10.0)
        assert len(result.stdout) == 3000
