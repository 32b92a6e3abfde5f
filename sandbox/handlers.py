"""The runtime handlers this node serves and the sandbox kind behind each: a pod VM for
``clearcri`` (sandbox/pod.py), a pod on the host for ``host`` (sandbox/hostpod.py).
cri/ makes and re-adopts sandboxes only through a ``SandboxKinds``; tests hand it one
whose sandboxes are fakes."""

from __future__ import annotations

from sandbox.hostpod import HOST_HANDLER, HostPodSpec, HostSandbox, adopt_sandbox
from sandbox.pod import PodSandbox, SandboxHost, SandboxSpec

VM_HANDLER = "clearcri"


class SandboxKinds:
    """Makes a sandbox of the kind a handler names, and re-adopts any kind."""

    def __init__(self, host: SandboxHost) -> None:
        self.host = host

    def create_vm(self, spec: SandboxSpec) -> PodSandbox:
        """A pod VM (not started)."""
        return PodSandbox.create(self.host, spec)

    def create_host(self, spec: HostPodSpec) -> PodSandbox:
        """A pod on the host (not started)."""
        return HostSandbox.create_host(self.host, spec)

    async def adopt(self, sandbox_id: str) -> PodSandbox:
        """Re-attach to a sandbox of either kind an earlier daemon left."""
        return await adopt_sandbox(self.host, sandbox_id)


__all__ = ["HOST_HANDLER", "VM_HANDLER", "SandboxKinds"]
