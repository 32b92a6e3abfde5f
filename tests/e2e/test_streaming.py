"""Streams through the API server and kubelet: exec with stdin, kubectl cp, port-forward,
logs -f."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import time
import urllib.request
from pathlib import Path

from agent.guest.stdio import set_window_size
from tests.e2e.cluster import free_port
from tests.e2e.workloads import Workloads


def test_exec_stdin_cp_and_port_forward(k8s: Workloads, tmp_path: Path) -> None:
    k8s.apply(
        k8s.pod(
            "io",
            [
                {
                    "name": "httpd",
                    "command": [
                        "sh",
                        "-c",
                        "mkdir -p /www; echo served > /www/index.html; "
                        "exec httpd -f -p 8080 -h /www",
                    ],
                }
            ],
        )
    )
    k8s.wait_ready("io")
    # 1 MiB through exec -i, counted in the container
    data = os.urandom(1 << 19).hex()
    out = k8s.exec("io", "sh", "-c", "wc -c", stdin=data).stdout
    assert int(out.split()[0]) == len(data)
    # kubectl cp both ways (tar in the container)
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(300_000))
    k8s.kubectl("cp", str(local), f"{k8s.namespace}/io:/tmp/payload.bin")
    remote_sum = k8s.exec("io", "md5sum", "/tmp/payload.bin").stdout.split()[0]
    assert remote_sum == hashlib.md5(local.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    k8s.kubectl("cp", f"{k8s.namespace}/io:/tmp/payload.bin", str(back))
    assert back.read_bytes() == local.read_bytes()
    # port-forward to the container's port
    port = free_port()
    forward = subprocess.Popen(
        k8s.cluster.kubectl_argv(
            "-n",
            k8s.namespace,
            "port-forward",
            "pod/io",
            f"{port}:8080",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
                    body = reply.read().decode()
            except OSError:
                time.sleep(0.5)
        assert body.strip() == "served"
    finally:
        forward.terminate()
        forward.wait(10)


def test_logs_follow_streams_new_lines(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "ticker",
            [
                {
                    "name": "main",
                    "command": [
                        "sh",
                        "-c",
                        "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done",
                    ],
                }
            ],
        )
    )
    k8s.wait_ready("ticker")
    follow = subprocess.Popen(
        k8s.cluster.kubectl_argv(
            "-n",
            k8s.namespace,
            "logs",
            "-f",
            "ticker",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert follow.stdout is not None
        seen = [follow.stdout.readline() for _ in range(4)]
    finally:
        follow.terminate()
        follow.wait(10)
    numbers = [int(line.split()[1]) for line in seen]
    assert numbers == sorted(numbers) and numbers[-1] > numbers[0]


def _run_on_a_terminal(argv: list[str], cols: int, rows: int, timeout: float) -> bytes:
    """Run ``argv`` with a pseudo-terminal of ``cols`` x ``rows`` as its stdio (as a user
    at a terminal would) and return what it wrote there."""
    master, slave = pty.openpty()
    set_window_size(slave, cols, rows)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: every writer is gone
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
    return out


def test_exec_on_a_terminal_starts_with_its_size(k8s: Workloads) -> None:
    """kubectl exec -it: the process's first TIOCGWINSZ sees the user's terminal size
    (kubectl sends it only once the session is open), and nothing but its output comes
    back (no stray NUL)."""
    k8s.apply(k8s.pod("term", [{"name": "main", "command": ["sleep", "3600"]}]))
    k8s.wait_ready("term")
    argv = k8s.cluster.kubectl_argv(
        "-n", k8s.namespace, "exec", "-it", "term", "--", "sh", "-c", "stty size; echo end"
    )
    out = _run_on_a_terminal(argv, 132, 43, 60)
    assert out.replace(b"\r\n", b"\n") == b"43 132\nend\n", out
