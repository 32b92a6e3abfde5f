"""crictl against `clearcri serve`, as a user drives it: pull, runp, create, start,
exec (sync, streamed, with stdin), logs, inspect, stop, rm, rmp.

crictl is built by scripts/build-cri-tools.sh (~/.cache/clearcri/bin); CRICTL names
another binary. Every call uses a crictl config file of the test's own, never
/etc/crictl.yaml.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import GUEST_DIR
from tests.integration.cri_daemon import CriDaemon
from tests.registry import RegistryServer, busybox_layer, push_image, registry  # noqa: F401

pytestmark = pytest.mark.vm

DEFAULT_CRICTL = Path.home() / ".cache" / "clearcri" / "bin" / "crictl"


def find_crictl() -> str:
    for candidate in (os.environ.get("CRICTL", ""), str(DEFAULT_CRICTL), shutil.which("crictl")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("crictl not found: run scripts/build-cri-tools.sh or set CRICTL")


class Crictl:
    """crictl with a config file that points at one daemon."""

    def __init__(self, binary: str, daemon: CriDaemon, workdir: Path) -> None:
        self.binary = binary
        self.config = workdir / "crictl.yaml"
        endpoint = f"unix://{daemon.socket}"
        self.config.write_text(
            f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 60\n"
        )

    def run(
        self, *args: str, stdin: bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [self.binary, "--config", str(self.config), *args],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"crictl {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace')}"
            )
        return result

    def out(self, *args: str, stdin: bytes | None = None) -> str:
        return self.run(*args, stdin=stdin).stdout.decode()

    def inspect(self, command: str, *args: str) -> dict[str, Any]:
        # crictl reads flags only before the first argument
        data: dict[str, Any] = json.loads(self.out(command, "-o", "json", *args))
        return data


@pytest.fixture(scope="module")
def image_ref(registry: RegistryServer) -> str:  # noqa: F811
    asyncio.run(push_image(registry.host, "library/busybox", ["crictl"], [busybox_layer()]))
    return f"{registry.host}/library/busybox:crictl"


@pytest.fixture
def daemon() -> Iterator[CriDaemon]:
    # short path: the pod VMs' sockets live under it
    root = Path(f"/tmp/cc-crictl-{os.getpid()}-{os.urandom(3).hex()}")
    root.mkdir()
    d = CriDaemon(root, GUEST_DIR)
    d.start()
    try:
        yield d
    finally:
        leftovers = [p.parent.name for p in (root / "run" / "sandboxes").glob("*/state.json")]
        if leftovers and d.proc is not None:
            binary = find_crictl()
            Crictl(binary, d, root).run("rmp", "-f", *leftovers, check=False)
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def crictl(daemon: CriDaemon, tmp_path: Path) -> Crictl:
    return Crictl(find_crictl(), daemon, tmp_path)


def write_configs(tmp_path: Path, image: str, name: str, *command: str) -> tuple[Path, Path]:
    pod = {
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "attempt": 0},
        "hostname": name,
        "log_directory": str(tmp_path / "logs"),
        "labels": {"app": name},
    }
    container = {
        "metadata": {"name": "app"},
        "image": {"image": image},
        "command": list(command),
        "log_path": "app.log",
        "labels": {"role": "app"},
    }
    pod_json, container_json = tmp_path / "pod.json", tmp_path / "container.json"
    pod_json.write_text(json.dumps(pod))
    container_json.write_text(json.dumps(container))
    return pod_json, container_json


def wait_for_state(crictl: Crictl, cid: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = crictl.inspect("inspect", cid)["status"]
        if status["state"] == state or time.monotonic() > deadline:
            return status
        time.sleep(0.3)


def test_crictl_pod_and_container_lifecycle(
    crictl: Crictl, image_ref: str, tmp_path: Path, daemon: CriDaemon
) -> None:
    crictl.out("pull", image_ref)
    repository, tag = image_ref.rsplit(":", 1)
    assert [repository, tag] in [line.split()[:2] for line in crictl.out("images").splitlines()]
    pod_json, container_json = write_configs(
        tmp_path,
        image_ref,
        "crictl-pod",
        "sh",
        "-c",
        "echo hello from app; echo warning >&2; exec sleep 1000",
    )

    pod_id = crictl.out("runp", str(pod_json)).strip()
    assert len(pod_id) == 64
    pod = crictl.inspect("inspectp", pod_id)["status"]
    assert pod["state"] == "SANDBOX_READY"
    assert pod["metadata"]["name"] == "crictl-pod" and pod["metadata"]["namespace"] == "default"
    assert crictl.out("pods", "-q", "--label", "app=crictl-pod").split() == [pod_id]

    cid = crictl.out("create", pod_id, str(container_json), str(pod_json)).strip()
    assert crictl.inspect("inspect", cid)["status"]["state"] == "CONTAINER_CREATED"
    crictl.out("start", cid)
    status = wait_for_state(crictl, cid, "CONTAINER_RUNNING")
    assert status["state"] == "CONTAINER_RUNNING"
    assert status["image"]["image"] == image_ref and status["imageRef"]
    assert status["logPath"] == str(tmp_path / "logs" / "app.log")
    assert cid in crictl.out("ps", "-q", "--pod", pod_id).split()

    # ExecSync: output, exit code, and the timeout
    assert crictl.out("exec", "--sync", cid, "echo", "synced").strip() == "synced"
    failed = crictl.run("exec", "--sync", cid, "sh", "-c", "exit 3", check=False)
    assert failed.returncode != 0 and b"exited with 3" in failed.stderr
    slow = crictl.run("exec", "--sync", "--timeout", "1", cid, "sleep", "30", check=False)
    assert slow.returncode != 0

    # logs: both streams, and the CRI log format on disk
    logs = b""
    for _ in range(50):
        result = crictl.run("logs", cid)
        logs = result.stdout + result.stderr
        if b"warning" in logs and b"hello from app" in logs:
            break
        time.sleep(0.2)
    assert b"hello from app" in logs and b"warning" in logs
    stdout_only = crictl.run("logs", cid).stdout
    assert b"hello from app" in stdout_only and b"warning" not in stdout_only
    on_disk = (tmp_path / "logs" / "app.log").read_text().splitlines()
    assert any(line.split(" ", 3)[1:] == ["stdout", "F", "hello from app"] for line in on_disk)

    stats = crictl.inspect("stats", "--id", cid)
    assert stats["stats"][0]["attributes"]["id"] == cid

    crictl.out("stop", "--timeout", "5", cid)
    stopped = wait_for_state(crictl, cid, "CONTAINER_EXITED")
    assert stopped["state"] == "CONTAINER_EXITED"
    crictl.out("rm", cid)
    assert crictl.out("ps", "-a", "-q", "--pod", pod_id).split() == []
    crictl.out("stopp", pod_id)
    assert crictl.inspect("inspectp", pod_id)["status"]["state"] == "SANDBOX_NOTREADY"
    crictl.out("rmp", pod_id)
    assert crictl.out("pods", "-q").split() == []
    assert list((daemon.root / "run" / "sandboxes").iterdir()) == []


def test_crictl_exec_streams(crictl: Crictl, image_ref: str, tmp_path: Path) -> None:
    crictl.out("pull", image_ref)
    pod_json, container_json = write_configs(tmp_path, image_ref, "exec-pod", "sleep", "1000")
    cid = crictl.out("run", str(container_json), str(pod_json)).strip()
    assert wait_for_state(crictl, cid, "CONTAINER_RUNNING")["state"] == "CONTAINER_RUNNING"

    out = crictl.run("exec", cid, "sh", "-c", "echo out; echo err >&2; exit 5", check=False)
    # crictl exec (streaming, not --sync) reports a non-zero exit as an error (exit 1)
    # naming the code it got through the status stream
    assert out.returncode == 1
    assert out.stdout == b"out\n" and out.stderr.startswith(b"err\n")
    assert b"command terminated with exit code 5" in out.stderr
    synced = crictl.run("exec", "--sync", cid, "sh", "-c", "exit 5", check=False)
    assert synced.returncode == 1 and b"exited with 5" in synced.stderr

    data = b"".join(b"line %d\n" % i for i in range(2000))
    piped = crictl.run("exec", "-i", cid, "sh", "-c", "cat; echo done >&2", stdin=data)
    assert piped.stdout == data and piped.stderr == b"done\n"
    counted = crictl.out("exec", "-i", cid, "wc", "-l", stdin=data)
    assert counted.strip() == "2000"

    pods = crictl.out("pods", "-q").split()
    assert len(pods) == 1
    crictl.out("rmp", "-f", *pods)
    assert crictl.out("pods", "-q").split() == []
