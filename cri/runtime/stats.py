"""ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats.

Container figures come from the guest's cgroup files (through the agent). A pod's
figures are what the VM really costs the host: the qemu process's CPU time and PSS,
next to the guest's own view (MemTotal / MemAvailable) in the verbose info; its network
counters are the guest's interfaces.

kubelet looks every writable layer's ``fs_id.mountpoint`` up on the host (cAdvisor) for
capacity and free space, and fails its whole summary when the path does not exist. A
host pod's layers are in its run dir; a pod VM's live in the guest and are accounted
against the containers' filesystem ImageFsInfo reports (the image store), with the bytes
and inodes each layer really uses measured in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from cri_api.v1 import api_pb2

from agent.errors import AgentError
from agent.protocol import ContainerStats as GuestContainerStats
from agent.protocol import InterfaceStats, StatsReport
from cri.runtime.core import RuntimeCore
from cri.runtime.state import ContainerRecord, PodRecord, container_matches, labels_match
from sandbox.api import SandboxState
from sandbox.pod import SandboxError


class StatsOps(RuntimeCore):
    def _nano_cores(self, key: str, now_ns: int, usage_ns: int) -> int:
        samples = self.cpu_samples
        previous = samples.get(key)
        samples[key] = (now_ns, usage_ns)
        if previous is None or now_ns <= previous[0]:
            return 0
        return max(0, (usage_ns - previous[1]) * 1_000_000_000 // (now_ns - previous[0]))

    def _layer_mountpoint(self, pod_id: str) -> str:
        """A host directory on the filesystem kubelet should account the pod's writable
        layers against (it must exist on the host)."""
        sandbox = self.sandboxes.get(pod_id)
        host_dir = sandbox.writable_layer_dir if sandbox is not None else None
        return str(host_dir or self.images.root)

    def _container_stats(
        self, ctr: ContainerRecord, guest: GuestContainerStats | None
    ) -> api_pb2.ContainerStats:
        now = time.time_ns()
        stats = api_pb2.ContainerStats(
            attributes=api_pb2.ContainerAttributes(
                id=ctr.id, metadata=ctr.metadata(), labels=ctr.labels, annotations=ctr.annotations
            )
        )
        usage_ns = guest.cpu_usage_usec * 1000 if guest else 0
        stats.cpu.timestamp = now
        stats.cpu.usage_core_nano_seconds.value = usage_ns
        stats.cpu.usage_nano_cores.value = self._nano_cores(ctr.id, now, usage_ns)
        stats.memory.timestamp = now
        stats.memory.working_set_bytes.value = guest.memory_working_set if guest else 0
        stats.memory.usage_bytes.value = guest.memory_current if guest else 0
        stats.memory.rss_bytes.value = guest.memory_anon if guest else 0
        layer = stats.writable_layer
        layer.timestamp = now
        layer.fs_id.mountpoint = self._layer_mountpoint(ctr.pod_id)
        fs = guest.detail.fs if guest is not None and guest.detail is not None else None
        layer.used_bytes.value = fs.usage_bytes if fs else 0
        layer.inodes_used.value = fs.inodes_used if fs else 0
        return stats

    async def _guest_report(self, pod_id: str) -> StatsReport | None:
        """Every container's figures (writable layer included) and the pod's network
        counters, or None when the guest cannot answer."""
        sandbox = self.sandboxes.get(pod_id)
        if sandbox is None or sandbox.state != SandboxState.READY:
            return None
        with contextlib.suppress(AgentError, SandboxError):
            return await sandbox.stats(detail=True)
        return None

    async def _guest_stats(self, pod_id: str) -> dict[str, GuestContainerStats]:
        return _by_container(await self._guest_report(pod_id))

    async def container_stats(self, container_id: str) -> api_pb2.ContainerStats:
        ctr = self.get_container(container_id)
        guest = await self._guest_stats(ctr.pod_id)
        return self._container_stats(ctr, guest.get(ctr.id))

    async def list_container_stats(
        self, flt: api_pb2.ContainerStatsFilter | None
    ) -> list[api_pb2.ContainerStats]:
        selected = []
        for ctr in self.state.containers.values():
            if flt is None or container_matches(
                ctr, flt.id, flt.pod_sandbox_id, flt.label_selector
            ):
                selected.append(ctr)
        by_pod: dict[str, dict[str, GuestContainerStats]] = {}
        for pod_id in {c.pod_id for c in selected}:
            by_pod[pod_id] = await self._guest_stats(pod_id)
        return [self._container_stats(c, by_pod[c.pod_id].get(c.id)) for c in selected]

    async def pod_stats(self, pod_id: str) -> api_pb2.PodSandboxStats:
        pod = self.get_pod(pod_id)
        return await self._pod_stats(pod)

    async def _pod_stats(self, pod: PodRecord) -> api_pb2.PodSandboxStats:
        now = time.time_ns()
        stats = api_pb2.PodSandboxStats(
            attributes=api_pb2.PodSandboxAttributes(
                id=pod.id, metadata=pod.metadata(), labels=pod.labels, annotations=pod.annotations
            )
        )
        sandbox = self.sandboxes.get(pod.id)
        linux = stats.linux
        linux.cpu.timestamp = now
        linux.memory.timestamp = now
        pod_usage = (
            await asyncio.to_thread(sandbox.pod_usage)
            if sandbox is not None and sandbox.state == SandboxState.READY
            else None
        )
        if pod_usage is not None:
            # a pod VM's QEMU, or a host pod's cgroup (its agent and every container)
            linux.cpu.usage_core_nano_seconds.value = pod_usage.cpu_ns
            linux.cpu.usage_nano_cores.value = self._nano_cores(
                "pod:" + pod.id, now, pod_usage.cpu_ns
            )
            linux.memory.working_set_bytes.value = pod_usage.working_set_bytes
            linux.memory.usage_bytes.value = pod_usage.usage_bytes
            linux.memory.rss_bytes.value = pod_usage.rss_bytes
        report = await self._guest_report(pod.id)
        guest = _by_container(report)
        if report is not None and report.interfaces:
            _network_usage(linux.network, now, report.interfaces)
        linux.process.timestamp = now
        linux.process.process_count.value = sum(c.pids_current for c in guest.values())
        for ctr in self.state.pod_containers(pod.id):
            linux.containers.append(self._container_stats(ctr, guest.get(ctr.id)))
        return stats

    async def list_pod_stats(
        self, flt: api_pb2.PodSandboxStatsFilter | None
    ) -> list[api_pb2.PodSandboxStats]:
        out = []
        for pod in list(self.state.pods.values()):
            if flt is not None:
                if flt.id and not pod.id.startswith(flt.id):
                    continue
                if not labels_match(pod.labels, flt.label_selector):
                    continue
            out.append(await self._pod_stats(pod))
        return out


def _interface_usage(usage: api_pb2.NetworkInterfaceUsage, iface: InterfaceStats) -> None:
    usage.name = iface.name
    usage.rx_bytes.value = iface.rx_bytes
    usage.rx_errors.value = iface.rx_errors
    usage.tx_bytes.value = iface.tx_bytes
    usage.tx_errors.value = iface.tx_errors


def _network_usage(
    network: api_pb2.NetworkUsage, now: int, interfaces: list[InterfaceStats]
) -> None:
    """The pod's interfaces as CRI reports them; the default one is eth0 where it exists."""
    network.timestamp = now
    default = next((i for i in interfaces if i.name == "eth0"), interfaces[0])
    _interface_usage(network.default_interface, default)
    for iface in interfaces:
        _interface_usage(network.interfaces.add(), iface)


def _by_container(report: StatsReport | None) -> dict[str, GuestContainerStats]:
    return {c.id: c for c in report.containers} if report else {}
