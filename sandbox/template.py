"""VM templates: boot the guest once, start every pod VM from a copy-on-write clone.

A template is one VM of a given shape (vCPUs, memory, devices) booted to a ready agent
with its RAM in a file on tmpfs, then paused and its device state saved (RAM is not
copied: it already is the file). A pod VM of the same shape maps that RAM file
privately (MAP_PRIVATE: pages stay shared with the template until the guest writes
them) and loads the saved device state instead of booting: no firmware, no kernel
boot, no init, no Python start-up. The guest pages every clone only reads (kernel,
agent, libraries) exist once on the host.

Pod VMs are sized at clone time (sandbox/hotplug.py): the node's templates have the
default pod shape and the smallest pod VM's (the bases), with room to grow (CPU slots, a
virtio-mem device with nothing plugged), and a clone of a pod bigger than its base
hot-plugs the rest, so two templates serve every pod of the node.

Guest-visible devices must be identical between template and clones, so every
template and clone carries a NIC; a pod without networking gets it with a backend that
goes nowhere. After a restore the agent is handed fresh entropy (the
clones would otherwise share the template's random state), the clock and the pod's
identity (hostname, MAC, addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent.client import AgentClient
from agent.errors import AgentError
from sandbox.jail import JailError, VmmIds, jail_for, prepare_vmm_dir
from sandbox.network import NETDEV_ID, NIC_PCI_ADDR
from sandbox.procfs import pid_alive, read_cmdline
from sandbox.qmp import QmpControl, QmpError
from sandbox.vm import MachineSpec, VmProcess, build_command, vmm_identity

log = logging.getLogger(__name__)

TEMPLATE_FORMAT = 4
# The NIC every template and clone has; clones set their own MAC from the guest.
TEMPLATE_MAC = "52:54:00:c1:cc:01"
RAM_FILE = "ram"
NULL_NIC_SOCKET = "nic.sock"
STATE_FILE = "devices.state"
INFO_FILE = "template.json"


class TemplateError(Exception):
    """A template could not be built or restored."""


#: The template VM's hostname while it runs (every clone sets its pod's).
TEMPLATE_HOSTNAME = "clearcri-template"


async def run_clone_requests(agent: AgentClient) -> None:
    """Ask a template's agent, once before its state is saved, what every clone's agent
    is asked right after its restore (sandbox/vmpod.py): fresh entropy, the clock, a
    hostname, the network (no NIC). The agent's first run of that code (its lazy
    imports, Python's specialising of what runs) is then in the saved memory that the
    clones share, instead of each clone doing it again, keeping the guest pages it
    writes and the translated code under TCG. Nothing of it outlives a clone's own
    requests: each sets its hostname and network, and no /etc file is written here."""
    await agent.reseed(os.urandom(64))
    await agent.sync_clock()
    await agent.set_pod_config(hostname=TEMPLATE_HOSTNAME)
    await agent.configure_network([])


def fill_holes(ram_file: Path) -> None:
    """Allocate every page of a template's RAM file (pages the guest never touched are
    holes on tmpfs).

    A clone maps the file privately. A fault on a hole of a tmpfs file allocates a new
    shared page in the file, charged to the faulting clone's pod cgroup and never
    reclaimable without swap, and a write then copies it: every page a clone first
    writes would cost its pod twice, and the template file would grow with every clone.
    With no holes, a clone's cgroup is charged only for the pages it writes.
    """
    fd = os.open(ram_file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def nic_args(netdev: str | None) -> list[str]:
    """The NIC of templates and clones: ``netdev`` is the backend. None gives a NIC
    that goes nowhere: a listening unix stream socket in the VM's run dir that nobody
    connects to (a lone hub port would be simpler but stalls the firmware)."""
    backend = netdev or (
        f"stream,id={NETDEV_ID},server=on,addr.type=unix,addr.path={NULL_NIC_SOCKET}"
    )
    return [
        "-netdev",
        backend,
        "-device",
        f"virtio-net-pci,netdev={NETDEV_ID},id=nic0,mac={TEMPLATE_MAC},"
        f"bus=pcie.0,addr={NIC_PCI_ADDR},romfile=",
    ]


def _assets(machine: MachineSpec, qemu: str) -> dict[str, object]:
    return {
        "format": TEMPLATE_FORMAT,
        "qemu": vmm_identity(qemu),
        "kernel": str(machine.kernel),
        "initrd": str(machine.initrd),
        "os_image": str(machine.os_image),
        "os_image_size": machine.os_image.stat().st_size,
        "os_image_mtime": machine.os_image.stat().st_mtime_ns,
        "kernel_mtime": machine.kernel.stat().st_mtime_ns,
        "initrd_mtime": machine.initrd.stat().st_mtime_ns,
    }


def assets_key(machine: MachineSpec, qemu: str) -> str:
    """What every template of a node has in common: the VMM build and the guest's
    kernel, initramfs and OS image. A template of other assets serves no VM any more
    (an upgrade, a rebuilt guest directory)."""
    return hashlib.sha256(json.dumps(_assets(machine, qemu), sort_keys=True).encode()).hexdigest()[
        :16
    ]


def template_key(machine: MachineSpec, qemu: str) -> str:
    """What decides the guest-visible machine. A template serves the VMs that boot with
    its shape: a VM sized at clone time boots with the node's base shape and room (the
    vCPUs and memory it grows to are not part of the key), any other VM with its own."""
    shape = {
        **_assets(machine, qemu),
        "vcpus": machine.boot_vcpus,
        "memory_mib": machine.boot_memory_mib,
        "max_vcpus": machine.max_vcpus,
        "hotplug_memory_mib": machine.hotplug_memory_mib,
        "accel": machine.accel,
        "tb": machine.tcg_tb_size_mib,
        "slots": machine.image_slots,
        "mem_merge": machine.mem_merge,
        "extra_cmdline": machine.extra_cmdline,
        "os_image_mode": machine.os_image_mode,
        "share": machine.share,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VmTemplate:
    key: str
    directory: Path
    boot_seconds: float
    created_at: float
    #: the guest's MemTotal when it was saved (a clone's grows by what it plugs)
    mem_total_kib: int = 0

    @property
    def ram_file(self) -> Path:
        return self.directory / RAM_FILE

    @property
    def state_file(self) -> Path:
        return self.directory / STATE_FILE


class TemplateStore:
    """Templates under ``root`` (tmpfs: their RAM files are the shared guest memory)."""

    def __init__(
        self, root: Path, qemu: str, *, keep: int = 4, vmm_ids: VmmIds | None = None
    ) -> None:
        self.root = root
        self.qemu = qemu
        self.keep = keep
        # template VMs are jailed as pod VMs are, with ids of their own from this range
        self.vmm_ids = vmm_ids
        self._locks: dict[str, asyncio.Lock] = {}
        self._building: dict[str, asyncio.Task[VmTemplate | None]] = {}
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_abandoned()

    def _remove_abandoned(self) -> None:
        """Drop half-built templates of processes that are gone, and kill their VMs (a
        daemon that died while building a template leaves its qemu running)."""
        for entry in self.root.glob(".*.*.*"):
            try:
                pid = int(entry.name.split(".")[2])
            except (IndexError, ValueError):
                continue
            if Path(f"/proc/{pid}").exists():
                continue
            with contextlib.suppress(OSError, ValueError):
                pidfile = entry / "vmm" / "qemu.pid"
                if not pidfile.exists():
                    pidfile = entry / "qemu.pid"  # a template VM that was not jailed
                vm_pid = int(pidfile.read_text().strip())
                if pid_alive(vm_pid) and any(
                    "clearcri-template-" in part for part in read_cmdline(vm_pid)
                ):
                    log.warning("killing the VM of an abandoned template build (pid %d)", vm_pid)
                    os.kill(vm_pid, signal.SIGKILL)
            shutil.rmtree(entry, ignore_errors=True)

    def get(self, machine: MachineSpec) -> VmTemplate | None:
        """The ready template for ``machine``'s shape, if there is one."""
        key = template_key(machine, self.qemu)
        directory = self.root / key
        try:
            info = json.loads((directory / INFO_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not (directory / RAM_FILE).exists() or not (directory / STATE_FILE).exists():
            return None
        return VmTemplate(
            key,
            directory,
            info["boot_seconds"],
            info["created_at"],
            int(info.get("mem_total_kib", 0)),
        )

    def ensure(self, machine: MachineSpec) -> asyncio.Task[VmTemplate | None]:
        """Build the template for ``machine``'s shape in the background (once)."""
        key = template_key(machine, self.qemu)
        task = self._building.get(key)
        if task is None or task.done():
            task = asyncio.ensure_future(self._build_quietly(machine))
            self._building[key] = task
        return task

    async def _build_quietly(self, machine: MachineSpec) -> VmTemplate | None:
        try:
            return await self.build(machine)
        except TemplateError as exc:
            log.warning("VM template not built, pods boot cold: %s", exc)
            return None

    async def build(self, machine: MachineSpec) -> VmTemplate:
        key = template_key(machine, self.qemu)
        assets = assets_key(machine, self.qemu)
        async with self._locks.setdefault(key, asyncio.Lock()):
            existing = self.get(machine)
            if existing is not None:
                self._prune(keep=key, assets=assets)
                return existing
            final = self.root / key
            # unique: several daemons (or test processes) may share one template dir
            work = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(4)}"
            work.mkdir(mode=0o700)
            vmm_id = None
            try:
                if self.vmm_ids is not None:
                    vmm_id = self.vmm_ids.allocate()
                spec = replace(
                    machine,
                    name=f"template-{key}",
                    run_dir=work,
                    memory_file=work / RAM_FILE,
                    memory_shared=True,
                    incoming=False,
                    extra_args=tuple(nic_args(None)),
                    vmm_id=vmm_id,
                )
                self._prepare(spec)
                boot, mem_total_kib = await self._boot_and_save(spec)
            except BaseException as exc:
                shutil.rmtree(work, ignore_errors=True)
                if isinstance(exc, (JailError, OSError)):
                    raise TemplateError(f"template VM not started: {exc}") from exc
                raise
            finally:
                if self.vmm_ids is not None:
                    self.vmm_ids.release(vmm_id)
            if spec.vmm_dir != work:
                shutil.rmtree(spec.vmm_dir)
            else:
                for name in ("qmp.sock", "agent.sock", "qemu.pid", NULL_NIC_SOCKET):
                    (work / name).unlink(missing_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    (work / "share").rmdir()
            try:
                await asyncio.to_thread(fill_holes, work / RAM_FILE)
            except OSError as exc:
                shutil.rmtree(work, ignore_errors=True)
                raise TemplateError(f"cannot allocate the template's RAM file: {exc}") from exc
            info = {
                "key": key,
                "assets": assets,
                "boot_seconds": boot,
                "created_at": time.time(),
                "mem_total_kib": mem_total_kib,
            }
            (work / INFO_FILE).write_text(json.dumps(info))
            try:
                work.rename(final)
            except OSError:
                # another process finished the same template first: use theirs
                shutil.rmtree(work, ignore_errors=True)
                if self.get(machine) is None:
                    raise TemplateError(f"cannot install template {key} in {self.root}") from None
            self._prune(keep=key, assets=assets)
            log.info("VM template %s ready (boot %.2fs)", key, boot)
            template = self.get(machine)
            assert template is not None
            return template

    @staticmethod
    def _prepare(spec: MachineSpec) -> None:
        """The template VM's files before it starts. Its RAM file is readable and
        writable by every jailed VMM (a clone's QEMU opens it for writing even though it
        maps it privately; each VMM runs as an id of its own), inside a directory only
        root can enter: a VMM reaches it through its jail's bind alone."""
        if spec.vmm_id is not None:
            prepare_vmm_dir(spec, mounts_later=False)
            assert spec.memory_file is not None
            fd = os.open(spec.memory_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.fchmod(fd, 0o666)
            os.close(fd)
        if spec.share:
            # the device needs a directory; the template never mounts it (QEMU
            # refuses to save a VM while a 9p share is attached)
            spec.share_dir.mkdir()

    async def _boot_and_save(self, spec: MachineSpec) -> tuple[float, int]:
        """Boot the template VM, save it; its boot time and the guest's MemTotal."""
        cmd = build_command(spec, qemu=self.qemu)
        if spec.vmm_id is not None:
            cmd = jail_for(spec).command(cmd)
        started = time.monotonic()
        process = await VmProcess.spawn(cmd, stderr_log=spec.stderr_log, cwd=spec.vmm_dir)
        qmp = QmpControl(spec.name)
        try:
            await qmp.connect(spec.qmp_socket, timeout=10.0)
            agent = await AgentClient.connect(spec.agent_socket, timeout=120.0)
            boot = time.monotonic() - started
            mem_total_kib = agent.ready.mem_total_kib
            # Let the guest finish what boot started (module init, page cache) so the
            # saved state is quiet; then drop the connection: clones reconnect.
            await agent.ping()
            await run_clone_requests(agent)
            await agent.close()
            await asyncio.sleep(0.3)
            await qmp.save_state(spec.run_dir / STATE_FILE)
            return boot, mem_total_kib
        except (QmpError, AgentError, OSError) as exc:
            tail = ""
            with contextlib.suppress(OSError):
                tail = spec.console_log.read_text(errors="replace")[-300:]
            raise TemplateError(f"template VM failed: {exc}; console: {tail}") from exc
        finally:
            await qmp.quit()
            await qmp.close()
            await process.kill_and_wait()

    def _prune(self, keep: str, assets: str) -> None:
        """Drop every template of other ``assets`` (another VMM build or guest: no VM is
        cloned from it again, and its RAM file holds its whole memory on tmpfs), and keep
        the newest ``self.keep`` of the others. ``keep`` is the one just asked for."""
        entries = []
        for directory in self.root.iterdir():
            if directory.name.startswith(".") or directory.name == keep:
                continue
            try:
                info = json.loads((directory / INFO_FILE).read_text())
                created = float(info["created_at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a template, or one being installed
            if info.get("assets") != assets:
                log.info("removing VM template %s: made for another VMM or guest", directory.name)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            entries.append((created, directory))
        entries.sort(reverse=True)
        for _, directory in entries[self.keep - 1 :]:
            shutil.rmtree(directory, ignore_errors=True)

    def describe(self) -> list[dict[str, object]]:
        out = []
        for directory in sorted(self.root.iterdir()):
            with contextlib.suppress(OSError, ValueError):
                info = json.loads((directory / INFO_FILE).read_text())
                ram = directory / RAM_FILE
                info["ram_resident_bytes"] = ram.stat().st_blocks * 512
                out.append(info)
        return out
