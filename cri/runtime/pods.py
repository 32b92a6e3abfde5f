"""RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox,
and re-adoption of pods after a daemon restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time

from cri_api.v1 import api_pb2

from agent.protocol import CodedError
from cri.runtime.convert import (
    check_dns,
    check_name,
    check_resources,
    check_user_namespace,
    resolv_conf,
)
from cri.runtime.core import MetricsSink, RuntimeCore
from cri.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, in_context
from cri.runtime.state import (
    EXITED,
    POD_NOTREADY,
    POD_READY,
    RUNNING,
    UNKNOWN,
    PodRecord,
    encode_proto,
    labels_match,
)
from sandbox.api import (
    HOST_HANDLER,
    VM_HANDLER,
    DnsConfig,
    HostPodSpec,
    PodNetworkSpec,
    PortMapping,
    Sandbox,
    SandboxError,
    SandboxSpec,
    SandboxState,
)

log = logging.getLogger("clearcri.runtime")

HANDLERS = ("", VM_HANDLER, HOST_HANDLER)
PROTOCOLS = {api_pb2.TCP: "tcp", api_pb2.UDP: "udp", api_pb2.SCTP: "sctp"}


def pod_handler(config: api_pb2.PodSandboxConfig, runtime_handler: str) -> str:
    """The handler that serves a pod: ``host`` when asked for, or when the pod shares a
    host namespace or is privileged (a VM cannot serve those); else the VM."""
    ns = config.linux.security_context.namespace_options
    if (
        runtime_handler == HOST_HANDLER
        or api_pb2.NODE in (ns.network, ns.pid, ns.ipc)
        or config.linux.security_context.privileged
    ):
        return HOST_HANDLER
    return VM_HANDLER


def pod_network_spec(config: api_pb2.PodSandboxConfig) -> PodNetworkSpec:
    """What CNI needs of a pod: its identity, hostPorts and DNS."""
    meta = config.metadata
    dns = config.dns_config
    return PodNetworkSpec(
        name=meta.name,
        namespace=meta.namespace,
        uid=meta.uid,
        port_mappings=[
            PortMapping(
                protocol=PROTOCOLS.get(m.protocol, "tcp"),
                container_port=m.container_port,
                host_port=m.host_port,
                host_ip=m.host_ip,
            )
            for m in config.port_mappings
            if m.host_port
        ],
        dns=DnsConfig(list(dns.servers), list(dns.searches), list(dns.options))
        if config.HasField("dns_config")
        else None,
    )


def host_pod_spec(pod_id: str, config: api_pb2.PodSandboxConfig, cgroup_driver: str) -> HostPodSpec:
    ns = config.linux.security_context.namespace_options
    network = pod_network_spec(config)
    return HostPodSpec(
        sandbox_id=pod_id,
        hostname=_pod_hostname(config),
        resolv_conf=resolv_conf(config.dns_config),
        hosts=_hosts_file(_pod_hostname(config)),
        host_network=ns.network == api_pb2.NODE,
        host_ipc=ns.ipc == api_pb2.NODE,
        cgroup_parent=config.linux.cgroup_parent,
        cgroup_driver=cgroup_driver,
        network=network,
    )


def _pod_hostname(config: api_pb2.PodSandboxConfig) -> str:
    """The pod's hostname: the one asked for, else the pod name cut to the 63 bytes a
    hostname may have (as kubelet does), without a trailing '-' or '.'."""
    if config.hostname:
        return config.hostname
    return config.metadata.name[:63].rstrip("-.")


def _hosts_file(hostname: str) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if hostname:
        lines.append(f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


#: How often a leftover sandbox that could not be removed is tried again.
LEFTOVER_RETRY_S = 30


class PodOps(RuntimeCore):
    metrics: MetricsSink | None = None  # set by the daemon (cri/metrics.py)

    async def run_pod_sandbox(self, config: api_pb2.PodSandboxConfig, runtime_handler: str) -> str:
        meta = config.metadata
        if not meta.name or not meta.namespace or not meta.uid:
            raise InvalidArgument("pod metadata needs name, namespace and uid")
        for what, value in (("name", meta.name), ("namespace", meta.namespace), ("uid", meta.uid)):
            problem = check_name(f"pod {what}", value)
            if problem:
                raise InvalidArgument(f"{problem}: pod metadata must be a Kubernetes name")
        if runtime_handler not in HANDLERS:
            raise InvalidArgument(
                f"unknown runtime handler {runtime_handler!r}: this runtime serves "
                f"{VM_HANDLER!r} (pod VMs) and {HOST_HANDLER!r} (pods on the host)"
            )
        problem = (
            check_user_namespace(config)
            or check_dns(config.dns_config)
            or self.provider.cgroup_parent_problem(
                config.linux.cgroup_parent, self.config.daemon.cgroup_driver
            )
            or check_resources(config.linux.resources)
        )
        if problem:
            raise InvalidArgument(f"pod {meta.namespace}/{meta.name}: {problem}")
        handler = pod_handler(config, runtime_handler)
        if handler == HOST_HANDLER and not self.config.daemon.host_pods:
            raise FailedPrecondition(
                "this node runs pods only in VMs (daemon.host_pods = false), and pod "
                f"{meta.namespace}/{meta.name} needs the host handler (it asks for it, shares "
                "the host's network, PID or IPC namespace, or is privileged); schedule it "
                "on a node that allows host pods"
            )
        for pod in self.state.pods.values():
            m = pod
            if (m.name, m.namespace, m.uid, m.attempt) == (
                meta.name,
                meta.namespace,
                meta.uid,
                meta.attempt,
            ):
                raise AlreadyExists(
                    f"pod {meta.namespace}/{meta.name} attempt {meta.attempt} already exists "
                    f"as {pod.id}; remove it first"
                )
        pod_id = secrets.token_hex(32)
        if config.log_directory:
            await asyncio.to_thread(_mkdir, config.log_directory)
        res = config.linux.resources
        budget = await asyncio.to_thread(
            self.provider.memory_budget,
            config.linux.cgroup_parent,
            self.config.daemon.cgroup_driver,
            res.memory_limit_in_bytes,
            config.linux.overhead.memory_limit_in_bytes,
        )
        spec = SandboxSpec(
            sandbox_id=pod_id,
            hostname=_pod_hostname(config),
            resolv_conf=resolv_conf(config.dns_config),
            hosts=_hosts_file(_pod_hostname(config)),
            cpu_quota_us=res.cpu_quota,
            cpu_period_us=res.cpu_period,
            memory_limit_bytes=res.memory_limit_in_bytes,
            memory_budget_bytes=budget,
            cgroup_parent=config.linux.cgroup_parent,
            cgroup_driver=self.config.daemon.cgroup_driver,
        )
        # every pod but a host-network one gets a CNI network (host pods without the tap)
        host_network = config.linux.security_context.namespace_options.network == api_pb2.NODE
        if self.provider.networking and not (handler == HOST_HANDLER and host_network):
            status = self.provider.network_status()
            if not status.ready:
                raise FailedPrecondition(
                    f"pod networking is not ready: {status.message}; install a CNI config "
                    "or set [vm.network] enabled = false"
                )
            if handler != HOST_HANDLER:
                spec.network = pod_network_spec(config)
        started = time.monotonic()
        sandbox = self.provider.create(
            handler,
            host_pod_spec(pod_id, config, self.config.daemon.cgroup_driver)
            if handler == HOST_HANDLER
            else spec,
        )
        try:
            await sandbox.start()
        except SandboxError as exc:
            await sandbox.destroy()
            raise in_context(exc, f"pod {meta.namespace}/{meta.name}") from exc
        except BaseException:
            await sandbox.destroy()
            raise
        pod = PodRecord(
            id=pod_id,
            name=meta.name,
            uid=meta.uid,
            namespace=meta.namespace,
            attempt=meta.attempt,
            created_at_ns=time.time_ns(),
            runtime_handler=handler,
            config=encode_proto(config),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            vm_pid=sandbox.pid,
            boot_seconds=time.monotonic() - started,
        )
        pod.ips = sandbox.pod_ips
        try:
            self.state.save_pod(pod)
        except BaseException:
            await sandbox.destroy()
            raise
        self._watch_sandbox(pod, sandbox)
        if self.metrics is not None and handler == VM_HANDLER:
            self.metrics.sandbox_started(pod_id, sandbox.boot, pod.boot_seconds)
        log.info(
            "pod=%s name=%s/%s handler=%s started boot=%.2fs",
            pod_id[:12],
            meta.namespace,
            meta.name,
            handler,
            pod.boot_seconds,
        )
        self.publish(api_pb2.CONTAINER_CREATED_EVENT, pod_id, pod)
        self.publish(api_pb2.CONTAINER_STARTED_EVENT, pod_id, pod)
        return pod_id

    def _watch_sandbox(self, pod: PodRecord, sandbox: Sandbox) -> None:
        self.sandboxes[pod.id] = sandbox
        sandbox.on_exit(lambda s: self._sandbox_died(pod.id, s.exit_reason))

    def _sandbox_died(self, pod_id: str, reason: str) -> None:
        pod = self.state.pods.get(pod_id)
        if pod is None:
            return
        if self.metrics is not None and pod.state == POD_READY:
            self.metrics.vm_crashed(reason)
        pod.state = POD_NOTREADY
        pod.reason = reason
        now = time.time_ns()
        for ctr in self.state.pod_containers(pod_id):
            if ctr.state in (RUNNING, UNKNOWN):
                self._mark_exited(ctr, 255, "Error", f"the pod VM went away: {reason}", now)
        with contextlib.suppress(Exception):
            self.state.save_pod(pod)
        log.warning("pod=%s VM gone: %s", pod_id[:12], reason)
        self.publish(api_pb2.CONTAINER_STOPPED_EVENT, pod_id, pod)

    async def stop_pod_sandbox(self, pod_id: str) -> None:
        pod = self.state.find_pod(pod_id)
        if pod is None:
            return  # idempotent: nothing left to stop
        async with self.pod_lock(pod.id):
            sandbox = self.sandboxes.get(pod.id)
            now = time.time_ns()
            if sandbox is not None and sandbox.state == SandboxState.READY:
                # Give running containers their exit status before the VM goes.
                running = [c for c in self.state.pod_containers(pod.id) if c.state == RUNNING]
                for ctr in running:
                    with contextlib.suppress(CodedError):
                        await sandbox.signal_container(ctr.id, 9, all_processes=True, timeout=5)
                for ctr in running:
                    with contextlib.suppress(CodedError, TimeoutError):
                        status = await sandbox.wait_container(ctr.id, timeout=5)
                        self._mark_exited(
                            ctr,
                            status.exit_code,
                            status.reason or "Error",
                            "",
                            status.finished_at_ns or now,
                        )
                await sandbox.stop()
            for ctr in self.state.pod_containers(pod.id):
                if ctr.state != EXITED:
                    self._mark_exited(ctr, 137, "Error", "the pod was stopped", now)
                self._close_io(ctr.id)
            if pod.state != POD_NOTREADY:
                pod.state = POD_NOTREADY
                pod.reason = pod.reason or "stopped"
                self.state.save_pod(pod)
                self.publish(api_pb2.CONTAINER_STOPPED_EVENT, pod.id, pod)

    def _close_io(self, container_id: str) -> None:
        io = self.io.pop(container_id, None)
        if io is None:
            return
        for task in (io.pump, io.waiter):
            if task is not None:
                task.cancel()
        io.fan_out(None)
        io.log.close()

    async def remove_pod_sandbox(self, pod_id: str) -> None:
        pod = self.state.find_pod(pod_id)
        if pod is None:
            return
        await self.stop_pod_sandbox(pod.id)
        async with self.pod_lock(pod.id):
            sandbox = self.sandboxes.pop(pod.id, None)
            if sandbox is not None:
                await sandbox.destroy()
            else:
                await self._destroy_leftover(pod.id)
            for ctr in self.state.pod_containers(pod.id):
                self._close_io(ctr.id)
                self.publish(api_pb2.CONTAINER_DELETED_EVENT, ctr.id, None)
            self.state.delete_pod(pod.id)
        self._pod_locks.pop(pod.id, None)
        self.publish(api_pb2.CONTAINER_DELETED_EVENT, pod.id, None)
        log.info("pod=%s removed", pod.id[:12])

    async def _destroy_leftover(self, pod_id: str) -> None:
        await self.provider.remove_leftover(pod_id)

    def pod_status_message(self, pod: PodRecord) -> api_pb2.PodSandboxStatus:
        config = pod.pod_config()
        ns = config.linux.security_context.namespace_options
        status = api_pb2.PodSandboxStatus(
            id=pod.id,
            metadata=pod.metadata(),
            state=pod.state,  # type: ignore[arg-type]
            created_at=pod.created_at_ns,
            labels=pod.labels,
            annotations=pod.annotations,
            runtime_handler=pod.runtime_handler,
        )
        if pod.ips:
            status.network.ip = pod.ips[0]
            for ip in pod.ips[1:]:
                status.network.additional_ips.add(ip=ip)
        opts = status.linux.namespaces.options
        opts.network = ns.network
        opts.pid = ns.pid
        opts.ipc = ns.ipc
        return status

    def pod_status(self, pod_id: str, verbose: bool) -> api_pb2.PodSandboxStatusResponse:
        pod = self.get_pod(pod_id)
        response = api_pb2.PodSandboxStatusResponse(
            status=self.pod_status_message(pod), timestamp=time.time_ns()
        )
        for ctr in self.state.pod_containers(pod.id):
            response.containers_statuses.append(self.container_status_message(ctr))
        if verbose:
            sandbox = self.sandboxes.get(pod.id)
            info: dict[str, object] = {"runtimeHandler": pod.runtime_handler}
            own = sandbox.status_info() if sandbox is not None else {"state": "gone"}
            if pod.runtime_handler == HOST_HANDLER:
                info["host"] = {
                    "agentPid": pod.vm_pid,
                    **own,
                    "startSeconds": pod.boot_seconds,
                    "exitReason": pod.reason,
                }
            else:
                info["vm"] = {
                    "pid": pod.vm_pid,
                    **own,
                    "bootSeconds": pod.boot_seconds,
                    "exitReason": pod.reason,
                }
            response.info["info"] = json.dumps(info)
        return response

    def list_pods(self, flt: api_pb2.PodSandboxFilter | None) -> list[api_pb2.PodSandbox]:
        out = []
        for pod in self.state.pods.values():
            if flt is not None:
                if flt.id and not pod.id.startswith(flt.id):
                    continue
                if flt.HasField("state") and pod.state != flt.state.state:
                    continue
                if not labels_match(pod.labels, flt.label_selector):
                    continue
            out.append(
                api_pb2.PodSandbox(
                    id=pod.id,
                    metadata=pod.metadata(),
                    state=pod.state,  # type: ignore[arg-type]
                    created_at=pod.created_at_ns,
                    labels=pod.labels,
                    annotations=pod.annotations,
                    runtime_handler=pod.runtime_handler,
                )
            )
        return out

    async def recover(self) -> None:
        """Re-adopt every pod VM an earlier daemon left; settle the ones that died. Never
        fails: what cannot be settled now is logged and left to a retry, and the daemon
        serves (a node whose runtime cannot start runs nothing at all)."""
        known = set(self.state.pods)
        for pod in list(self.state.pods.values()):
            if pod.state != POD_READY:
                continue
            try:
                await self._recover_pod(pod)
            except Exception:
                log.exception("pod=%s: could not re-adopt it; it stays as it is", pod.id[:12])
        # A VM whose pod never reached the database (daemon killed mid-RunPodSandbox).
        leftovers = [pod_id for pod_id in self.provider.sandbox_ids() if pod_id not in known]
        failed = await self._remove_leftovers(leftovers)
        if failed:
            self.spawn(self._retry_leftovers(failed), "retry-leftover-sandboxes")

    async def _recover_pod(self, pod: PodRecord) -> None:
        try:
            sandbox = await self.provider.adopt(pod.id)
        except SandboxError as exc:
            self._sandbox_died(pod.id, f"its VM state was lost: {exc}")
            return
        if sandbox.state != SandboxState.READY:
            self._sandbox_died(pod.id, sandbox.exit_reason or "the VM is gone")
            return
        self._watch_sandbox(pod, sandbox)
        await self.recover_containers(pod, sandbox)
        log.info("pod=%s re-adopted pid=%d", pod.id[:12], sandbox.pid)

    async def _remove_leftovers(self, pod_ids: list[str]) -> list[str]:
        """Remove sandboxes that have no pod record; the ids that could not be."""
        failed = []
        for pod_id in pod_ids:
            log.warning("removing sandbox %s that has no pod record", pod_id[:12])
            try:
                await self._destroy_leftover(pod_id)
            except Exception as exc:
                log.error(
                    "sandbox %s: could not remove it (%s); trying again in %d s",
                    pod_id[:12],
                    exc,
                    LEFTOVER_RETRY_S,
                )
                failed.append(pod_id)
        return failed

    async def _retry_leftovers(self, pod_ids: list[str]) -> None:
        while pod_ids:
            await asyncio.sleep(LEFTOVER_RETRY_S)
            present = set(self.provider.sandbox_ids())
            pod_ids = await self._remove_leftovers([p for p in pod_ids if p in present])


def _mkdir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
