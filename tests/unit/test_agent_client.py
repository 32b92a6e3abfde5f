"""The agent client against a scripted agent on a socket pair: the connection's run state,
what a frame that breaks the protocol does, and what the typed operations put on the
wire (the JSON an agent built before the records must still understand)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agent.client import AgentClient
from agent.errors import AgentTimeout, AgentUnavailable
from agent.protocol import (
    CLOSE,
    EVENT,
    EVENT_CONTAINER_EXITED,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    STDOUT,
    SYNC,
    SYNC_MARKER,
    CgroupUpdate,
    ConfiguredInterface,
    ExecSpec,
    FrameDecoder,
    ImageSource,
    NetInterface,
    decode_json,
    encode_data,
    encode_frame,
    encode_json,
)
from agent.transport import RunState

#: What the agent does with a request: send these frames (None: never answer).
Script = Callable[[dict[str, Any]], list[bytes] | None]


def reply(request: dict[str, Any], result: Any = None) -> bytes:
    return encode_json(RESPONSE, 0, {"id": request["id"], "ok": True, "result": result})


class ScriptedAgent:
    """Answers every op as ``scripts[op]`` says; hello and ping by default, any other
    op with {}."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.requests: list[dict[str, Any]] = []
        self.writer: asyncio.StreamWriter | None = None

    async def serve(self, sock: socket.socket) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=sock)
        decoder = FrameDecoder()
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.kind == SYNC:
                    self.writer.write(SYNC_MARKER)
                elif frame.kind == REQUEST:
                    self._handle(decode_json(frame.payload))
        self.writer.close()

    def _handle(self, request: dict[str, Any]) -> None:
        assert self.writer is not None
        self.requests.append(request)
        op = request["op"]
        frames: list[bytes] | None
        if op in self.scripts:
            frames = self.scripts[op](request)
        elif op == "hello":
            frames = [reply(request, {"agent_version": "s", "protocol_version": PROTOCOL_VERSION})]
        elif op == "ping":
            frames = [reply(request, {"time_ns": 1})]
        else:
            frames = [reply(request, {})]
        for frame in frames or []:
            self.writer.write(frame)

    def send(self, frame: bytes) -> None:
        assert self.writer is not None
        self.writer.write(frame)

    def hang_up(self) -> None:
        assert self.writer is not None
        self.writer.close()

    def args_of(self, op: str) -> dict[str, Any]:
        args: dict[str, Any] = next(r["args"] for r in self.requests if r["op"] == op)
        return args


@pytest.fixture
async def agent() -> AsyncIterator[tuple[ScriptedAgent, AgentClient]]:
    scripted = ScriptedAgent()
    host, guest = socket.socketpair()
    server = asyncio.create_task(scripted.serve(guest))
    reader, writer = await asyncio.open_unix_connection(sock=host)
    client = AgentClient(reader, writer)
    client.default_timeout = 30.0  # far longer than any of these tests may take
    assert client.state is RunState.CONNECTING
    await client._hello(5.0)
    try:
        yield scripted, client
    finally:
        await client.close()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def state(client: AgentClient) -> RunState:
    """The client's state, read anew (not narrowed by an earlier assert)."""
    return client.state


def never(request: dict[str, Any]) -> None:
    return None


async def fails_fast(call: asyncio.Future[Any]) -> AgentUnavailable:
    """The error ``call`` fails with, well before any request timeout."""
    with pytest.raises(AgentUnavailable) as info:
        await asyncio.wait_for(call, 2.0)
    return info.value


# ---------------------------------------------------------------------- run state


