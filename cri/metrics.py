"""Prometheus metrics: how fast pods start and what each pod VM really costs the host.

Two kinds of figures live in one dedicated registry (never the client's global one):

* events the runtime pushes as they happen — boot phases, RunPodSandbox and
  StartContainer durations, CRI requests, image pulls, VM crashes (``RuntimeMetrics``);
* state read at scrape time — per-sandbox PSS / RSS / CPU of the qemu process, the
  guest's own MemTotal / MemAvailable (through the agent), node-wide KSM counters, and
  how many VMs map each shared DAX image (``RuntimeCollector``).

A scrape never blocks the event loop with file reads: the loop only copies the runtime's
in-memory records and asks the agents for guest figures (asynchronously, with a
timeout); /proc, /sys and page-cache residency are read in a worker thread, which is
also where the text exposition is rendered. The HTTP endpoint is a small asyncio server
(``MetricsServer``). Every metric is listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from cri.runtime.snapshot import (
    CONTAINER_STATE_NAMES,
    POD_STATE_NAMES,
    GuestCache,
    RuntimeView,
    SharedImage,
    Snapshot,
    take_snapshot,
)
from sandbox.api import PROC, BootTimes, PoolReport, process_cpu_ns, read_process_memory

log = logging.getLogger("clearcri.metrics")

PAGE_SIZE = mmap.PAGESIZE
KSM_DIR = Path("/sys/kernel/mm/ksm")

# 50 ms to 30 s, about three buckets per decade: enough to tell 0.3 s from 0.5 s
# (KVM target) and 1.9 s from 2.5 s (TCG).
BOOT_BUCKETS = (
    0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0,
    4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
)  # fmt: skip
# CRI calls: list/status calls in the low milliseconds, RunPodSandbox in seconds.
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip
PULL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# A container started later than this after its pod was ready is not "boot" any more.
FIRST_CONTAINER_WINDOW_S = 600.0


SANDBOX_LABELS = ("sandbox_id", "pod", "namespace")
IMAGE_LABELS = ("image", "kind", "path")
OS_IMAGE_NAME = "guest-os"

KSM_FIELDS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans")
KSM_SETTINGS = ("run", "pages_to_scan", "sleep_millisecs")


# -- events pushed by the runtime -----------------------------------------------------


class RuntimeMetrics:
    """The registry and every metric the runtime updates as things happen."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.boot_seconds = Histogram(
            "clearcri_sandbox_boot_seconds",
            "Pod VM boot phases: vmm_spawn (qemu start to QMP), restore (a template clone's "
            "device state), firmware, kernel (guest "
            "clock at init), agent_ready (init to agent ready), first_container (pod "
            "ready to its first container running).",
            ["phase"],
            buckets=BOOT_BUCKETS,
            registry=r,
        )
        self.sandbox_start_seconds = Histogram(
            "clearcri_sandbox_start_seconds",
            "Whole RunPodSandbox: from the request to a ready pod VM.",
            buckets=BOOT_BUCKETS,
            registry=r,
        )
        self.container_start_seconds = Histogram(
            "clearcri_container_start_seconds",
            "StartContainer: from the request to the container running in its pod VM.",
            buckets=BOOT_BUCKETS,
            registry=r,
        )
        self.container_phase_seconds = Histogram(
            "clearcri_container_phase_seconds",
            "Where CreateContainer and StartContainer spend their time, by step: "
            "image_attach (hot-plug and mount of the image on first use in the pod), "
            "layer, overlay, mounts, config, crun_create, release or crun_start (in the guest), "
            "agent_create and agent_start (each agent call, round trip).",
            ["phase"],
            buckets=BOOT_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "clearcri_cri_requests",
            "CRI requests served, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "clearcri_cri_request_duration_seconds",
            "Time to serve one CRI request.",
            ["method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.pulls = Counter(
            "clearcri_image_pulls",
            "Image pulls, by result (success or failure).",
            ["result"],
            registry=r,
        )
        self.pull_seconds = Histogram(
            "clearcri_image_pull_seconds",
            "Time to pull one image (resolve, download, build its rootfs file).",
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self.vm_crashes = Counter(
            "clearcri_vm_crashes",
            "Pod VMs that went away without being stopped, by cause (panic, exit, lost).",
            ["cause"],
            registry=r,
        )
        self.jit_flushes = Counter(
            "clearcri_jit_flushes",
            "Flushes of an idle pod VM's translated code, its memory given back to the host "
            "(TCG only; vm.jit_flush_idle_s).",
            registry=r,
        )
        for phase in (
            "vmm_spawn",
            "restore",
            "firmware",
            "kernel",
            "agent_ready",
            "hotplug",
            "standby",
            "first_container",
        ):
            self.boot_seconds.labels(phase)
        for cause in ("panic", "exit", "lost"):
            self.vm_crashes.labels(cause)
        for result in ("success", "failure"):
            self.pulls.labels(result)
        self._ready_at: dict[str, float] = {}

    def observe_cri(self, method: str, code: str, seconds: float) -> None:
        """The ``observe`` hook of the RuntimeService and the ImageService."""
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)

    def sandbox_started(self, pod_id: str, boot: BootTimes, seconds: float) -> None:
        """A pod VM is ready: its boot phases and the whole RunPodSandbox."""
        # a VM cloned from a template restores instead of running firmware and kernel; a
        # pod that took over a standby VM did neither (its VM had started before)
        phases: tuple[str, ...] = (
            ("standby",)
            if boot.standby > 0
            else ("vmm_spawn", "restore", "agent_ready")
            if boot.restore > 0
            else ("vmm_spawn", "firmware", "kernel", "agent_ready")
        )
        if boot.hotplug > 0:
            phases += ("hotplug",)
        for phase in phases:
            self.boot_seconds.labels(phase).observe(getattr(boot, phase))
        self.sandbox_start_seconds.observe(seconds)
        now = time.monotonic()
        for stale in [p for p, t in self._ready_at.items() if now - t > FIRST_CONTAINER_WINDOW_S]:
            del self._ready_at[stale]
        self._ready_at[pod_id] = now

    def container_started(self, pod_id: str, seconds: float) -> None:
        """A container runs; the pod's first one also ends its boot (first_container)."""
        self.container_start_seconds.observe(seconds)
        ready = self._ready_at.pop(pod_id, None)
        if ready is not None:
            waited = time.monotonic() - ready
            if waited <= FIRST_CONTAINER_WINDOW_S:
                self.boot_seconds.labels("first_container").observe(waited)

    def container_phases(self, timings: Mapping[str, float]) -> None:
        """The steps of one CreateContainer or StartContainer (seconds each)."""
        for phase, seconds in timings.items():
            self.container_phase_seconds.labels(phase).observe(seconds)

    def vm_crashed(self, reason: str) -> None:
        self.vm_crashes.labels(crash_cause(reason)).inc()

    def jit_flushed(self) -> None:
        """The sandbox host's ``jit_flushed`` hook."""
        self.jit_flushes.inc()

    def image_pulled(self, ok: bool, seconds: float) -> None:
        """The ImageStore's ``pull_observer`` hook."""
        self.pulls.labels("success" if ok else "failure").inc()
        if ok:
            self.pull_seconds.observe(seconds)


def crash_cause(reason: str) -> str:
    """A small fixed label for a free-text VM exit reason."""
    text = reason.lower()
    if "panic" in text:
        return "panic"
    if "no daemon" in text or "lost" in text or "reconnect" in text:
        return "lost"
    return "exit"


def read_ksm(ksm_dir: Path = KSM_DIR) -> dict[str, int]:
    """The host's KSM counters and settings that exist here (empty without KSM)."""
    out: dict[str, int] = {}
    for name in (*KSM_FIELDS, *KSM_SETTINGS, "general_profit", "ksm_zero_pages"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((ksm_dir / name).read_text().split()[0])
    return out


class _Libc:
    """mmap / mincore / munmap through ctypes: Python's mmap module has no mincore."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self.munmap = libc.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mincore = libc.mincore
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


_libc: _Libc | None = None
_libc_lock = threading.Lock()
MAP_FAILED = ctypes.c_void_p(-1).value


def page_cache_bytes(path: Path) -> int | None:
    """Bytes of ``path`` resident in the host page cache (mincore on a fresh mapping;
    this reads residency only, it faults nothing in). None when it cannot be told."""
    global _libc
    with _libc_lock:
        if _libc is None:
            try:
                _libc = _Libc()
            except (OSError, AttributeError):
                return None
        libc = _libc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            return None
        try:
            pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident = sum(1 for b in bytes(vec) if b & 1)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * PAGE_SIZE, size)


# -- the scrape-time collector ------------------------------------------------------------


class RuntimeCollector(Collector):
    """Turns a ``Snapshot`` plus /proc, /sys and page-cache reads into metric families.

    ``collect`` does file I/O: call it (through the registry) off the event loop.
    """

    def __init__(
        self,
        *,
        proc: Path = PROC,
        ksm_dir: Path = KSM_DIR,
        resident: Callable[[Path], int | None] = page_cache_bytes,
    ) -> None:
        self.proc = proc
        self.ksm_dir = ksm_dir
        self.resident = resident
        self.snapshot = Snapshot()

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield from self._states(snap)
        yield from self._sandboxes(snap)
        yield from self._ksm()
        yield from self._shared_images(snap)
        yield from self._standby(snap)
        pulled = CounterMetricFamily(
            "clearcri_image_pull_bytes", "Bytes of image blobs downloaded by pulls."
        )
        pulled.add_metric([], snap.pulled_bytes)
        yield pulled

    def _states(self, snap: Snapshot) -> Iterator[Metric]:
        pods = GaugeMetricFamily(
            "clearcri_sandboxes", "Pod sandboxes by CRI state.", labels=["state"]
        )
        for state in POD_STATE_NAMES.values():
            pods.add_metric([state], snap.pod_states.get(state, 0))
        yield pods
        ctrs = GaugeMetricFamily(
            "clearcri_containers", "Containers by CRI state.", labels=["state"]
        )
        for state in CONTAINER_STATE_NAMES.values():
            ctrs.add_metric([state], snap.container_states.get(state, 0))
        yield ctrs

    def _sandboxes(self, snap: Snapshot) -> Iterator[Metric]:
        labels = list(SANDBOX_LABELS)
        info = GaugeMetricFamily(
            "clearcri_sandbox_info",
            "1 for every ready pod sandbox, with the runtime handler serving it: "
            "clearcri (a pod VM) or host (crun on the host, sandbox/hostpod.py).",
            labels=[*labels, "handler"],
        )
        for sample in snap.sandboxes:
            info.add_metric([*sample.labels, sample.handler], 1)
        yield info
        pss = GaugeMetricFamily(
            "clearcri_sandbox_memory_pss_bytes",
            "Proportional set size of the pod VM's qemu process: its share of the host's "
            "memory, shared pages (DAX images, page cache) divided among their users.",
            labels=labels,
        )
        rss = GaugeMetricFamily(
            "clearcri_sandbox_memory_rss_bytes",
            "Resident set of the pod VM's qemu process, by kind (anon, file, shmem).",
            labels=[*labels, "kind"],
        )
        merged = GaugeMetricFamily(
            "clearcri_sandbox_ksm_merged_bytes",
            "Bytes of the pod VM's memory currently merged by KSM.",
            labels=labels,
        )
        cpu = CounterMetricFamily(
            "clearcri_sandbox_cpu_seconds",
            "CPU time of the pod VM's qemu process (user + system).",
            labels=labels,
        )
        mem_total = GaugeMetricFamily(
            "clearcri_sandbox_guest_memory_total_bytes",
            "MemTotal inside the pod VM, from its agent.",
            labels=labels,
        )
        mem_avail = GaugeMetricFamily(
            "clearcri_sandbox_guest_memory_available_bytes",
            "MemAvailable inside the pod VM, from its agent.",
            labels=labels,
        )
        for sample in snap.sandboxes:
            values = list(sample.labels)
            memory = read_process_memory(sample.pid, self.proc)
            if memory is not None:
                pss.add_metric(values, memory.pss)
                rss.add_metric([*values, "anon"], memory.rss_anon)
                rss.add_metric([*values, "file"], memory.rss_file)
                rss.add_metric([*values, "shmem"], memory.rss_shmem)
                merged.add_metric(values, memory.ksm_merging)
            cpu_ns = process_cpu_ns(sample.pid, self.proc)
            if cpu_ns is not None:
                cpu.add_metric(values, cpu_ns / 1e9)
            if sample.guest is not None and sample.guest.mem_total_kib:
                mem_total.add_metric(values, sample.guest.mem_total_kib * 1024)
                mem_avail.add_metric(values, sample.guest.mem_available_kib * 1024)
        yield from (pss, rss, merged, cpu, mem_total, mem_avail)

    def _standby(self, snap: Snapshot) -> Iterator[Metric]:
        pool = snap.standby
        if pool is None:
            return
        labels = ["vcpus", "memory_mib"]
        vms = GaugeMetricFamily(
            "clearcri_standby_vms",
            "Standby VMs ready for new pods to take over, by base (vCPUs and MiB the VM "
            "has before a pod grows it).",
            labels=labels,
        )
        target = GaugeMetricFamily(
            "clearcri_standby_target",
            "Standby VMs the pool keeps of a base now ([vm] standby for the default base, "
            "plus up to [vm] standby_burst while its pods come faster than it makes them).",
            labels=labels,
        )
        pss = GaugeMetricFamily(
            "clearcri_standby_memory_pss_bytes",
            "PSS of the ready standby VMs' qemu processes, by base: host memory no pod's "
            "cgroup is charged for until a pod takes one over.",
            labels=labels,
        )
        for base in pool.bases:
            values = [str(base.vcpus), str(base.memory_mib)]
            vms.add_metric(values, len(base.pids))
            target.add_metric(values, base.target)
            held = (read_process_memory(pid, self.proc) for pid in base.pids)
            pss.add_metric(values, sum(m.pss for m in held if m is not None))
        yield from (vms, target, pss)
        taken = CounterMetricFamily("clearcri_standby_taken", "Pods that took over a standby VM.")
        taken.add_metric([], pool.taken)
        missed = CounterMetricFamily(
            "clearcri_standby_missed",
            "Pods a base's standby VMs serve that found none of it ready (each started as "
            "a clone).",
        )
        missed.add_metric([], pool.missed)
        yield from (taken, missed)

    def _ksm(self) -> Iterator[Metric]:
        ksm = read_ksm(self.ksm_dir)
        run = GaugeMetricFamily(
            "clearcri_ksm_run",
            "The host's KSM mode (/sys/kernel/mm/ksm/run: 0 off, 1 on, 2 unmerge); "
            "absent where the host has no KSM.",
        )
        if "run" in ksm:
            run.add_metric([], ksm["run"])
        yield run
        for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"):
            gauge = GaugeMetricFamily(
                f"clearcri_ksm_{name}", f"/sys/kernel/mm/ksm/{name} (pages of {PAGE_SIZE} bytes)."
            )
            if name in ksm:
                gauge.add_metric([], ksm[name])
            yield gauge
        scans = CounterMetricFamily("clearcri_ksm_full_scans", "KSM full scans since boot.")
        if "full_scans" in ksm:
            scans.add_metric([], ksm["full_scans"])
        yield scans
        saved = GaugeMetricFamily(
            "clearcri_ksm_saved_bytes",
            "Memory KSM saves on this host: pages_sharing (page-table entries that point "
            "at a shared page instead of their own) times the page size.",
        )
        if "pages_sharing" in ksm:
            saved.add_metric([], ksm["pages_sharing"] * PAGE_SIZE)
        yield saved

    def _shared_images(self, snap: Snapshot) -> Iterator[Metric]:
        vms: Tally[SharedImage] = Tally()
        for sample in snap.sandboxes:
            if sample.os_image is not None:
                vms[SharedImage(OS_IMAGE_NAME, "os", sample.os_image)] += 1
            for image_id in sample.image_ids:
                image = snap.container_images.get(image_id)
                if image is None:  # not in the image store (removed while in use)
                    image = SharedImage(image_id, "container", Path())
                vms[image] += 1
        labels = list(IMAGE_LABELS)
        count = GaugeMetricFamily(
            "clearcri_shared_image_vms",
            "Running pod VMs that map this read-only image with DAX.",
            labels=labels,
        )
        size = GaugeMetricFamily(
            "clearcri_shared_image_size_bytes", "Size of the shared image file.", labels=labels
        )
        resident = GaugeMetricFamily(
            "clearcri_shared_image_resident_bytes",
            "Bytes of the image in the host page cache (one copy, mapped by every VM).",
            labels=labels,
        )
        saved = GaugeMetricFamily(
            "clearcri_shared_image_saved_bytes",
            "Memory saved against one private copy per VM: resident bytes times (VMs - 1).",
            labels=labels,
        )
        for image, n in sorted(vms.items(), key=lambda item: (item[0].kind, item[0].name)):
            values = [image.name, image.kind, str(image.path) if image.path.parts else ""]
            count.add_metric(values, n)
            if not image.path.parts:
                continue
            with contextlib.suppress(OSError):
                size.add_metric(values, image.path.stat().st_size)
            in_cache = self.resident(image.path)
            if in_cache is not None:
                resident.add_metric(values, in_cache)
                saved.add_metric(values, in_cache * max(0, n - 1))
        yield from (count, size, resident, saved)


# -- exporter and HTTP endpoint -------------------------------------------------------------


class MetricsExporter:
    """Renders the registry for one scrape: snapshot on the loop, I/O in a thread."""

    def __init__(
        self,
        metrics: RuntimeMetrics,
        runtime: RuntimeView,
        collector: RuntimeCollector | None = None,
        *,
        standby: Callable[[], PoolReport] | None = None,
    ) -> None:
        self.metrics = metrics
        self.runtime = runtime
        #: the standby pool's report (StandbyPool.report), None without a pool
        self.standby = standby
        self.collector = collector or RuntimeCollector()
        metrics.registry.register(self.collector)
        self._scrape = asyncio.Lock()
        self._guests: GuestCache = {}
        self._render_lock = threading.Lock()

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type (text or OpenMetrics by ``accept``)."""
        async with self._scrape:
            snap = await take_snapshot(self.runtime, cache=self._guests)
            if self.standby is not None:
                snap.standby = self.standby()
            return await asyncio.to_thread(self._render, snap, accept)

    def _render(self, snap: Snapshot, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        with self._render_lock:
            self.collector.snapshot = snap
            return encoder(self.metrics.registry), content_type


MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT_S = 10.0


class MetricsServer:
    """GET /metrics over plain HTTP/1.1 on the daemon's event loop (one request per
    connection). The heavy part of a scrape runs in a worker thread."""

    def __init__(self, exporter: MetricsExporter, address: str, port: int) -> None:
        self.exporter = exporter
        self.address = address
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.address, self.port, reuse_address=True, limit=MAX_REQUEST_HEAD
        )
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("serving metrics on http://%s:%d/metrics", self.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, content_type, head_only = await asyncio.wait_for(
                self._respond(reader), REQUEST_TIMEOUT_S
            )
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(header.encode() + (b"" if head_only else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str, bool]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return "431 Request Header Fields Too Large", b"", "text/plain", False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return "400 Bad Request", b"bad request line\n", "text/plain", False
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"use GET\n", "text/plain", False
        path = urlsplit(target).path
        if path == "/metrics":
            body, content_type = await self.exporter.render(headers.get("accept", ""))
            return "200 OK", body, content_type, method == "HEAD"
        if path in ("/", "/healthz"):
            return "200 OK", b"clearcri metrics: GET /metrics\n", "text/plain", method == "HEAD"
        return "404 Not Found", b"not found; try /metrics\n", "text/plain", False
