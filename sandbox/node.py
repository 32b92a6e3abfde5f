"""What every sandbox on a node shares: the daemon's sandbox settings (``[vm]``), the
guest assets, the accelerator, the network manager, the VMM id range and the VM
templates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from sandbox.accel import choose_accel
from sandbox.api import SandboxRefused, SandboxSpec
from sandbox.guest import DEFAULT_GUEST_DIR, GuestAssets, locate_guest
from sandbox.hotplug import (
    DEFAULT_MAX_CLONE_MEMORY_MIB,
    HotplugRoom,
    NodeRooms,
    guest_lpj,
    room_for,
)
from sandbox.jail import DEFAULT_FIRST_ID, DEFAULT_ID_COUNT, VmmIds
from sandbox.lifecycle import STATE_FILE, PodSandbox
from sandbox.network import NetworkConfig, NetworkManager
from sandbox.template import TemplateStore, VmTemplate
from sandbox.vm import QEMU_BINARY, MachineSpec


@dataclass
class SandboxConfig:
    """Node-wide settings for pod VMs (daemon configuration, `[vm]` table)."""

    run_root: Path = Path("/run/clearcri/sandboxes")
    guest_dir: Path = DEFAULT_GUEST_DIR
    # The VMM: "" runs the guest directory's own QEMU build (guestbuild/vmm.py), or the
    # host's qemu-system-x86_64 when the guest has none; a name on PATH or a path
    # overrides it.
    qemu: str = ""
    accel: str = "auto"
    # Guest size when the pod sets no limits (documented in docs/operations.md).
    default_vcpus: int = 1
    default_memory_mib: int = 256
    # Memory the guest kernel, agent and page tables need on top of container limits.
    guest_overhead_mib: int = 128
    # What QEMU itself costs the pod's cgroup beyond the guest's RAM (heap, device
    # state), measured by `clearcri bench overhead`; without KVM its TCG code buffer
    # (tcg_tb_size_mib) comes on top (qemu_memory_mib). A VM is sized so that its RAM
    # plus that fits the pod's memory budget (its cgroup limit).
    qemu_overhead_mib: int = 32
    # The smallest pod VM that boots and runs a container.
    min_memory_mib: int = 96
    # A pod whose memory budget cannot hold the smallest VM plus QEMU (small limits, no
    # RuntimeClass overhead): "grow" gives it the VM it would get with an overhead (its
    # limits plus guest_overhead_mib) and raises its cgroup's memory limit to what that
    # VM and QEMU need (its containers keep their limits in the guest); "refuse"
    # answers INVALID_ARGUMENT.
    small_pods: str = "grow"
    max_vcpus: int = 0  # 0: the host's CPU count
    # With hotplug: the most memory a pod VM cloned from a base grows to (its base's
    # virtio-mem region reaches that far, each GiB of it ~94 KiB of every VM's QEMU
    # memory); a pod VM above it boots with its whole size, no template.
    # 0: the host's memory, at most DEFAULT_MAX_CLONE_MEMORY_MIB.
    max_clone_memory_mib: int = 0
    image_slots: int = 4
    # TCG's translated-code cache per VM: too small and the guest's start, container
    # creation and exec translate their code again and again (docs/benchmarks.md).
    tcg_tb_size_mib: int = 48
    # Without KVM: after this many seconds in which a pod VM used (almost) no CPU, its
    # QEMU drops its translated code and frees that memory (sandbox/jit.py); 0: never.
    jit_flush_idle_s: float = 60.0
    mem_merge: bool = True
    # Turn the host's KSM on at daemon start where /sys allows it (docs/metrics.md:
    # memory saved vs. side channels); 0 leaves ksmd's pages_to_scan as it is.
    host_ksm: bool = False
    ksm_pages_to_scan: int = 0
    boot_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0
    sandbox_filter: bool = True
    # Run each VM's QEMU jailed (sandbox/jail.py): a uid of its own from
    # [jail_first_id, jail_first_id + jail_ids), no capabilities but what its 9p share
    # needs, a mount namespace holding only its own files.
    jail: bool = True
    jail_first_id: int = DEFAULT_FIRST_ID
    jail_ids: int = DEFAULT_ID_COUNT
    # Start pod VMs from a copy-on-write clone of a booted template VM (sandbox/template.py)
    # instead of booting each one; the first pod of a shape boots cold and builds it.
    templates: bool = True
    # Where templates live (their RAM files should be on tmpfs); default: beside run_root.
    template_dir: Path | None = None
    # VMs of the default shape kept running, cloned and warmed, for new pods to take
    # over (sandbox/standby.py); 0: none, every pod VM starts when its pod does.
    standby: int = 1
    # Up to this many standby VMs more while pods come faster than the pool makes them:
    # one more after each pod of that shape that found none ready, one fewer after two
    # minutes in which no pod took one; 0: always ``standby``.
    standby_burst: int = 1
    # Size pod VMs at clone time (sandbox/hotplug.py): templates of the default shape and
    # of the smallest VM (the bases) serve every pod; a clone of the base below its size
    # hot-plugs the vCPUs and memory its pod needs beyond it.
    # False: one template per shape (vCPUs, memory), its first pod boots cold.
    hotplug: bool = True
    # "pmem" (DAX, the product) or "blk" (only for the memory benchmark's comparison).
    os_image_mode: str = "pmem"
    # CNI: config and plugin directories, netns directory (sandbox/network.py).
    network: NetworkConfig = field(default_factory=NetworkConfig)


class StandbySource(Protocol):
    """Where a new pod VM finds a VM of its shape already running (sandbox/standby.py)."""

    def take(self, machine: MachineSpec, *, networked: bool) -> PodSandbox | None:
        """A running standby VM that can be ``machine`` (None: none is ready), with a
        tap in a namespace of its own when ``networked``."""
        ...


def host_memory_mib() -> int:
    """The node's MemTotal in MiB (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def qemu_memory_mib(config: SandboxConfig, accel: str) -> int:
    """What one VM's QEMU costs beyond the guest's RAM with accelerator ``accel``."""
    return config.qemu_overhead_mib + (0 if accel == "kvm" else config.tcg_tb_size_mib)


