"""`make run` (scripts/run-demo.sh) as a user meets it: Ctrl-C cleans up, a daemon that
cannot start says why at once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conformance.run import processes_mentioning

REPO = Path(__file__).resolve().parents[2]
SANDBOXES = Path("/run/clearcri/sandboxes")
DEMO_SOCKET = Path("/run/clearcri/clearcri.sock")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo runs as root")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _qemu_pids_naming(name: str) -> list[int]:
    return [pid for pid in processes_mentioning(name) if pid in processes_mentioning("qemu-system")]


def _start_demo(*, metrics_port_free: bool = True) -> subprocess.Popen[str]:
    if DEMO_SOCKET.exists() or (metrics_port_free and not _port_free(9464)):
        pytest.fail("a clearcri daemon already serves the demo's socket or metrics port")
    return subprocess.Popen(
        ["bash", "scripts/run-demo.sh"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # as from a terminal: a shell that inherits SIGINT ignored cannot trap it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _stop_leftover_daemons() -> None:
    """A failed run may leave the demo's daemon and registry (own sessions) behind."""
    for pid in processes_mentioning("/tmp/clearcri-demo.") + processes_mentioning(
        "scripts/registry.yml"
    ):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_on_the_demo_removes_its_pod() -> None:
    before = set(SANDBOXES.iterdir()) if SANDBOXES.exists() else set()
    demo = _start_demo()
    output: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 900
        for line in demo.stdout:
            output.append(line)
            if "clearcri is serving" in line or time.monotonic() > deadline:
                break
        assert any("clearcri is serving" in line for line in output), "".join(output)[-3000:]
        pods = [p.name for p in set(SANDBOXES.iterdir()) - before]
        assert len(pods) == 1
        assert _qemu_pids_naming(pods[0])
        # Ctrl-C: SIGINT to the whole foreground process group
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(180)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(30)
            _stop_leftover_daemons()
    assert not (SANDBOXES / pods[0]).exists()
    assert not _qemu_pids_naming(pods[0])
    assert not DEMO_SOCKET.exists()


def test_a_daemon_that_cannot_start_says_why_at_once() -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 9464))  # the daemon's default metrics port
        taken.listen()
        demo = _start_demo(metrics_port_free=False)
        try:
            out, _ = demo.communicate(timeout=900)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait(30)
                _stop_leftover_daemons()
    assert demo.returncode != 0
    assert "clearcri serve exited before serving" in out
    assert "9464" in out  # the daemon's own message names the port
    assert "no such file or directory" not in out
