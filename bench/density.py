"""`clearcri bench density`: how many idle pods one node holds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import time
from pathlib import Path

from bench.common import bench_config, drop_templates, mem_available_kib, read_kib
from bench.plots import DensityStep, density_plot, require_matplotlib
from sandbox.api import BootTimes, SandboxSpec
from sandbox.guest import locate_guest
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.procfs import process_cpu_ns
from sandbox.vmpod import create_vm_pod, vm_backend

#: How long a step waits for its pods' translated code to be flushed, beyond the idle
#: time the flush waits for.
FLUSH_WAIT_MARGIN_S = 30.0


#: ``--starts-csv``: a pod's number, seconds since the bench began, and its start's
#: phases as sandbox/api.py's BootTimes has them (a clone: spawn, restore, agent; one
#: sized at clone time also hotplug, from the restore, overlapping the agent's).
START_COLUMNS = ("pod", "at_s", "total_s", "vmm_spawn_s", "restore_s", "agent_s", "hotplug_s")


def start_row(pod: int, at: float, boot: BootTimes) -> str:
    """A ``--starts-csv`` row of one start."""
    values = (at, boot.total, boot.vmm_spawn, boot.restore, boot.agent_ready, boot.hotplug)
    return ",".join([str(pod), *(f"{v:.4f}" for v in values)])


def cpu_busy_fraction(seconds: float) -> float:
    """The host's busy CPU share (all cores) over ``seconds``, from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else 0.0


def cpu_seconds(sandboxes: list[PodSandbox]) -> float:
    """CPU time (user + system) the VMs' qemu processes have used, summed (a VM gone
    meanwhile counts 0)."""
    return sum(process_cpu_ns(s.pid) or 0 for s in sandboxes if s.pid) / 1e9


async def wait_flushed(sandboxes: list[PodSandbox], idle_s: float) -> bool:
    """Wait until every pod VM's translated code has been flushed once (sandbox/jit.py):
    the pods have idled ``idle_s``. False when some were not within the margin."""
    deadline = time.monotonic() + idle_s + FLUSH_WAIT_MARGIN_S
    while time.monotonic() < deadline:
        if all(_flushed(sandbox) for sandbox in sandboxes):
            return True
        await asyncio.sleep(1.0)
    return False


def _flushed(sandbox: PodSandbox) -> bool:
    jit = vm_backend(sandbox).jit
    return jit is None or jit.flushes > 0


def pss_total_kib(sandboxes: list[PodSandbox]) -> int:
    """PSS summed over the VMs' qemu processes (a VM gone meanwhile counts 0)."""
    total = 0
    for sandbox in sandboxes:
        with contextlib.suppress(OSError, KeyError, ValueError):
            total += read_kib(Path(f"/proc/{sandbox.pid}/smaps_rollup"), "Pss")
    return total


