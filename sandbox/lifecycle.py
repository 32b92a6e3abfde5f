"""A pod sandbox's life, whatever runs it: the one implementation of ``sandbox.api.Sandbox``.

A ``PodSandbox`` holds what every kind of sandbox has: its run directory with an atomic
``state.json``, its state and exit reason, its host process and exit callbacks, its
agent connection (every container operation goes through the pod's agent, in a VM or on
the host), and its pod network. What differs between a pod VM and a pod on the host is
its ``SandboxBackend`` (sandbox/vmpod.py, sandbox/hostpod.py): how the pod's process is
launched, re-attached, halted and cleaned up, how images and host paths reach its
containers, and what it costs the node. Each component writes its own part of the state
file (``to_state``) and reads it back (``from_state`` beside it).

Every operation is safe to repeat: ``stop`` and ``destroy`` are idempotent, and a
failure half-way (a start that fails, a daemon that dies inside a stop) leaves a state
the next call or the next daemon finishes from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from agent.client import AgentClient, ExecResult
from agent.errors import AgentError
from agent.protocol import (
    CgroupUpdate,
    ContainerInfo,
    ContainerSpec,
    ErrorCode,
    ExecSpec,
    ExitStatus,
    Mount,
    StatsReport,
)
from agent.streams import ContainerOutput, ExecSession, PortForwardStream
from sandbox.api import (
    BootTimes,
    HostPathMount,
    PodUsage,
    RootfsImage,
    Sandbox,
    SandboxError,
    SandboxNotFound,
    SandboxRefused,
    SandboxState,
    SandboxUnavailable,
    SharedFiles,
)
from sandbox.network import NetworkError, NetworkResult, PodNetwork
from sandbox.vm import VmProcess

log = logging.getLogger(__name__)

SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STATE_FILE = "state.json"


def check_new(run_root: Path, sandbox_id: str) -> Path:
    """The run directory a new sandbox ``sandbox_id`` gets (not made yet); refuses a
    bad id or one in use."""
    if not SANDBOX_ID_RE.match(sandbox_id):
        raise SandboxRefused(
            f"invalid sandbox id {sandbox_id!r}: use 1-128 letters, digits, '_', '.', '-'"
        )
    run_dir = run_root / sandbox_id
    if run_dir.exists():
        raise SandboxError(f"sandbox {sandbox_id} already exists", code=ErrorCode.ALREADY_EXISTS)
    return run_dir


def read_state(run_dir: Path) -> dict[str, Any]:
    """A sandbox's saved state (SandboxNotFound when there is none to read)."""
    try:
        saved = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise SandboxNotFound(f"sandbox {run_dir.name} has no readable state: {exc}") from exc
    if not isinstance(saved, dict):
        raise SandboxNotFound(f"sandbox {run_dir.name} has no readable state: not an object")
    return saved


def write_state(run_dir: Path, data: dict[str, Any]) -> None:
    """Replace the state file in one step (a crash leaves the old one or the new one)."""
    path = run_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


class LifeSettings(Protocol):
    """The node's settings a sandbox's life needs (``SandboxConfig`` has them)."""

    @property
    def boot_timeout_s(self) -> float:
        """How long a starting pod's agent has to answer."""
        ...

    @property
    def stop_timeout_s(self) -> float:
        """The containers' grace period when a stop names none."""
        ...


