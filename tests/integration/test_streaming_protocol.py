"""The streaming server spoken to by small Python clients written here: raw SPDY frames
(limits, malformed input, pings) and WebSocket (v5 exec, the older port-forward framing)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from cri_api.v1 import api_pb2

from cri.streaming import StreamingServer, spdy
from cri.streaming import websocket as ws
from tests.streaming_client.local_backend import LocalBackend


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    local = LocalBackend()
    yield local
    await local.close()


@pytest.fixture
async def server(backend: LocalBackend) -> AsyncIterator[StreamingServer]:
    srv = StreamingServer(
        backend, "127.0.0.1", 0, handshake_timeout=1.0, stream_creation_timeout=2.0, max_streams=4
    )
    await srv.start()
    yield srv
    await srv.stop()


def split_url(url: str) -> tuple[int, str]:
    rest = url.removeprefix("http://127.0.0.1:")
    port, path = rest.split("/", 1)
    return int(port), "/" + path


async def http_upgrade(
    url: str, headers: dict[str, str], method: str = "POST"
) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    port, path = split_url(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *header_lines = head.decode().split("\r\n")
    answer = {}
    for line in header_lines:
        if ":" in line:
            key, value = line.split(":", 1)
            answer[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer, reader, writer


SPDY_HEADERS = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}


class RawSpdy:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = spdy.FrameParser()
        self.compressor = spdy.HeaderCompressor()
        self.frames: list[spdy.Frame] = []

    def syn(self, sid: int, headers: list[tuple[str, str]], fin: bool = False) -> None:
        self.writer.write(spdy.syn_stream_frame(self.compressor, sid, headers, fin=fin))

    async def next_frame(self, timeout: float = 10.0) -> spdy.Frame | None:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return None
            self.frames.extend(self.parser.feed(data))
        return self.frames.pop(0)

    async def until(self, kind: int, timeout: float = 10.0) -> spdy.Frame:
        while True:
            frame = await self.next_frame(timeout)
            assert frame is not None, f"connection closed before frame {kind}"
            if frame.kind == kind:
                return frame


async def spdy_session(url: str, protocol: str) -> RawSpdy:
    headers = {**SPDY_HEADERS, "X-Stream-Protocol-Version": protocol}
    status, answer, reader, writer = await http_upgrade(url, headers)
    assert status == 101
    assert answer["x-stream-protocol-version"] == protocol
    return RawSpdy(reader, writer)


# ---------------------------------------------------------------------------- SPDY


async def test_pings_are_answered_and_exec_runs(server: StreamingServer) -> None:
    url = server.url_for_exec(
        api_pb2.ExecRequest(container_id="c", cmd=["sh", "-c", "echo hi; exit 5"], stdout=True)
    )
    conn = await spdy_session(url, "v4.channel.k8s.io")
    conn.writer.write(spdy.ping_frame(1))
    assert (await conn.until(spdy.PING)).ping_id == 1
    conn.syn(1, [("streamType", "error")])
    conn.syn(3, [("streamType", "stdout")])
    replies = {(await conn.until(spdy.SYN_REPLY)).stream_id for _ in range(2)}
    assert replies == {1, 3}
    data: dict[int, bytes] = {1: b"", 3: b""}
    fins: set[int] = set()
    while fins != {1, 3}:
        frame = await conn.next_frame()
        assert frame is not None
        if frame.kind == spdy.DATA:
            data[frame.stream_id] += frame.data
            if frame.fin:
                fins.add(frame.stream_id)
    assert data[3] == b"hi\n"
    status = json.loads(data[1])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "5"}]
    assert (await conn.until(spdy.GOAWAY)).status == spdy.GOAWAY_OK
    conn.writer.close()


async def test_header_bomb_closes_connection_cleanly(server: StreamingServer) -> None:
    url = server.url_for_exec(api_pb2.ExecRequest(container_id="c", cmd=["true"], stdout=True))
    conn = await spdy_session(url, "v4.channel.k8s.io")
    raw = struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 8 << 20)
    z = zlib.compressobj(9, zdict=spdy.DICTIONARY)
    block = z.compress(raw) + z.compress(b"\0" * (8 << 20)) + z.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + block
    conn.writer.write(struct.pack(">HHI", 0x8003, spdy.SYN_STREAM, len(payload)) + payload)
    goaway = await conn.until(spdy.GOAWAY)
    assert goaway.status == spdy.GOAWAY_PROTOCOL_ERROR
    assert await conn.next_frame() is None  # closed
    conn.writer.close()
    await _server_still_serves(server)


async def test_garbage_after_upgrade_closes_connection(server: StreamingServer) -> None:
    url = server.url_for_exec(api_pb2.ExecRequest(container_id="c", cmd=["true"], stdout=True))
    conn = await spdy_session(url, "v4.channel.k8s.io")
    conn.writer.write(b"\x80\x02\x00\x01" + b"\xff" * 64)  # SPDY/2 header
    assert (await conn.until(spdy.GOAWAY)).status == spdy.GOAWAY_PROTOCOL_ERROR
    conn.writer.close()
    await _server_still_serves(server)


async def test_stream_limits_and_bad_ids(server: StreamingServer) -> None:
    echo = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = str(echo.sockets[0].getsockname()[1])
    url = server.url_for_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
    conn = await spdy_session(url, "portforward.k8s.io")
    conn.syn(2, [("streamType", "error"), ("port", port), ("requestID", "0")])  # even id
    assert (await conn.until(spdy.RST_STREAM)).status == spdy.PROTOCOL_ERROR
    for sid in (1, 3, 5, 7, 9):  # max_streams=4: the fifth is refused
        conn.syn(sid, [("streamType", "error"), ("port", port), ("requestID", str(sid))])
    rst = await conn.until(spdy.RST_STREAM)
    assert (rst.stream_id, rst.status) == (9, spdy.REFUSED_STREAM)
    conn.syn(11, [("streamType", "data"), ("port", "0"), ("requestID", "1")])
    assert (await conn.until(spdy.RST_STREAM)).stream_id == 11  # port 0 is invalid
    conn.writer.close()
    echo.close()


async def _server_still_serves(server: StreamingServer) -> None:
    url = server.url_for_exec(api_pb2.ExecRequest(container_id="c", cmd=["true"], stdout=True))
    conn = await spdy_session(url, "v4.channel.k8s.io")
    conn.writer.write(spdy.ping_frame(3))
    assert (await conn.until(spdy.PING)).ping_id == 3
    conn.writer.close()


async def test_handshake_errors(server: StreamingServer) -> None:
    url = server.url_for_exec(api_pb2.ExecRequest(container_id="c", cmd=["true"], stdout=True))
    status, answer, _r, w = await http_upgrade(
        url, {**SPDY_HEADERS, "X-Stream-Protocol-Version": "v9.channel.k8s.io"}
    )
    assert status == 403
    assert "v4.channel.k8s.io" in answer["x-accepted-stream-protocol-versions"]
    w.close()
    status, _a, _r, w = await http_upgrade(url, {}, method="GET")  # no upgrade
    assert status == 400
    w.close()
    # Neither refusal used the token up.
    conn = await spdy_session(url, "v4.channel.k8s.io")
    conn.writer.close()
    status, _a, _r, w = await http_upgrade(
        url, {**SPDY_HEADERS, "X-Stream-Protocol-Version": "v4.channel.k8s.io"}
    )
    assert status == 404  # now it is used
    w.close()
    port, _path = split_url(url)
    status, _a, _r, w = await http_upgrade(f"http://127.0.0.1:{port}/nothing/here", SPDY_HEADERS)
    assert status == 404
    w.close()


async def test_silent_connection_is_dropped(server: StreamingServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /exec/x HTTP/1.1\r\n")  # never finishes its head
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_streams_never_opened_time_out(
    server: StreamingServer, backend: LocalBackend
) -> None:
    url = server.url_for_exec(api_pb2.ExecRequest(container_id="c", cmd=["true"], stdout=True))
    conn = await spdy_session(url, "v4.channel.k8s.io")
    conn.syn(1, [("streamType", "error")])  # stdout never comes
    await conn.until(spdy.GOAWAY, timeout=10)
    conn.writer.close()
    assert backend.processes == []  # nothing was started


async def test_client_disconnect_kills_exec(server: StreamingServer, backend: LocalBackend) -> None:
    url = server.url_for_exec(
        api_pb2.ExecRequest(container_id="c", cmd=["sleep", "100"], stdout=True)
    )
    conn = await spdy_session(url, "v4.channel.k8s.io")
    conn.syn(1, [("streamType", "error")])
    conn.syn(3, [("streamType", "stdout")])
    for _ in range(2):
        await conn.until(spdy.SYN_REPLY)
    for _ in range(50):
        if backend.processes:
            break
        await asyncio.sleep(0.05)
    conn.writer.close()
    process = backend.processes[0]
    for _ in range(100):
        if process.closed and server.active_sessions == 0:
            break
        await asyncio.sleep(0.05)
    assert process.closed
    assert process.proc is not None and process.proc.returncode is not None
    assert server.active_sessions == 0


# ---------------------------------------------------------------------------- WebSocket


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = ws.FrameParser(require_mask=False)
        self.pending: list[ws.Message] = []

    def send(self, opcode: int, data: bytes) -> None:
        self.writer.write(ws.encode_frame(opcode, data, mask=os.urandom(4)))

    async def receive(self) -> ws.Message | None:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                return None
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)


async def ws_connect(url: str, protocols: str) -> tuple[str, RawWebSocket]:
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Protocol": protocols,
    }
    status, answer, reader, writer = await http_upgrade(url, headers, method="GET")
    assert status == 101
    assert answer["sec-websocket-accept"] == ws.accept_key(key)
    return answer["sec-websocket-protocol"], RawWebSocket(reader, writer)


async def test_websocket_v5_exec_with_stdin_close_signal(server: StreamingServer) -> None:
    url = server.url_for_exec(
        api_pb2.ExecRequest(
            container_id="c", cmd=["sh", "-c", "cat; exit 2"], stdin=True, stdout=True, stderr=True
        )
    )
    protocol, conn = await ws_connect(url, "v5.channel.k8s.io, v4.channel.k8s.io")
    assert protocol == "v5.channel.k8s.io"
    conn.send(ws.PING, b"are you there")
    conn.send(ws.BINARY, b"\x00hello ")
    # a fragmented stdin message
    conn.writer.write(ws.encode_frame(ws.BINARY, b"\x00wor", fin=False, mask=os.urandom(4)))
    conn.writer.write(ws.encode_frame(ws.CONTINUATION, b"ld", mask=os.urandom(4)))
    conn.send(ws.BINARY, b"\xff\x00")  # v5: close stdin
    stdout = b""
    status = b""
    got_pong = False
    close_code = None
    while (message := await conn.receive()) is not None:
        if message.opcode == ws.PONG:
            got_pong = message.data == b"are you there"
        elif message.opcode == ws.CLOSE:
            close_code = struct.unpack(">H", message.data[:2])[0]
            break
        elif message.data[0] == 1:
            stdout += message.data[1:]
        elif message.data[0] == 3:
            status += message.data[1:]
    assert got_pong
    assert stdout == b"hello world"
    assert json.loads(status)["details"]["causes"][0]["message"] == "2"
    assert close_code == ws.NORMAL_CLOSURE
    conn.writer.close()


async def test_websocket_v1_exec_as_the_conformance_suite_uses_it(
    server: StreamingServer,
) -> None:
    """channel.k8s.io (before v4): an empty message on stdout opens the session, the
    error channel carries plain text."""
    url = server.url_for_exec(
        api_pb2.ExecRequest(
            container_id="c",
            cmd=["sh", "-c", "echo remote execution test; exit 3"],
            stdout=True,
            stderr=True,
        )
    )
    protocol, conn = await ws_connect(url, "channel.k8s.io")
    assert protocol == "channel.k8s.io"
    messages = []
    while (message := await conn.receive()) is not None and message.opcode != ws.CLOSE:
        messages.append(message)
    assert all(m.opcode == ws.BINARY for m in messages)
    assert messages[0].data == b"\x01"
    stdout = b"".join(m.data[1:] for m in messages if m.data[0] == 1)
    errors = b"".join(m.data[1:] for m in messages if m.data[0] == 3)
    assert stdout == b"remote execution test\n"
    assert errors == b"command terminated with non-zero exit code: exit code 3"
    conn.writer.close()


async def test_websocket_base64_exec_with_stdin(server: StreamingServer) -> None:
    url = server.url_for_exec(
        api_pb2.ExecRequest(container_id="c", cmd=["cat"], stdin=True, stdout=True)
    )
    protocol, conn = await ws_connect(url, "base64.channel.k8s.io")
    assert protocol == "base64.channel.k8s.io"
    conn.send(ws.TEXT, b"0" + base64.b64encode(b"\x00binary\xffstdin"))
    conn.send(ws.TEXT, b"0" + base64.b64encode(b"\x04"))  # not a tty: just bytes
    stdout = b""
    for _ in range(20):
        message = await asyncio.wait_for(conn.receive(), 10)
        assert message is not None and message.opcode == ws.TEXT
        assert message.data[:1] == b"1"
        stdout += base64.b64decode(message.data[1:])
        if stdout == b"\x00binary\xffstdin\x04":
            break
    assert stdout == b"\x00binary\xffstdin\x04"
    conn.writer.close()


async def test_websocket_rejects_unknown_subprotocol(server: StreamingServer) -> None:
    url = server.url_for_exec(api_pb2.ExecRequest(container_id="c", cmd=["true"], stdout=True))
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Protocol": "v9.channel.k8s.io",
    }
    status, _a, _r, writer = await http_upgrade(url, headers, method="GET")
    assert status == 400
    writer.close()


async def test_websocket_port_forward_channel_framing(server: StreamingServer) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(5)
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    url = server.url_for_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
    protocol, conn = await ws_connect(url + f"?port={port}", "v4.channel.k8s.io")
    assert protocol == "v4.channel.k8s.io"
    first = [await conn.receive(), await conn.receive()]
    head = port.to_bytes(2, "little")
    assert sorted(m.data for m in first if m) == [b"\x00" + head, b"\x01" + head]
    conn.send(ws.BINARY, b"\x00hello")
    received = b""
    while (message := await conn.receive()) is not None and message.opcode != ws.CLOSE:
        if message.data[:1] == b"\x00":
            received += message.data[1:]
    assert received == b"HELLO"
    conn.writer.close()
    srv.close()