async def run_density_bench(
    *,
    guest_dir: Path,
    pods: int,
    step: int,
    work_dir: Path,
    plot: Path | None = None,
    qemu: str = "",
    jit_flush_idle_s: float | None = None,
    starts_csv: Path | None = None,
) -> int:
    """Start up to ``pods`` idle pod VMs (template clones, as the daemon does), one at a
    time, and print at every ``step`` pods: the start time of the last ones, the host
    memory each pod costs (the qemu processes' PSS, the drop of MemAvailable per pod and
    per pod added since the step before), the host's CPU busy share, the CPU an idle
    pod's QEMU uses (share of one core) and what memory is left. The baseline is the
    first step, measured in the same run; the limit is where a start fails or where the
    figures project that memory runs out. With ``plot``, start time and memory per pod against
    the pod count go to that PNG file. ``qemu`` is the VMM (default: the guest's own).

    Under TCG an idle pod VM's translated code is flushed once it has idled
    ``jit_flush_idle_s`` (``[vm] jit_flush_idle_s``, default the daemon's): each step
    then prints the qemu processes' PSS twice, 3 s after the step's last start ("fresh")
    and once every pod's code was flushed ("idle"); the other memory figures are the
    idle ones. 0: nothing is flushed, one figure.

    With ``starts_csv``, every start's phases go to that CSV file, one row per pod
    (``START_COLUMNS``), as it starts."""
    if plot is not None:
        require_matplotlib()
    assets = locate_guest(guest_dir)
    config = bench_config(guest_dir, work_dir, templates=True, qemu=qemu)
    if jit_flush_idle_s is not None:
        config = dataclasses.replace(config, jit_flush_idle_s=jit_flush_idle_s)
    host = SandboxHost(config, assets)
    flushing = host.accel == "tcg" and config.jit_flush_idle_s > 0
    assert host.templates is not None
    sandboxes: list[PodSandbox] = []
    starts: list[float] = []
    steps: list[DensityStep] = []
    csv_file = starts_csv.open("w", encoding="utf-8") if starts_csv is not None else None
    if csv_file is not None:
        csv_file.write(",".join(START_COLUMNS) + "\n")
    began = time.monotonic()
    try:
        await host.templates.build(
            host.machine_for(SandboxSpec("default"), config.run_root / "default")
        )
        idle_cpu = await asyncio.to_thread(cpu_busy_fraction, 5.0)
        before = mem_available_kib()
        print(
            f"guest {assets.version}  accel {host.accel}  {config.default_memory_mib} MiB "
            f"guests  VMM {host.qemu}"
        )
        if flushing:
            print(
                f"translated code flushed after {config.jit_flush_idle_s:.0f} s idle: PSS "
                "fresh (3 s after the step's last start) and idle (every pod flushed); the "
                "other memory figures are the idle ones"
            )
        print(f"host before: MemAvailable {before / 1024:.0f} MiB, CPU busy {idle_cpu:.1%}")
        print(
            f"{'pods':>5} {'start median (s)':>17} {'start max':>10} "
            f"{'PSS fresh':>10} {'PSS MiB/pod':>12} "
            f"{'MiB/pod':>8} {'MiB/extra pod':>14} {'CPU busy':>9} {'qemu CPU/pod':>13} "
            f"{'MemAvailable MiB':>17}"
        )
        limit = ""
        first_median = 0.0
        per_pod_kib = 0.0
        last_available, last_count = before, 0
        for i in range(pods):
            try:
                sandbox = create_vm_pod(host, SandboxSpec(f"bench-density-{i}"))
                sandboxes.append(sandbox)
                boot = await sandbox.start()
            except Exception as exc:  # the limit: report it, then clean up
                limit = f"pod {i + 1} did not start: {exc}"
                break
            starts.append(boot.total)
            count = len(starts)
            if csv_file is not None:
                csv_file.write(start_row(count, time.monotonic() - began, boot) + "\n")
                csv_file.flush()
            if count % step == 0 or count == pods:
                await asyncio.sleep(3)
                fresh_pss_kib = pss_total_kib(sandboxes) / count
                if flushing and not await wait_flushed(sandboxes, config.jit_flush_idle_s):
                    print(f"  (at {count} pods some pods' code was not flushed in time)")
                qemu_cpu0, t_cpu0 = cpu_seconds(sandboxes), time.monotonic()
                busy = await asyncio.to_thread(cpu_busy_fraction, 5.0)
                qemu_cpu = (cpu_seconds(sandboxes) - qemu_cpu0) / (time.monotonic() - t_cpu0)
                available = mem_available_kib()
                pss_per_pod_kib = pss_total_kib(sandboxes) / count
                per_pod_kib = (before - available) / count
                # the drop since the step before, per pod added since (the first step's
                # pods against the host before any)
                extra_kib = (last_available - available) / (count - last_count)
                last_available, last_count = available, count
                recent = starts[-step:]
                median = statistics.median(recent)
                first_median = first_median or median
                steps.append(
                    DensityStep(
                        pods=count,
                        start_median=median,
                        start_max=max(recent),
                        pss_per_pod_mib=pss_per_pod_kib / 1024,
                        drop_per_pod_mib=per_pod_kib / 1024,
                        cpu_busy=busy,
                    )
                )
                print(
                    f"{count:>5} {median:>17.3f} {max(recent):>10.3f} "
                    f"{fresh_pss_kib / 1024:>10.1f} {pss_per_pod_kib / 1024:>12.1f} "
                    f"{per_pod_kib / 1024:>8.1f} "
                    f"{extra_kib / 1024:>14.1f} {busy:>9.1%} {qemu_cpu / count:>13.3%} "
                    f"{available / 1024:>17.0f}",
                    flush=True,
                )
        if starts:
            last = statistics.median(starts[-step:])
            print(
                f"start time at {len(starts)} pods / at the first {min(step, len(starts))}: "
                f"{last / first_median:.2f}"
            )
            if per_pod_kib > 0:
                left = mem_available_kib()
                print(
                    f"host memory per idle pod: {per_pod_kib / 1024:.1f} MiB (target <= 64), "
                    f"qemu PSS {steps[-1].pss_per_pod_mib if steps else 0.0:.1f} MiB; "
                    f"MemAvailable left for ~{left / per_pod_kib:.0f} more such pods"
                )
        print(f"limit: {limit or f'none reached up to {pods} pods'}")
    finally:
        if csv_file is not None:
            csv_file.close()
        for sandbox in sandboxes:
            with contextlib.suppress(Exception):
                await sandbox.destroy()
        drop_templates(config)
    if plot is not None and steps:
        density_plot(
            steps,
            starts,
            plot,
            title=(
                f"clearcri bench density: idle pod VMs (template clones, "
                f"{config.default_memory_mib} MiB guests), accel {host.accel}, "
                f"{os.cpu_count()} host CPUs"
            ),
        )
        print(f"plot: {plot}")
    return 0
