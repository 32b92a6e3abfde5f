"""Pods on the host: the ``host`` runtime handler, for pods a VM cannot serve.

kube-proxy, CNI daemons and node agents need the host's network, PID or IPC namespace,
or privileged access to the host. clearcri runs such pods without a VM: the same agent
that is PID 1 of a pod VM (``agent.guest.server``) runs as a host process per pod and
starts the pod's containers with crun on the host.

One host pod is:

* **the agent**: started detached (its own session, so it outlives the daemon) as
  ``nsenter --net=<pod netns> unshare --mount [--uts] [--ipc] sh -c <launch> python -m
  agent``. It listens on ``<run dir>/agent.sock`` for one host connection at a time
  (the stand-in for QEMU's chardev); the daemon's ``AgentClient`` connects there, and a
  restarted daemon reconnects. Its private mount namespace holds the image mounts and
  the containers' overlays (host paths are cloned into it from the daemon's mount
  namespace at container creation, agent/guest/hostmounts.py); its UTS and IPC
  namespaces (unless the pod shares the host's) are the pod's, which every container
  joins, as it joins the agent's network namespace.
* **namespaces**: network: the pod's netns (CNI, as for VM pods, without the tap) or the
  host's; IPC and UTS: the agent's own or the host's; PID: per container, pod-wide (the
  agent's holder process) or the host's. Privileged containers get every host device,
  all capabilities, writable /sys and no masked paths.
* **cgroups**: containers go under the pod's cgroup parent (a kubelet cgroupfs path or
  systemd slice name, expanded to its path), the agent itself into
  ``<parent>/clearcri-sandbox`` so everything the pod runs can be found and killed. On a
  host with the hybrid v1/v2 layout the agent's mount namespace drops the v2 mount at
  ``/sys/fs/cgroup/unified`` so crun drives the v1 hierarchies with ``cgroupfs``.
* **images**: each image's read-only erofs file is attached to ONE loop device on the
  node, shared by every host pod (the agents mount that device, so the kernel keeps one
  superblock and one page cache per image); each container gets an overlay with a
  private upper layer in the pod's run directory.

``HostSandbox`` offers the interface the CRI layer uses on ``PodSandbox`` (it subclasses
it only so that the CRI layer's annotations hold; nothing of the VM machinery is used).
Its state is ``state.json`` in its run directory with ``"kind": "host"``;
:func:`adopt_sandbox` picks the right class when a daemon re-adopts a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import agent
from agent.client import AgentClient
from agent.errors import AgentError
from agent.protocol import ImageSource, Mount
from sandbox.api import HostPathMount, PodUsage, SandboxState
from sandbox.cgroups import CGROUP_ROOT
from sandbox.network import (
    POD_IFNAME,
    CniInvocation,
    NetworkError,
    NetworkResult,
    PodNetwork,
    PodNetworkSpec,
    cni_args,
    create_netns,
    runtime_config,
)
from sandbox.pod import (
    SANDBOX_ID_RE,
    STATE_FILE,
    BootTimes,
    PodSandbox,
    SandboxError,
    SandboxHost,
    SandboxNotFound,
)
from sandbox.rootfs import RootfsImage
from sandbox.usage import read_cgroup_usage
from sandbox.vm import VmProcess

log = logging.getLogger(__name__)

HOST_HANDLER = "host"
AGENT_SOCKET = "agent.sock"
AGENT_LOG = "agent.log"
AGENT_DIR = "agent"
SANDBOX_CGROUP = "clearcri-sandbox"

# Runs in the agent's new namespaces before the agent: cgroup placement, the pod's
# /dev/shm, loopback up, then exec. Arguments: cgroup path, shm dir, "hybrid" flag,
# "netns" flag, then the agent's command line.
LAUNCH_SCRIPT = r"""
cg="$1"; shm="$2"; hybrid="$3"; netns="$4"; shift 4
if [ -n "$hybrid" ]; then umount /sys/fs/cgroup/unified || exit 1; fi
if [ -n "$cg" ]; then
    if [ -f /sys/fs/cgroup/cgroup.procs ]; then
        mkdir -p "/sys/fs/cgroup$cg" && echo $$ > "/sys/fs/cgroup$cg/cgroup.procs" || exit 1
    else
        for d in /sys/fs/cgroup/*; do
            case "$d" in */cpuset|*/unified) continue ;; esac
            [ -f "$d/cgroup.procs" ] || continue
            mkdir -p "$d$cg" && echo $$ > "$d$cg/cgroup.procs" || true
        done
    fi