class SandboxBackend(Protocol):
    """What runs a pod: its VM (sandbox/vmpod.py) or its host agent (sandbox/hostpod.py)."""

    #: the runtime handler this backend serves
    handler: str
    #: what the pod is called in messages ("sandbox", "host pod")
    noun: str
    run_dir: Path
    network: PodNetwork | None
    writable_layer_dir: Path | None

    def to_state(self) -> dict[str, Any]:
        """This backend's part of the state file (its spec under ``spec``)."""
        ...

    @property
    def process_marker(self) -> str:
        """A string the pod process's command line holds (re-adoption checks it)."""
        ...

    @property
    def agent_socket(self) -> Path: ...

    async def launch(self, sandbox: PodSandbox) -> BootTimes:
        """Start the pod's process (``sandbox.started(process)``), connect its agent
        (``sandbox.connect_agent``) and configure the pod; the sandbox cleans up if it
        raises (``abort_launch``)."""
        ...

    async def abort_launch(self, sandbox: PodSandbox) -> None:
        """Undo a launch that failed half-way (the network is the sandbox's)."""
        ...

    async def reattach(self, sandbox: PodSandbox) -> None:
        """Reconnect what a restarted daemon needs besides the agent (QMP)."""
        ...

    async def halt(self, sandbox: PodSandbox, grace: float) -> None:
        """End the pod's processes once the agent stopped the containers (or could not):
        also called for a pod at rest, to end what a failed start may have left."""
        ...

    async def release(self, sandbox: PodSandbox) -> None:
        """Remove everything the pod made on the host but its network (it is halted)."""
        ...

    async def close(self) -> None:
        """Drop connections of the backend's own (QMP)."""
        ...

    def exit_reason(self, process: VmProcess) -> str:
        """Why the pod's process went away unasked."""
        ...

    @property
    def gone_while_away(self) -> str:
        """Why a pod whose process a restarted daemon does not find is dead."""
        ...

    def failure_detail(self, exc: BaseException) -> str:
        """A failed start, with what the pod's logs say."""
        ...

    async def attach_image(self, sandbox: PodSandbox, image: RootfsImage) -> str: ...
    async def host_path_mount(self, sandbox: PodSandbox, request: HostPathMount) -> Mount: ...
    async def unshare_host_paths(self, keys: list[str]) -> None: ...
    def status_info(self) -> dict[str, object]: ...
    def pod_usage(self, sandbox: PodSandbox) -> PodUsage | None: ...
    def shared_files(self) -> SharedFiles: ...


