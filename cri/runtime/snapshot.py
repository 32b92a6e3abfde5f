"""What the runtime holds, copied for a metrics scrape or a ListPodSandboxMetrics call:
the pod and container records, each ready pod's sandbox with its guest's own figures
(asked of every agent concurrently, each with a timeout), the images they share.
The Prometheus collector (cri/metrics.py) and the CRI metrics calls
(cri/runtime/pod_metrics.py) both read a ``Snapshot``; nothing here imports them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cri_api.v1 import api_pb2

from agent.protocol import ContainerStats, GuestStats, InterfaceStats, StatsReport
from cri.runtime.state import ContainerRecord, PodRecord
from sandbox.api import HOST_HANDLER, PoolReport, SandboxState, SharedFiles

log = logging.getLogger("clearcri.metrics")

# How long a scrape waits for one guest's agent; one that does not answer in time is
# reported with its last figures if they are recent enough, else without them.
GUEST_STATS_TIMEOUT_S = 2.0
GUEST_STATS_MAX_AGE_S = 60.0

GuestCache = dict[str, tuple[float, StatsReport]]

POD_STATE_NAMES: dict[int, str] = {
    api_pb2.SANDBOX_READY: "ready",
    api_pb2.SANDBOX_NOTREADY: "notready",
}
CONTAINER_STATE_NAMES: dict[int, str] = {
    api_pb2.CONTAINER_CREATED: "created",
    api_pb2.CONTAINER_RUNNING: "running",
    api_pb2.CONTAINER_EXITED: "exited",
    api_pb2.CONTAINER_UNKNOWN: "unknown",
}


# -- what the collector reads from the runtime (the real Runtime fits these) ----------


class SandboxView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def pid(self) -> int: ...
    def shared_files(self) -> SharedFiles: ...
    async def stats(
        self, container_id: str | None = None, *, detail: bool = False
    ) -> StatsReport: ...


class RecordsView(Protocol):
    @property
    def pods(self) -> Mapping[str, PodRecord]: ...
    @property
    def containers(self) -> Mapping[str, ContainerRecord]: ...


class ImageView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def repo_tags(self) -> Sequence[str]: ...
    @property
    def rootfs_id(self) -> str: ...


class PullStatsView(Protocol):
    @property
    def blob_bytes(self) -> int: ...


class ImagesView(Protocol):
    def list(self) -> Sequence[ImageView]: ...
    def rootfs_path(self, image_id: str) -> Path: ...
    @property
    def stats(self) -> PullStatsView: ...


class RuntimeView(Protocol):
    @property
    def state(self) -> RecordsView: ...
    @property
    def sandboxes(self) -> Mapping[str, SandboxView]: ...
    @property
    def images(self) -> ImagesView: ...


# -- what a scrape reads ---------------------------------------------------------------


@dataclass(frozen=True)
class SandboxSample:
    """One pod VM as the loop saw it at the start of a scrape."""

    sandbox_id: str
    pod: str
    namespace: str
    pid: int
    os_image: Path | None  # None for a host pod (no VM, no guest OS image)
    image_ids: tuple[str, ...]
    guest: GuestStats | None = None
    containers: tuple[ContainerStats, ...] = ()
    handler: str = "clearcri"
    interfaces: tuple[InterfaceStats, ...] = ()

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.sandbox_id, self.pod, self.namespace)


@dataclass(frozen=True)
class SharedImage:
    name: str
    kind: str  # "os" or "container"
    path: Path


@dataclass
class Snapshot:
    """Everything a scrape needs from the event loop's side, copied there."""

    sandboxes: list[SandboxSample] = field(default_factory=list)
    pod_states: Tally[str] = field(default_factory=Tally)
    container_states: Tally[str] = field(default_factory=Tally)
    container_images: dict[str, SharedImage] = field(default_factory=dict)
    pulled_bytes: int = 0
    #: the standby pool's VMs (None: the node keeps none)
    standby: PoolReport | None = None


async def take_snapshot(
    runtime: RuntimeView,
    *,
    guest_timeout: float = GUEST_STATS_TIMEOUT_S,
    cache: GuestCache | None = None,
    detail: bool = False,
) -> Snapshot:
    """Copy what a scrape needs (on the loop) and ask every ready guest for its figures
    (concurrently, each with ``guest_timeout``; ``cache`` keeps the last answers for a
    guest too busy to answer in time; ``detail`` asks for every container figure and
    the pod's network counters)."""
    snap = Snapshot()
    records = runtime.state
    pods = dict(records.pods)
    for pod in pods.values():
        snap.pod_states[POD_STATE_NAMES.get(pod.state, "unknown")] += 1
    for ctr in records.containers.values():
        snap.container_states[CONTAINER_STATE_NAMES.get(ctr.state, "unknown")] += 1
    ready = [
        (pods[pid], sb)
        for pid, sb in list(runtime.sandboxes.items())
        if pid in pods and sb.state == SandboxState.READY and sb.pid > 0
    ]
    if cache is not None:
        for gone in set(cache) - {pod.id for pod, _ in ready}:
            del cache[gone]

    async def guest_report(sandbox: SandboxView) -> StatsReport | None:
        try:
            query = sandbox.stats(detail=True) if detail else sandbox.stats()
            report = await asyncio.wait_for(query, guest_timeout)
        except Exception as exc:  # an unreachable agent only loses its guest figures
            log.debug("sandbox=%s no guest stats: %s", sandbox.id[:12], exc)
            if cache is not None and sandbox.id in cache:
                taken, last = cache[sandbox.id]
                if time.monotonic() - taken <= GUEST_STATS_MAX_AGE_S:
                    return last
            return None
        if cache is not None:
            cache[sandbox.id] = (time.monotonic(), report)
        return report

    reports = await asyncio.gather(*(guest_report(sb) for _, sb in ready))
    for (pod, sandbox), report in zip(ready, reports, strict=True):
        on_host = pod.runtime_handler == HOST_HANDLER
        shared = sandbox.shared_files()
        snap.sandboxes.append(
            SandboxSample(
                sandbox_id=pod.id,
                pod=pod.name,
                namespace=pod.namespace,
                pid=sandbox.pid,
                os_image=shared.os_image,
                image_ids=shared.image_ids,
                guest=None if on_host or report is None else report.guest,
                containers=tuple(report.containers) if report else (),
                handler=pod.runtime_handler,
                interfaces=tuple(report.interfaces) if report else (),
            )
        )
    used = {i for s in snap.sandboxes for i in s.image_ids}
    if used:
        images = runtime.images
        for record in images.list():
            if record.rootfs_id in used:
                name = record.repo_tags[0] if record.repo_tags else record.id
                snap.container_images[record.rootfs_id] = SharedImage(
                    name, "container", images.rootfs_path(record.id)
                )
    snap.pulled_bytes = runtime.images.stats.blob_bytes
    return snap