fi
if [ -n "$shm" ]; then
    mkdir -p "$shm" &&
        mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=65536k shm "$shm" || exit 1
fi
if [ -n "$netns" ]; then ip link set lo up 2>/dev/null || true; fi
exec "$@"
"""


# ------------------------------------------------------------------------ cgroups


def cgroup_layout(root: Path = CGROUP_ROOT) -> str:
    """ "v2" (unified), "hybrid" (v1 controllers plus a v2 mount at unified/), "v1",
    or "none"."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "memory" / "cgroup.procs").exists():
        return "hybrid" if (root / "unified" / "cgroup.controllers").exists() else "v1"
    return "none"


def cgroup_parent_path(parent: str, driver: str, sandbox_id: str) -> str:
    """The cgroup path for a pod's containers from kubelet's ``cgroup_parent``.

    cgroupfs: the path as given. systemd: a slice name such as
    ``kubepods-besteffort-pod<uid>.slice`` expands to the path systemd gives it
    (``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice``);
    clearcri drives that path with crun's cgroupfs manager, so no systemd is needed. No
    parent: ``/clearcri/<sandbox id>``.
    """
    if not parent:
        return f"/clearcri/{sandbox_id}"
    if driver == "systemd" and "/" not in parent and parent.endswith(".slice"):
        name = parent.removesuffix(".slice")
        if name in ("", "-"):
            return "/"
        parts = name.split("-")
        return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))
    if not parent.startswith("/"):
        parent = "/" + parent
    return parent.rstrip("/") or "/"


def _hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every cgroup hierarchy mounted under ``root`` (the root itself for v2)."""
    if (root / "cgroup.procs").exists():
        return [root]
    out = []
    with contextlib.suppress(OSError):
        for entry in sorted(root.iterdir()):
            real = not entry.is_symlink() and entry.name != "unified"
            if real and (entry / "cgroup.procs").exists():
                out.append(entry)
    return out


def missing_cgroup_dirs(path: str, root: Path = CGROUP_ROOT) -> list[str]:
    """The components of ``path`` that do not exist yet (outermost first), checked in the
    memory hierarchy (or the v2 root): what removing the pod should remove again."""
    hierarchies = _hierarchies(root)
    probe = next((h for h in hierarchies if h.name == "memory"), None) or (
        hierarchies[0] if hierarchies else None
    )
    if probe is None:
        return []
    missing = []
    current = ""
    for part in [p for p in path.split("/") if p]:
        current += "/" + part
        if not (probe / current.lstrip("/")).exists():
            missing.append(current)
    return missing


def kill_cgroup_tree(path: str, root: Path = CGROUP_ROOT, rounds: int = 20) -> int:
    """SIGKILL every process in the cgroup ``path`` and below (every hierarchy);
    returns how many were signalled. Blocking."""
    killed = 0
    for _ in range(rounds):
        pids: set[int] = set()
        for hierarchy in _hierarchies(root):
            base = hierarchy / path.lstrip("/")
            for dirpath, _dirs, _files in os.walk(base):
                with contextlib.suppress(OSError, ValueError):
                    text = Path(dirpath, "cgroup.procs").read_text()
                    pids.update(int(x) for x in text.split())
        pids.discard(os.getpid())
        if not pids:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    return killed


def remove_cgroup_tree(path: str, root: Path = CGROUP_ROOT, *, keep_base: bool = False) -> None:
    """rmdir every cgroup below ``path`` (and ``path`` itself unless ``keep_base``) in
    every hierarchy. Blocking."""
    for hierarchy in _hierarchies(root):
        base = hierarchy / path.lstrip("/")
        if not base.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
            if keep_base and Path(dirpath) == base:
                continue
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


# ------------------------------------------------------------------------ images


class HostImages:
    """Read-only loop devices of container images, one per image, shared by host pods.

    A device is attached on the first host pod that needs the image and detached when
    no host pod of this daemon uses it any more (a device still mounted somewhere is
    detached by the kernel when its last user goes: ``losetup -d`` sets autoclear).
    A restarted daemon finds the devices again by their backing file.
    """

    def __init__(self) -> None:
        self._users: dict[str, set[str]] = {}  # backing file -> sandbox ids
        self._lock = asyncio.Lock()

    def register(self, sandbox_id: str, paths: list[str]) -> None:
        for path in paths:
            self._users.setdefault(path, set()).add(sandbox_id)

    async def attach(self, sandbox_id: str, path: Path) -> str:
        """The loop device of the erofs file ``path`` (attached now if needed)."""
        async with self._lock:
            device = await asyncio.to_thread(_loop_device_of, path)
            if device is None:
                device = await asyncio.to_thread(_attach_loop, path)
                log.info("image %s attached to %s", path.name, device)
            self._users.setdefault(str(path), set()).add(sandbox_id)
            return device

    async def release(self, sandbox_id: str) -> None:
        """The sandbox is gone: detach the devices nobody else uses."""
        async with self._lock:
            for path, users in list(self._users.items()):
                if sandbox_id not in users:
                    continue
                users.discard(sandbox_id)
                if users:
                    continue
                del self._users[path]
                for device in await asyncio.to_thread(_loop_devices_of, Path(path)):
                    await asyncio.to_thread(_detach_loop, device)
                    log.info("image %s detached from %s", Path(path).name, device)


_IMAGES: HostImages | None = None


def host_images() -> HostImages:
    """The node's image devices (one registry per daemon process)."""
    global _IMAGES
    if _IMAGES is None:
        _IMAGES = HostImages()
    return _IMAGES


