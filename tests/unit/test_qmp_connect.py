"""Connecting to a VM's QMP socket (sandbox/qmp.py) while QEMU is still setting it up:
the socket file is there a moment before QEMU listens on it."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from sandbox.qmp import QmpControl, QmpError


def _bound_not_listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


async def test_attempts_that_are_retried_log_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "qmp.sock"
    sock = _bound_not_listening(path)
    caplog.set_level(logging.DEBUG)
    try:
        qmp = QmpControl("retried")
        with pytest.raises(QmpError, match="cannot connect to QMP"):
            await qmp.connect(path, timeout=0.3)
    finally:
        sock.close()
    # several attempts were refused; the only error is the one QmpError carries
    refused = [r for r in caplog.records if r.name.startswith("qemu.qmp")]
    assert not [r for r in refused if r.levelno >= logging.ERROR], [r.getMessage() for r in refused]


async def test_a_socket_that_starts_listening_is_connected(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    sock = _bound_not_listening(path)
    greeting = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
    greeting += b'"package": ""}, "capabilities": []}}\r\n'

    async def serve() -> None:
        await asyncio.sleep(0.1)
        sock.listen(1)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(sock)
        await loop.sock_sendall(conn, greeting)
        await loop.sock_recv(conn, 4096)  # qmp_capabilities
        await loop.sock_sendall(conn, b'{"return": {}}\r\n')
        await loop.sock_recv(conn, 4096)  # the client goes away
        conn.close()

    server = asyncio.create_task(serve())
    qmp = QmpControl("late")
    try:
        await qmp.connect(path, timeout=5)
        assert server.done() is False, "connected while the socket listens"
    finally:
        await qmp.close()
        await server
        sock.close()
