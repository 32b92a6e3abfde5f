"""Idle pod VMs give back their translated code (TCG only; docs/architecture.md, "Idle
VMs give back their translated code").

Under TCG, a VM's QEMU keeps every page of host code it has translated for its guest
until its translation cache is full: ~10 MiB for a VM that has only started, 35-40 MiB
once it has run a container, the biggest part of what an idle pod VM costs the node.
Nothing uses that code while the pod idles. A ``JitFlusher`` follows one pod VM's QEMU:
once the VM has used less than ``IDLE_CPU_SHARE`` of a core for ``idle_s`` seconds, it
asks QEMU to drop its translated code and free that memory (the ``jit-flush`` monitor
command of our VMM, guestbuild/vmm_patches/jit-flush.patch). The guest then translates
again what it runs next: an idle pod's timer ticks at once, the rest when the pod works
again (its next exec pays for translating the exec path anew).

A VM is flushed again only after it has been busy since (new code to drop), and each
flush of a VM waits twice as long an idle time as the one before (up to
``MAX_BACKOFF`` times ``idle_s``): a pod woken now and then by a probe or a cron job is
not made to translate its code again every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sandbox.procfs import process_cpu_ns

log = logging.getLogger(__name__)

#: Below this share of one core (over one poll) a VM counts as idle: an idle clone's
#: timer ticks take ~0.1 %, a container doing anything at all more than 2 %.
IDLE_CPU_SHARE = 0.02
#: How often a VM's CPU time is read.
POLL_S = 5.0
#: The longest idle time a VM's flush waits for, as a multiple of ``idle_s``.
MAX_BACKOFF = 16

#: Asks the VM's QEMU to flush; False when its VMM has no such command.
FlushFn = Callable[[], Awaitable[bool]]
#: A process's CPU time in ns, None once it is gone.
CpuFn = Callable[[int], int | None]


class JitFlusher:
    """Flushes one VM's translated code each time it has gone idle (see the module)."""

    def __init__(
        self,
        name: str,
        pid: int,
        flush: FlushFn,
        *,
        idle_s: float,
        poll_s: float | None = None,
        cpu_ns: CpuFn = process_cpu_ns,
        clock: Callable[[], float] = time.monotonic,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.pid = pid
        self._flush = flush
        self.idle_s = idle_s
        self.poll_s = POLL_S if poll_s is None else poll_s
        self._cpu_ns = cpu_ns
        self._clock = clock
        self._on_flush = on_flush
        #: idle time the next flush waits for
        self.window = idle_s
        self.flushes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.idle_s > 0:
            self._task = asyncio.create_task(self._run(), name=f"jit-flush-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            await self.follow()
        except asyncio.CancelledError:
            raise
        except Exception:  # the pod is not to fail because its memory is not trimmed
            log.exception("sandbox=%s: translated code no longer flushed when idle", self.name)

    async def follow(self) -> None:
        """Poll the VM's CPU time and flush when it has been idle long enough; returns
        when the VM is gone or its VMM cannot flush."""
        cpu, at = self._cpu_ns(self.pid), self._clock()
        idle_for = 0.0
        # a VM that just started has its start-up's code to drop
        new_code = True
        while cpu is not None:
            await asyncio.sleep(self.poll_s)
            now_cpu, now = self._cpu_ns(self.pid), self._clock()
            if now_cpu is None:
                return
            elapsed = max(now - at, 1e-9)
            if (now_cpu - cpu) / 1e9 / elapsed > IDLE_CPU_SHARE:
                idle_for = 0.0
                new_code = True
            else:
                idle_for += elapsed
            cpu, at = now_cpu, now
            if new_code and idle_for >= self.window:
                if not await self._flush():
                    log.info("sandbox=%s: the VMM cannot flush translated code", self.name)
                    return
                self.flushes += 1
                if self._on_flush is not None:
                    self._on_flush()
                new_code = False
                idle_for = 0.0
                self.window = min(self.window * 2, self.idle_s * MAX_BACKOFF)
                log.debug("sandbox=%s: translated code flushed (idle)", self.name)
