"""Helpers for tests that install clearcri for real into a temporary prefix (`clearcri
node ...` as a user runs it) and talk CRI to the daemon run from that install."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.node_install import _copy_project
from sandbox.mounts import remove_tree
from tests.integration.conftest import GUEST_DIR

REPO = Path(__file__).resolve().parents[2]

#: For programs of the installed venv: nothing of this checkout on their path.
VENV_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def can_build_wheels() -> bool:
    """Whether the clearcri wheel can be built offline here."""
    version = importlib.metadata.version("setuptools")
    major, minor = (int(x) for x in version.split(".")[:2])
    return importlib.util.find_spec("wheel") is not None or (major, minor) >= (70, 1)


CANNOT_BUILD_WHEELS = (
    "building the clearcri wheel offline needs the `wheel` package or setuptools>=70.1"
)


def node(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `clearcri node ...` as a user would; its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "cri.cli", "node", *args],
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def frozen_source(dest: Path) -> Path:
    """A copy of this project at ``dest`` (the tree may change while the tests run)."""
    src = dest / "clearcri"
    _copy_project(REPO, src)
    shutil.copytree(REPO / "packaging", src / "packaging")
    return src


@contextlib.contextmanager
def temporary_prefix() -> Iterator[Path]:
    """A prefix to install into; short, since the daemon's unix sockets live under it."""
    path = Path(f"/tmp/ccn-{os.urandom(3).hex()}")
    path.mkdir()
    try:
        yield path
    finally:
        remove_tree(path)  # share binds a failed test left are detached first


def install_args(prefix: Path, source: Path, *extra: str, start: bool = False) -> list[str]:
    args = ["--prefix", str(prefix), "--source", str(source), "--guest-from", str(GUEST_DIR)]
    return [*args, *([] if start else ["--no-start"]), *extra]


def daemon_config() -> str:
    """The packaged config with the metrics port left free for a daemon already running,
    and pod networking off (a test machine has no CNI config)."""
    text = (REPO / "packaging/config.toml").read_text()
    text = text.replace("[metrics]\nenabled = true", "[metrics]\nenabled = false")
    return text + "\n[vm.network]\nenabled = false\n"


def socket_of(prefix: Path) -> Path:
    return prefix / "run/clearcri/clearcri.sock"


def cri_version(socket: Path, timeout: float = 2.0) -> str:
    """The runtime's CRI Version answer (its version string); raises grpc.RpcError."""
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub: Any = api_pb2_grpc.RuntimeServiceStub
        answer = stub(channel).Version(api_pb2.VersionRequest(), timeout=timeout)
        version: str = answer.runtime_version
        return version


def wait_serving(socket: Path, timeout: float = 120.0) -> str:
    """Wait until the daemon on ``socket`` answers CRI Version."""
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        if socket.exists():
            try:
                return cri_version(socket)
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no daemon answered on {socket} within {timeout} s")
        time.sleep(0.2)


async def run_pod(socket: Path, name: str) -> str:
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub: Any = api_pb2_grpc.RuntimeServiceStub
        rt = stub(channel)
        response = await rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(
                config=api_pb2.PodSandboxConfig(
                    metadata=api_pb2.PodSandboxMetadata(
                        name=name, namespace="default", uid=f"uid-{name}"
                    ),
                    hostname=name,
                )
            )
        )
        pod_id: str = response.pod_sandbox_id
        return pod_id


async def pod_state(socket: Path, pod_id: str) -> int:
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub: Any = api_pb2_grpc.RuntimeServiceStub
        status = await stub(channel).PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
        )
        state: int = status.status.state
        return state


async def remove_pods(socket: Path) -> None:
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub: Any = api_pb2_grpc.RuntimeServiceStub
        rt = stub(channel)
        pods = await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())
        for pod in pods.items:
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


def vm_pids(prefix: Path) -> dict[str, int]:
    """The QEMU PID of every pod VM the installed daemon has state for, by pod id."""
    import json

    found = {}
    for state in (prefix / "run/clearcri/sandboxes").glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            found[state.parent.name] = int(json.loads(state.read_text())["pid"])
    return found
