"""The CRI metrics calls: ListMetricDescriptors and ListPodSandboxMetrics, kubelet's
per-pod and per-container figures (its /metrics/cadvisor), from a runtime snapshot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

from cri_api.v1 import api_pb2

from cri import cadvisor_metrics
from cri.runtime.snapshot import RuntimeView, Snapshot, take_snapshot
from cri.runtime.state import EXITED, ContainerRecord
from sandbox.api import PROC, process_cpu_ns, read_process_memory

# ListPodSandboxMetrics asks for every figure (the guest walks /proc and the writable
# layers): give a busy guest longer than a scrape does.
CRI_METRICS_TIMEOUT_S = 5.0

# clearcri's own CRI metrics carry cAdvisor's base labels too (pod-level ones as the
# pod's "POD" series), so kubelet's /metrics/cadvisor has one label set throughout.
POD_METRICS = (
    ("clearcri_pod_memory_pss_bytes", "PSS of the pod VM's qemu process.", api_pb2.GAUGE),
    ("clearcri_pod_memory_rss_bytes", "RSS of the pod VM's qemu process.", api_pb2.GAUGE),
    (
        "clearcri_pod_vm_cpu_usage_nanoseconds_total",
        "CPU time of the pod VM's qemu process, in nanoseconds.",
        api_pb2.COUNTER,
    ),
    ("clearcri_pod_guest_memory_total_bytes", "MemTotal inside the pod VM.", api_pb2.GAUGE),
    (
        "clearcri_pod_guest_memory_available_bytes",
        "MemAvailable inside the pod VM.",
        api_pb2.GAUGE,
    ),
)
CONTAINER_METRICS = (
    (
        "clearcri_container_memory_working_set_bytes",
        "Working set of the container's cgroup in the guest.",
        api_pb2.GAUGE,
    ),
    (
        "clearcri_container_cpu_usage_nanoseconds_total",
        "CPU time of the container's cgroup in the guest, in nanoseconds.",
        api_pb2.COUNTER,
    ),
)


def metric_descriptors() -> list[api_pb2.MetricDescriptor]:
    """ListMetricDescriptors: clearcri's own pod and container figures, then the
    cAdvisor set (cri/cadvisor_metrics.py)."""
    keys = list(cadvisor_metrics.BASE_LABELS)
    out = [
        api_pb2.MetricDescriptor(name=name, help=text, label_keys=keys)
        for name, text, _ in (*POD_METRICS, *CONTAINER_METRICS)
    ]
    out += [d.message() for d in cadvisor_metrics.DESCRIPTORS]
    return out


def pod_metrics_messages(
    snap: Snapshot, containers: Mapping[str, ContainerRecord], proc: Path = PROC
) -> list[api_pb2.PodSandboxMetrics]:
    """Per-pod figures for kubelet: pod-level series (the VM's cost, the pod's network)
    and, for each container the runtime knows that has not exited, its series. Reads
    /proc: call off the event loop."""
    out = []
    types = {name: kind for name, _, kind in (*POD_METRICS, *CONTAINER_METRICS)}
    for sample in snap.sandboxes:
        now = time.time_ns()
        labels = cadvisor_metrics.pod_labels(sample.sandbox_id, sample.pod, sample.namespace)
        values: dict[str, int] = {}
        memory = read_process_memory(sample.pid, proc)
        if memory is not None:
            values["clearcri_pod_memory_pss_bytes"] = memory.pss
            values["clearcri_pod_memory_rss_bytes"] = memory.rss
        cpu_ns = process_cpu_ns(sample.pid, proc)
        if cpu_ns is not None:
            values["clearcri_pod_vm_cpu_usage_nanoseconds_total"] = cpu_ns
        if sample.guest is not None and sample.guest.mem_total_kib:
            values["clearcri_pod_guest_memory_total_bytes"] = sample.guest.mem_total_kib * 1024
            values["clearcri_pod_guest_memory_available_bytes"] = (
                sample.guest.mem_available_kib * 1024
            )
        message = api_pb2.PodSandboxMetrics(pod_sandbox_id=sample.sandbox_id)
        for name, value in values.items():
            message.metrics.add(
                name=name,
                timestamp=now,
                metric_type=types[name],
                label_values=labels,
            ).value.value = value
        message.metrics.extend(
            cadvisor_metrics.pod_network_metrics(
                sample.sandbox_id, sample.pod, sample.namespace, sample.interfaces, now
            )
        )
        for stats in sample.containers:
            record = containers.get(stats.id)
            if record is None or record.pod_id != sample.sandbox_id or record.state == EXITED:
                continue
            cm = message.container_metrics.add(container_id=stats.id)
            ctr_labels = cadvisor_metrics.container_labels(record, sample.pod, sample.namespace)
            for name, value in (
                ("clearcri_container_memory_working_set_bytes", stats.memory_working_set),
                ("clearcri_container_cpu_usage_nanoseconds_total", stats.cpu_usage_usec * 1000),
            ):
                cm.metrics.add(
                    name=name,
                    timestamp=now,
                    metric_type=types[name],
                    label_values=ctr_labels,
                ).value.value = max(0, value)
            cm.metrics.extend(
                cadvisor_metrics.container_metrics(record, sample.pod, sample.namespace, stats, now)
            )
        out.append(message)
    return out


async def list_pod_sandbox_metrics(runtime: RuntimeView) -> list[api_pb2.PodSandboxMetrics]:
    """ListPodSandboxMetrics: every ready pod, with every figure its guest has."""
    snap = await take_snapshot(runtime, guest_timeout=CRI_METRICS_TIMEOUT_S, detail=True)
    containers = dict(runtime.state.containers)
    return await asyncio.to_thread(pod_metrics_messages, snap, containers)
