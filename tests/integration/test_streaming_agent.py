"""The agent's port_forward op: first with the agent run on this host (fast), then in a
real pod VM against busybox httpd; and the streaming server on top of it (client-go)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2

from agent.client import AgentClient
from agent.errors import FailedPrecondition
from agent.protocol import ContainerSpec
from cri.streaming import StreamingServer
from cri.streaming.agent_backend import AgentStreamingBackend
from sandbox.api import RootfsImage
from sandbox.lifecycle import PodSandbox
from tests.integration.test_streaming_clients import port_forward_client
from tests.streaming_client import build_client

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def local_agent(tmp_path: Path) -> AsyncIterator[AgentClient]:
    """The guest agent as a subprocess of this test, on one end of a socketpair."""
    host_sock, guest_sock = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from agent.guest.server import main; main()",
            f"--port-fd={guest_sock.fileno()}",
            f"--run-dir={tmp_path / 'run'}",
            "--cgroup=disabled",
            "--no-poweroff",
            "--pod-namespaces=",
        ],
        pass_fds=[guest_sock.fileno()],
        cwd=REPO,
    )
    guest_sock.close()
    reader, writer = await asyncio.open_unix_connection(sock=host_sock, limit=1 << 22)
    client = AgentClient(reader, writer)
    try:
        await client._hello(15.0)
        yield client
    finally:
        await client.close()
        proc.kill()
        proc.wait()


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_agent_port_forward_round_trip(local_agent: AgentClient) -> None:
    echo, port = await _echo_server()
    try:
        stream = await local_agent.port_forward(port)
        assert stream.address == f"127.0.0.1:{port}"
        payload = os.urandom(4 << 20)  # four windows' worth: exercises the credit flow

        async def send() -> None:
            await stream.write(payload)
            await stream.close_write()

        sender = asyncio.ensure_future(send())
        received = bytearray()
        while chunk := await asyncio.wait_for(stream.read(), 20):
            received += chunk
        await sender
        assert bytes(received) == payload
        await asyncio.wait_for(stream.finished.wait(), 10)
        assert stream.error is None
        assert not local_agent.streams.forwards
    finally:
        echo.close()


async def test_agent_port_forward_refused(local_agent: AgentClient) -> None:
    echo, port = await _echo_server()
    echo.close()
    await echo.wait_closed()
    with pytest.raises(FailedPrecondition, match=f"cannot connect to port {port}"):
        await local_agent.port_forward(port)
    assert not local_agent.streams.forwards


async def test_agent_port_forward_abort(local_agent: AgentClient) -> None:
    """Closing from the host ends the guest side (the echo server sees EOF)."""
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        closed.set()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        stream = await local_agent.port_forward(srv.sockets[0].getsockname()[1])
        await stream.write(b"partial")
        await stream.close()
        await asyncio.wait_for(closed.wait(), 10)
        await asyncio.wait_for(stream.finished.wait(), 10)
    finally:
        srv.close()


async def test_streaming_server_over_local_agent(local_agent: AgentClient) -> None:
    """client-go port-forward -> SPDY -> AgentStreamingBackend -> agent -> TCP."""
    client = build_client()
    echo, port = await _echo_server()

    async def agent_for(_id: str) -> AgentClient:
        return local_agent

    backend = AgentStreamingBackend(agent_for, agent_for)
    try:
        async with StreamingServer(backend, "127.0.0.1", 0) as server:
            url = server.url_for_port_forward(
                api_pb2.PortForwardRequest(pod_sandbox_id="p1", port=[port])
            )
            async with port_forward_client(client, url, port, "spdy") as local:
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                payload = os.urandom(1 << 20)
                writer.write(payload)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 30) == payload
                writer.close()
    finally:
        echo.close()


# ---------------------------------------------------------------------------- pod VM


@pytest.mark.vm
async def test_port_forward_in_pod_vm(pod: PodSandbox, busybox_image: RootfsImage) -> None:
    script = "echo served-from-the-pod > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"
    await pod.create_container("web", ContainerSpec(args=["sh", "-c", script]), busybox_image)
    await pod.start_container("web")
    agent = pod.agent
    for _ in range(50):  # httpd needs a moment to listen
        try:
            stream = await agent.port_forward(8080)
            break
        except FailedPrecondition:
            await asyncio.sleep(0.2)
    else:
        pytest.fail("httpd never listened on 8080 in the pod VM")
    await stream.write(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
    response = bytearray()
    while chunk := await asyncio.wait_for(stream.read(), 30):
        response += chunk
    assert response.startswith(b"HTTP/1.")
    assert b" 200 " in response.split(b"\r\n", 1)[0]
    assert b"served-from-the-pod" in response
    await stream.close()

    # And through the streaming server with client-go.
    client = build_client()

    async def agent_for(_id: str) -> AgentClient:
        return agent

    async with StreamingServer(AgentStreamingBackend(agent_for, agent_for)) as server:
        url = server.url_for_port_forward(
            api_pb2.PortForwardRequest(pod_sandbox_id=pod.id, port=[8080])
        )
        async with port_forward_client(client, url, 8080, "spdy") as local:
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), 30)
            writer.close()
            assert b"served-from-the-pod" in data
