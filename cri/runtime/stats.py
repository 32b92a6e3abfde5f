"""ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats.

Container figures come from the guest's cgroup v2 files (through the agent). A pod's
figures are what the VM really costs the host: the qemu process's CPU time and PSS,
next to the guest's own view (MemTotal / MemAvailable) in the verbose info.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from cri_api.v1 import api_pb2

from agent.client import AgentError
from agent.protocol import ContainerStats as GuestContainerStats
from cri.runtime.core import RuntimeCore
from cri.runtime.state import ContainerRecord, PodRecord, container_matches, labels_match
from sandbox.hostpod import HostSandbox
from sandbox.pod import SandboxError

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def qemu_cpu_ns(pid: int) -> int:
    """utime + stime of a process, in nanoseconds (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // CLOCK_TICKS


class StatsOps(RuntimeCore):
    def _nano_cores(self, key: str, now_ns: int, usage_ns: int) -> int:
        samples = self.cpu_samples
        previous = samples.get(key)
        samples[key] = (now_ns, usage_ns)
        if previous is None or now_ns <= previous[0]:
            return 0
        return max(0, (usage_ns - previous[1]) * 1_000_000_000 // (now_ns - previous[0]))

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
        stats.writable_layer.timestamp = now
        stats.writable_layer.fs_id.mountpoint = "/run/clearcri/containers"
        return stats

    async def _guest_stats(self, pod_id: str) -> dict[str, GuestContainerStats]:
        sandbox = self.sandboxes.get(pod_id)
        if sandbox is None or sandbox.state != "ready":
            return {}
        with contextlib.suppress(AgentError, SandboxError):
            report = await sandbox.stats()
            return {c.id: c for c in report.containers}
        return {}

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
            if isinstance(sandbox, HostSandbox) and sandbox.state == "ready"
            else None
        )
        if pod_usage is not None:
            # a host pod: its cgroup holds the agent and every container
            linux.cpu.usage_core_nano_seconds.value = pod_usage.cpu_ns
            linux.cpu.usage_nano_cores.value = self._nano_cores(
                "pod:" + pod.id, now, pod_usage.cpu_ns
            )
            linux.memory.working_set_bytes.value = pod_usage.working_set_bytes
            linux.memory.usage_bytes.value = pod_usage.usage_bytes
            linux.memory.rss_bytes.value = pod_usage.rss_bytes
        elif sandbox is not None and sandbox.state == "ready":
            # a pod VM: the qemu process is what the pod costs the node
            usage = qemu_cpu_ns(sandbox.pid)
            linux.cpu.usage_core_nano_seconds.value = usage
            linux.cpu.usage_nano_cores.value = self._nano_cores("pod:" + pod.id, now, usage)
            memory = sandbox.host_memory()
            linux.memory.working_set_bytes.value = memory.get("pss", 0)
            linux.memory.usage_bytes.value = memory.get("rss", 0)
            linux.memory.rss_bytes.value = memory.get("rssanon", 0)
        guest = await self._guest_stats(pod.id)
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
