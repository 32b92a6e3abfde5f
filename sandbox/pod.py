"""One pod = one VM: create, start, stop, destroy and re-adopt a pod sandbox.

A sandbox's host-side state lives in one run directory (``<run_root>/<sandbox id>``):
``state.json``, QEMU's stderr log and, in ``vmm/`` (all a jailed QEMU sees of it, see
sandbox/jail.py), the QMP and agent sockets, the console log, QEMU's pid file, the
pod's share and its images. A new daemon process re-adopts a running VM from that
directory instead of killing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.client import AgentClient, ExecResult
from agent.errors import AgentError
from agent.protocol import (
    CgroupUpdate,
    ContainerInfo,
    ContainerSpec,
    ErrorCode,
    ExecSpec,
    ExitStatus,
    ImageSource,
    Mount,
    StatsReport,
)
from agent.streams import ContainerOutput, ExecSession, PortForwardStream
from sandbox import mounts
from sandbox.accel import choose_accel
from sandbox.api import HostPathMount, PodUsage, SandboxState
from sandbox.cgroups import CgroupError, VmCgroup, raise_memory_limit
from sandbox.cgroups import place as place_in_cgroup
from sandbox.guest import DEFAULT_GUEST_DIR, GuestAssets, locate_guest
from sandbox.jail import (
    DEFAULT_FIRST_ID,
    DEFAULT_ID_COUNT,
    JailError,
    VmmIds,
    jail_for,
    prepare_vmm_dir,
)
from sandbox.network import (
    NETDEV_ID,
    NetworkConfig,
    NetworkError,
    NetworkManager,
    NetworkResult,
    PodNetwork,
    PodNetworkSpec,
    TapDevice,
)
from sandbox.qmp import QmpControl, QmpError
from sandbox.rootfs import RootfsImage
from sandbox.share import IdMappings, PodShare, ShareError
from sandbox.template import TEMPLATE_MAC, TemplateStore, VmTemplate, nic_args
from sandbox.usage import ProcessMemory, process_cpu_ns, read_process_memory
from sandbox.vm import (
    QEMU_BINARY,
    MachineSpec,
    VmProcess,
    build_command,
    slot_root_port,
)

log = logging.getLogger(__name__)

SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STATE_FILE = "state.json"


class SandboxError(Exception):
    """A sandbox operation failed; the message says what and what to do. ``code``: why,
    in the vocabulary every layer shares (agent/protocol.py ``ErrorCode``)."""

    code = ErrorCode.FAILED_PRECONDITION


class SandboxNotFound(SandboxError):
    code = ErrorCode.NOT_FOUND


class SandboxExhausted(SandboxError):
    """A per-VM resource (such as image slots) is used up."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class SandboxRefused(SandboxError):
    """What was asked cannot work in this kind of sandbox: the request is at fault, nothing
    failed."""

    code = ErrorCode.INVALID_ARGUMENT


@dataclass
class SandboxConfig:
    """Node-wide settings for pod VMs (daemon configuration, `[vm]` table)."""

    run_root: Path = Path("/run/clearcri/sandboxes")
    guest_dir: Path = DEFAULT_GUEST_DIR
    qemu: str = QEMU_BINARY
    accel: str = "auto"
    # Guest size when the pod sets no limits (documented in docs/operations.md).
    default_vcpus: int = 1
    default_memory_mib: int = 256
    # Memory the guest kernel, agent and page tables need on top of container limits.
    guest_overhead_mib: int = 128
    # What QEMU itself costs the pod's cgroup beyond the guest's RAM (TCG code buffer,
    # heap, device state), measured by `clearcri bench overhead`. A VM is sized so that
    # its RAM plus this fits the pod's memory budget (its cgroup limit).
    qemu_overhead_mib: int = 40
    # The smallest pod VM that boots and runs a container.
    min_memory_mib: int = 96
    # A pod whose memory budget cannot hold the smallest VM plus QEMU (small limits, no
    # RuntimeClass overhead): "grow" gives it the VM it would get with an overhead (its
    # limits plus guest_overhead_mib) and raises its cgroup's memory limit to what that
    # VM and QEMU need (its containers keep their limits in the guest); "refuse"
    # answers INVALID_ARGUMENT.
    small_pods: str = "grow"
    max_vcpus: int = 0  # 0: the host's CPU count
    image_slots: int = 4
    tcg_tb_size_mib: int = 16
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
    # "pmem" (DAX, the product) or "blk" (only for the memory benchmark's comparison).
    os_image_mode: str = "pmem"
    # CNI: config and plugin directories, netns directory (sandbox/network.py).
    network: NetworkConfig = field(default_factory=NetworkConfig)


