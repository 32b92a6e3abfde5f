"""A node of its own on a machine that runs several: a PID and a mount namespace.

What a node runtime installer touches is the node's: PID 1 (a DaemonSet pod enters its
mount namespace with ``nsenter --target 1``), and paths such as ``/opt/clearcri``,
``/etc/clearcri``, ``/run/clearcri`` or ``/var/lib/kubelet``. Two nodes on one machine
therefore each get a PID namespace, whose PID 1 is a small init of this module (it reaps
orphans, as an init does), and a mount namespace in which those paths are bind mounts of
directories of the node's own. Network, UTS and IPC stay the machine's: the nodes tell
themselves apart by their node IPs and ports, as containers of one host network do.
kind (Kubernetes in Docker) makes its nodes the same way, with a container each.

The node's programs are started with ``nsenter`` into both namespaces; ``NodeHost.stop``
kills its init, which ends every process left in the node (the kernel does that when a
PID namespace's init dies), then removes the mount points it had to create.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Paths every node has of its own (bind mounts of ``<root>/<path>``).
NODE_PRIVATE_PATHS = (
    "etc/clearcri",
    "etc/cni/net.d",
    "etc/systemd/system",
    "opt/clearcri",
    "run/clearcri",
    "run/netns",
    "var/lib/clearcri",
    "var/lib/clearcri-deploy",
    "var/lib/cni",
    "var/lib/kubelet",
    "var/log/clearcri",
)


class NodeHostError(Exception):
    pass


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def wait_child(pid: int, timeout: float = 10.0) -> int:
    """The first child of ``pid`` (``unshare --fork`` and ``nsenter`` run their program as
    their child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = _children(pid)
        if children:
            return children[0]
        time.sleep(0.02)
    raise NodeHostError(f"process {pid} started no child within {timeout:.0f} s")


class NodeHost:
    """The namespaces of one node, rooted at ``root`` (its private directories)."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.made_mount_points: list[Path] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def start(self) -> None:
        for rel in NODE_PRIVATE_PATHS:
            (self.root / rel).mkdir(parents=True, exist_ok=True)
            target = Path("/") / rel
            if not target.exists():
                # made on the machine (an empty directory), removed by stop()
                missing = [p for p in (target, *target.parents) if not p.exists()]
                target.mkdir(parents=True)
                self.made_mount_points.extend(sorted(missing, key=lambda p: len(p.parts)))
        ready = self.root / "init-ready"
        ready.unlink(missing_ok=True)
        spec = {"root": str(self.root), "paths": list(NODE_PRIVATE_PATHS), "ready": str(ready)}
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--propagation",
                    "private",
                    "--mount-proc",
                    "--",
                    sys.executable,
                    "-m",
                    "tests.e2e.node_host",
                    json.dumps(spec),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parents[2],
            )
        self.init_pid = wait_child(self.popen.pid)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NodeHostError(f"the node init did not start (see {self.log})")
            time.sleep(0.05)

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the node (its PID and mount namespaces)."""
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--pid", "--", *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.enter(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise NodeHostError(
                f"{' '.join(argv)} in the node failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def pids(self) -> list[int]:
        """Host PIDs of every process in the node but its init."""
        found: list[int] = []
        try:
            node_ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            return found  # the node has ended
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.init_pid:
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns/pid") == node_ns:
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        if self.popen is not None:
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
            self.popen = None
        for path in reversed(self.made_mount_points):
            with contextlib.suppress(OSError):
                path.rmdir()
        self.made_mount_points.clear()


# ---------------------------------------------------------------------------- the init


def _init(spec: dict[str, object]) -> None:
    root = Path(str(spec["root"]))
    paths = spec["paths"]
    assert isinstance(paths, list)
    for rel in paths:
        subprocess.run(["mount", "--bind", str(root / rel), f"/{rel}"], check=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Path(str(spec["ready"])).write_text(str(os.getpid()))
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


if __name__ == "__main__":
    _init(json.loads(sys.argv[1]))