async def test_the_run_state_follows_the_connection(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    _scripted, client = agent
    assert state(client) is RunState.RUNNING
    assert client.close_reason is None
    events = client.events()
    waiting = asyncio.ensure_future(anext(events, None))
    await asyncio.sleep(0)
    await client.close()
    assert state(client) is RunState.CLOSED
    assert client.close_reason is not None
    assert await asyncio.wait_for(waiting, 1.0) is None  # event iterators end
    with pytest.raises(AgentUnavailable, match="closed"):
        await client.ping()


async def test_a_client_without_a_connection_is_idle() -> None:
    client = AgentClient()
    assert state(client) is RunState.IDLE
    with pytest.raises(AgentUnavailable, match="idle"):
        await client.ping()
    await client.close()
    assert state(client) is RunState.CLOSED


async def test_connecting_to_a_missing_socket_gives_up(tmp_path: Any) -> None:
    with pytest.raises(AgentUnavailable, match="cannot connect"):
        await AgentClient.connect(tmp_path / "absent.sock", timeout=0.1)


async def test_an_agent_hanging_up_fails_pending_requests(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    scripted.scripts["wait_container"] = never
    waiting = asyncio.ensure_future(client.wait_container("c1"))
    await asyncio.sleep(0.05)
    scripted.hang_up()
    error = await fails_fast(waiting)
    assert "agent closed the connection" in str(error)
    assert client.state is RunState.CLOSED


# ---------------------------------------------------------------------- protocol errors


async def test_an_undecodable_reply_fails_every_pending_request_at_once(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    scripted.scripts["wait_container"] = never
    scripted.scripts["container_stats"] = lambda request: [
        encode_frame(RESPONSE, 0, b'{"id": ' + str(request["id"]).encode() + b", trunc")
    ]
    waiting = asyncio.ensure_future(client.wait_container("c1"))
    stats = asyncio.ensure_future(client.container_stats())
    error = await fails_fast(stats)
    assert "broke the protocol" in error.message
    other = await fails_fast(waiting)  # a request the bad frame was not even meant for
    assert "broke the protocol" in other.message
    assert client.state is RunState.CLOSED
    assert client.close_reason is not None
    assert "broke the protocol" in client.close_reason.message
    with pytest.raises(AgentUnavailable, match="broke the protocol"):
        await client.ping()


async def test_a_reply_without_an_id_closes_the_connection(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    scripted.scripts["list_containers"] = lambda request: [
        encode_json(RESPONSE, 0, {"ok": True, "result": []})
    ]
    error = await fails_fast(asyncio.ensure_future(client.list_containers()))
    assert "without an id" in error.message
    assert client.state is RunState.CLOSED


async def test_an_undecodable_event_closes_the_connection(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    scripted.scripts["exec"] = lambda request: [reply(request, {"stream": 5, "pid": 9})]
    session = await client.exec("c1", ExecSpec(args=["sleep", "9"]))
    scripted.scripts["wait_container"] = never
    waiting = asyncio.ensure_future(client.wait_container("c1"))
    await asyncio.sleep(0.05)
    scripted.send(encode_frame(EVENT, 5, b"\xff not json"))
    error = await fails_fast(waiting)
    assert "broke the protocol" in error.message
    with pytest.raises(AgentUnavailable):
        await session.wait(1.0)
    assert client.state is RunState.CLOSED


async def test_frames_for_unknown_streams_and_late_replies_are_harmless(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    late: list[dict[str, Any]] = []
    scripted.scripts["signal_container"] = lambda request: late.append(request)
    with pytest.raises(AgentTimeout):
        await client.signal_container("c1", timeout=0.1)
    scripted.send(reply(late[0], {}))  # its caller gave up
    scripted.send(encode_data(99, STDOUT, b"nobody listens"))
    scripted.send(encode_frame(CLOSE, 98, bytes((STDOUT,))))
    scripted.send(encode_data(0x40000007, STDOUT, b"no such forward"))
    event = {"event": EVENT_CONTAINER_EXITED, "stream": 97, "container_id": "gone"}
    scripted.send(encode_json(EVENT, 97, {**event, "status": {"exit_code": 0}}))
    assert await client.ping() == 1
    assert client.state is RunState.RUNNING


# ---------------------------------------------------------------------- typed operations


async def test_mount_image_sends_only_the_source_fields_that_are_set(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    scripted.scripts["mount_image"] = lambda request: [
        reply(request, {"path": "/run/clearcri/images/i1", "options": "ro"})
    ]
    path = await client.mount_image("i1", ImageSource(pci_path="0000:00:05.0/0000:01:00.0"))
    assert path == "/run/clearcri/images/i1"
    # what the agent has always been sent: it tells the kind of source by its keys
    assert scripted.args_of("mount_image") == {
        "image_id": "i1",
        "source": {"pci_path": "0000:00:05.0/0000:01:00.0"},
    }
    scripted.requests.clear()
    await client.mount_image("i2", ImageSource(device="/dev/loop3", fstype="erofs"))
    assert scripted.args_of("mount_image")["source"] == {"device": "/dev/loop3", "fstype": "erofs"}


async def test_update_container_sends_the_values_that_are_set(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    await client.update_container("c1", CgroupUpdate(cpu_max="50000 100000", memory_max="max"))
    assert scripted.args_of("update_container") == {
        "container_id": "c1",
        "resources": {"cpu_max": "50000 100000", "memory_max": "max"},
    }


async def test_configure_network_returns_the_configured_interfaces(
    agent: tuple[ScriptedAgent, AgentClient],
) -> None:
    scripted, client = agent
    nic = {"name": "eth0", "mac": "02:00:00:00:00:01", "ms": {"find": 0.5, "link": 1.0}}
    scripted.scripts["configure_network"] = lambda request: [reply(request, {"interfaces": [nic]})]
    configured = await client.configure_network(
        [NetInterface(mac="02:00:00:00:00:01", addresses=["10.0.0.2/24"])]
    )
    assert configured == [
        ConfiguredInterface(name="eth0", mac="02:00:00:00:00:01", ms={"find": 0.5, "link": 1.0})
    ]
    sent = scripted.args_of("configure_network")["interfaces"]
    assert sent[0]["mac"] == "02:00:00:00:00:01" and sent[0]["addresses"] == ["10.0.0.2/24"]


class ListeningAgent:
    """A unix socket like QEMU's agent chardev: one host at a time, each connection
    served by a ScriptedAgent; ``unanswered`` connections never answer hello."""

    def __init__(self, path: Any, unanswered: int) -> None:
        self.path = path
        self.unanswered = unanswered
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> ListeningAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        scripted = ScriptedAgent()
        if self.connections <= self.unanswered:
            scripted.scripts["hello"] = never
        decoder = FrameDecoder()
        scripted.writer = writer
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.kind == SYNC:
                    writer.write(SYNC_MARKER)
                elif frame.kind == REQUEST:
                    scripted._handle(decode_json(frame.payload))
        writer.close()


async def test_a_hello_left_unanswered_is_said_again_on_a_new_connection(tmp_path: Any) -> None:
    async with ListeningAgent(tmp_path / "agent.sock", unanswered=2) as agent:
        client = await AgentClient.connect(agent.path, timeout=10.0, hello_attempt_s=0.2)
        try:
            assert client.ready.protocol_version == PROTOCOL_VERSION
            assert agent.connections == 3
            assert await client.ping() >= 0
        finally:
            await client.close()


async def test_an_agent_that_never_answers_fails_at_the_timeout(tmp_path: Any) -> None:
    async with ListeningAgent(tmp_path / "agent.sock", unanswered=10**6) as agent:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AgentUnavailable, match=r"did not answer hello within 1\.0 s"):
            await AgentClient.connect(agent.path, timeout=1.0, hello_attempt_s=0.3)
        assert 0.9 <= loop.time() - started < 3.0
        assert agent.connections >= 3
