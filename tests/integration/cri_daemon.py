"""Run `clearcri serve` as a real process for end-to-end tests, and talk CRI to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.integration.conftest import TEMPLATE_DIR


class CriDaemon:
    """A clearcri daemon with its own state, run dir and socket under ``root``."""

    def __init__(
        self,
        root: Path,
        guest_dir: Path,
        registry_host: str = "",
        template_dir: Path = TEMPLATE_DIR,
        network: str = "enabled = false",
        standby: int = 0,
        standby_burst: int = 0,
    ) -> None:
        """``network`` is the body of the ``[vm.network]`` table (CNI is off unless a
        test brings its own CNI config). ``standby``, ``standby_burst``: standby VMs
        (none, so that what a test's pods leave is all there is;
        tests/integration/test_standby.py and the fuzz tests run with them)."""
        self.root = root
        self.socket = root / "run" / "clearcri.sock"
        self.config_path = root / "config.toml"
        lines = [
            "[daemon]",
            f'socket = "{self.socket}"',
            f'state_dir = "{root / "state"}"',
            f'run_dir = "{root / "run"}"',
            f'log_dir = "{root / "log"}"',
            "[vm]",
            f'guest_dir = "{guest_dir}"',
            f'template_dir = "{template_dir}"',
            f"standby = {standby}",
            f"standby_burst = {standby_burst}",
            "[streaming]",
            'address = "127.0.0.1"',
            "[metrics]",
            "enabled = false",
        ]
        lines += ["[vm.network]", network]
        if registry_host:
            lines += [
                '[registry.mirrors."registry.k8s.io"]',
                f'endpoints = ["http://{registry_host}"]',
            ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = root / "daemon.log"

    def start(self, timeout: float = 120.0) -> None:
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cri.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[2],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_file.read_text()[-2000:]}")
            if self.socket.exists():
                try:
                    with grpc.insecure_channel(f"unix://{self.socket}") as channel:
                        stub = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
                        stub.Version(api_pb2.VersionRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not serve within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix://{self.socket}")