def size_vm(spec: SandboxSpec, config: SandboxConfig, qemu_mib: int) -> tuple[int, int]:
    """vCPUs and memory (MiB) for a pod: from its limits, else the defaults.

    The guest gets the containers' limits plus ``guest_overhead_mib``, but never more
    than the pod's memory budget leaves once QEMU's own cost (``qemu_mib``,
    qemu_memory_mib) is paid: the host must never OOM-kill a whole VM whose containers
    stay inside their limits. When the budget is tighter (no or a small RuntimeClass
    overhead), the guest is smaller and a container that outgrows it is refused memory
    or OOM-killed inside the guest.
    """
    max_vcpus = config.max_vcpus or os.cpu_count() or 1
    vcpus = config.default_vcpus
    if spec.cpu_quota_us > 0 and spec.cpu_period_us > 0:
        vcpus = math.ceil(spec.cpu_quota_us / spec.cpu_period_us)
    vcpus = max(1, min(vcpus, max_vcpus))
    memory = config.default_memory_mib
    if spec.memory_limit_bytes > 0:
        memory = max(
            config.min_memory_mib,
            math.ceil(spec.memory_limit_bytes / 2**20) + config.guest_overhead_mib,
        )
    if spec.memory_budget_bytes > 0:
        fits = spec.memory_budget_bytes // 2**20 - qemu_mib
        if fits < config.min_memory_mib and config.small_pods == "grow":
            # the VM a pod with a RuntimeClass overhead would get; its cgroup grows to
            # hold it (memory_floor_bytes)
            return vcpus, memory
        if fits < config.min_memory_mib:
            raise SandboxRefused(
                f"the pod's memory budget of {spec.memory_budget_bytes // 2**20} MiB "
                "(its containers' limits plus its overhead) leaves "
                f"{max(fits, 0)} MiB for the VM once QEMU's own "
                f"{qemu_mib} MiB are paid; a pod VM needs at least "
                f"{config.min_memory_mib} MiB: raise the memory limits or give the pod a "
                "RuntimeClass with an overhead (docs/install.md)"
            )
        memory = min(memory, fits)
    return vcpus, memory