@dataclass
class SandboxSpec:
    """What one pod asks for."""

    sandbox_id: str
    hostname: str = ""
    resolv_conf: str = ""
    hosts: str = ""
    cpu_quota_us: int = 0
    cpu_period_us: int = 0
    memory_limit_bytes: int = 0
    # What the pod's cgroup may hold in all (containers' limits + pod overhead, as
    # kubelet limits the pod cgroup): the VM and QEMU must fit in it. 0: no limit.
    memory_budget_bytes: int = 0
    # kubelet's pod cgroup: the VM's host processes go below it
    cgroup_parent: str = ""
    cgroup_driver: str = "cgroupfs"
    extra_args: list[str] = field(default_factory=list)
    # None: the VM gets no NIC. Otherwise CNI decides its address (sandbox/network.py).
    network: PodNetworkSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):  # read back from state.json
            self.network = PodNetworkSpec.from_dict(self.network)


@dataclass
class BootTimes:
    """Phases of one boot, in seconds."""

    vmm_spawn: float = 0.0
    # restoring a VM template's device state (0 for a cold boot)
    restore: float = 0.0
    firmware: float = 0.0
    kernel: float = 0.0
    agent_ready: float = 0.0
    total: float = 0.0


def host_memory_mib() -> int:
    """The node's MemTotal in MiB (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def size_vm(spec: SandboxSpec, config: SandboxConfig) -> tuple[int, int]:
    """vCPUs and memory (MiB) for a pod: from its limits, else the defaults.

    The guest gets the containers' limits plus ``guest_overhead_mib``, but never more
    than the pod's memory budget leaves once QEMU's own cost is paid: the host must
    never OOM-kill a whole VM whose containers stay inside their limits. When the
    budget is tighter (no or a small RuntimeClass overhead), the guest is smaller and
    a container that outgrows it is refused memory or OOM-killed inside the guest.
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
        fits = spec.memory_budget_bytes // 2**20 - config.qemu_overhead_mib
        if fits < config.min_memory_mib and config.small_pods == "grow":
            # the VM a pod with a RuntimeClass overhead would get; its cgroup grows to
            # hold it (memory_floor_bytes)
            return vcpus, memory
        if fits < config.min_memory_mib:
            raise SandboxError(
                f"the pod's memory budget of {spec.memory_budget_bytes // 2**20} MiB "
                "(its containers' limits plus its overhead) leaves "
                f"{max(fits, 0)} MiB for the VM once QEMU's own "
                f"{config.qemu_overhead_mib} MiB are paid; a pod VM needs at least "
                f"{config.min_memory_mib} MiB: raise the memory limits or give the pod a "
                "RuntimeClass with an overhead (docs/install.md)"
            )
        memory = min(memory, fits)
    return vcpus, memory


def memory_floor_bytes(spec: SandboxSpec, config: SandboxConfig, memory_mib: int) -> int:
    """What the pod's cgroup must allow for its VM when its budget is smaller (a small
    pod, ``small_pods = "grow"``), else 0."""
    needed = (memory_mib + config.qemu_overhead_mib) * 2**20
    if spec.memory_budget_bytes > 0 and needed > spec.memory_budget_bytes:
        return needed
    return 0