def _losetup(*args: str) -> str:
    result = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise SandboxError(f"losetup {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _loop_devices_of(path: Path) -> list[str]:
    out = _losetup("--list", "--noheadings", "--raw", "--output", "NAME,RO", "-j", str(path))
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == ["1"]]


def _loop_device_of(path: Path) -> str | None:
    devices = _loop_devices_of(path)
    return devices[0] if devices else None


def _attach_loop(path: Path) -> str:
    return _losetup("--find", "--show", "--read-only", str(path)).strip()


def _detach_loop(device: str) -> None:
    with contextlib.suppress(SandboxError):
        _losetup("--detach", device)


# ------------------------------------------------------------------------ network


class HostPodNetwork(PodNetwork):
    """A host pod's own network namespace with CNI ADD/DEL as for a pod VM, but no tap:
    the containers live in the namespace itself. With networking disabled on the node
    the namespace is made all the same (loopback only)."""

    async def setup_host(self) -> NetworkResult | None:
        async with self._lock:
            if self.phase != "none":
                raise NetworkError(f"the network of {self.sandbox_id} is already {self.phase}")
            try:
                return await self._setup_host()
            except BaseException as exc:
                await self._rollback()
                if isinstance(exc, NetworkError | asyncio.CancelledError):
                    raise
                raise NetworkError(f"pod network setup failed: {exc}") from exc

    async def _setup_host(self) -> NetworkResult | None:
        manager = self.manager
        t0 = time.monotonic()
        netns = manager.netns_path(self.sandbox_id)
        enabled = manager.config.enabled
        if enabled:
            self.conflist = manager.load()
            self.invocation = CniInvocation(
                container_id=self.sandbox_id,
                netns=str(netns),
                ifname=POD_IFNAME,
                cni_args=cni_args(self.spec, self.sandbox_id),
                runtime_config=runtime_config(self.spec),
            )
        self.netns = netns
        self.phase = "attaching"
        self._save()
        await asyncio.to_thread(create_netns, netns)
        if not enabled or self.conflist is None or self.invocation is None:
            self.phase = "attached"
            self._save()
            return None

        def keep_partial(result: dict[str, Any]) -> None:
            self._partial = result

        result = await manager.runner.add(self.conflist, self.invocation, keep_partial)
        if not result.pod_interface_ips():
            raise NetworkError(f"CNI network {self.conflist.name} gave the pod no IP address")
        self.result = result
        self._partial = None
        self.timings = {"cni_add": time.monotonic() - t0}
        self.phase = "attached"
        self._save()
        log.info(
            "sandbox=%s network=%s ips=%s (host pod)",
            self.sandbox_id,
            self.conflist.name,
            ",".join(result.pod_ips),
        )
        return result


# ------------------------------------------------------------------------ the sandbox


