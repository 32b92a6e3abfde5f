"""The runtime handlers this node serves and the sandbox kind behind each: a pod VM for
``clearcri`` (sandbox/vmpod.py), a pod on the host for ``host`` (sandbox/hostpod.py).
``Sandboxes`` is the node's ``sandbox.api.SandboxProvider``: cri/ makes, re-adopts and
cleans up sandboxes only through it; tests hand cri/ one whose sandboxes are fakes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox import mounts
from sandbox.api import (
    HOST_HANDLER,
    VM_HANDLER,
    HostPodSpec,
    NetworkStatus,
    SandboxError,
    SandboxNotFound,
    SandboxRefused,
    SandboxSpec,
)
from sandbox.cgroups import parent_problem, pod_memory_budget
from sandbox.hostpod import create_host_pod, restore_host_pod
from sandbox.lifecycle import PodSandbox, read_state
from sandbox.network import NetworkError
from sandbox.node import SandboxHost
from sandbox.vmpod import create_vm_pod, restore_vm_pod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxKind:
    """How sandboxes of one runtime handler are made and read back."""

    spec_type: type[SandboxSpec] | type[HostPodSpec]
    create: Callable[[SandboxHost, Any], PodSandbox]
    restore: Callable[[SandboxHost, dict[str, Any]], PodSandbox]


KINDS: dict[str, SandboxKind] = {
    VM_HANDLER: SandboxKind(SandboxSpec, create_vm_pod, restore_vm_pod),
    HOST_HANDLER: SandboxKind(HostPodSpec, create_host_pod, restore_host_pod),
}


class Sandboxes:
    """The node's sandboxes of every kind (``sandbox.api.SandboxProvider``)."""

    def __init__(self, host: SandboxHost) -> None:
        self.host = host

    @property
    def handlers(self) -> tuple[str, ...]:
        return tuple(KINDS)

    @property
    def networking(self) -> bool:
        return self.host.config.network.enabled

    def create(self, handler: str, spec: SandboxSpec | HostPodSpec) -> PodSandbox:
        kind = KINDS.get(handler)
        if kind is None:
            raise SandboxRefused(
                f"no runtime handler {handler!r} on this node (it has {', '.join(KINDS)})"
            )
        if not isinstance(spec, kind.spec_type):
            raise SandboxRefused(f"runtime handler {handler!r} takes a {kind.spec_type.__name__}")
        return kind.create(self.host, spec)

    async def adopt(self, sandbox_id: str) -> PodSandbox:
        saved = read_state(self.host.config.run_root / sandbox_id)
        kind = KINDS.get(str(saved.get("kind", VM_HANDLER)))
        if kind is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} was made by an unknown handler")
        try:
            sandbox = kind.restore(self.host, saved)
        except (KeyError, TypeError, ValueError) as exc:
            raise SandboxNotFound(f"sandbox {sandbox_id} has no readable state: {exc}") from exc
        await sandbox.adopt_process()
        return sandbox

    async def remove_leftover(self, sandbox_id: str) -> None:
        run_dir = self.host.config.run_root / sandbox_id
        if not os.path.lexists(run_dir):  # a link that leads nowhere is still removed
            return
        try:
            sandbox = await self.adopt(sandbox_id)
        except SandboxError:
            # binds of host paths may be below it: detach them before deleting anything
            # (a pod on a standby VM: the directory its link points to, then the link)
            target = run_dir.resolve() if run_dir.is_symlink() else run_dir
            try:
                await asyncio.to_thread(mounts.remove_tree_and_link, target, run_dir)
            except OSError as exc:
                log.warning("sandbox=%s: cannot remove %s: %s", sandbox_id[:12], run_dir, exc)
            return
        await sandbox.destroy()

    def sandbox_ids(self) -> list[str]:
        return self.host.sandbox_ids()

    def node_info(self) -> dict[str, str]:
        host = self.host
        return {
            "accelerator": f"{host.accel} ({host.accel_reason})",
            "guest": host.assets.version,
        }

    def network_status(self) -> NetworkStatus:
        return self.host.network.status()

    def update_pod_cidr(self, cidr: str) -> None:
        try:
            self.host.network.update_pod_cidr(cidr)
        except NetworkError as exc:
            raise SandboxRefused(str(exc)) from exc

    def memory_budget(self, cgroup_parent: str, driver: str, limit: int, overhead: int) -> int:
        return pod_memory_budget(cgroup_parent, driver, limit, overhead)

    def cgroup_parent_problem(self, parent: str, driver: str) -> str | None:
        return parent_problem(parent, driver)
