"""Standby VMs: pod VMs of the node's bases, started and warmed before a pod asks.

Under TCG most of a clone's start is guest code running for the first time in its QEMU
process (translated code is per process, and a clone starts with none): the restore,
the agent's reconnect, its first requests on new threads, the clock and /etc files.
A standby VM has been through all of that: a clone of one of the node's bases (the
default shape's, or the smallest VM's that pods below the default's memory are cloned
from), its agent connected, reseeded and answering, its hostname and /etc files set
once, with a tap in a network namespace of its own when the node has networking. It has
also been once through a container's life (``warm_up_containers``): the guest OS image
hot-plugged once more (into a root port no pod image uses) and mounted, a throwaway
container on it created with crun, started, exec'd into, killed and deleted, so that
the code a pod's first container runs (the kernel's hot-plug, probe and mount of an
image; the agent's, crun's and nsexec's, which the agent starts at fixed addresses) is
translated before the pod comes.
A new pod of its base and no smaller takes it over at creation (sandbox/vmpod.py): the
VM's run directory and namespace become the pod's (the run root links the pod's id to
the directory), the VM joins the pod's cgroup with the memory it holds, the vCPUs and
memory the pod needs beyond the standby's are hot-plugged into the running VM (as a
clone of that base gets them before it runs), and the pod's own setup (CNI, the
guest's NIC, clock, hostname, /etc files) runs as after a boot.

Standby VMs are sandboxes of their own (named ``standby-<hex>``, their run directories
in the host's standby directory), made, watched and removed like pods. The pool makes
the next one once no pod VM is starting (a standby's start would compete with theirs
for the CPU), keeps ``[vm] standby`` of the default base's, removes and replaces one
as soon as its VM dies (killed, crashed), and removes the ones no pod took when the
daemon stops; a new daemon removes whatever standby VMs an earlier one left (those no
pod's link points to).

Pods that come faster than the pool makes standby VMs (one takes the last, the next
finds none ready and starts as a clone) make it keep more of their base's: one more
after each such pod, up to ``[vm] standby_burst`` more per base, and one fewer again
after BURST_IDLE_S in which no pod of that base came (PoolTarget). So the other bases
have standby VMs only while their pods keep coming: the first pod below the default's
memory starts as a clone, and the next finds a standby of its base.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.errors import AgentError
from agent.protocol import ContainerSpec, ImageSource
from sandbox import mounts
from sandbox.api import BaseStandby, PoolReport, SandboxError, SandboxState
from sandbox.lifecycle import PodSandbox, read_state
from sandbox.network import remove_netns
from sandbox.node import SandboxHost
from sandbox.qmp import QmpError
from sandbox.template import template_key
from sandbox.vm import MachineSpec
from sandbox.vmpod import create_standby_vm, restore_vm_pod, vm_backend

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: How long no pod VM must have been starting before the pool starts one.
QUIET_S = 0.5
#: Retry delays after failed standby starts, doubling up to the last.
RETRY_S = (2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
#: Seconds without a pod taking a standby VM after which a pool kept larger by pods
#: that found none ready keeps one fewer again.
BURST_IDLE_S = 120.0
#: The id of a standby's throwaway warm-up container and of its image.
WARM_UP_ID = "standby-warm-up"
#: Seconds each of the warm-up's agent calls may take.
WARM_UP_TIMEOUT_S = 30.0


@dataclass
class PoolTarget:
    """How many standby VMs the pool keeps: ``base``, and up to ``burst`` more while
    pods come faster than it makes them."""

    base: int
    burst: int = 0
    #: standby VMs kept beyond ``base`` now
    extra: int = 0
    #: when a pod last took a standby VM or found none ready (time.monotonic)
    last_demand: float = 0.0

    @property
    def size(self) -> int:
        return self.base + self.extra

    def took(self, now: float) -> None:
        """A pod took a standby VM."""
        self.last_demand = now

    def missed(self, now: float) -> bool:
        """A pod the pool's VMs fit found none ready: keep one more, up to the burst.
        True when the target grew."""
        self.last_demand = now
        if self.extra >= self.burst:
            return False
        self.extra += 1
        return True

    def shrink(self, now: float) -> bool:
        """Keep one fewer when BURST_IDLE_S passed since the last pod came for one (and
        again BURST_IDLE_S later). True when the target shrank."""
        if self.extra == 0 or now - self.last_demand < BURST_IDLE_S:
            return False
        self.extra -= 1
        self.last_demand = now
        return True

    def next_shrink_s(self, now: float) -> float | None:
        """Seconds until ``shrink`` is due (None: the target is at its base)."""
        if self.extra == 0:
            return None
        return max(0.0, self.last_demand + BURST_IDLE_S - now)


@dataclass
class Lane:
    """The standby VMs of one base: the VM they are (``machine``, the base's shape,
    size and room) and how many of them the pool keeps (``target``)."""

    machine: MachineSpec
    target: PoolTarget


class StandbyPool:
    """Keeps ``size`` standby VMs of the default base running for new pods to take
    over, and up to ``burst`` more of each base while its pods come faster than the
    pool makes them (PoolTarget)."""

    def __init__(self, host: SandboxHost, size: int, *, burst: int = 0) -> None:
        self.host = host
        #: one per base, the default's first (which has ``size`` standby VMs at least)
        self.lanes = [
            Lane(machine, PoolTarget(size if i == 0 else 0, burst))
            for i, machine in enumerate(host.base_machines())
        ]
        self.ready: list[PodSandbox] = []
        self.taken = 0
        self.missed = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: the lane each standby VM the pool made belongs to, by sandbox id
        self._lane_of: dict[str, Lane] = {}

    @property
    def size(self) -> int:
        """How many standby VMs the pool keeps now, of every base."""
        return sum(lane.target.size for lane in self.lanes)

    def report(self) -> PoolReport:
        """The pool now, for metrics (cheap: no I/O)."""
        bases = tuple(
            BaseStandby(
                vcpus=lane.machine.vcpus,
                memory_mib=lane.machine.memory_mib,
                target=lane.target.size,
                pids=tuple(
                    s.process.pid
                    for s in self._ready_in(lane)
                    if self._running(s) and s.process is not None
                ),
            )
            for lane in self.lanes
        )
        return PoolReport(bases, self.taken, self.missed)

    # taking --------------------------------------------------------------------------

    def take(self, machine: MachineSpec, *, networked: bool) -> PodSandbox | None:
        """A ready standby VM that can be ``machine`` (its base, no smaller, no extra
        arguments), with a tap of its own when ``networked`` (a pod without a network
        may have one: its tap stays in a namespace where it leads nowhere, as a clone's
        NIC without a network does)."""
        now = time.monotonic()
        for standby in list(self.ready):
            if not self._running(standby):
                self._wake.set()  # the pool removes it and starts another
                continue
            if self._fits(standby, machine, networked):
                self.ready.remove(standby)
                self.taken += 1
                lane = self._lane_of.pop(standby.id, None)
                if lane is not None:
                    lane.target.took(now)
                self._wake.set()
                return standby
        lane = self.lane_for(machine)
        if lane is not None:
            # a pod one of the pool's bases serves came before a standby of it was ready
            self.missed += 1
            if lane.target.missed(now):
                log.info(
                    "a pod found no standby VM of its base (%d vCPU, %d MiB) ready: "
                    "keeping %d of it from now on",
                    lane.machine.vcpus,
                    lane.machine.memory_mib,
                    lane.target.size,
                )
            self._wake.set()
        return None

    def has_ready(self, machine: MachineSpec, *, networked: bool) -> bool:
        """Whether a standby VM that can be ``machine`` is ready."""
        return any(self._running(s) and self._fits(s, machine, networked) for s in self.ready)

    def lane_for(self, machine: MachineSpec) -> Lane | None:
        """The lane whose standby VMs could be ``machine`` (None: no base serves it)."""
        return next((lane for lane in self.lanes if self._same_shape(lane.machine, machine)), None)

    def _fits(self, standby: PodSandbox, machine: MachineSpec, networked: bool) -> bool:
        backend = vm_backend(standby)
        if networked and backend.own_netns is None:
            return False
        return self._same_shape(backend.machine, machine)

    def _same_shape(self, vm: MachineSpec, machine: MachineSpec) -> bool:
        """Whether a pod VM ``machine`` can be the standby VM ``vm``: a clone of the same
        template (base and room), no smaller (what it needs beyond is hot-plugged into
        the running VM when it launches, sandbox/vmpod.py), no extra arguments."""
        qemu = self.host.qemu
        # the key holds the boot shape, room and share: a VM not sized at clone time
        # finds only a standby of its very size
        if machine.extra_args or machine.vcpus < vm.vcpus or machine.memory_mib < vm.memory_mib:
            return False
        try:
            return template_key(vm, qemu) == template_key(machine, qemu)
        except OSError:  # the guest assets changed under the standby
            return False

    @staticmethod
    def _running(standby: PodSandbox) -> bool:
        process = standby.process
        return standby.state == SandboxState.READY and process is not None and process.alive

    # the pool's life -----------------------------------------------------------------

    def start(self) -> None:
        """Remove what an earlier daemon left, then keep the pool full (background)."""
        if self.lanes[0].target.base > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop filling the pool and remove the standby VMs no pod took."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        ready, self.ready = self.ready, []
        self._lane_of.clear()
        for standby in ready:
            await self._remove(standby)

    def _ready_in(self, lane: Lane) -> list[PodSandbox]:
        """The ready standby VMs of ``lane``, oldest first."""
        default = self.lanes[0]
        return [s for s in self.ready if self._lane_of.get(s.id, default) is lane]

    def _short_lane(self) -> Lane | None:
        """The first lane (the default base's first) with fewer ready standby VMs than
        it keeps now (None: every lane is full)."""
        return next(
            (lane for lane in self.lanes if len(self._ready_in(lane)) < lane.target.size), None
        )

    async def _run(self) -> None:
        await self.remove_abandoned()
        failures = 0
        while True:
            for standby in [s for s in self.ready if not self._running(s)]:
                await self._drop(standby)
            if await self._shrink():
                continue
            lane = self._short_lane()
            if lane is None:
                self._wake.clear()
                now = time.monotonic()
                due = [
                    t for t in (ln.target.next_shrink_s(now) for ln in self.lanes) if t is not None
                ]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(due, default=None))
                continue
            await self._quiet()
            try:
                standby = await self._make(lane)
            except Exception as exc:
                # one failed standby, not the pool's end (an agent gone during its ping
                # or warm-up raises an AgentError, not a SandboxError)
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.warning("standby VM not started (next try in %.0f s): %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._lane_of[standby.id] = lane
            self.ready.append(standby)
            if standby.process is not None:
                # a standby VM that dies is replaced now, not when a pod next asks
                standby.process.on_exit(lambda _: self._wake.set())

    async def _shrink(self) -> bool:
        """Keep one fewer standby VM of a base whose pods stopped coming (PoolTarget),
        and remove each lane's newest beyond its target (also one made while its target
        shrank). True when a target shrank or a VM was removed."""
        now = time.monotonic()
        changed = False
        for lane in self.lanes:
            if lane.target.shrink(now):
                changed = True
                log.info(
                    "no pod came for a standby VM of its base (%d vCPU, %d MiB) for %.0f s: "
                    "keeping %d of it",
                    lane.machine.vcpus,
                    lane.machine.memory_mib,
                    BURST_IDLE_S,
                    lane.target.size,
                )
            ready = self._ready_in(lane)
            for surplus in reversed(ready[lane.target.size :]):
                changed = True
                await self._drop(surplus)
        return changed

    async def _drop(self, standby: PodSandbox) -> None:
        """Take a ready standby VM out of the pool and remove it."""
        self.ready.remove(standby)
        self._lane_of.pop(standby.id, None)
        await self._remove(standby)

    async def _quiet(self) -> None:
        """Wait until no pod VM has been starting for QUIET_S."""
        since = time.monotonic()
        while True:
            if self.host.starting:
                since = time.monotonic()
            elif time.monotonic() - since >= QUIET_S:
                return
            await asyncio.sleep(0.2)

    async def _make(self, lane: Lane) -> PodSandbox:
        host = self.host
        name = f"standby-{secrets.token_hex(6)}"
        networked = host.network.config.enabled
        standby = create_standby_vm(host, name, lane.machine, networked=networked)
        try:
            t0 = time.monotonic()
            await standby.start()
            # the first requests of a fresh clone run cold: once here, not in a pod (the
            # start itself set the clock, hostname and /etc files)
            await standby.agent.ping()
            await warm_up_containers(standby)
        except BaseException:
            await self._remove(standby)
            raise
        log.info("standby VM %s ready (%.2fs)", name, time.monotonic() - t0)
        return standby

    async def _remove(self, standby: PodSandbox) -> None:
        try:
            await standby.destroy()
        except SandboxError as exc:
            log.warning("standby VM %s not removed: %s", standby.id, exc)

    # what an earlier daemon left ------------------------------------------------------

    async def remove_abandoned(self) -> int:
        """Remove the standby VMs no pod took that an earlier daemon left (their VMs,
        namespaces, run directories, VMM ids); returns how many."""
        root = self.host.standby_dir
        if not root.is_dir():
            return 0
        taken = {
            os.path.realpath(link)
            for link in self.host.config.run_root.iterdir()
            if link.is_symlink()
        }
        ours = {vm_backend(s).run_dir for s in self.ready}
        removed = 0
        for run_dir in sorted(root.iterdir()):
            if os.path.realpath(run_dir) in taken or run_dir in ours:
                continue
            await self._remove_left(run_dir)
            removed += 1
        return removed

    async def _remove_left(self, run_dir: Path) -> None:
        try:
            standby = restore_vm_pod(self.host, read_state(run_dir))
        except (SandboxError, KeyError, TypeError, ValueError) as exc:
            # made but never saved: no VM, no namespace yet
            log.warning("removing the unreadable standby directory %s: %s", run_dir, exc)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(mounts.remove_tree, run_dir)
            return
        try:
            await standby.adopt_process()
        except SandboxError as exc:
            log.warning("standby VM %s left by an earlier daemon: %s", standby.id, exc)
        await self._remove(standby)
        own_netns = vm_backend(standby).own_netns
        if own_netns is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(remove_netns, own_netns)


async def warm_up_containers(standby: PodSandbox) -> None:
    """Take a throwaway container through the calls a pod's first container gets (image
    hot-plug and mount, create, start, an exec, kill, delete). Its image is the guest's
    OS image, plugged once more into the port after the pod's image slots
    (VmBackend.plug_warm_up_image); the VM is left with no container and no image
    mounted, that device still plugged. Raises SandboxError when a step fails (the pool
    then drops the VM)."""
    agent = standby.agent
    t = WARM_UP_TIMEOUT_S

    async def bounded(call: Awaitable[_T]) -> _T:
        return await asyncio.wait_for(call, t)

    try:
        pci = await vm_backend(standby).plug_warm_up_image()
        await bounded(agent.mount_image(WARM_UP_ID, ImageSource(pci_path=pci)))
        try:
            spec = ContainerSpec(args=["/bin/busybox", "sleep", "600"], image_id=WARM_UP_ID)
            await bounded(agent.create_container(WARM_UP_ID, spec))
            try:
                await bounded(agent.start_container(WARM_UP_ID))
                result = await agent.exec_sync(
                    WARM_UP_ID, ["/bin/busybox", "true"], timeout=t, max_output=0
                )
                if result.exit_code != 0:
                    raise SandboxError(f"an exec of busybox true exited {result.exit_code}")
                await agent.signal_container(WARM_UP_ID, 9, all_processes=True, timeout=t)
                await agent.wait_container(WARM_UP_ID, timeout=t)
            finally:
                await bounded(agent.delete_container(WARM_UP_ID, force=True))
        finally:
            await bounded(agent.unmount_image(WARM_UP_ID))
    except (TimeoutError, AgentError, ConnectionError, QmpError) as exc:
        raise SandboxError(f"standby VM {standby.id}: its warm-up container failed: {exc}") from exc
