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

``HostBackend`` is what runs such a pod inside the one ``PodSandbox`` class
(sandbox/lifecycle.py), as ``VmBackend`` runs a pod VM; its state is ``state.json`` in
its run directory with ``"kind": "host"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import agent
from agent.protocol import ImageSource, Mount
from sandbox.api import (
    HOST_HANDLER,
    BootTimes,
    HostPathMount,
    HostPodSpec,
    PodNetworkSpec,
    PodUsage,
    RootfsImage,
    SandboxError,
    SharedFiles,
)
from sandbox.cgroups import (
    cgroup_layout,
    hierarchies_under,
    kill_cgroup_tree,
    missing_cgroup_dirs,
    pod_tree_path,
    remove_cgroup_tree,
)
from sandbox.lifecycle import PodSandbox, check_new
from sandbox.network import (
    POD_IFNAME,
    CniInvocation,
    NetworkError,
    NetworkResult,
    PodNetwork,
    cni_args,
    create_netns,
    runtime_config,
)
from sandbox.node import SandboxHost
from sandbox.usage import read_cgroup_usage
from sandbox.vm import VmProcess
from sandbox.vmpod import check_propagation

log = logging.getLogger(__name__)

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


class HostBackend:
    """What runs a pod on the host: its agent process, its namespaces and cgroups, the
    node's shared loop devices for its images."""

    handler = HOST_HANDLER
    noun = "host pod"
    gone_while_away = "the pod's agent exited while no daemon was watching it"

    def __init__(self, host: SandboxHost, spec: HostPodSpec, run_dir: Path) -> None:
        self.host = host
        self.spec = spec
        self.run_dir = run_dir
        # the containers' upper directories are in their bundles below the run dir
        self.writable_layer_dir: Path | None = run_dir
        self.images: dict[str, str] = {}  # image id -> erofs file
        self.cgroups = HostCgroups()
        self.network: PodNetwork | None = None

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / AGENT_SOCKET

    @property
    def agent_dir(self) -> Path:
        return self.run_dir / AGENT_DIR

    @property
    def process_marker(self) -> str:
        return str(self.agent_socket)

    # the state file ------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "kind": HOST_HANDLER,
            "spec": asdict(self.spec),
            "images": self.images,
            "cgroups": asdict(self.cgroups),
        }

    @classmethod
    def from_state(cls, host: SandboxHost, run_dir: Path, saved: dict[str, Any]) -> HostBackend:
        backend = cls(host, HostPodSpec(**saved["spec"]), run_dir)
        backend.images = dict(saved.get("images", {}))
        backend.cgroups = HostCgroups(**saved.get("cgroups", {}))
        host_images().register(backend.spec.sandbox_id, list(backend.images.values()))
        return backend

    # launch -------------------------------------------------------------------------

    async def launch(self, sandbox: PodSandbox) -> BootTimes:
        """Make the pod's namespaces and start its agent; wait until it answers."""
        spec = self.spec
        t0 = time.monotonic()
        self.cgroups = await asyncio.to_thread(self._plan_cgroups)
        sandbox.save()
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
            process = await VmProcess.spawn(
                cmd, stderr_log=self.run_dir / AGENT_LOG, cwd=self.run_dir, pass_fds=(mntns,)
            )
        finally:
            os.close(mntns)
        sandbox.started(process)
        sandbox.save()
        t_spawned = time.monotonic()
        agent = await sandbox.connect_agent("the pod's agent exited during start")
        t_ready = time.monotonic()
        if not spec.host_network:
            await agent.set_pod_config(hostname=self._hostname())
        log.info("sandbox=%s (host) cgroups=%s", spec.sandbox_id, self.cgroups.mode)
        return BootTimes(
            vmm_spawn=t_spawned - t_net,
            agent_ready=t_ready - t_spawned,
            total=time.monotonic() - t0,
        )

    async def abort_launch(self, sandbox: PodSandbox) -> None:
        if sandbox.process is not None:
            await sandbox.process.kill_and_wait()
        await asyncio.to_thread(self._kill_leftovers)

    def _hostname(self) -> str:
        if self.spec.host_network:
            return socket.gethostname()
        return self.spec.hostname or self.spec.sandbox_id[:63]

    def _plan_cgroups(self) -> HostCgroups:
        layout = cgroup_layout()
        if layout == "none":
            log.warning(
                "sandbox=%s: no cgroup hierarchy found; host pod runs without",
                self.spec.sandbox_id,
            )
            return HostCgroups()
        spec = self.spec
        parent = pod_tree_path(spec.cgroup_parent, spec.cgroup_driver, spec.sandbox_id)
        return HostCgroups(
            mode="v2" if layout == "v2" else "v1",
            hybrid=layout == "hybrid",
            parent=parent,
            made=missing_cgroup_dirs(parent),
        )

    def _write_etc_files(self) -> None:
        etc = self.agent_dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        spec = self.spec
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
        spec = self.spec
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

    def failure_detail(self, exc: BaseException) -> str:
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

    # re-adoption, stop, removal -------------------------------------------------------

    async def reattach(self, sandbox: PodSandbox) -> None:
        """Nothing but the agent to reconnect."""

    async def halt(self, sandbox: PodSandbox, grace: float) -> None:
        """The agent exits once it stopped the containers; whatever is left in the pod's
        cgroups is killed."""
        process = sandbox.process
        if process is not None and process.alive:
            with contextlib.suppress(asyncio.TimeoutError):
                await process.wait(timeout=max(grace, 0.1) + 2)
        if process is not None:
            await process.kill_and_wait()
        await asyncio.to_thread(self._kill_leftovers)

    def _kill_leftovers(self) -> None:
        """Kill every process of the pod still in its cgroups (containers whose agent
        died, the agent's helpers)."""
        if self.cgroups.mode == "disabled" or not self.cgroups.parent:
            return
        killed = kill_cgroup_tree(self.cgroups.parent)
        if killed:
            log.info("sandbox=%s killed %d leftover processes", self.spec.sandbox_id, killed)

    def _remove_cgroups(self) -> None:
        cg = self.cgroups
        if cg.mode == "disabled" or not cg.parent:
            return
        # The parent is the pod's alone (kubelet's pod cgroup, or ours): every cgroup
        # below it is one of this pod's; the parent itself and its ancestors go only if
        # this pod made them.
        remove_cgroup_tree(cg.parent, keep_base=cg.parent not in cg.made)
        for path in reversed(cg.made):
            for hierarchy in hierarchies_under():
                with contextlib.suppress(OSError):
                    (hierarchy / path.lstrip("/")).rmdir()

    async def release(self, sandbox: PodSandbox) -> None:
        await asyncio.to_thread(self._remove_cgroups)
        await host_images().release(self.spec.sandbox_id)
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)

    async def close(self) -> None:
        """No connection of its own."""

    def exit_reason(self, process: VmProcess) -> str:
        code = process.returncode
        how = "" if code is None else f" ({'signal ' + str(-code) if code < 0 else code})"
        return f"the pod's agent exited{how}"

    # images and host paths --------------------------------------------------------------

    async def attach_image(self, sandbox: PodSandbox, image: RootfsImage) -> str:
        """Mount ``image`` in the pod's agent from the node's shared loop device."""
        agent = sandbox.agent
        device = await host_images().attach(self.spec.sandbox_id, image.path)
        if self.images.get(image.image_id) != str(image.path):
            self.images[image.image_id] = str(image.path)
            sandbox.save()
        return await agent.mount_image(image.image_id, ImageSource(device=device, fstype="erofs"))

    async def host_path_mount(self, sandbox: PodSandbox, request: HostPathMount) -> Mount:
        """The container's mount of a host path: the host pod's agent clones it (with
        its submounts) from the host's mount namespace when it creates the container,
        idmapped in a user namespace; every propagation works, Bidirectional included."""
        await check_propagation(request.host_path, request.propagation)
        return Mount(
            destination=request.destination,
            source=str(request.host_path),
            options=[*request.options, request.propagation],
        )

    async def unshare_host_paths(self, keys: list[str]) -> None:
        """Nothing to undo: the agent's clones go with the container."""

    # figures ----------------------------------------------------------------------------

    def status_info(self) -> dict[str, object]:
        return {"cgroupParent": self.cgroups.parent, "cgroups": self.cgroups.mode}

    def pod_usage(self, sandbox: PodSandbox) -> PodUsage | None:
        """CPU and memory of everything the pod runs (its cgroup), or None."""
        return read_cgroup_usage(self.cgroups.mode, self.cgroups.parent)

    def shared_files(self) -> SharedFiles:
        return SharedFiles()


def create_host_pod(host: SandboxHost, spec: HostPodSpec) -> PodSandbox:
    """A pod on the host, made (its run directory) but not started."""
    run_dir = check_new(host.config.run_root, spec.sandbox_id)
    run_dir.mkdir(parents=True, mode=0o711)  # see SandboxHost: traversable for userns
    sandbox = _sandbox(host, HostBackend(host, spec, run_dir))
    sandbox.save()
    return sandbox


def restore_host_pod(host: SandboxHost, saved: dict[str, Any]) -> PodSandbox:
    """A host pod as an earlier daemon saved it (not yet re-attached)."""
    spec_id = str(saved["spec"]["sandbox_id"])
    backend = HostBackend.from_state(host, host.config.run_root / spec_id, saved)
    sandbox = _sandbox(host, backend)
    sandbox.restore(saved)
    return sandbox


def _sandbox(host: SandboxHost, backend: HostBackend) -> PodSandbox:
    sandbox = PodSandbox(backend, backend.spec.sandbox_id, host.config)
    if not backend.spec.host_network:
        backend.network = HostPodNetwork(
            host.network,
            backend.spec.sandbox_id,
            backend.spec.network or PodNetworkSpec(),
            sandbox.save,
        )
    return sandbox
