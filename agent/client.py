"""Host side of the agent channel: the typed operations of one pod VM's agent.

The layers, in the manner of qemu.qmp's client:

- agent/transport.py: the connection (socket, framing, read loop, request/response
  matching, run state);
- agent/streams.py: container output, exec sessions and port forwards, and the routing
  of stream frames to them;
- agent/events.py: guest events and their subscribers;
- agent/errors.py: AgentError and one subclass per error code;
- here: :class:`AgentClient`, the connection plus one method per operation.

The names of those modules are re-exported here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent.errors import (
    AgentError,
    AgentTimeout,
    AgentUnanswered,
    AgentUnavailable,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    UnknownOperation,
    error_from_wire,
)
from agent.events import AgentEvent, EventHub
from agent.protocol import (
    EVENT,
    PROTOCOL_VERSION,
    CgroupUpdate,
    ConfiguredInterface,
    ContainerInfo,
    ContainerSpec,
    ExecSpec,
    ExecStarted,
    ExitStatus,
    HotplugResult,
    ImageSource,
    NetInterface,
    PortForwardStarted,
    ReadyInfo,
    StatsReport,
)
from agent.streams import ContainerOutput, ExecSession, OutputQueue, PortForwardStream, Streams
from agent.transport import AgentTransport, RunState, socket_address

log = logging.getLogger(__name__)

#: How long one connection waits for the agent's hello before the host connects again:
#: a clone answers within a fraction of a second, a cold boot within a few seconds;
#: a guest that missed this host's connection answers the next one at once.
HELLO_ATTEMPT_S = 5.0

__all__ = [
    "UNBOUNDED_OPS",
    "AgentClient",
    "AgentError",
    "AgentEvent",
    "AgentTimeout",
    "AgentUnavailable",
    "AlreadyExists",
    "ContainerOutput",
    "ExecResult",
    "ExecSession",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutputQueue",
    "PortForwardStream",
    "RunState",
    "UnknownOperation",
    "error_from_wire",
    "socket_address",
]

# Operations that may rightly take as long as a workload runs.
UNBOUNDED_OPS = frozenset({"wait_container"})


class ExecResult:
    """What ``exec_sync`` collected of a process that ran to completion (or timed out)."""

    __slots__ = ("exit_code", "stderr", "stdout", "timed_out")

    def __init__(self, exit_code: int, stdout: bytes, stderr: bytes, timed_out: bool) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    def __repr__(self) -> str:
        return (
            f"ExecResult(exit_code={self.exit_code}, stdout={self.stdout!r}, "
            f"stderr={self.stderr!r}, timed_out={self.timed_out})"
        )


class AgentClient(AgentTransport):
    """One connection to one guest agent, and its operations.

    Requests may run concurrently; each waits for its own response. If the connection
    drops (or the agent breaks the protocol), every pending request fails at once with
    AgentUnavailable; ``state`` tells where the connection is.
    """

    output_buffer_bytes = 4 << 20
    default_timeout = 60.0

    def __init__(
        self,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
    ) -> None:
        self._events = EventHub()
        self.streams = Streams(self, self._events.publish)
        self.ready: ReadyInfo = ReadyInfo(agent_version="", protocol_version=0)
        super().__init__(reader, writer)

    # ------------------------------------------------------------------ connect

    @classmethod
    async def connect(
        cls,
        socket_path: Path | str,
        *,
        timeout: float = 30.0,
        hello_attempt_s: float = HELLO_ATTEMPT_S,
    ) -> AgentClient:
        """Connect (retrying while the socket is missing or refused), say hello. A
        connection whose hello goes unanswered for ``hello_attempt_s`` is closed and
        another one made, until ``timeout``: a guest that missed the news of this host's
        connection hears of it again (see PROTOCOL.md, "Connecting")."""
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            attempts += 1
            client = cls()
            left = max(0.1, deadline - time.monotonic())
            try:
                await client._open(socket_path, left)
                left = max(0.1, deadline - time.monotonic())
                await client._hello(min(left, hello_attempt_s))
            except AgentUnanswered:
                await client.close()
                if time.monotonic() + 0.1 >= deadline:
                    raise AgentUnavailable(
                        f"the agent did not answer hello within {timeout:.1f} s "
                        f"({attempts} connections)"
                    ) from None
                log.warning(
                    "agent at %s did not answer hello within %.1f s: connecting again",
                    socket_path,
                    hello_attempt_s,
                )
                continue
            except BaseException:
                await client.close()
                raise
            return client

    async def _hello(self, timeout: float) -> None:
        await self._send_sync()
        try:
            result = await self.request(
                "hello", {"protocol_version": PROTOCOL_VERSION}, timeout=timeout
            )
        except AgentTimeout:
            raise AgentUnanswered(
                f"the agent did not answer hello within {timeout:.1f} s"
            ) from None
        ready: ReadyInfo = ReadyInfo.from_dict(result)
        if ready.protocol_version != PROTOCOL_VERSION:
            raise AgentUnavailable(
                f"agent speaks protocol {ready.protocol_version}, host {PROTOCOL_VERSION}"
            )
        self.ready = ready
        self._set_running()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing

    async def request(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request; return its result or raise the matching AgentError.

        Without a ``timeout``, every operation but ``wait_container`` (which waits for a
        container's exit by design) is bounded by ``default_timeout``: a frozen or
        broken guest fails the call instead of hanging its caller."""
        if timeout is None and op not in UNBOUNDED_OPS:
            timeout = self.default_timeout
        return await self.call(op, args or {}, timeout=timeout)

    def _on_frame(self, kind: int, stream: int, payload: bytes) -> None:
        event = AgentEvent.decode(payload) if kind == EVENT else None
        self.streams.dispatch(kind, stream, payload, event)

    def _on_close(self, error: AgentUnavailable) -> None:
        self.streams.close(error.message)
        self._events.end()

    # ------------------------------------------------------------------ events

    def events(self) -> AsyncIterator[AgentEvent]:
        """Every event from now on (container exits, OOM kills, output drops); ends
        when the connection closes."""
        return self._events.events()

    def on_event(self, callback: Callable[[AgentEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every event; returns a function that unregisters it."""
        return self._events.on_event(callback)

    def subscribe_output(self, container_id: str) -> ContainerOutput:
        """The container's output from now on (buffered from creation when created by
        this client). Requires the container to be known: created by this client or seen
        in ``list_containers``."""
        return self.streams.subscribe_output(container_id)

    # ------------------------------------------------------------------ operations

    async def ping(self) -> int:
        result = await self.request("ping", {}, timeout=10.0)
        return int(result["time_ns"])

    async def set_pod_config(
        self,
        *,
        hostname: str | None = None,
        resolv_conf: str | None = None,
        hosts: str | None = None,
    ) -> None:
        args: dict[str, Any] = {}
        if hostname is not None:
            args["hostname"] = hostname
        if resolv_conf is not None:
            args["resolv_conf"] = resolv_conf
        if hosts is not None:
            args["hosts"] = hosts
        await self.request("set_pod_config", args)

    async def sync_clock(self, unix_ns: int | None = None) -> int:
        """Set the guest clock (default: the host's now); returns the correction in ns."""
        result = await self.request("sync_clock", {"unix_ns": unix_ns or time.time_ns()})
        return int(result["offset_ns"])

    async def configure_network(
        self, interfaces: list[NetInterface] | list[dict[str, Any]]
    ) -> list[ConfiguredInterface]:
        """Give guest NICs their MAC, MTU, addresses and routes (see NetInterface);
        returns the configured NICs (with the guest time of each step)."""
        records = [
            i if isinstance(i, NetInterface) else NetInterface.from_dict(i) for i in interfaces
        ]
        result = await self.request(
            "configure_network", {"interfaces": [r.to_dict() for r in records]}, timeout=60.0
        )
        configured: list[ConfiguredInterface] = [
            ConfiguredInterface.from_dict(i) for i in result["interfaces"]
        ]
        return configured

    async def mount_image(self, image_id: str, source: ImageSource) -> str:
        """Mount an image read-only at <run>/images/<image_id> (idempotent); returns
        that path."""
        result = await self.request(
            "mount_image", {"image_id": image_id, "source": source.to_dict()}
        )
        return str(result["path"])

    async def unmount_image(self, image_id: str) -> None:
        await self.request("unmount_image", {"image_id": image_id})

    async def create_container(self, container_id: str, spec: ContainerSpec) -> ContainerInfo:
        result = await self.request(
            "create_container", {"container_id": container_id, "spec": spec.to_dict()}
        )
        info: ContainerInfo = ContainerInfo.from_dict(result)
        self.streams.track(info)
        return info

    async def start_container(self, container_id: str) -> ContainerInfo:
        result = await self.request("start_container", {"container_id": container_id})
        info: ContainerInfo = ContainerInfo.from_dict(result)
        return info

    async def signal_container(
        self,
        container_id: str,
        signal: int = 15,
        *,
        all_processes: bool = False,
        timeout: float | None = None,
    ) -> None:
        await self.request(
            "signal_container",
            {"container_id": container_id, "signal": signal, "all": all_processes},
            timeout=timeout,
        )

    async def wait_container(
        self, container_id: str, *, timeout: float | None = None
    ) -> ExitStatus:
        args: dict[str, Any] = {"container_id": container_id}
        if timeout is not None:
            args["timeout"] = timeout
        result = await self.request(
            "wait_container", args, timeout=None if timeout is None else timeout + 10.0
        )
        status: ExitStatus = ExitStatus.from_dict(result)
        return status

    async def delete_container(self, container_id: str, *, force: bool = False) -> None:
        await self.request("delete_container", {"container_id": container_id, "force": force})
        self.streams.forget(container_id)

    async def list_containers(self) -> list[ContainerInfo]:
        result = await self.request("list_containers", {})
        infos: list[ContainerInfo] = [ContainerInfo.from_dict(item) for item in result]
        for info in infos:
            self.streams.track(info)
        return infos

    async def container_stats(
        self, container_id: str | None = None, *, detail: bool = False, timeout: float | None = None
    ) -> StatsReport:
        """Cgroup figures of one or every container and the guest's memory and CPU; with
        ``detail``, every container's full figures (``ContainerDetail``) and the pod's
        network interfaces too (slower: the guest walks /proc and writable layers)."""
        args: dict[str, Any] = {"container_id": container_id or ""}
        if detail:
            args["detail"] = True
        result = await self.request("container_stats", args, timeout=timeout)
        report: StatsReport = StatsReport.from_dict(result)
        return report

    async def exec(
        self, container_id: str, spec: ExecSpec, *, timeout: float | None = None
    ) -> ExecSession:
        result = await self.request(
            "exec", {"container_id": container_id, "spec": spec.to_dict()}, timeout=timeout
        )
        started: ExecStarted = ExecStarted.from_dict(result)
        return self.streams.add_exec(container_id, started)

    #: After an exec that did not start within its budget, how long to wait for its late
    #: start so that it can be killed before the call returns.
    late_start_grace = 10.0

    async def exec_sync(
        self,
        container_id: str,
        args: list[str],
        *,
        timeout: float | None = None,
        env: list[str] | None = None,
        cwd: str = "",
        stdin: bytes | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run to completion and collect its output: at most ``max_output`` bytes of each
        stream are kept, the rest is read and dropped (the process is never held up).

        ``timeout`` is one budget for starting and running: when it runs out (even while
        the guest is still starting the process) the result is ``timed_out`` and the process
        is dead before this returns. The guest is told the same limit, so a process this
        side could not reach is still killed there."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        spec = ExecSpec(args=args, env=env or [], cwd=cwd, stdin=stdin is not None, timeout=timeout)
        starting = asyncio.ensure_future(self.exec(container_id, spec))
        try:
            session = await asyncio.wait_for(asyncio.shield(starting), remaining())
        except TimeoutError:
            await self._kill_late_start(starting)
            return ExecResult(-1, b"", b"", True)
        chunks: dict[int, list[bytes]] = {1: [], 2: []}
        kept = {1: 0, 2: 0}

        async def collect() -> None:
            async for channel, data in session:
                if channel not in kept:
                    continue
                if max_output is not None:
                    data = data[: max(0, max_output - kept[channel])]
                if data:
                    chunks[channel].append(data)
                    kept[channel] += len(data)

        collector = asyncio.ensure_future(collect())
        timed_out = False
        try:
            if stdin is not None:
                await asyncio.wait_for(self._feed_stdin(session, stdin), remaining())
            code = await session.wait(remaining())
        except (AgentTimeout, TimeoutError):
            timed_out = True
            await session.kill(9)
            code = await session.wait(10.0)
        await collector
        return ExecResult(code, b"".join(chunks[1]), b"".join(chunks[2]), timed_out)

    @staticmethod
    async def _feed_stdin(session: ExecSession, data: bytes) -> None:
        await session.write_stdin(data)
        await session.close_stdin()

    async def _kill_late_start(self, starting: asyncio.Future[ExecSession]) -> None:
        """An exec whose start outlived its budget: kill it once it has started."""
        try:
            session = await asyncio.wait_for(starting, self.late_start_grace)
        except (AgentError, TimeoutError):
            return  # it never started here; the guest's own limit kills a late one
        with contextlib.suppress(AgentError):
            await session.kill(9)
            await session.wait(10.0)

    async def reseed(self, entropy: bytes) -> None:
        """Give the guest kernel fresh randomness (after a restore from a template)."""
        await self.request("reseed", {"entropy": base64.b64encode(entropy).decode()})

    async def hotplug(
        self, *, vcpus: int, mem_total_kib: int, template_mem_total_kib: int, timeout: float
    ) -> HotplugResult:
        """Wait until the guest has ``vcpus`` vCPUs online (it onlines hot-added ones)
        and a MemTotal of at least ``mem_total_kib``, then raise what its kernel sized
        from the template's memory (``template_mem_total_kib``) to what that MemTotal
        gives: a VM the host hot-plugged into."""
        result = await self.request(
            "hotplug",
            {
                "vcpus": vcpus,
                "mem_total_kib": mem_total_kib,
                "template_mem_total_kib": template_mem_total_kib,
                "timeout": timeout,
            },
            timeout=timeout + 10.0,
        )
        sized: HotplugResult = HotplugResult.from_dict(result)
        return sized

    async def update_container(self, container_id: str, update: CgroupUpdate) -> None:
        """Write a running container's cgroup limits (translated where the guest runs
        cgroup v1)."""
        await self.request(
            "update_container", {"container_id": container_id, "resources": update.to_dict()}
        )

    async def port_forward(self, port: int, *, timeout: float = 20.0) -> PortForwardStream:
        """Open a TCP connection to 127.0.0.1:port (or [::1]:port) inside the guest."""
        forward = self.streams.open_forward(port)
        try:
            result = await self.request(
                "port_forward", {"port": port, "stream": forward.stream}, timeout=timeout
            )
        except BaseException:
            self.streams.forwards.pop(forward.stream, None)
            raise
        started: PortForwardStarted = PortForwardStarted.from_dict(result)
        forward.address = started.address
        return forward

    async def shutdown(self, *, grace: float = 10.0) -> None:
        """Stop every container (SIGTERM, grace, SIGKILL) and power the VM off."""
        await self.request("shutdown", {"grace": grace}, timeout=grace + 30.0)