@dataclass
class HostPodSpec:
    """What one host pod asks for (from its CRI PodSandboxConfig)."""

    sandbox_id: str
    hostname: str = ""
    resolv_conf: str = ""
    hosts: str = ""
    host_network: bool = False
    host_ipc: bool = False
    # kubelet's cgroup_parent and the node's cgroup driver ("cgroupfs" or "systemd")
    cgroup_parent: str = ""
    cgroup_driver: str = "cgroupfs"
    # CNI input (None: CNI is not asked, e.g. networking disabled in a test)
    network: PodNetworkSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):  # read back from state.json
            self.network = PodNetworkSpec.from_dict(self.network)


@dataclass
class HostCgroups:
    mode: str = "disabled"  # what the agent uses: "v2", "v1" or "disabled"
    hybrid: bool = False
    parent: str = ""  # the containers' parent path
    made: list[str] = field(default_factory=list)  # components we created

    @property
    def sandbox(self) -> str:
        if self.parent.endswith(".slice"):
            return f"{self.parent}/{SANDBOX_CGROUP}.scope"
        return f"{self.parent.rstrip('/')}/{SANDBOX_CGROUP}"


def _agent_pythonpath() -> str:
    return str(Path(agent.__file__).resolve().parent.parent)


class HostSandbox(PodSandbox):
    """One pod on the host, served by its own agent process."""

    handler = HOST_HANDLER

    def __init__(self, host: SandboxHost, spec: HostPodSpec, run_dir: Path) -> None:
        # PodSandbox.__init__ is not called: no VM, no machine, no tap.
        self.host = host
        self.host_spec = spec
        self.id = spec.sandbox_id
        self.run_dir = run_dir
        # the containers' upper directories are in their bundles below the run dir
        self.writable_layer_dir = run_dir
        self.state = SandboxState.CREATED
        self.exit_reason = ""
        self.created_at = time.time()
        self.boot = BootTimes()
        self.pid = 0
        self.slots: dict[int, str] = {}
        self.images: dict[str, str] = {}  # image id -> erofs file
        self.process: VmProcess | None = None
        self.qmp = None
        self._agent: AgentClient | None = None
        self._lock = asyncio.Lock()
        self._exit_callbacks: list[Callable[[PodSandbox], None]] = []
        self.cgroups = HostCgroups()
        self.network: PodNetwork | None = None
        if not spec.host_network:
            self.network = HostPodNetwork(
                host.network, spec.sandbox_id, spec.network or PodNetworkSpec(), self._save
            )

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / AGENT_SOCKET

    @property
    def agent_dir(self) -> Path:
        return self.run_dir / AGENT_DIR

    # construction -------------------------------------------------------

    @classmethod
    def create_host(cls, host: SandboxHost, spec: HostPodSpec) -> HostSandbox:
        if not SANDBOX_ID_RE.match(spec.sandbox_id):
            raise SandboxError(
                f"invalid sandbox id {spec.sandbox_id!r}: use 1-128 letters, digits, '_', '.', '-'"
            )
        run_dir = host.config.run_root / spec.sandbox_id
        if run_dir.exists():
            raise SandboxError(f"sandbox {spec.sandbox_id} already exists")
        run_dir.mkdir(parents=True, mode=0o711)  # see SandboxHost: traversable for userns
        sandbox = cls(host, spec, run_dir)
        sandbox._save()
        return sandbox

    @classmethod
    async def adopt_host(
        cls, host: SandboxHost, sandbox_id: str, saved: dict[str, Any]
    ) -> HostSandbox:
        run_dir = host.config.run_root / sandbox_id
        sandbox = cls(host, HostPodSpec(**saved["spec"]), run_dir)
        if sandbox.network is not None:
            sandbox.network.restore(saved.get("network"))
        try:
            sandbox.state = SandboxState(saved["state"])
        except (KeyError, ValueError) as exc:
            raise SandboxNotFound(f"sandbox {sandbox_id} has no readable state: {exc}") from exc
        sandbox.exit_reason = saved.get("exit_reason", "")
        sandbox.created_at = saved["created_at"]
        sandbox.boot = BootTimes(**saved.get("boot", {}))
        sandbox.pid = saved.get("pid", 0)
        sandbox.images = dict(saved.get("images", {}))
        sandbox.cgroups = HostCgroups(**saved.get("cgroups", {}))
        host_images().register(sandbox_id, list(sandbox.images.values()))
        if not sandbox.state.running or not sandbox.pid:
            return sandbox
        process = VmProcess.adopt(sandbox.pid, str(sandbox.agent_socket))
        if process is None:
            sandbox._set_dead("the pod's agent exited while no daemon was watching it")
            return sandbox
        sandbox.process = process
        process.on_exit(sandbox._agent_exited)
        try:
            sandbox._agent = await AgentClient.connect(sandbox.agent_socket, timeout=10.0)
        except (AgentError, OSError) as exc:
            log.warning("sandbox=%s adopt failed, killing its agent: %s", sandbox_id, exc)
            await sandbox._kill_agent()
            sandbox._set_dead(f"could not reconnect to the pod's agent after a restart: {exc}")
            return sandbox
        if sandbox.state == SandboxState.BOOTING:
            sandbox.state = SandboxState.READY
        sandbox._save()
        log.info("sandbox=%s (host) adopted pid=%d", sandbox_id, sandbox.pid)
        return sandbox

    # lifecycle ------------------------------------------------------------

    async def start(self) -> BootTimes:
        """Make the pod's namespaces and start its agent; wait until it answers."""
        if self.state != SandboxState.CREATED:
            raise SandboxError(f"sandbox {self.id} cannot start from state {self.state}")
        self.state = SandboxState.BOOTING
        spec = self.host_spec
        t0 = time.monotonic()
        try:
            self.cgroups = await asyncio.to_thread(self._plan_cgroups)
            self._save()
            netns: Path | None = None
            if isinstance(self.network, HostPodNetwork):
                await self.network.setup_host()
                netns = self.network.netns
            t_net = time.monotonic()
            await asyncio.to_thread(self._write_etc_files)
            # the agent clones host paths from the daemon's mount namespace
            mntns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                cmd = self._agent_command(netns, mntns)
                self.process = await VmProcess.spawn(
                    cmd, stderr_log=self.run_dir / AGENT_LOG, cwd=self.run_dir, pass_fds=(mntns,)
                )
            finally:
                os.close(mntns)
            self.pid = self.process.pid
            self.process.on_exit(self._agent_exited)
            self._save()
            t_spawned = time.monotonic()
            self._agent = await self._connect_host_agent()
            t_ready = time.monotonic()
            if not spec.host_network:
                await self._agent.set_pod_config(hostname=self._hostname())
            self.boot = BootTimes(
                vmm_spawn=t_spawned - t_net,
                agent_ready=t_ready - t_spawned,
                total=time.monotonic() - t0,
            )
        except BaseException as exc:
            detail = self._failure_detail(exc)
            await self._kill_agent()
            await asyncio.to_thread(self._kill_leftovers)
            if self.network is not None:
                with contextlib.suppress(NetworkError):
                    await self.network.teardown()
            self._set_dead(detail)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SandboxError(f"host pod {self.id} failed to start: {detail}") from exc
        self.state = SandboxState.READY
        self._save()
        log.info(
            "sandbox=%s (host) ready pid=%d start=%.3fs cgroups=%s",
            self.id,
            self.pid,
            self.boot.total,
            self.cgroups.mode,
        )
        return self.boot

    def _hostname(self) -> str:
        if self.host_spec.host_network:
            return socket.gethostname()
        return self.host_spec.hostname or self.id[:63]

    def _plan_cgroups(self) -> HostCgroups:
        layout = cgroup_layout()
        if layout == "none":
            log.warning("sandbox=%s: no cgroup hierarchy found; host pod runs without", self.id)
            return HostCgroups()
        spec = self.host_spec
        parent = cgroup_parent_path(spec.cgroup_parent, spec.cgroup_driver, self.id)
        if parent == "/":
            parent = f"/clearcri/{self.id}"
        return HostCgroups(
            mode="v2" if layout == "v2" else "v1",
            hybrid=layout == "hybrid",
            parent=parent,
            made=missing_cgroup_dirs(parent),
        )

    def _write_etc_files(self) -> None:
        etc = self.agent_dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        spec = self.host_spec
        hostname = self._hostname()
        resolv_conf, hosts = spec.resolv_conf, spec.hosts
        if spec.host_network:
            # the node's own files, as other runtimes give host-network pods
            if not resolv_conf:
                with contextlib.suppress(OSError):
                    resolv_conf = Path("/etc/resolv.conf").read_text()
            with contextlib.suppress(OSError):
                hosts = Path("/etc/hosts").read_text()
        elif self.network is not None:
            resolv_conf, hosts = self.network.etc_files(hostname, resolv_conf, hosts)
        (etc / "hostname").write_text(hostname + "\n")
        (etc / "resolv.conf").write_text(resolv_conf)
        (etc / "hosts").write_text(hosts or "127.0.0.1\tlocalhost\n::1\tlocalhost\n")

    def _agent_command(self, netns: Path | None, mntns_fd: int) -> list[str]:
        spec = self.host_spec
        cmd: list[str] = ["env", f"PYTHONPATH={_agent_pythonpath()}"]
        if netns is not None:
            cmd += ["nsenter", f"--net={netns}", "--"]
        cmd += ["unshare", "--mount", "--propagation", "private"]
        if not spec.host_network:
            cmd.append("--uts")
        if not spec.host_ipc:
            cmd.append("--ipc")
        shm_dir = "" if spec.host_ipc else str(self.agent_dir / "shm")
        cg = self.cgroups
        cmd += [
            "--",
            "sh",
            "-c",
            LAUNCH_SCRIPT,
            "clearcri-host-agent",
            cg.sandbox if cg.mode != "disabled" else "",
            shm_dir,
            "1" if cg.hybrid else "",
            "1" if netns is not None else "",
            sys.executable,
            "-S",
            "-s",
            "-B",
            "-c",
            "from agent.guest.server import main; main()",
            f"--listen={self.agent_socket}",
            f"--run-dir={self.agent_dir}",
            f"--cgroup={cg.mode}",
            "--no-poweroff",
            "--layer-fs=dir",
        ]
        if cg.mode != "disabled":
            cmd.append(f"--cgroup-parent={cg.parent}")
        if shm_dir:
            cmd.append(f"--shm-dir={shm_dir}")
        owned = [
            kind
            for kind, own in (
                ("ipc", not spec.host_ipc),
                ("net", netns is not None),
                ("uts", not spec.host_network),
            )
            if own
        ]
        cmd.append(f"--pod-namespaces={','.join(owned)}")
        cmd.append(f"--host-mntns-fd={mntns_fd}")
        busybox = shutil.which("busybox")
        if busybox:
            cmd.append(f"--busybox={busybox}")
        crun = shutil.which("crun")
        if crun:
            cmd.append(f"--crun={crun}")
        return cmd

    async def _connect_host_agent(self) -> AgentClient:
        return await self._connect_agent(self.agent_socket, "the pod's agent exited during start")

    def _failure_detail(self, exc: BaseException) -> str:
        parts = [str(exc) or type(exc).__name__]
        tail = self.console_tail()
        if tail:
            parts.append(f"agent: {tail}")
        return "; ".join(parts)

    def console_tail(self, limit: int = 400) -> str:
        try:
            data = (self.run_dir / AGENT_LOG).read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the pod: the agent stops and deletes its containers and exits; whatever
        is left in the pod's cgroups is killed; the network is released. Idempotent."""
        if self.state.at_rest:
            if self.state == SandboxState.CREATED:
                self.state = SandboxState.STOPPED
                self._save()
            await self._kill_agent()
            await asyncio.to_thread(self._kill_leftovers)
            await self._release_network()
            return
        grace = self.host.config.stop_timeout_s if timeout is None else timeout
        self.state = SandboxState.STOPPING
        self._save()
        if self._agent is not None:
            with contextlib.suppress(AgentError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._agent.shutdown(grace=max(grace, 0.1)), timeout=max(grace, 0.1) + 5
                )
        if self.process is not None and self.process.alive:
            with contextlib.suppress(asyncio.TimeoutError):
                await self.process.wait(timeout=max(grace, 0.1) + 2)
        await self._kill_agent()
        await asyncio.to_thread(self._kill_leftovers)
        if self.state != SandboxState.DEAD:
            self.state = SandboxState.STOPPED
            self.exit_reason = self.exit_reason or "stopped"
        self._save()
        await self._release_network()

    async def _kill_agent(self) -> None:
        process = self.process
        if process is not None and process.alive:
            process.kill(signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await process.wait(timeout=10.0)

    def _kill_leftovers(self) -> None:
        """Kill every process of the pod still in its cgroups (containers whose agent
        died, the agent's helpers)."""
        if self.cgroups.mode == "disabled" or not self.cgroups.parent:
            return
        killed = kill_cgroup_tree(self.cgroups.parent)
        if killed:
            log.info("sandbox=%s killed %d leftover processes", self.id, killed)

    def _remove_cgroups(self) -> None:
        cg = self.cgroups
        if cg.mode == "disabled" or not cg.parent:
            return
        # The parent is the pod's alone (kubelet's pod cgroup, or ours): every cgroup
        # below it is one of this pod's; the parent itself and its ancestors go only if
        # this pod made them.
        remove_cgroup_tree(cg.parent, keep_base=cg.parent not in cg.made)
        for path in reversed(cg.made):
            for hierarchy in _hierarchies():
                with contextlib.suppress(OSError):
                    (hierarchy / path.lstrip("/")).rmdir()

    async def destroy(self) -> None:
        """Stop the pod and remove everything it made on the host. Idempotent."""
        if self.state == SandboxState.REMOVED:
            return
        await self.stop(timeout=0)
        await self._close_channels()
        await asyncio.to_thread(self._remove_cgroups)
        await host_images().release(self.id)
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)
        self.state = SandboxState.REMOVED

    async def _close_channels(self) -> None:
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()

    def _agent_exited(self, process: VmProcess) -> None:
        if self.state in (SandboxState.STOPPING, SandboxState.STOPPED, SandboxState.REMOVED):
            return
        code = process.returncode
        how = "" if code is None else f" ({'signal ' + str(-code) if code < 0 else code})"
        self._set_dead(f"the pod's agent exited{how}")

    def _save(self) -> None:
        data: dict[str, Any] = {
            "kind": HOST_HANDLER,
            "spec": asdict(self.host_spec),
            "state": self.state,
            "exit_reason": self.exit_reason,
            "created_at": self.created_at,
            "boot": asdict(self.boot),
            "pid": self.pid,
            "images": self.images,
            "cgroups": asdict(self.cgroups),
            "network": self.network.to_state() if self.network is not None else None,
        }
        path = self.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)

    async def host_path_mount(self, request: HostPathMount) -> Mount:
        """The container's mount of a host path: the host pod's agent clones it (with
        its submounts) from the host's mount namespace when it creates the container,
        idmapped in a user namespace; every propagation works, Bidirectional included."""
        await self._check_propagation(request.host_path, request.propagation)
        return Mount(
            destination=request.destination,
            source=str(request.host_path),
            options=[*request.options, request.propagation],
        )

    def status_info(self) -> dict[str, object]:
        """What PodSandboxStatus (verbose) tells of this sandbox."""
        return {
            "state": self.state,
            "cgroupParent": self.cgroups.parent,
            "cgroups": self.cgroups.mode,
        }

    def pod_usage(self) -> PodUsage | None:
        """CPU and memory of everything the pod runs (its cgroup), or None."""
        return read_cgroup_usage(self.cgroups.mode, self.cgroups.parent)

    # containers -------------------------------------------------------------

    async def attach_image(self, image: RootfsImage) -> str:
        """Mount ``image`` in the pod's agent from the node's shared loop device."""
        agent = self.agent
        async with self._lock:
            device = await host_images().attach(self.id, image.path)
            if self.images.get(image.image_id) != str(image.path):
                self.images[image.image_id] = str(image.path)
                self._save()
            return await agent.mount_image(
                image.image_id, ImageSource(device=device, fstype="erofs")
            )


def read_kind(host: SandboxHost, sandbox_id: str) -> tuple[str, dict[str, Any]]:
    """The handler that made a sandbox ("clearcri" or "host") and its saved state."""
    path = host.config.run_root / sandbox_id / STATE_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SandboxNotFound(f"sandbox {sandbox_id} has no readable state: {exc}") from exc
    return str(saved.get("kind", "clearcri")), saved


async def adopt_sandbox(host: SandboxHost, sandbox_id: str) -> PodSandbox:
    """Re-attach to a pod VM or host pod left by an earlier daemon."""
    kind, saved = read_kind(host, sandbox_id)
    if kind == HOST_HANDLER:
        return await HostSandbox.adopt_host(host, sandbox_id, saved)
    return await PodSandbox.adopt(host, sandbox_id)
