"""What every part of the runtime service shares: state, sandboxes, images, events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cri_api.v1 import api_pb2

from cri.config import Config
from cri.images.store import ImageStore
from cri.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from cri.runtime.logs import ContainerLog
from cri.runtime.state import EXITED, ContainerRecord, PodRecord, RuntimeState
from sandbox.api import BootTimes, Sandbox, SandboxProvider, SandboxState

if TYPE_CHECKING:
    from sandbox.api import ContainerOutput

log = logging.getLogger("clearcri.runtime")

EVENT_QUEUE_LIMIT = 1000


class MetricsSink(Protocol):
    """Where the runtime reports what happens as it happens (cri/metrics.py
    ``RuntimeMetrics``); the runtime knows nothing else of metrics."""

    def sandbox_started(self, pod_id: str, boot: BootTimes, seconds: float) -> None: ...
    def container_started(self, pod_id: str, seconds: float) -> None: ...
    def container_phases(self, timings: Mapping[str, float]) -> None: ...
    def vm_crashed(self, reason: str) -> None: ...


@dataclass
class ContainerIO:
    """A running container's output: written to its CRI log and fanned out to attaches."""

    log: ContainerLog
    output: ContainerOutput | None = None
    listeners: set[asyncio.Queue[tuple[int, bytes] | None]] = field(default_factory=set)
    pump: asyncio.Task[None] | None = None
    waiter: asyncio.Task[None] | None = None

    def subscribe(self) -> asyncio.Queue[tuple[int, bytes] | None]:
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=256)
        self.listeners.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[int, bytes] | None]) -> None:
        self.listeners.discard(queue)

    def fan_out(self, item: tuple[int, bytes] | None) -> None:
        for queue in list(self.listeners):
            if queue.full():
                # A slow attach client loses the oldest chunk, never blocks the log.
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(item)


class EventBus:
    """Container lifecycle events for GetContainerEvents subscribers."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[api_pb2.ContainerEventResponse]] = set()

    def publish(self, event: api_pb2.ContainerEventResponse) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[api_pb2.ContainerEventResponse]:
        queue: asyncio.Queue[api_pb2.ContainerEventResponse] = asyncio.Queue(EVENT_QUEUE_LIMIT)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)


class RuntimeCore(ABC):
    """State and collaborators shared by the pod, container and exec operations."""

    def __init__(
        self,
        config: Config,
        state: RuntimeState,
        provider: SandboxProvider,
        images: ImageStore,
    ) -> None:
        self.config = config
        self.state = state
        # makes and re-adopts sandboxes (sandbox/handlers.py; tests hand a fake one)
        self.provider = provider
        self.images = images
        self.sandboxes: dict[str, Sandbox] = {}
        self.io: dict[str, ContainerIO] = {}
        self.events = EventBus()
        self.pod_cidr = ""
        self._pod_locks: dict[str, asyncio.Lock] = {}
        self.background: set[asyncio.Task[None]] = set()
        # (timestamp, cumulative CPU ns) per container or pod, for usage_nano_cores
        self.cpu_samples: dict[str, tuple[int, int]] = {}

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def pod_lock(self, pod_id: str) -> asyncio.Lock:
        return self._pod_locks.setdefault(pod_id, asyncio.Lock())

    def get_pod(self, pod_id: str) -> PodRecord:
        if not pod_id:
            raise InvalidArgument("pod_sandbox_id is empty")
        pod = self.state.find_pod(pod_id)
        if pod is None:
            raise NotFound(f"pod sandbox {pod_id} not found")
        return pod

    def get_container(self, container_id: str) -> ContainerRecord:
        if not container_id:
            raise InvalidArgument("container_id is empty")
        ctr = self.state.find_container(container_id)
        if ctr is None:
            raise NotFound(f"container {container_id} not found")
        return ctr

    def running_sandbox(self, pod_id: str) -> Sandbox:
        sandbox = self.sandboxes.get(pod_id)
        if sandbox is None or sandbox.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {pod_id} is not ready (its VM is not running)")
        return sandbox

    def publish(
        self,
        kind: int,
        container_id: str,
        pod: PodRecord | None,
    ) -> None:
        event = api_pb2.ContainerEventResponse(
            container_id=container_id,
            container_event_type=kind,  # type: ignore[arg-type]
            created_at=time.time_ns(),
        )
        if pod is not None:
            event.pod_sandbox_status.CopyFrom(self.pod_status_message(pod))
            for ctr in self.state.pod_containers(pod.id):
                event.containers_statuses.append(self.container_status_message(ctr))
        self.events.publish(event)

    def _mark_exited(
        self, ctr: ContainerRecord, code: int, reason: str, message: str, finished_ns: int
    ) -> None:
        ctr.state = EXITED
        ctr.exit_code = code
        ctr.reason = reason
        ctr.message = message
        ctr.finished_at_ns = finished_ns
        with contextlib.suppress(Exception):
            self.state.save_container(ctr)
        io = self.io.get(ctr.id)
        if io is not None:
            io.log.flush()

    # implemented by the pod and container parts
    @abstractmethod
    def pod_status_message(self, pod: PodRecord) -> api_pb2.PodSandboxStatus: ...

    @abstractmethod
    async def recover_containers(self, pod: PodRecord, sandbox: Sandbox) -> None: ...

    @abstractmethod
    def container_status_message(self, ctr: ContainerRecord) -> api_pb2.ContainerStatus: ...