def memory_floor_bytes(spec: SandboxSpec, memory_mib: int, qemu_mib: int) -> int:
    """What the pod's cgroup must allow for its VM when its budget is smaller (a small
    pod, ``small_pods = "grow"``), else 0."""
    needed = (memory_mib + qemu_mib) * 2**20
    if spec.memory_budget_bytes > 0 and needed > spec.memory_budget_bytes:
        return needed
    return 0


class SandboxHost:
    """What every sandbox on this node shares: config, guest assets, accelerator."""

    def __init__(self, config: SandboxConfig, assets: GuestAssets | None = None) -> None:
        self.config = config
        self.assets = assets or locate_guest(config.guest_dir)
        # the VMM every VM of the node runs
        self.qemu = config.qemu or str(self.assets.vmm or QEMU_BINARY)
        choice = choose_accel(
            config.accel,
            qemu=self.qemu,
            assets=self.assets,
            cache_file=config.run_root.parent / "accel.json",
        )
        self.accel = choice.accel
        self.accel_reason = choice.reason
        # what each VM's QEMU costs its pod's cgroup beyond the guest's RAM
        self.qemu_mib = qemu_memory_mib(config, self.accel)
        self.network = NetworkManager(config.network)
        # traversable, not listable: a host pod's containers in a user namespace of
        # their own reach their rootfs below it as an unprivileged id
        config.run_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        config.run_root.chmod(0o711)
        self.vmm_ids: VmmIds | None = None
        if config.jail:
            self.vmm_ids = VmmIds(config.jail_first_id, config.jail_ids)
            for vmm_id in self._saved_vmm_ids():
                self.vmm_ids.claim(vmm_id)
        self.templates: TemplateStore | None = None
        # running VMs that new pods take over (set by the daemon, sandbox/standby.py)
        self.standby: StandbySource | None = None
        # pod VMs being launched right now
        self.starting = 0
        # called after each flush of an idle pod VM's translated code (sandbox/jit.py;
        # set by the daemon, for its metrics)
        self.jit_flushed: Callable[[], None] | None = None
        # the shapes VMs are cloned from and how far they grow, when VMs are sized at
        # clone time
        self.rooms: NodeRooms | None = None
        if config.templates and config.os_image_mode == "pmem":
            self.templates = TemplateStore(
                config.template_dir or config.run_root.parent / "templates",
                self.qemu,
                vmm_ids=self.vmm_ids,
            )
            if config.hotplug:
                self.rooms = room_for(
                    default_vcpus=config.default_vcpus,
                    default_memory_mib=config.default_memory_mib,
                    min_memory_mib=config.min_memory_mib,
                    max_vcpus=config.max_vcpus or os.cpu_count() or 1,
                    max_memory_mib=config.max_clone_memory_mib
                    or min(host_memory_mib(), DEFAULT_MAX_CLONE_MEMORY_MIB),
                )
        # the boot vCPU's delay calibration, for the kernel of a VM whose vCPUs are
        # hot-added (none: they calibrate their own)
        self.lpj: int | None = None
        if self.rooms is not None and self.rooms.max_vcpus > min(self.rooms.base_vcpus):
            with contextlib.suppress(OSError):
                self.lpj = guest_lpj(Path("/proc/cpuinfo").read_text(), self.assets.hz)

    def _saved_vmm_ids(self) -> list[int]:
        """The VMM ids of the sandboxes earlier daemons made (running or not: an id
        goes back to the range when its sandbox is removed)."""
        ids = []
        state_files = [
            *self.config.run_root.glob(f"*/{STATE_FILE}"),
            *self.standby_dir.glob(f"*/{STATE_FILE}"),
        ]
        for state_file in state_files:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                vmm_id = json.loads(state_file.read_text())["machine"].get("vmm_id")
                if vmm_id is not None:
                    ids.append(int(vmm_id))
        return ids

    @property
    def standby_dir(self) -> Path:
        """Where standby VMs live (a pod that takes one over links its run directory
        there)."""
        return self.config.run_root.parent / "standby"

    def machine_for(self, spec: SandboxSpec, run_dir: Path) -> MachineSpec:
        """The VM a pod with ``spec`` gets on this node (its VMM id is given at creation).
        Sized at clone time where it can be: booted (cloned) with the base shape below
        its size and that base's room, the rest hot-plugged."""
        vcpus, memory = size_vm(spec, self.config, self.qemu_mib)
        room = None
        if self.rooms is not None and not spec.extra_args:
            room = self.rooms.room(vcpus, memory)
        if room is not None:
            memory = room.memory_for(memory)
        return self._machine(spec, run_dir, vcpus, memory, room)

    def _machine(
        self,
        spec: SandboxSpec,
        run_dir: Path,
        vcpus: int,
        memory: int,
        room: HotplugRoom | None,
    ) -> MachineSpec:
        cfg = self.config
        machine = MachineSpec(
            name=spec.sandbox_id,
            kernel=self.assets.kernel,
            initrd=self.assets.initrd,
            os_image=self.assets.os_image,
            run_dir=run_dir,
            vcpus=vcpus,
            memory_mib=memory,
            accel=self.accel,
            tcg_tb_size_mib=cfg.tcg_tb_size_mib,
            image_slots=cfg.image_slots,
            mem_merge=cfg.mem_merge,
            sandbox_filter=cfg.sandbox_filter,
            os_image_mode=cfg.os_image_mode,
            extra_args=tuple(spec.extra_args),
            share=self.assets.share,
        )
        if room is None:
            return machine
        return replace(
            machine,
            base_vcpus=room.base_vcpus,
            base_memory_mib=room.base_memory_mib,
            max_vcpus=room.max_vcpus,
            hotplug_memory_mib=room.region_mib,
            extra_cmdline=f"lpj={self.lpj}" if self.lpj else "",
        )

    def warm_up(self) -> asyncio.Task[VmTemplate | None] | None:
        """Build the templates in the background, so the first pods start fast too: the
        default size's first (returned by the task), then the other bases' (pods below
        the default size)."""
        if self.templates is None:
            return None
        return asyncio.ensure_future(self._build_bases(self.templates))

    def base_machines(self) -> list[MachineSpec]:
        """The VMs of the node's templates: the default size's first, then, when VMs are
        sized at clone time, every other base (cloned by pods below the default)."""
        run_dir = self.config.run_root / "default"
        default = self.machine_for(SandboxSpec("default"), run_dir)
        machines = [default]
        if self.rooms is None or not default.sized_at_clone:
            return machines
        for vcpus in self.rooms.base_vcpus:
            for memory in self.rooms.base_memory_mib:
                room = self.rooms.room(vcpus, memory)
                if room is None or (vcpus, memory) == (default.vcpus, default.memory_mib):
                    continue
                machines.append(self._machine(SandboxSpec("base"), run_dir, vcpus, memory, room))
        return machines

    async def _build_bases(self, templates: TemplateStore) -> VmTemplate | None:
        default, *others = self.base_machines()
        template = await templates.ensure(default)
        for machine in others:
            await templates.ensure(machine)
        return template

    def sandbox_ids(self) -> list[str]:
        """Ids of every sandbox with a run directory (running or not), also one without
        its state yet (a daemon killed between making the directory and saving into it)
        or whose link leads nowhere: recovery removes what it finds no pod for."""
        return sorted(
            p.name
            for p in self.config.run_root.iterdir()
            if not p.name.startswith(".") and (p.is_dir() or p.is_symlink())
        )