class SandboxHost:
    """What every sandbox on this node shares: config, guest assets, accelerator."""

    def __init__(self, config: SandboxConfig, assets: GuestAssets | None = None) -> None:
        self.config = config
        self.assets = assets or locate_guest(config.guest_dir)
        choice = choose_accel(
            config.accel,
            qemu=config.qemu,
            assets=self.assets,
            cache_file=config.run_root.parent / "accel.json",
        )
        self.accel = choice.accel
        self.accel_reason = choice.reason
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
        if config.templates and config.os_image_mode == "pmem":
            self.templates = TemplateStore(
                config.template_dir or config.run_root.parent / "templates",
                config.qemu,
                vmm_ids=self.vmm_ids,
            )

    def _saved_vmm_ids(self) -> list[int]:
        """The VMM ids of the sandboxes earlier daemons made (running or not: an id
        goes back to the range when its sandbox is removed)."""
        ids = []
        for state_file in self.config.run_root.glob(f"*/{STATE_FILE}"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                vmm_id = json.loads(state_file.read_text())["machine"].get("vmm_id")
                if vmm_id is not None:
                    ids.append(int(vmm_id))
        return ids

    def machine_for(self, spec: SandboxSpec, run_dir: Path) -> MachineSpec:
        """The VM a pod with ``spec`` gets on this node (its VMM id is given at creation)."""
        vcpus, memory = size_vm(spec, self.config)
        cfg = self.config
        return MachineSpec(
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

    def warm_up(self) -> asyncio.Task[VmTemplate | None] | None:
        """Build the template for pods of the default size in the background, so the
        first pod starts fast too."""
        if self.templates is None:
            return None
        return self.templates.ensure(
            self.machine_for(SandboxSpec("default"), self.config.run_root / "default")
        )

    def sandbox_ids(self) -> list[str]:
        """Ids of every sandbox with a run directory (running or not)."""
        return sorted(p.name for p in self.config.run_root.iterdir() if (p / STATE_FILE).exists())


class PodSandbox:
    """One pod VM."""

    #: The host directory that holds the containers' writable layers (None: they live
    #: in the guest).
    writable_layer_dir: Path | None = None
    #: The host paths the pod's containers mount, seen in the guest (None: no share).
    share: PodShare | None = None

    def __init__(self, host: SandboxHost, machine: MachineSpec, spec: SandboxSpec) -> None:
        self.host = host
        self.machine = machine
        self.spec = spec
        self.id = spec.sandbox_id
        self.state = SandboxState.CREATED
        self.exit_reason = ""
        self.created_at = time.time()
        self.boot = BootTimes()
        self.pid = 0
        self.slots: dict[int, str] = {}
        self.cgroup = VmCgroup(())
        self.process: VmProcess | None = None
        self.qmp: QmpControl | None = None
        self._agent: AgentClient | None = None
        self._lock = asyncio.Lock()
        self._exit_callbacks: list[Callable[[PodSandbox], None]] = []
        self.network: PodNetwork | None = None
        if spec.network is not None:
            self.network = host.network.for_pod(spec.sandbox_id, spec.network, self._save)
        # the host paths the pod's containers mount (None: the guest kernel has no 9p)
        self.share = PodShare(machine.share_dir, machine.vmm_id) if machine.share else None

    # construction -------------------------------------------------------

    @classmethod
    def create(cls, host: SandboxHost, spec: SandboxSpec) -> PodSandbox:
        if not SANDBOX_ID_RE.match(spec.sandbox_id):
            raise SandboxError(
                f"invalid sandbox id {spec.sandbox_id!r}: use 1-128 letters, digits, '_', '.', '-'"
            )
        run_dir = host.config.run_root / spec.sandbox_id
        if run_dir.exists():
            raise SandboxError(f"sandbox {spec.sandbox_id} already exists")
        machine = host.machine_for(spec, run_dir)
        host_mib = host_memory_mib()
        if host_mib and machine.memory_mib > host_mib:
            raise SandboxExhausted(
                f"the pod needs a {machine.memory_mib} MiB VM (its memory limit plus "
                f"{host.config.guest_overhead_mib} MiB guest overhead) but the node has "
                f"{host_mib} MiB"
            )
        if host.vmm_ids is not None:
            try:
                machine = replace(machine, vmm_id=host.vmm_ids.allocate())
            except JailError as exc:
                raise SandboxExhausted(str(exc)) from exc
        run_dir.mkdir(parents=True, mode=0o700)
        sandbox = cls(host, machine, spec)
        try:
            if machine.vmm_id is not None:
                prepare_vmm_dir(machine, mounts_later=True)
            if sandbox.share is not None:
                sandbox.share.create()
            sandbox._save()
        except BaseException as exc:
            mounts.remove_tree(run_dir)
            if host.vmm_ids is not None:
                host.vmm_ids.release(machine.vmm_id)
            raise SandboxError(f"sandbox {spec.sandbox_id}: {exc}") from exc
        return sandbox

    @classmethod
    async def adopt(cls, host: SandboxHost, sandbox_id: str) -> PodSandbox:
        """Re-attach to a sandbox left by an earlier daemon process.

        A VM that still runs is reconnected (QMP and agent); one that is gone is
        returned in state "dead" so the caller can report and destroy it.
        """
        run_dir = host.config.run_root / sandbox_id
        try:
            saved = json.loads((run_dir / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SandboxNotFound(f"sandbox {sandbox_id} has no readable state: {exc}") from exc
        machine_fields = dict(saved["machine"])
        for key in ("kernel", "initrd", "os_image", "run_dir"):
            machine_fields[key] = Path(machine_fields[key])
        if machine_fields.get("memory_file"):
            machine_fields["memory_file"] = Path(machine_fields["memory_file"])
        machine_fields["extra_args"] = tuple(machine_fields.get("extra_args", ()))
        machine = MachineSpec(**machine_fields)
        sandbox = cls(host, machine, SandboxSpec(**saved["spec"]))
        if sandbox.network is not None:
            sandbox.network.restore(saved.get("network"))
        try:
            sandbox.state = SandboxState(saved["state"])
        except (KeyError, ValueError) as exc:
            raise SandboxNotFound(f"sandbox {sandbox_id} has no readable state: {exc}") from exc
        sandbox.exit_reason = saved.get("exit_reason", "")
        sandbox.created_at = saved["created_at"]
        sandbox.boot = BootTimes(**saved.get("boot", {}))
        sandbox.pid = saved.get("pid", 0)
        sandbox.slots = {int(k): v for k, v in saved.get("slots", {}).items()}
        sandbox.cgroup = VmCgroup(tuple(Path(p) for p in saved.get("cgroups", [])))
        if sandbox.state == SandboxState.STOPPING and sandbox.pid:
            # the daemon died inside stop(): finish it (the VM would otherwise run on
            # with no pod to account for it)
            process = VmProcess.adopt(sandbox.pid, f"clearcri-{sandbox_id},")
            if process is not None:
                sandbox.process = process
                await sandbox._kill_vm()
            sandbox.state = SandboxState.STOPPED
            sandbox.exit_reason = sandbox.exit_reason or "stopped"
            sandbox._save()
            log.info("sandbox=%s: finished a stop an earlier daemon began", sandbox_id)
            return sandbox
        if not sandbox.state.running or not sandbox.pid:
            return sandbox
        process = VmProcess.adopt(sandbox.pid, f"clearcri-{sandbox_id},")
        if process is None:
            sandbox._set_dead("the VM exited while no daemon was watching it")
            return sandbox
        sandbox.process = process
        process.on_exit(sandbox._vm_exited)
        try:
            sandbox.qmp = QmpControl(f"clearcri-{sandbox_id}")
            await sandbox.qmp.connect(machine.qmp_socket, timeout=5.0)
            sandbox._agent = await AgentClient.connect(machine.agent_socket, timeout=10.0)
        except (QmpError, AgentError, OSError) as exc:
            log.warning("sandbox=%s adopt failed, killing the VM: %s", sandbox_id, exc)
            await sandbox._kill_vm()
            sandbox._set_dead(f"could not reconnect to the VM after a restart: {exc}")
            return sandbox
        if sandbox.state == SandboxState.BOOTING:
            sandbox.state = SandboxState.READY
        sandbox._save()
        log.info("sandbox=%s adopted pid=%d", sandbox_id, sandbox.pid)
        return sandbox

    # lifecycle ------------------------------------------------------------

    @property
    def agent(self) -> AgentClient:
        if self._agent is None or self.state != SandboxState.READY:
            raise SandboxError(f"sandbox {self.id} is not running (state {self.state})")
        return self._agent

    def on_exit(self, callback: Callable[[PodSandbox], None]) -> None:
        """Call ``callback`` when the VM goes away (crash, shutdown or kill)."""
        self._exit_callbacks.append(callback)

    async def start(self) -> BootTimes:
        """Boot the VM and wait until its agent is ready."""
        if self.state != SandboxState.CREATED:
            raise SandboxError(f"sandbox {self.id} cannot start from state {self.state}")
        self.state = SandboxState.BOOTING
        template: VmTemplate | None = None
        templates = self.host.templates
        if templates is not None and not self.machine.extra_args:
            template = templates.get(self.machine)
            if template is None:
                # Build it (or join the build under way) and clone it: about as fast as
                # a cold boot for this pod, and every later pod of this shape is fast.
                # A failed build leaves this pod to boot cold.
                with contextlib.suppress(asyncio.TimeoutError):
                    template = await asyncio.wait_for(
                        asyncio.shield(templates.ensure(self.machine)),
                        self.host.config.boot_timeout_s,
                    )
            if template is not None:
                self.machine = replace(
                    self.machine,
                    memory_file=template.ram_file,
                    memory_shared=False,
                    incoming=True,
                )
        cmd = build_command(self.machine, qemu=self.host.config.qemu)
        tap: TapDevice | None = None
        try:
            if self.machine.vmm_id is not None:
                cmd = jail_for(self.machine).command(cmd)
            if self.network is not None:
                # The namespace and tap now; CNI ADD runs while the guest boots.
                tap = await self.network.prepare()
            if template is not None:
                netdev = f"tap,id={NETDEV_ID},fd={tap.fd},vhost=off" if tap else None
                cmd += nic_args(netdev)
                if self.network is not None:
                    self.network.boot_mac = TEMPLATE_MAC
            elif tap is not None:
                cmd += tap.qemu_args()
            t0 = time.monotonic()
            self.process = await VmProcess.spawn(
                cmd,
                stderr_log=self.machine.stderr_log,
                cwd=self.machine.vmm_dir,
                pass_fds=tap.pass_fds if tap else (),
            )
            if tap is not None:
                tap.close()
                assert self.network is not None
                self.network.start_attach()
            self.pid = self.process.pid
            self.process.on_exit(self._vm_exited)
            if self.spec.cgroup_parent:
                self._grow_small_pod_cgroup()
                self.cgroup = place_in_cgroup(
                    self.pid,
                    parent=self.spec.cgroup_parent,
                    driver=self.spec.cgroup_driver,
                    sandbox_id=self.id,
                )
            self._save()
            self.qmp = QmpControl(f"clearcri-{self.id}")
            await self.qmp.connect(self.machine.qmp_socket, timeout=10.0)
            t_spawned = time.monotonic()
            if template is not None:
                await self.qmp.restore_state(template.state_file)
                t_restored = time.monotonic()
                self._agent = await self._connect_agent()
                # clones must not share the template's random state
                await self._agent.reseed(os.urandom(64))
                t_ready = time.monotonic()
                self.boot = BootTimes(
                    vmm_spawn=t_spawned - t0,
                    restore=t_restored - t_spawned,
                    agent_ready=t_ready - t_restored,
                    total=t_ready - t0,
                )
            else:
                self._agent = await self._connect_agent()
                t_ready = time.monotonic()
                ready = self._agent.ready
                init_start = float(ready.boot_times.get("init_start", 0.0))
                agent_uptime = float(ready.boot_times.get("agent_ready", 0.0))
                self.boot = BootTimes(
                    vmm_spawn=t_spawned - t0,
                    firmware=max(0.0, (t_ready - t_spawned) - agent_uptime),
                    kernel=init_start,
                    agent_ready=max(0.0, agent_uptime - init_start),
                    total=t_ready - t0,
                )
            await self._agent.sync_clock(time.time_ns())
            hostname = self.spec.hostname or self.id[:63]
            resolv_conf, hosts = self.spec.resolv_conf, self.spec.hosts
            if self.network is not None:
                await self.network.configure_guest(self._agent)
                resolv_conf, hosts = self.network.etc_files(hostname, resolv_conf, hosts)
            await self._agent.set_pod_config(
                hostname=hostname, resolv_conf=resolv_conf, hosts=hosts
            )
        except BaseException as exc:
            detail = self._failure_detail(exc)
            if tap is not None:
                tap.close()
            await self._kill_vm()
            if self.network is not None:
                with contextlib.suppress(NetworkError):
                    await self.network.teardown()
            self._set_dead(detail)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SandboxError(f"sandbox {self.id} failed to boot: {detail}") from exc
        self.state = SandboxState.READY
        self._save()
        log.info(
            "sandbox=%s ready pid=%d boot=%.3fs accel=%s",
            self.id,
            self.pid,
            self.boot.total,
            self.machine.accel,
        )
        return self.boot

    async def _connect_agent(
        self, socket: Path | None = None, gone: str = "the VM exited during boot"
    ) -> AgentClient:
        """Connect to the agent at ``socket`` (default: the VM's), failing at once with
        ``gone`` if the process serving it exits first."""
        assert self.process is not None
        connect = asyncio.ensure_future(
            AgentClient.connect(
                socket or self.machine.agent_socket, timeout=self.host.config.boot_timeout_s
            )
        )
        exited = asyncio.ensure_future(self.process.wait())
        done, _ = await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        if connect in done:
            exited.cancel()
            return connect.result()
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        raise SandboxError(gone)

    def _failure_detail(self, exc: BaseException) -> str:
        parts = [str(exc) or type(exc).__name__]
        tail = self.console_tail()
        if tail:
            parts.append(f"console: {tail}")
        with contextlib.suppress(OSError):
            err = self.machine.stderr_log.read_text(errors="replace").strip()[-400:]
            if err:
                parts.append(f"qemu: {err}")
        return "; ".join(parts)

    def console_tail(self, limit: int = 400) -> str:
        try:
            data = self.machine.console_log.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the VM: the agent stops the containers; then QMP quit; then SIGKILL.
        Idempotent."""
        if self.state.at_rest:
            if self.state == SandboxState.CREATED:
                self.state = SandboxState.STOPPED
                self._save()
            await self._release_network()
            return
        grace = self.host.config.stop_timeout_s if timeout is None else timeout
        self.state = SandboxState.STOPPING
        self._save()
        if self._agent is not None:
            # the agent answers once every container has stopped (SIGTERM, grace, SIGKILL)
            with contextlib.suppress(AgentError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._agent.shutdown(grace=grace), timeout=max(grace, 0.1) + 5
                )
        # Nothing in the guest needs flushing (read-only root, container layers on tmpfs):
        # quit QEMU instead of waiting for the guest kernel's power-off, which takes
        # seconds under TCG.
        await self._kill_vm()
        if self.state != SandboxState.DEAD:
            self.state = SandboxState.STOPPED
            self.exit_reason = self.exit_reason or "stopped"
        self._save()
        await self._release_network()

    async def _release_network(self) -> None:
        """CNI DEL and netns removal; on failure the pod keeps its network state and
        stop/destroy can be called again."""
        if self.network is None:
            return
        try:
            await self.network.teardown()
        except NetworkError as exc:
            raise SandboxError(f"sandbox {self.id}: {exc}") from exc

    @property
    def network_result(self) -> NetworkResult | None:
        """The pod's IPs, routes, MAC, DNS (None without a network)."""
        return self.network.result if self.network is not None else None

    async def destroy(self) -> None:
        """Stop the VM and remove everything the sandbox made on the host. Idempotent."""
        if self.state == SandboxState.REMOVED:
            return
        await self.stop(timeout=0)
        await self._close_channels()
        self.cgroup.remove()
        try:
            # the share's binds are detached first: host files below them must survive
            await asyncio.to_thread(mounts.remove_tree, self.machine.run_dir)
        except OSError as exc:
            raise SandboxError(
                f"sandbox {self.id}: cannot remove its run directory: {exc}"
            ) from exc
        if self.host.vmm_ids is not None:
            self.host.vmm_ids.release(self.machine.vmm_id)
        self.state = SandboxState.REMOVED

    async def close(self) -> None:
        """Drop host connections but leave the VM running (daemon shutdown)."""
        await self._close_channels()

    async def _close_channels(self) -> None:
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()
        if self.qmp is not None:
            await self.qmp.close()

    async def _kill_vm(self) -> None:
        process = self.process
        if process is None or not process.alive:
            return
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.quit(), timeout=2.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await process.wait(timeout=3.0)
        if process.alive:
            process.kill(signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await process.wait(timeout=10.0)

    def _vm_exited(self, process: VmProcess) -> None:
        if self.state in (SandboxState.STOPPING, SandboxState.STOPPED, SandboxState.REMOVED):
            return
        reason = "the VM exited"
        if self.qmp is not None and self.qmp.panicked:
            reason = "the guest kernel panicked"
        elif self.qmp is not None and self.qmp.shutdown_reason:
            reason = f"the VM shut down ({self.qmp.shutdown_reason})"
        elif process.returncode is not None:
            code = process.returncode
            reason = f"qemu exited with {'signal ' + str(-code) if code < 0 else code}"
        self._set_dead(reason)

    def _set_dead(self, reason: str) -> None:
        was = self.state
        self.state = SandboxState.DEAD
        self.exit_reason = reason
        with contextlib.suppress(OSError):
            self._save()
        if was != SandboxState.DEAD:
            log.warning("sandbox=%s dead: %s", self.id, reason)
            for callback in self._exit_callbacks:
                callback(self)

    def _grow_small_pod_cgroup(self) -> None:
        """A small pod's cgroup gets room for its VM before QEMU joins it (or the host
        would OOM-kill the VM as a whole): the guest still holds each container to its
        own limit, the pod as a whole may use what the smallest VM costs."""
        floor = memory_floor_bytes(self.spec, self.host.config, self.machine.memory_mib)
        if floor == 0:
            return
        try:
            raised = raise_memory_limit(self.spec.cgroup_parent, self.spec.cgroup_driver, floor)
        except CgroupError as exc:
            raise SandboxError(f"cannot make room for the pod's VM: {exc}") from exc
        if raised:
            log.warning(
                "pod=%s: a memory budget of %d MiB cannot hold the smallest VM; its cgroup "
                "limit was raised to %d MiB (a RuntimeClass overhead would account for it)",
                self.id[:12],
                self.spec.memory_budget_bytes // 2**20,
                floor // 2**20,
            )

    def _save(self) -> None:
        machine = asdict(self.machine)
        for key in ("kernel", "initrd", "os_image", "run_dir"):
            machine[key] = str(machine[key])
        if machine.get("memory_file") is not None:
            machine["memory_file"] = str(machine["memory_file"])
        machine["extra_args"] = list(machine["extra_args"])
        data: dict[str, Any] = {
            "spec": asdict(self.spec),
            "machine": machine,
            "state": self.state,
            "exit_reason": self.exit_reason,
            "created_at": self.created_at,
            "boot": asdict(self.boot),
            "pid": self.pid,
            "slots": {str(k): v for k, v in self.slots.items()},
            "cgroups": [str(p) for p in self.cgroup.paths],
            "network": self.network.to_state() if self.network is not None else None,
        }
        path = self.machine.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)

    # container images ------------------------------------------------------

    async def attach_image(self, image: RootfsImage) -> str:
        """Make ``image`` available in the guest; return its mount point there.

        The image is hot-plugged into a free PCIe root port as a shared read-only
        virtio-pmem device the first time a container of this pod needs it.
        QEMU 7.2 cannot unplug such devices, so a slot stays with its image for the
        VM's life and is reused by every later container of the same image.
        """
        agent = self.agent
        async with self._lock:
            for slot, image_id in self.slots.items():
                if image_id == image.image_id:
                    _, pci = slot_root_port(slot)
                    return await agent.mount_image(image.image_id, ImageSource(pci_path=pci))
            free = [s for s in range(self.machine.image_slots) if s not in self.slots]
            if not free:
                raise SandboxExhausted(
                    f"sandbox {self.id} has used all {self.machine.image_slots} image slots; "
                    "raise vm.image_slots in the config to run more distinct images per pod"
                )
            slot = free[0]
            bus, pci = slot_root_port(slot)
            assert self.qmp is not None
            path = image.path
            if self.machine.vmm_id is not None:
                # the jailed VMM sees only what is below its own directory
                path = self.machine.images_dir / f"img{slot}"
                await asyncio.to_thread(self._bind_image, image.path, path)
            await self.qmp.hotplug_pmem(dev_id=f"img{slot}", bus=bus, path=path, size=image.size)
            self.slots[slot] = image.image_id
            self._save()
            return await agent.mount_image(image.image_id, ImageSource(pci_path=pci))

    @staticmethod
    def _bind_image(source: Path, target: Path) -> None:
        if target.exists():  # an earlier attempt at this slot
            mounts.unmount_under(target)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400))
        try:
            mounts.attach_clone(source, target, readonly=True)
        except OSError as exc:
            raise SandboxError(f"cannot give the VM image {source.name}: {exc}") from exc

    # host paths ---------------------------------------------------------------

    async def share_host_path(
        self,
        key: str,
        source: Path,
        *,
        readonly: bool,
        propagation: str,
        id_mappings: IdMappings | None = None,
    ) -> str:
        """Make the host's ``source`` visible live in the guest (sandbox/share.py);
        returns its guest path for a container's bind mount. ``id_mappings``: the pod's
        user namespace mappings (uids, gids), for an idmapped entry."""
        if self.share is None:
            raise SandboxError(
                "this node's guest kernel cannot share host paths with pod VMs (no 9p): "
                "build the guest with the clearcri kernel (`clearcri guest build`)"
            )
        try:
            return await asyncio.to_thread(
                self.share.bind,
                key,
                source,
                readonly=readonly,
                propagation=propagation,
                id_mappings=id_mappings,
            )
        except ShareError as exc:
            raise SandboxError(str(exc)) from exc

    async def host_path_mount(self, request: HostPathMount) -> Mount:
        """The container's mount of a host path: a bind of its share entry (see
        share_host_path). Bidirectional is refused: a mount made in the guest never
        reaches the host. A watched volume is served from a guest copy the agent keeps
        in step (agent/guest/watched.py)."""
        if request.propagation == "rshared":
            raise SandboxRefused(
                "Bidirectional propagation cannot work in a pod VM (mounts made in the guest "
                "never reach the host); use HostToContainer, or the host runtime handler for "
                "a privileged pod"
            )
        await self._check_propagation(request.host_path, request.propagation)
        source = await self.share_host_path(
            request.key,
            request.host_path,
            readonly=request.readonly,
            propagation=request.propagation,
            id_mappings=request.id_mappings,
        )
        # in the guest the share is one 9p mount without submounts: host mounts below a
        # HostToContainer path appear through it, nothing propagates inside the guest
        return Mount(
            destination=request.destination,
            source=source,
            options=request.options,
            watch=request.watch,
        )

    @staticmethod
    async def _check_propagation(host_path: Path, propagation: str) -> None:
        if propagation != "rprivate":
            problem = await asyncio.to_thread(mounts.propagation_problem, host_path, propagation)
            if problem:
                raise SandboxError(problem)

    async def unshare_host_paths(self, keys: list[str]) -> None:
        """Drop share entries (a removed container's mounts); unknown keys are fine."""
        if self.share is not None and keys:
            try:
                await asyncio.to_thread(self.share.unbind, keys)
            except (ShareError, OSError) as exc:
                raise SandboxError(f"sandbox {self.id}: {exc}") from exc

    # containers -------------------------------------------------------------

    async def create_container(
        self, container_id: str, spec: ContainerSpec, image: RootfsImage | None = None
    ) -> ContainerInfo:
        """Create a container; with ``image``, its rootfs is that shared image plus a
        private writable layer in the guest."""
        if image is not None:
            await self.attach_image(image)
            spec.image_id = image.image_id
        return await self.agent.create_container(container_id, spec)

    async def start_container(self, container_id: str) -> ContainerInfo:
        return await self.agent.start_container(container_id)

    async def exec(self, container_id: str, spec: ExecSpec) -> ExecSession:
        return await self.agent.exec(container_id, spec)

    async def signal_container(
        self,
        container_id: str,
        signal: int,
        *,
        all_processes: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Send ``signal`` to the container's first process (every process of it with
        ``all_processes``); nothing once it has exited."""
        await self.agent.signal_container(
            container_id, signal, all_processes=all_processes, timeout=timeout
        )

    async def wait_container(
        self, container_id: str, *, timeout: float | None = None
    ) -> ExitStatus:
        """The container's exit, once it has exited (AgentTimeout after ``timeout``)."""
        return await self.agent.wait_container(container_id, timeout=timeout)

    async def delete_container(self, container_id: str, *, force: bool = False) -> None:
        """Remove the container (a running one only with ``force``, which kills it)."""
        await self.agent.delete_container(container_id, force=force)

    async def update_container(self, container_id: str, update: CgroupUpdate) -> None:
        """Write the container's cgroup limits (cgroup v2 file values)."""
        await self.agent.update_container(container_id, update)

    async def list_containers(self) -> list[ContainerInfo]:
        """Every container the sandbox holds, as its agent sees them."""
        return await self.agent.list_containers()

    async def port_forward(self, port: int) -> PortForwardStream:
        """A byte stream to ``port`` on the pod's loopback, as the pod's processes see it."""
        return await self.agent.port_forward(port)

    def subscribe_output(self, container_id: str) -> ContainerOutput:
        """The container's output stream (see AgentClient.subscribe_output)."""
        return self.agent.subscribe_output(container_id)

    async def exec_sync(
        self, container_id: str, args: list[str], *, timeout: float | None, max_output: int
    ) -> ExecResult:
        """Run ``args`` in the container to completion (killed after ``timeout``), its
        output collected: at most ``max_output`` bytes of each stream."""
        return await self.agent.exec_sync(
            container_id, args, timeout=timeout, max_output=max_output
        )

    async def stats(
        self, container_id: str | None = None, timeout: float = 5.0, *, detail: bool = False
    ) -> StatsReport:
        """The guest's figures (with ``detail``: every figure of each container and the
        pod's network counters); a guest that does not answer within ``timeout`` (frozen,
        overloaded) raises AgentTimeout rather than holding up kubelet's stats calls."""
        return await self.agent.container_stats(container_id, detail=detail, timeout=timeout)

    def status_info(self) -> dict[str, object]:
        """What PodSandboxStatus (verbose) tells of this sandbox."""
        return {
            "state": self.state,
            "accelerator": self.host.accel,
            "vcpus": self.machine.vcpus,
            "memoryMiB": self.machine.memory_mib,
            # started as a copy-on-write clone of a template VM
            "fromTemplate": bool(self.boot.restore),
            # host paths are shared live (virtio-9p)
            "share": self.share is not None,
            # QEMU runs jailed as this uid (None: as root)
            "vmmId": self.machine.vmm_id,
        }

    def pod_usage(self) -> PodUsage | None:
        """What the VM costs the node: QEMU's CPU time; its PSS as the working set (the
        pages it shares with other VMs counted in part), RSS as usage, anonymous RSS.
        None when it does not run."""
        memory = self.host_memory()
        cpu_ns = process_cpu_ns(self.pid) if memory is not None else None
        if memory is None or cpu_ns is None:
            return None
        return PodUsage(
            cpu_ns=cpu_ns,
            usage_bytes=memory.rss,
            working_set_bytes=memory.pss,
            rss_bytes=memory.rss_anon,
        )

    def host_memory(self) -> ProcessMemory | None:
        """The VM's own cost on the host: QEMU's PSS and RSS split (None when it does
        not run)."""
        if not self.pid or self.process is None or not self.process.alive:
            return None
        return read_process_memory(self.pid)
