"""One pod = one VM: the backend of the ``clearcri`` runtime handler.

A pod VM's host side lives in its run directory (``<run_root>/<sandbox id>``):
``state.json`` (sandbox/lifecycle.py), QEMU's stderr log and, in ``vmm/`` (all a jailed
QEMU sees of it, see sandbox/jail.py), the QMP and agent sockets, the console log,
QEMU's pid file, the pod's share and its images. A new daemon process re-adopts a
running VM from that directory instead of killing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from agent.client import AgentClient
from agent.protocol import HotplugResult, ImageSource, Mount
from sandbox import mounts
from sandbox.api import (
    VM_HANDLER,
    BootTimes,
    HostPathMount,
    PodUsage,
    RootfsImage,
    SandboxError,
    SandboxExhausted,
    SandboxRefused,
    SandboxSpec,
    SharedFiles,
)
from sandbox.cgroups import CgroupError, VmCgroup, raise_memory_limit
from sandbox.cgroups import place as place_in_cgroup
from sandbox.hotplug import PlugPlan, expected_mem_total_kib, plug_bytes
from sandbox.jail import JailError, jail_for, prepare_vmm_dir
from sandbox.jit import JitFlusher
from sandbox.lifecycle import PodSandbox, check_new
from sandbox.network import (
    NETDEV_ID,
    PodNetwork,
    TapDevice,
    create_netns,
    open_tap,
    remove_netns,
)
from sandbox.node import SandboxHost, host_memory_mib, memory_floor_bytes
from sandbox.procfs import ProcessMemory, process_cpu_ns, read_process_memory
from sandbox.qmp import QmpControl, QmpError
from sandbox.share import IdMappings, PodShare, ShareError
from sandbox.template import TEMPLATE_MAC, VmTemplate, nic_args
from sandbox.vm import (
    MachineSpec,
    VmProcess,
    build_command,
    os_image_backing_size,
    slot_root_port,
    warm_up_root_port,
)

log = logging.getLogger(__name__)

#: QEMU's id of the OS image a standby VM plugs for its warm-up (plug_warm_up_image).
WARM_UP_DEVICE = "warm-up-img"


def machine_to_state(machine: MachineSpec) -> dict[str, Any]:
    data = asdict(machine)
    for key in ("kernel", "initrd", "os_image", "run_dir"):
        data[key] = str(data[key])
    if data.get("memory_file") is not None:
        data["memory_file"] = str(data["memory_file"])
    data["extra_args"] = list(data["extra_args"])
    return data


def machine_from_state(saved: dict[str, Any]) -> MachineSpec:
    data = dict(saved)
    for key in ("kernel", "initrd", "os_image", "run_dir"):
        data[key] = Path(data[key])
    if data.get("memory_file"):
        data["memory_file"] = Path(data["memory_file"])
    data["extra_args"] = tuple(data.get("extra_args", ()))
    return MachineSpec(**data)


class VmBackend:
    """What runs a pod in a VM: QEMU (jailed), QMP, the template it is cloned from,
    its image slots, its share of host paths and its cgroup."""

    handler = VM_HANDLER
    noun = "sandbox"
    #: the containers' writable layers live in the guest
    writable_layer_dir: Path | None = None
    gone_while_away = "the VM exited while no daemon was watching it"

    def __init__(self, host: SandboxHost, machine: MachineSpec, spec: SandboxSpec) -> None:
        self.host = host
        self.machine = machine
        self.spec = spec
        self.run_dir = machine.run_dir
        self.slots: dict[int, str] = {}
        self.cgroup = VmCgroup(())
        self.qmp: QmpControl | None = None
        self.network: PodNetwork | None = None
        # the host paths the pod's containers mount (None: the guest kernel has no 9p)
        self.share = PodShare(machine.share_dir, machine.vmm_id) if machine.share else None
        # a network namespace the VM's tap lives in that no PodNetwork owns (a standby
        # VM's, sandbox/standby.py); removed with the VM
        self.own_netns: Path | None = None
        # a standby VM taken over at creation (its agent): launch starts no VM
        self.taken_agent: AgentClient | None = None
        # a standby VM itself (no pod yet): its warm-up's translated code is what makes
        # its pod's first container fast, it is not flushed
        self.standby = False
        # flushes the VM's translated code when the pod idles (TCG, sandbox/jit.py)
        self.jit: JitFlusher | None = None

    # the state file ------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "kind": VM_HANDLER,
            "spec": asdict(self.spec),
            "machine": machine_to_state(self.machine),
            "slots": {str(k): v for k, v in self.slots.items()},
            "cgroups": [str(p) for p in self.cgroup.paths],
            "own_netns": str(self.own_netns) if self.own_netns else "",
        }

    @classmethod
    def from_state(cls, host: SandboxHost, saved: dict[str, Any]) -> VmBackend:
        backend = cls(host, machine_from_state(saved["machine"]), SandboxSpec(**saved["spec"]))
        backend.slots = {int(k): v for k, v in saved.get("slots", {}).items()}
        backend.cgroup = VmCgroup(tuple(Path(p) for p in saved.get("cgroups", [])))
        backend.own_netns = Path(saved["own_netns"]) if saved.get("own_netns") else None
        return backend

    @property
    def process_marker(self) -> str:
        # the VM's own name: the pod's id, or the standby's the pod took over
        return f"clearcri-{self.machine.name},"

    @property
    def agent_socket(self) -> Path:
        return self.machine.agent_socket

    # launch -------------------------------------------------------------------------

    async def _template(self) -> VmTemplate | None:
        """The template a pod of this shape is cloned from: built (or the build under
        way joined) if there is none yet — about as fast as a cold boot for this pod, and
        every later pod of its shape is fast. A failed build leaves the pod to boot cold."""
        templates = self.host.templates
        if templates is None or self.machine.extra_args:
            return None
        if self.host.rooms is not None and not self.machine.sized_at_clone:
            # above every base's room (vm.max_clone_memory_mib): a template of its own
            # would hold its whole memory on tmpfs
            return None
        template = templates.get(self.machine)
        if template is None:
            with contextlib.suppress(asyncio.TimeoutError):
                template = await asyncio.wait_for(
                    asyncio.shield(templates.ensure(self.machine)),
                    self.host.config.boot_timeout_s,
                )
        return template

    async def launch(self, sandbox: PodSandbox) -> BootTimes:
        """Boot the VM (a template clone where one is there) and wait until its agent is
        ready, or take over the standby VM given at creation; then the pod's clock,
        network and /etc files."""
        self.host.starting += 1
        try:
            if self.taken_agent is not None:
                boot = await self._take_over(sandbox, self.taken_agent)
            else:
                boot = await self._boot(sandbox)
        finally:
            self.host.starting -= 1
        self._follow_idle_code(sandbox)
        return boot

    def _follow_idle_code(self, sandbox: PodSandbox) -> None:
        """Have the pod VM's translated code flushed whenever it idles (TCG only)."""
        idle_s = self.host.config.jit_flush_idle_s
        if self.standby or self.machine.accel == "kvm" or idle_s <= 0 or self.jit is not None:
            return
        if self.qmp is None or not sandbox.pid:
            return
        self.jit = JitFlusher(
            self.spec.sandbox_id,
            sandbox.pid,
            self.qmp.flush_translated_code,
            idle_s=idle_s,
            on_flush=self.host.jit_flushed,
        )
        self.jit.start()

    async def _stop_following(self) -> None:
        jit, self.jit = self.jit, None
        if jit is not None:
            await jit.stop()

    async def _boot(self, sandbox: PodSandbox) -> BootTimes:
        template = await self._template()
        if template is not None:
            self.machine = replace(
                self.machine, memory_file=template.ram_file, memory_shared=False, incoming=True
            )
        elif self.machine.sized_at_clone:
            # nothing to clone: boot with the whole size, as without templates
            self.machine = self.machine.booted_whole()
        cmd = build_command(self.machine, qemu=self.host.qemu)
        if self.machine.vmm_id is not None:
            cmd = jail_for(self.machine).command(cmd)
        tap: TapDevice | None = None
        try:
            if self.network is not None:
                # The namespace and tap now; CNI ADD runs while the guest boots.
                tap = await self.network.prepare()
            elif self.own_netns is not None:
                # a standby VM's NIC: a tap in a namespace of its own, for its pod's CNI
                await asyncio.to_thread(create_netns, self.own_netns)
                tap = await asyncio.to_thread(open_tap, self.own_netns)
            if template is not None:
                netdev = f"tap,id={NETDEV_ID},fd={tap.fd},vhost=off" if tap else None
                cmd += nic_args(netdev)
                if self.network is not None:
                    self.network.boot_mac = TEMPLATE_MAC
            elif tap is not None:
                cmd += tap.qemu_args()
            t0 = time.monotonic()
            process = await VmProcess.spawn(
                cmd,
                stderr_log=self.machine.stderr_log,
                cwd=self.machine.vmm_dir,
                pass_fds=tap.pass_fds if tap else (),
            )
        finally:
            if tap is not None:
                tap.close()
        if self.network is not None:
            self.network.start_attach()
        sandbox.started(process)
        self._join_pod_cgroup(process.pid)
        sandbox.save()
        self.qmp = QmpControl(f"clearcri-{self.spec.sandbox_id}")
        await self.qmp.connect(self.machine.qmp_socket, timeout=10.0)
        t_spawned = time.monotonic()
        sizing: asyncio.Future[HotplugResult] | None = None
        if template is not None:
            # the clone gets what its pod needs beyond the template before it runs
            await self.qmp.restore_state(template.state_file, run=False)
            plug = self._plug_plan(template)
            if plug is not None:
                await self.qmp.plug(vcpus=plug.vcpus, memory_bytes=plug.memory_bytes)
            await self.qmp.execute("cont")
            t_restored = time.monotonic()
            agent = await sandbox.connect_agent("the VM exited during boot")
            # clones must not share the template's random state
            await agent.reseed(os.urandom(64))
            t_ready = time.monotonic()
            if plug is not None:
                sizing = self._onlined(agent, plug, template)
            boot = BootTimes(
                vmm_spawn=t_spawned - t0,
                restore=t_restored - t_spawned,
                agent_ready=t_ready - t_restored,
                total=t_ready - t0,
            )
        else:
            agent = await sandbox.connect_agent("the VM exited during boot")
            t_ready = time.monotonic()
            init_start = float(agent.ready.boot_times.get("init_start", 0.0))
            agent_uptime = float(agent.ready.boot_times.get("agent_ready", 0.0))
            boot = BootTimes(
                vmm_spawn=t_spawned - t0,
                firmware=max(0.0, (t_ready - t_spawned) - agent_uptime),
                kernel=init_start,
                agent_ready=max(0.0, agent_uptime - init_start),
                total=t_ready - t0,
            )
        return await self._configure(agent, boot, t0, sizing)

    async def _configure(
        self,
        agent: AgentClient,
        boot: BootTimes,
        t0: float,
        sizing: asyncio.Future[HotplugResult] | None = None,
    ) -> BootTimes:
        """The pod's clock, network and /etc files in a VM whose agent answers; with
        ``sizing``, wait for the guest to have what was hot-plugged."""
        # the clock goes out beside the network and /etc files: one round trip less to
        # wait for
        clock = asyncio.ensure_future(agent.sync_clock(time.time_ns()))
        try:
            hostname = self.spec.hostname or self.spec.sandbox_id[:63]
            resolv_conf, hosts = self.spec.resolv_conf, self.spec.hosts
            if self.network is not None:
                await self.network.configure_guest(agent)
                resolv_conf, hosts = self.network.etc_files(hostname, resolv_conf, hosts)
            await agent.set_pod_config(hostname=hostname, resolv_conf=resolv_conf, hosts=hosts)
            await clock
            if sizing is not None:
                sized = await sizing
                t_sized = time.monotonic()
                boot = replace(
                    boot,
                    hotplug=t_sized - t0 - boot.vmm_spawn - boot.restore,
                    total=max(boot.total, t_sized - t0),
                )
                log.info(
                    "sandbox=%s sized at clone: %d vCPUs, MemTotal %d KiB (guest: %.3fs "
                    "waiting, %.3fs raising %s)",
                    self.spec.sandbox_id,
                    sized.vcpus,
                    sized.mem_total_kib,
                    sized.seconds,
                    sized.limits_seconds,
                    ", ".join(sized.raised) or "nothing",
                )
        finally:
            await _cancelled(clock)
            await _cancelled(sizing)
        log.info("sandbox=%s booted accel=%s", self.spec.sandbox_id, self.machine.accel)
        return boot

    async def _take_over(self, sandbox: PodSandbox, agent: AgentClient) -> BootTimes:
        """Launch a pod that took over a standby VM (sandbox/standby.py) at creation:
        the VM joins the pod's cgroup with the memory it holds, its namespace becomes
        the pod's network namespace, a pod bigger than the standby has the difference
        hot-plugged into the running VM (as a clone of the same base would before it
        runs), and the pod's setup goes on as after a boot."""
        t0 = time.monotonic()
        process = sandbox.process
        if process is None or not process.alive:
            raise SandboxError("the standby VM exited before its pod started")
        sandbox.adopt_agent(agent)
        self._join_pod_cgroup(process.pid, move_charges=True)
        sandbox.save()
        sizing = await self._grow_standby(agent)
        if self.network is not None and self.network.manager.config.enabled:
            if self.own_netns is None:
                raise SandboxError("the standby VM has no network namespace for the pod")
            await self.network.adopt(self.own_netns)
            self.network.boot_mac = TEMPLATE_MAC
            self.network.start_attach()
        taken = time.monotonic() - t0
        return await self._configure(agent, BootTimes(standby=taken, total=taken), t0, sizing)

    async def _grow_standby(self, agent: AgentClient) -> asyncio.Future[HotplugResult] | None:
        """Plug what the pod needs beyond the standby VM it took (a VM of the pod's base
        at the base's size, sandbox/standby.py), and have the guest online it while the
        pod's setup goes on (None: the pod is the base's size)."""
        machine = self.machine
        if not machine.sized_at_clone or (machine.vcpus, machine.memory_mib) == (
            machine.boot_vcpus,
            machine.boot_memory_mib,
        ):
            return None
        templates = self.host.templates
        template = templates.get(machine) if templates is not None else None
        if template is None or self.qmp is None:
            # the MemTotal to wait for comes from the template
            raise SandboxError("the standby VM cannot be grown: its template is gone")
        plug = self._plug_plan(template)
        assert plug is not None
        try:
            await self.qmp.plug(vcpus=plug.vcpus, memory_bytes=plug.memory_bytes)
        except QmpError as exc:
            raise SandboxError(f"cannot grow the standby VM to the pod's size: {exc}") from exc
        return self._onlined(agent, plug, template)

    def _onlined(
        self, agent: AgentClient, plug: PlugPlan, template: VmTemplate
    ) -> asyncio.Future[HotplugResult]:
        """The guest onlining what was plugged (``plug``) while the pod's setup goes on:
        done once it has the pod's vCPUs and the MemTotal ``template`` gives its size."""
        return asyncio.ensure_future(
            agent.hotplug(
                vcpus=self.machine.vcpus,
                mem_total_kib=plug.mem_total_kib,
                template_mem_total_kib=template.mem_total_kib,
                timeout=self.host.config.boot_timeout_s,
            )
        )

    def _join_pod_cgroup(self, pid: int, *, move_charges: bool = False) -> None:
        if self.spec.cgroup_parent:
            self._grow_small_pod_cgroup()
            self.cgroup = place_in_cgroup(
                pid,
                parent=self.spec.cgroup_parent,
                driver=self.spec.cgroup_driver,
                sandbox_id=self.spec.sandbox_id,
                move_charges=move_charges,
            )

    def _plug_plan(self, template: VmTemplate) -> PlugPlan | None:
        """What a clone of ``template`` plugs to reach its pod's size (None: nothing)."""
        machine = self.machine
        if not machine.sized_at_clone:
            return None
        vcpus = machine.vcpus - machine.boot_vcpus
        memory = plug_bytes(machine.memory_mib, machine.boot_memory_mib)
        if vcpus == 0 and memory == 0:
            return None
        return PlugPlan(vcpus, memory, expected_mem_total_kib(template.mem_total_kib, memory))

    async def abort_launch(self, sandbox: PodSandbox) -> None:
        await self._kill_vm(sandbox.process)

    def _grow_small_pod_cgroup(self) -> None:
        """A small pod's cgroup gets room for its VM before QEMU joins it (or the host
        would OOM-kill the VM as a whole): the guest still holds each container to its
        own limit, the pod as a whole may use what the smallest VM costs."""
        floor = memory_floor_bytes(self.spec, self.machine.memory_mib, self.host.qemu_mib)
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
                self.spec.sandbox_id[:12],
                self.spec.memory_budget_bytes // 2**20,
                floor // 2**20,
            )

    def failure_detail(self, exc: BaseException) -> str:
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

    # re-adoption, stop, removal -------------------------------------------------------

    async def reattach(self, sandbox: PodSandbox) -> None:
        self.qmp = QmpControl(f"clearcri-{self.spec.sandbox_id}")
        await self.qmp.connect(self.machine.qmp_socket, timeout=5.0)
        self._follow_idle_code(sandbox)

    async def halt(self, sandbox: PodSandbox, grace: float) -> None:
        # Nothing in the guest needs flushing (read-only root, container layers on
        # tmpfs): quit QEMU instead of waiting for the guest kernel's power-off, which
        # takes seconds under TCG.
        await self._stop_following()
        await self._kill_vm(sandbox.process)

    async def _kill_vm(self, process: VmProcess | None) -> None:
        if process is None or not process.alive:
            return
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.quit(), timeout=2.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await process.wait(timeout=3.0)
        await process.kill_and_wait()

    async def release(self, sandbox: PodSandbox) -> None:
        self.cgroup.remove()
        if self.own_netns is not None:
            try:
                await asyncio.to_thread(remove_netns, self.own_netns)
            except OSError as exc:
                raise SandboxError(
                    f"sandbox {self.spec.sandbox_id}: cannot remove its namespace: {exc}"
                ) from exc
        try:
            # the share's binds are detached first: host files below them must survive; a
            # pod on a standby VM has its run directory in the standby's place and a link
            # to it in the run root
            link = self.host.config.run_root / self.spec.sandbox_id
            await asyncio.to_thread(mounts.remove_tree_and_link, self.run_dir, link)
        except OSError as exc:
            raise SandboxError(
                f"sandbox {self.spec.sandbox_id}: cannot remove its run directory: {exc}"
            ) from exc
        if self.host.vmm_ids is not None:
            self.host.vmm_ids.release(self.machine.vmm_id)

    async def close(self) -> None:
        await self._stop_following()
        if self.qmp is not None:
            await self.qmp.close()

    def exit_reason(self, process: VmProcess) -> str:
        if self.qmp is not None and self.qmp.panicked:
            return "the guest kernel panicked"
        if self.qmp is not None and self.qmp.shutdown_reason:
            return f"the VM shut down ({self.qmp.shutdown_reason})"
        code = process.returncode
        if code is not None:
            return f"qemu exited with {'signal ' + str(-code) if code < 0 else code}"
        return "the VM exited"

    # container images ------------------------------------------------------------------

    async def attach_image(self, sandbox: PodSandbox, image: RootfsImage) -> str:
        """Make ``image`` available in the guest; return its mount point there.

        The image is hot-plugged into a free PCIe root port as a shared read-only
        virtio-pmem device the first time a container of this pod needs it.
        QEMU 7.2 cannot unplug such devices, so a slot stays with its image for the
        VM's life and is reused by every later container of the same image.
        """
        agent = sandbox.agent
        for slot, image_id in self.slots.items():
            if image_id == image.image_id:
                _, pci = slot_root_port(slot)
                return await agent.mount_image(image.image_id, ImageSource(pci_path=pci))
        free = [s for s in range(self.machine.image_slots) if s not in self.slots]
        if not free:
            raise SandboxExhausted(
                f"sandbox {self.spec.sandbox_id} has used all {self.machine.image_slots} "
                "image slots; raise vm.image_slots in the config to run more distinct "
                "images per pod"
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
        sandbox.save()
        return await agent.mount_image(image.image_id, ImageSource(pci_path=pci))

    async def plug_warm_up_image(self) -> str:
        """Hot-plug the guest OS image a second time, read-only, into the root port after
        the image slots (warm_up_root_port); returns its guest PCI address. A standby
        VM's warm-up runs its throwaway container on it, so that the guest's hot-plug,
        probe and mount of an image are translated before a pod's first image comes.
        The device stays (QEMU 7.2 cannot unplug virtio-pmem): the pod sees again what
        it has as its root, and keeps all of its image slots."""
        bus, pci = warm_up_root_port(self.machine)
        assert self.qmp is not None
        size = await asyncio.to_thread(os_image_backing_size, self.machine)
        # a jailed VMM sees the image at this path (sandbox/jail.py)
        await self.qmp.hotplug_pmem(
            dev_id=WARM_UP_DEVICE, bus=bus, path=self.machine.os_image, size=size
        )
        return pci

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

    # host paths -----------------------------------------------------------------------

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

    async def host_path_mount(self, sandbox: PodSandbox, request: HostPathMount) -> Mount:
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
        await check_propagation(request.host_path, request.propagation)
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

    async def unshare_host_paths(self, keys: list[str]) -> None:
        if self.share is not None and keys:
            try:
                await asyncio.to_thread(self.share.unbind, keys)
            except (ShareError, OSError) as exc:
                raise SandboxError(f"sandbox {self.spec.sandbox_id}: {exc}") from exc

    # figures ----------------------------------------------------------------------------

    def status_info(self) -> dict[str, object]:
        return {
            "accelerator": self.host.accel,
            "vcpus": self.machine.vcpus,
            "memoryMiB": self.machine.memory_mib,
            # started as a copy-on-write clone of a template VM
            "fromTemplate": self.machine.incoming,
            # the VM was a standby, started before the pod asked for it
            "fromStandby": self.machine.name != self.spec.sandbox_id,
            # host paths are shared live (virtio-9p)
            "share": self.share is not None,
            # QEMU runs jailed as this uid (None: as root)
            "vmmId": self.machine.vmm_id,
            # seconds of each step of the pod network's setup: prepare (netns, tap),
            # cni_add and join (while the VM boots), guest (the agent configuring the NIC)
            "networkSeconds": dict(self.network.timings) if self.network is not None else {},
        }

    def pod_usage(self, sandbox: PodSandbox) -> PodUsage | None:
        """What the VM costs the node: QEMU's CPU time; its PSS as the working set (the
        pages it shares with other VMs counted in part), RSS as usage, anonymous RSS.
        None when it does not run."""
        memory = host_memory(sandbox)
        cpu_ns = process_cpu_ns(sandbox.pid) if memory is not None else None
        if memory is None or cpu_ns is None:
            return None
        return PodUsage(
            cpu_ns=cpu_ns,
            usage_bytes=memory.rss,
            working_set_bytes=memory.pss,
            rss_bytes=memory.rss_anon,
        )

    def shared_files(self) -> SharedFiles:
        return SharedFiles(
            os_image=self.machine.os_image, image_ids=tuple(sorted(set(self.slots.values())))
        )


async def _cancelled(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` if it is still pending and wait for it to end (an error it ended
    with is taken: what failed first is what the caller reports)."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


def host_memory(sandbox: PodSandbox) -> ProcessMemory | None:
    """A pod VM's own cost on the host: QEMU's PSS and RSS split (None when it does not
    run)."""
    if not sandbox.pid or sandbox.process is None or not sandbox.process.alive:
        return None
    return read_process_memory(sandbox.pid)


async def check_propagation(host_path: Path, propagation: str) -> None:
    """Refuse a HostToContainer or Bidirectional mount of a host path that does not
    propagate (SandboxError saying what to do)."""
    if propagation != "rprivate":
        problem = await asyncio.to_thread(mounts.propagation_problem, host_path, propagation)
        if problem:
            raise SandboxError(problem)


def create_vm_pod(host: SandboxHost, spec: SandboxSpec) -> PodSandbox:
    """A pod VM, made on the host (run directory, VMM id, share) but not started; a
    standby VM of its shape, where there is one, is taken over instead at its start."""
    run_dir = check_new(host.config.run_root, spec.sandbox_id)
    machine = host.machine_for(spec, run_dir)
    networked = spec.network is not None and host.network.config.enabled
    standby = host.standby.take(machine, networked=networked) if host.standby else None
    if standby is not None:
        return _take_standby(host, spec, standby, run_dir, machine)
    return _create(host, spec, run_dir, machine)


def create_standby_vm(
    host: SandboxHost, name: str, base: MachineSpec, *, networked: bool
) -> PodSandbox:
    """A standby VM (sandbox/standby.py), made but not started: a VM of ``base`` (one
    of ``host.base_machines()``) named ``name`` below the standby directory, with a tap
    in a network namespace of its own when ``networked``."""
    run_dir = check_new(host.standby_dir, name)
    own_netns = host.network.netns_path(name) if networked else None
    machine = replace(base, name=name, run_dir=run_dir)
    standby = _create(host, SandboxSpec(name), run_dir, machine, own_netns=own_netns)
    vm_backend(standby).standby = True
    return standby


def _create(
    host: SandboxHost,
    spec: SandboxSpec,
    run_dir: Path,
    machine: MachineSpec,
    *,
    own_netns: Path | None = None,
) -> PodSandbox:
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
    backend = VmBackend(host, machine, spec)
    backend.own_netns = own_netns
    sandbox = _sandbox(host, backend)
    try:
        if machine.vmm_id is not None:
            prepare_vmm_dir(machine, mounts_later=True)
        if backend.share is not None:
            backend.share.create()
        sandbox.save()
    except BaseException as exc:
        mounts.remove_tree(run_dir)
        if host.vmm_ids is not None:
            host.vmm_ids.release(machine.vmm_id)
        raise SandboxError(f"sandbox {spec.sandbox_id}: {exc}") from exc
    return sandbox


def _take_standby(
    host: SandboxHost, spec: SandboxSpec, standby: PodSandbox, link: Path, machine: MachineSpec
) -> PodSandbox:
    """The pod's sandbox on ``standby``'s VM: its run directory, machine (grown to the
    pod's vCPUs and memory, ``machine``'s: the launch plugs the difference), share and
    namespace; the run root links the pod's id to that directory."""
    previous = vm_backend(standby)
    process, agent = standby.hand_over()
    backend = VmBackend(
        host, replace(previous.machine, vcpus=machine.vcpus, memory_mib=machine.memory_mib), spec
    )
    backend.own_netns = previous.own_netns
    backend.qmp, previous.qmp = previous.qmp, None
    backend.taken_agent = agent
    sandbox = _sandbox(host, backend)
    sandbox.started(process)
    try:
        sandbox.save()
        link.symlink_to(previous.run_dir)
    except OSError as exc:
        # nothing refers to the VM now: it goes, with all it had
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            if backend.own_netns is not None:
                remove_netns(backend.own_netns)
            mounts.remove_tree_and_link(backend.run_dir, link)
        if host.vmm_ids is not None:
            host.vmm_ids.release(backend.machine.vmm_id)
        raise SandboxError(f"sandbox {spec.sandbox_id}: {exc}") from exc
    log.info("sandbox=%s takes over the standby VM %s", spec.sandbox_id, previous.machine.name)
    return sandbox


def restore_vm_pod(host: SandboxHost, saved: dict[str, Any]) -> PodSandbox:
    """A pod VM as an earlier daemon saved it (not yet re-attached)."""
    sandbox = _sandbox(host, VmBackend.from_state(host, saved))
    sandbox.restore(saved)
    return sandbox


def _sandbox(host: SandboxHost, backend: VmBackend) -> PodSandbox:
    sandbox = PodSandbox(backend, backend.spec.sandbox_id, host.config)
    if backend.spec.network is not None:
        backend.network = host.network.for_pod(
            backend.spec.sandbox_id, backend.spec.network, sandbox.save
        )
    return sandbox


def vm_backend(sandbox: PodSandbox) -> VmBackend:
    """The VM behind a pod VM's sandbox (benchmarks and tests look at its machine)."""
    backend = sandbox.backend
    if not isinstance(backend, VmBackend):
        raise SandboxError(f"sandbox {sandbox.id} is not a pod VM")
    return backend
