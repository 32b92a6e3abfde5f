"""The streaming server driven by client-go (the code in kubectl and crictl) over SPDY and
WebSocket, against a backend that runs real processes on this host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2

from cri.streaming import StreamingServer
from tests.streaming_client import build_client
from tests.streaming_client.local_backend import LocalBackend

TRANSPORTS = ["spdy", "ws"]


@pytest.fixture(scope="module")
def client_binary() -> Path:
    try:
        return build_client()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    local = LocalBackend()
    yield local
    await local.close()


@pytest.fixture
async def server(backend: LocalBackend) -> AsyncIterator[StreamingServer]:
    srv = StreamingServer(backend, "127.0.0.1", 0)
    await srv.start()
    yield srv
    await srv.stop()


class Result:
    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"Result({self.code}, {self.stdout!r}, {self.stderr!r})"


async def run_client(
    binary: Path,
    *args: str,
    stdin: bytes | None = None,
    keep_stdin_open: bool = False,
    timeout: float = 30.0,
) -> Result:
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    if stdin:
        proc.stdin.write(stdin)
        await proc.stdin.drain()
    if not keep_stdin_open:
        proc.stdin.close()
    try:
        out, err = await asyncio.wait_for(_communicate(proc), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out, err)


async def _communicate(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    out, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
    await proc.wait()
    return out, err


def exec_request(
    cmd: list[str], *, stdin: bool = False, tty: bool = False, stderr: bool = True
) -> api_pb2.ExecRequest:
    return api_pb2.ExecRequest(
        container_id="c1", cmd=cmd, stdin=stdin, stdout=True, stderr=stderr and not tty, tty=tty
    )


def transport_flag(transport: str) -> list[str]:
    return ["-ws"] if transport == "ws" else []


# ---------------------------------------------------------------------------- exec


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_separates_streams_and_reports_exit_code(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    url = server.url_for_exec(exec_request(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    result = await run_client(client_binary, "exec", "-url", url, *transport_flag(transport))
    assert result.code == 3, result
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_success(client_binary: Path, server: StreamingServer, transport: str) -> None:
    url = server.url_for_exec(exec_request(["echo", "hello"]))
    result = await run_client(client_binary, "exec", "-url", url, *transport_flag(transport))
    assert (result.code, result.stdout) == (0, b"hello\n"), result


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stdin_close_ends_cat(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    data = os.urandom(300_000).hex().encode()  # 600 KB
    url = server.url_for_exec(exec_request(["cat"], stdin=True))
    result = await run_client(
        client_binary, "exec", "-url", url, "-stdin", *transport_flag(transport), stdin=data
    )
    assert result.code == 0, result.stderr
    assert result.stdout == data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_process_exit_ends_session_with_stdin_open(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    url = server.url_for_exec(
        exec_request(["sh", "-c", "read line; echo got $line; exit 4"], stdin=True)
    )
    start = time.monotonic()
    result = await run_client(
        client_binary,
        "exec",
        "-url",
        url,
        "-stdin",
        *transport_flag(transport),
        stdin=b"one\n",
        keep_stdin_open=True,
        timeout=20,
    )
    assert result.code == 4, result
    assert result.stdout == b"got one\n"
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_tty_with_resize(
    client_binary: Path, server: StreamingServer, backend: LocalBackend, transport: str
) -> None:
    # no sleep before the first stty: the process starts with the client's first size
    script = "stty size; sleep 1.5; stty size; test -t 0 && echo is-a-tty"
    url = server.url_for_exec(exec_request(["sh", "-c", script], stdin=True, tty=True))
    result = await run_client(
        client_binary,
        "exec",
        "-url",
        url,
        "-stdin",
        "-tty",
        "-sizes",
        "80x24,120x40",
        "-size-interval",
        "500ms",
        *transport_flag(transport),
        keep_stdin_open=True,
    )
    assert result.code == 0, result
    lines = result.stdout.replace(b"\r\n", b"\n").split(b"\n")
    assert lines[:3] == [b"24 80", b"40 120", b"is-a-tty"], result
    assert backend.processes[-1].initial_size == (80, 24)
    assert backend.processes[-1].resizes == [(120, 40)]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_error_reaches_client(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    request = exec_request(["true"])
    request.container_id = "missing"
    url = server.url_for_exec(request)
    result = await run_client(client_binary, "exec", "-url", url, *transport_flag(transport))
    assert result.code == 100
    assert b"container 'missing' not found" in result.stderr


async def test_twenty_concurrent_execs(client_binary: Path, server: StreamingServer) -> None:
    async def one(i: int) -> None:
        transport = TRANSPORTS[i % 2]
        url = server.url_for_exec(exec_request(["sh", "-c", f"sleep 0.5; echo {i}; exit {i % 7}"]))
        result = await run_client(client_binary, "exec", "-url", url, *transport_flag(transport))
        assert (result.code, result.stdout) == (i % 7, f"{i}\n".encode()), result

    await asyncio.gather(*(one(i) for i in range(20)))
    # a client exits once it has the exit status; the server ends its side of the
    # session as the connection closes, a moment later under load
    for _ in range(50):
        if server.active_sessions == 0:
            break
        await asyncio.sleep(0.1)
    assert server.active_sessions == 0


async def _idle_exec(
    client_binary: Path, server: StreamingServer, idle: float, transport: str
) -> None:
    url = server.url_for_exec(exec_request(["cat"], stdin=True))
    proc = await asyncio.create_subprocess_exec(
        str(client_binary),
        "exec",
        "-url",
        url,
        "-stdin",
        *transport_flag(transport),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"before\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"before\n"
        await asyncio.sleep(idle)
        proc.stdin.write(b"after\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"after\n"
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_idle_session_stays_up(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    await _idle_exec(client_binary, server, 6.0, transport)


@pytest.mark.skipif(not os.environ.get("CLEARCRI_SLOW_TESTS"), reason="set CLEARCRI_SLOW_TESTS=1")
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_idle_session_stays_up_40s(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    await _idle_exec(client_binary, server, 40.0, transport)


# ---------------------------------------------------------------------------- tokens


async def test_token_is_single_use(client_binary: Path, server: StreamingServer) -> None:
    url = server.url_for_exec(exec_request(["true"]))
    assert (await run_client(client_binary, "exec", "-url", url)).code == 0
    again = await run_client(client_binary, "exec", "-url", url)
    assert again.code == 100
    assert b"404" in again.stderr or b"unknown or expired" in again.stderr, again


async def test_token_expires(client_binary: Path, backend: LocalBackend) -> None:
    async with StreamingServer(backend, "127.0.0.1", 0, token_ttl=0.5) as srv:
        url = srv.url_for_exec(exec_request(["true"]))
        await asyncio.sleep(0.8)
        result = await run_client(client_binary, "exec", "-url", url)
        assert result.code == 100, result


# ---------------------------------------------------------------------------- attach


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_attach(
    client_binary: Path, server: StreamingServer, backend: LocalBackend, transport: str
) -> None:
    script = 'while read l; do echo "got:$l"; [ "$l" = quit ] && exit 7; done'
    await backend.add_container("c1", ["sh", "-c", script])
    request = api_pb2.AttachRequest(container_id="c1", stdin=True, stdout=True, stderr=True)
    url = server.url_for_attach(request)
    result = await run_client(
        client_binary,
        "exec",
        "-url",
        url,
        "-stdin",
        *transport_flag(transport),
        stdin=b"a\nquit\n",
        keep_stdin_open=True,
    )
    assert result.stdout == b"got:a\ngot:quit\n", result
    assert result.code == 0  # attach reports success; the container's own code is its status


# ---------------------------------------------------------------------------- port-forward


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def port_forward_client(
    binary: Path, url: str, remote: int, transport: str
) -> AsyncIterator[int]:
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "portforward",
        "-url",
        url,
        "-remote",
        str(remote),
        *transport_flag(transport),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.startswith(b"READY "), line
        yield int(line.split()[1])
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for start in range(0, len(payload), 1 << 16):
            writer.write(payload[start : start + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    received = await asyncio.wait_for(reader.read(-1), 30)
    await sender
    writer.close()
    return received


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_port_forward_round_trip_1mib(
    client_binary: Path, server: StreamingServer, transport: str
) -> None:
    echo, port = await _echo_server()
    try:
        url = server.url_for_port_forward(
            api_pb2.PortForwardRequest(pod_sandbox_id="p1", port=[port])
        )
        async with port_forward_client(client_binary, url, port, transport) as local:
            payload = os.urandom(1 << 20)
            assert await _round_trip(local, payload) == payload
            # A second connection over the same forward.
            assert await _round_trip(local, b"again") == b"again"
    finally:
        echo.close()


async def test_port_forward_refused_port(client_binary: Path, server: StreamingServer) -> None:
    echo, port = await _echo_server()
    echo.close()
    await echo.wait_closed()
    url = server.url_for_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p1", port=[port]))
    async with port_forward_client(client_binary, url, port, "spdy") as local:
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        assert await asyncio.wait_for(reader.read(-1), 15) == b""
        writer.close()