class PodSandbox:
    """One pod sandbox (``sandbox.api.Sandbox``): the life every kind shares, around a
    backend that runs it."""

    def __init__(self, backend: SandboxBackend, sandbox_id: str, settings: LifeSettings) -> None:
        self.backend = backend
        self.id = sandbox_id
        self.boot_timeout = settings.boot_timeout_s
        self.stop_timeout = settings.stop_timeout_s
        self.state = SandboxState.CREATED
        self.exit_reason = ""
        self.created_at = time.time()
        self.boot = BootTimes()
        self.pid = 0
        self.process: VmProcess | None = None
        self._agent: AgentClient | None = None
        self._exit_callbacks: list[Callable[[Sandbox], None]] = []
        # serializes image attachment (a slot, a loop device) among the pod's containers
        self.lock = asyncio.Lock()

    @property
    def handler(self) -> str:
        return self.backend.handler

    @property
    def network(self) -> PodNetwork | None:
        return self.backend.network

    @property
    def writable_layer_dir(self) -> Path | None:
        return self.backend.writable_layer_dir

    @property
    def network_result(self) -> NetworkResult | None:
        """The pod's IPs, routes, MAC, DNS (None without a network)."""
        network = self.backend.network
        return network.result if network is not None else None

    @property
    def pod_ips(self) -> list[str]:
        result = self.network_result
        return result.pod_ips if result is not None else []

    @property
    def agent(self) -> AgentClient:
        """The pod's agent; SandboxError unless the sandbox is ready."""
        if self._agent is None or self.state != SandboxState.READY:
            raise SandboxError(f"sandbox {self.id} is not running (state {self.state})")
        return self._agent

    # the state file -------------------------------------------------------------

    def save(self) -> None:
        network = self.backend.network
        data: dict[str, Any] = {
            **self.backend.to_state(),
            "state": self.state,
            "exit_reason": self.exit_reason,
            "created_at": self.created_at,
            "boot": asdict(self.boot),
            "pid": self.pid,
            "network": network.to_state() if network is not None else None,
        }
        write_state(self.backend.run_dir, data)

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the saved life (not the backend's part) back from a state file."""
        if self.backend.network is not None:
            self.backend.network.restore(saved.get("network"))
        try:
            self.state = SandboxState(saved["state"])
        except (KeyError, ValueError) as exc:
            raise SandboxNotFound(f"sandbox {self.id} has no readable state: {exc}") from exc
        self.exit_reason = str(saved.get("exit_reason", ""))
        self.created_at = float(saved.get("created_at", 0.0))
        self.boot = BootTimes(**saved.get("boot", {}))
        self.pid = int(saved.get("pid", 0))

    # lifecycle ------------------------------------------------------------------

    def on_exit(self, callback: Callable[[Sandbox], None]) -> None:
        """Call ``callback`` when the pod's process goes away unasked (crash, kill)."""
        self._exit_callbacks.append(callback)

    async def start(self) -> BootTimes:
        """Start the pod and wait until its agent is ready and configured."""
        if self.state != SandboxState.CREATED:
            raise SandboxError(f"sandbox {self.id} cannot start from state {self.state}")
        self.state = SandboxState.BOOTING
        try:
            self.boot = await self.backend.launch(self)
        except BaseException as exc:
            detail = self.backend.failure_detail(exc)
            await self.backend.abort_launch(self)
            network = self.backend.network
            if network is not None:
                with contextlib.suppress(NetworkError):
                    await network.teardown()
            self._set_dead(detail)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SandboxUnavailable(
                f"{self.backend.noun} {self.id} failed to start: {detail}"
            ) from exc
        self.state = SandboxState.READY
        self.save()
        log.info(
            "sandbox=%s ready handler=%s pid=%d start=%.3fs",
            self.id,
            self.handler,
            self.pid,
            self.boot.total,
        )
        return self.boot

    def started(self, process: VmProcess) -> None:
        """The backend's launch has the pod's process: watch it, record it."""
        self.process = process
        self.pid = process.pid
        process.on_exit(self._process_exited)

    def adopt_agent(self, agent: AgentClient) -> None:
        """The agent of a VM this sandbox took over, already connected."""
        self._agent = agent

    def hand_over(self) -> tuple[VmProcess, AgentClient]:
        """Give this sandbox's running VM (its process and connected agent) to another
        sandbox (a standby VM taken by its pod): nothing of it is this sandbox's to
        watch, save or remove any more."""
        process, agent = self.process, self._agent
        if self.state != SandboxState.READY or process is None or agent is None:
            raise SandboxError(f"sandbox {self.id} has no running VM to hand over")
        self.state = SandboxState.REMOVED
        self._agent = None
        self.process = None
        return process, agent

    async def connect_agent(self, gone: str) -> AgentClient:
        """Connect to the pod's agent, failing at once with ``gone`` if the pod's
        process exits first."""
        assert self.process is not None
        connect = asyncio.ensure_future(
            AgentClient.connect(self.backend.agent_socket, timeout=self.boot_timeout)
        )
        exited = asyncio.ensure_future(self.process.wait())
        done, _ = await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        if connect in done:
            exited.cancel()
            self._agent = connect.result()
            return self._agent
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        raise SandboxError(gone)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the pod: its agent stops the containers (SIGTERM, ``timeout``, SIGKILL);
        then the backend ends its processes; the network is released. Idempotent."""
        if self.state.at_rest:
            if self.state == SandboxState.CREATED:
                self.state = SandboxState.STOPPED
                self.save()
            await self.backend.halt(self, 0)
            await self._release_network()
            return
        grace = self.stop_timeout if timeout is None else timeout
        self.state = SandboxState.STOPPING
        self.save()
        if self._agent is not None:
            # the agent answers once every container has stopped
            with contextlib.suppress(AgentError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._agent.shutdown(grace=grace), timeout=max(grace, 0.1) + 5
                )
        await self.backend.halt(self, grace)
        if self.state != SandboxState.DEAD:
            self.state = SandboxState.STOPPED
            self.exit_reason = self.exit_reason or "stopped"
        self.save()
        await self._release_network()

    async def _release_network(self) -> None:
        """CNI DEL and netns removal; on failure the pod keeps its network state and
        stop/destroy can be called again."""
        network = self.backend.network
        if network is None:
            return
        try:
            await network.teardown()
        except NetworkError as exc:
            raise SandboxError(f"sandbox {self.id}: {exc}") from exc

    async def destroy(self) -> None:
        """Stop the pod and remove everything it made on the host. Idempotent."""
        if self.state == SandboxState.REMOVED:
            return
        await self.stop(timeout=0)
        await self.close()
        await self.backend.release(self)
        self.state = SandboxState.REMOVED

    async def close(self) -> None:
        """Drop host connections but leave the pod running (daemon shutdown)."""
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()
        await self.backend.close()

    async def adopt_process(self) -> None:
        """Re-attach to the pod's process and agent after a daemon restart (the saved
        life restored); a pod whose process is gone is left dead, one that cannot be
        reconnected is killed and left dead."""
        if self.state == SandboxState.STOPPING and self.pid:
            # the daemon died inside stop(): finish it (the pod would otherwise run on
            # with nothing to account for it)
            self.process = VmProcess.adopt(self.pid, self.backend.process_marker)
            await self.backend.halt(self, 0)
            self.state = SandboxState.STOPPED
            self.exit_reason = self.exit_reason or "stopped"
            self.save()
            log.info("sandbox=%s: finished a stop an earlier daemon began", self.id)
            return
        if not self.state.running or not self.pid:
            return
        process = VmProcess.adopt(self.pid, self.backend.process_marker)
        if process is None:
            self._set_dead(self.backend.gone_while_away)
            return
        self.started(process)
        try:
            await self.backend.reattach(self)
            self._agent = await AgentClient.connect(self.backend.agent_socket, timeout=10.0)
        except (SandboxError, AgentError, OSError) as exc:
            log.warning("sandbox=%s adopt failed, ending it: %s", self.id, exc)
            await self.backend.halt(self, 0)
            self._set_dead(f"could not reconnect to the pod after a restart: {exc}")
            return
        if self.state == SandboxState.BOOTING:
            self.state = SandboxState.READY
        self.save()
        log.info("sandbox=%s adopted handler=%s pid=%d", self.id, self.handler, self.pid)

    def _process_exited(self, process: VmProcess) -> None:
        if self.state in (SandboxState.STOPPING, SandboxState.STOPPED, SandboxState.REMOVED):
            return
        self._set_dead(self.backend.exit_reason(process))

    def _set_dead(self, reason: str) -> None:
        was = self.state
        self.state = SandboxState.DEAD
        self.exit_reason = reason
        with contextlib.suppress(OSError):
            self.save()
        if was != SandboxState.DEAD:
            log.warning("sandbox=%s dead: %s", self.id, reason)
            for callback in self._exit_callbacks:
                callback(self)

    # images and volumes -----------------------------------------------------------

    async def attach_image(self, image: RootfsImage) -> str:
        """Make ``image`` available to the pod's containers; return its mount point in
        the pod's agent."""
        self.agent  # noqa: B018 -- refuse before touching anything when not running
        async with self.lock:
            return await self.backend.attach_image(self, image)

    async def host_path_mount(self, request: HostPathMount) -> Mount:
        """The container's mount of a host path, as this kind of pod can give it."""
        return await self.backend.host_path_mount(self, request)

    async def unshare_host_paths(self, keys: list[str]) -> None:
        """Drop what host_path_mount made for a removed container; unknown keys are fine."""
        await self.backend.unshare_host_paths(keys)

    # containers --------------------------------------------------------------------

    async def create_container(
        self, container_id: str, spec: ContainerSpec, image: RootfsImage | None = None
    ) -> ContainerInfo:
        """Create a container; with ``image``, its rootfs is that shared image plus a
        private writable layer. Its ``timings``: the guest's steps, plus image_attach
        and agent_create (the agent call, round trip)."""
        t0 = time.monotonic()
        if image is not None:
            await self.attach_image(image)
            spec.image_id = image.image_id
        t1 = time.monotonic()
        info = await self.agent.create_container(container_id, spec)
        info.timings = {"image_attach": t1 - t0, **info.timings}
        info.timings["agent_create"] = time.monotonic() - t1
        return info

    async def start_container(self, container_id: str) -> ContainerInfo:
        """Start a created container. Its ``timings``: the guest's crun_start, plus
        agent_start (the agent call, round trip)."""
        t0 = time.monotonic()
        info = await self.agent.start_container(container_id)
        info.timings["agent_start"] = time.monotonic() - t0
        return info

    async def exec(self, container_id: str, spec: ExecSpec) -> ExecSession:
        return await self.agent.exec(container_id, spec)

    async def signal_container(
        self,
        container_id: str,
        signal: int,
        *,
        all_processes: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Send ``signal`` to the container's first process (every process of it with
        ``all_processes``); nothing once it has exited."""
        await self.agent.signal_container(
            container_id, signal, all_processes=all_processes, timeout=timeout
        )

    async def wait_container(
        self, container_id: str, *, timeout: float | None = None
    ) -> ExitStatus:
        """The container's exit, once it has exited (AgentTimeout after ``timeout``)."""
        return await self.agent.wait_container(container_id, timeout=timeout)

    async def delete_container(self, container_id: str, *, force: bool = False) -> None:
        """Remove the container (a running one only with ``force``, which kills it)."""
        await self.agent.delete_container(container_id, force=force)

    async def update_container(self, container_id: str, update: CgroupUpdate) -> None:
        """Write the container's cgroup limits (cgroup v2 file values)."""
        await self.agent.update_container(container_id, update)

    async def list_containers(self) -> list[ContainerInfo]:
        """Every container the sandbox holds, as its agent sees them."""
        return await self.agent.list_containers()

    async def port_forward(self, port: int) -> PortForwardStream:
        """A byte stream to ``port`` on the pod's loopback, as the pod's processes see it."""
        return await self.agent.port_forward(port)

    def subscribe_output(self, container_id: str) -> ContainerOutput:
        """The container's output stream (see AgentClient.subscribe_output)."""
        return self.agent.subscribe_output(container_id)

    async def exec_sync(
        self, container_id: str, args: list[str], *, timeout: float | None, max_output: int
    ) -> ExecResult:
        """Run ``args`` in the container to completion (killed after ``timeout``), its
        output collected: at most ``max_output`` bytes of each stream."""
        return await self.agent.exec_sync(
            container_id, args, timeout=timeout, max_output=max_output
        )

    # figures -------------------------------------------------------------------------

    async def stats(
        self, container_id: str | None = None, timeout: float = 5.0, *, detail: bool = False
    ) -> StatsReport:
        """The pod's figures as its agent sees them (with ``detail``: every figure of each
        container and the pod's network counters); an agent that does not answer within
        ``timeout`` (frozen, overloaded) raises AgentTimeout rather than holding up
        kubelet's stats calls."""
        return await self.agent.container_stats(container_id, detail=detail, timeout=timeout)

    def status_info(self) -> dict[str, object]:
        """What PodSandboxStatus (verbose) tells of this sandbox."""
        return {"state": self.state, **self.backend.status_info()}

    def pod_usage(self) -> PodUsage | None:
        """What the pod costs the node (None when it does not run)."""
        return self.backend.pod_usage(self)

    def shared_files(self) -> SharedFiles:
        return self.backend.shared_files()
