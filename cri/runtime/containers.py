"""CreateContainer, StartContainer, StopContainer, RemoveContainer, ContainerStatus,
ListContainers, UpdateContainerResources, ReopenContainerLog, ExecSync."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterable, Callable
from pathlib import Path

from cri_api.v1 import api_pb2

from agent.protocol import CodedError, ContainerSpec, ErrorCode, Mount
from cri.images.errors import ImageError
from cri.runtime import convert
from cri.runtime.core import ContainerIO, MetricsSink, RuntimeCore
from cri.runtime.errors import (
    AlreadyExists,
    CriError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    in_context,
)
from cri.runtime.logs import ContainerLog
from cri.runtime.state import (
    CREATED,
    EXITED,
    POD_READY,
    RUNNING,
    ContainerRecord,
    PodRecord,
    container_matches,
    encode_proto,
)
from cri.streaming.agent_backend import queue_chunks
from cri.streaming.errors import BackendError
from sandbox.api import HOST_HANDLER, HostPathMount, Sandbox, SandboxError, SandboxState

log = logging.getLogger("clearcri.runtime")

# What ExecSync returns of each stream; the rest is dropped. Both together, framed, stay
# under the 16 MiB gRPC message limit of kubelet and of this server.
EXEC_OUTPUT_LIMIT = 4 << 20
PROPAGATION = {
    api_pb2.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared",
}
VOLUME_LIMIT = 64 << 20


def _signal_number(name: str) -> int:
    if not name:
        return signal.SIGTERM
    upper = name.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    try:
        return int(signal.Signals[upper])
    except KeyError:
        if name.isdigit():
            return int(name)
        raise InvalidArgument(f"unknown stop signal {name!r}") from None


#: kubelet's volume plugins that write their directory atomically (a ``..data`` link
#: swapped to each new version): /var/lib/kubelet/pods/<uid>/volumes/<plugin>/<name>
ATOMIC_VOLUME_PLUGINS = (
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
)


def is_atomic_volume(host_path: Path) -> bool:
    """Whether ``host_path`` is a volume kubelet updates by swapping ``..data``."""
    parts = host_path.parts
    return (
        len(parts) >= 3
        and parts[-2] in ATOMIC_VOLUME_PLUGINS
        and parts[-3] == "volumes"
        and (host_path / "..data").is_symlink()
    )


def share_keys(container_id: str, count: int) -> list[str]:
    """The share entries of a container's ``count`` mounts (one per mount)."""
    return [f"{container_id[:16]}-{index}" for index in range(count)]


class ContainerOps(RuntimeCore):
    metrics: MetricsSink | None = None  # set by the daemon (cri/metrics.py)

    async def create_container(
        self,
        pod_id: str,
        config: api_pb2.ContainerConfig,
        pod_config: api_pb2.PodSandboxConfig | None,
    ) -> str:
        pod = self.get_pod(pod_id)
        if pod.state != POD_READY:
            raise FailedPrecondition(f"pod sandbox {pod.id} is not ready")
        meta = config.metadata
        if not meta.name:
            raise InvalidArgument("container metadata needs a name")
        problem = convert.check_name("container name", meta.name)
        if problem:
            raise InvalidArgument(f"{problem}: a container name must be a Kubernetes name")
        problem = convert.check_log_path(config.log_path) or convert.check_resources(
            config.linux.resources
        )
        if problem:
            raise InvalidArgument(f"container {meta.name}: {problem}")
        if config.devices and pod.runtime_handler != HOST_HANDLER:
            raise InvalidArgument(
                f"container {meta.name}: a pod VM cannot take host devices "
                f"({config.devices[0].host_path}): run the pod with the host handler"
            )
        if not config.image.image:
            raise InvalidArgument("container config needs an image")
        for other in self.state.pod_containers(pod.id):
            if (other.name, other.attempt) == (meta.name, meta.attempt):
                raise AlreadyExists(
                    f"container {meta.name} attempt {meta.attempt} already exists in pod "
                    f"{pod.id} as {other.id}; remove it first"
                )
        if config.linux.security_context.privileged and pod.runtime_handler != HOST_HANDLER:
            raise InvalidArgument(
                "privileged containers cannot run in a pod VM: mark the pod privileged "
                "(or use the host runtime handler)"
            )
        sec = config.linux.security_context
        if sec.HasField("run_as_group") and not (
            sec.HasField("run_as_user") or sec.run_as_username
        ):
            raise InvalidArgument("run_as_group needs run_as_user or run_as_username")
        record = self.images.get(config.image.image)
        if record is None:
            raise NotFound(f"image {config.image.image} is not present: pull it first")
        sandbox = self.running_sandbox(pod.id)
        pod_cfg = pod.pod_config() if pod_config is None else pod_config
        try:
            image = await self.images.rootfs_image(record.id)
            ctx = config.linux.security_context
            if ctx.HasField("run_as_user") or ctx.run_as_username:
                user_spec = (
                    str(ctx.run_as_user.value)
                    if ctx.HasField("run_as_user")
                    else ctx.run_as_username
                )
                if ctx.HasField("run_as_group"):
                    user_spec += f":{ctx.run_as_group.value}"
                user = await self.images.resolve_user(record.id, user_spec)
            else:
                user = await self.images.resolve_user(record.id)
        except ImageError as exc:
            raise FailedPrecondition(f"image {config.image.image}: {exc}") from exc
        # Merge (the default) adds the groups the image's /etc/group gives the user;
        # Strict keeps only the pod's supplemental groups
        image_gids = (
            [] if ctx.supplemental_groups_policy == api_pb2.Strict else user.additional_gids
        )
        gids = list(image_gids) + [g for g in ctx.supplemental_groups if g not in image_gids]
        spec = convert.container_spec(
            pod=pod_cfg,
            config=config,
            image=record.config,
            uid=user.uid,
            gid=user.gid,
            additional_gids=gids,
        )
        cid = secrets.token_hex(32)
        log_path = ""
        if pod_cfg.log_directory and config.log_path:
            log_path = str(Path(pod_cfg.log_directory) / config.log_path)
        volume_keys = share_keys(cid, len(config.mounts))
        try:
            for key, mount in zip(volume_keys, config.mounts, strict=True):
                spec.mounts.append(await self._guest_mount(sandbox, key, mount, spec))
            created = await sandbox.create_container(cid, spec, image)
        except CodedError as exc:
            await self._drop_volumes(sandbox, volume_keys)
            if isinstance(exc, CriError):  # a mount refused, already saying which
                raise
            raise in_context(exc, f"create container {meta.name}") from exc
        repo_digests = record.repo_digests
        ctr = ContainerRecord(
            id=cid,
            pod_id=pod.id,
            name=meta.name,
            attempt=meta.attempt,
            created_at_ns=time.time_ns(),
            config=encode_proto(config),
            image=config.image.image,
            image_id=record.id,
            image_ref=repo_digests[0] if repo_digests else record.id,
            log_path=log_path,
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            user_uid=user.uid,
            user_gid=user.gid,
            user_gids=gids,
            resources=encode_proto(config.linux.resources)
            if config.linux.HasField("resources")
            else "",
            stop_signal=record.config.stop_signal,
        )
        try:
            self.state.save_container(ctr)
        except BaseException:
            with contextlib.suppress(CodedError):
                await sandbox.delete_container(cid, force=True)
            await self._drop_volumes(sandbox, volume_keys)
            raise
        self._open_io(ctr, sandbox)
        if self.metrics is not None:
            self.metrics.container_phases(created.timings)
        log.info(
            "pod=%s container=%s name=%s created %s",
            pod.id[:12],
            cid[:12],
            meta.name,
            _phases(created.timings),
        )
        self.publish(api_pb2.CONTAINER_CREATED_EVENT, cid, pod)
        return cid

    async def _guest_mount(
        self, sandbox: Sandbox, key: str, mount: api_pb2.Mount, spec: ContainerSpec
    ) -> Mount:
        """The agent's mount for a CRI mount. A host path is the host's own file or
        directory, as the pod's sandbox mounts it (``host_path_mount``)."""
        if not mount.container_path:
            raise InvalidArgument("a mount has no container_path")
        if mount.image.image:
            return await self._image_volume(sandbox, mount)
        options = ["rbind", "ro" if mount.readonly else "rw"]
        if mount.recursive_read_only:
            if not mount.readonly:
                raise InvalidArgument(
                    f"mount {mount.container_path}: recursive_read_only needs readonly"
                )
            if mount.propagation != api_pb2.PROPAGATION_PRIVATE:
                raise InvalidArgument(
                    f"mount {mount.container_path}: recursive_read_only needs private "
                    "propagation (a read-only tree cannot take mounts from the host)"
                )
            options.append("rro")
        if not mount.host_path:
            raise InvalidArgument(f"mount {mount.container_path} has no host_path")
        host_path = Path(mount.host_path)
        if not host_path.exists():
            # as other runtimes do: a missing bind source is created as a directory
            await asyncio.to_thread(host_path.mkdir, parents=True, exist_ok=True)
        propagation = PROPAGATION.get(mount.propagation, "rprivate")
        watch = mount.readonly and await asyncio.to_thread(is_atomic_volume, host_path)
        try:
            return await sandbox.host_path_mount(
                HostPathMount(
                    key=key,
                    destination=mount.container_path,
                    host_path=host_path,
                    readonly=mount.readonly,
                    propagation=propagation,
                    options=options,
                    id_mappings=(
                        (spec.uid_mappings, spec.gid_mappings) if spec.uid_mappings else None
                    ),
                    watch=watch,
                )
            )
        except SandboxError as exc:
            raise in_context(exc, f"mount {mount.container_path}") from exc

    async def _image_volume(self, sandbox: Sandbox, mount: api_pb2.Mount) -> Mount:
        """An image (or a directory of it) mounted read-only: the image's shared erofs
        file, attached to the pod as for a container rootfs, bound into the container."""
        target = mount.container_path
        if not mount.readonly:
            raise InvalidArgument(f"image volume {target} must be readonly")
        if mount.host_path:
            raise InvalidArgument(f"mount {target} names both an image and a host_path")
        sub = mount.image_sub_path.strip("/")
        parts = sub.split("/") if sub else []
        if any(part in ("", ".", "..") for part in parts):
            raise InvalidArgument(
                f"image volume {target}: sub path {mount.image_sub_path!r} must be a relative "
                "path inside the image without '.' or '..'"
            )
        record = self.images.get(mount.image.image)
        if record is None:
            raise NotFound(f"image volume {target}: image {mount.image.image} is not present")
        try:
            image = await self.images.rootfs_image(record.id)
        except ImageError as exc:
            raise FailedPrecondition(f"image volume {target}: {exc}") from exc
        try:
            base = await sandbox.attach_image(image)
        except CodedError as exc:
            raise in_context(exc, f"attach image volume {target}") from exc
        # ContainerStatus reports the image id the volume resolved to
        mount.image.CopyFrom(convert.image_spec_with_ref(mount.image, record.id))
        source = f"{base}/{sub}" if sub else base
        # the agent refuses a source that does not exist (a sub path not in the image)
        return Mount(destination=target, source=source, options=["rbind", "ro", "nodev"])

    async def _drop_volumes(self, sandbox: Sandbox, keys: list[str]) -> None:
        try:
            await sandbox.unshare_host_paths(keys)
        except SandboxError as exc:
            log.warning("pod=%s: %s", sandbox.id[:12], exc)

    def _open_io(self, ctr: ContainerRecord, sandbox: Sandbox) -> ContainerIO:
        io = self.io.get(ctr.id)
        if io is not None:
            return io
        try:
            container_log = ContainerLog(Path(ctr.log_path) if ctr.log_path else None)
        except OSError as exc:
            log.warning("container=%s cannot open log %s: %s", ctr.id[:12], ctr.log_path, exc)
            container_log = ContainerLog(None)
        io = ContainerIO(log=container_log)
        self.io[ctr.id] = io
        try:
            io.output = sandbox.subscribe_output(ctr.id)
        except CodedError as exc:
            log.warning("container=%s no output stream: %s", ctr.id[:12], exc)
            return io
        io.pump = self.spawn(self._pump(ctr.id, io), f"pump-{ctr.id[:12]}")
        return io

    async def _pump(self, cid: str, io: ContainerIO) -> None:
        assert io.output is not None
        try:
            async for channel, data in io.output:
                io.log.write("stderr" if channel == 2 else "stdout", data)
                io.fan_out((channel, data))
        finally:
            io.log.flush()
            io.fan_out(None)

    async def start_container(self, container_id: str) -> None:
        ctr = self.get_container(container_id)
        if ctr.state != CREATED:
            raise FailedPrecondition(
                f"container {ctr.id} is {api_pb2.ContainerState.Name(ctr.state)}, not CREATED"
            )
        sandbox = self.running_sandbox(ctr.pod_id)
        started = time.monotonic()
        self._open_io(ctr, sandbox)
        try:
            started_info = await sandbox.start_container(ctr.id)
        except CodedError as exc:
            self._mark_failed_start(ctr, str(exc))
            raise in_context(exc, f"start container {ctr.name}") from exc
        ctr.state = RUNNING
        ctr.started_at_ns = time.time_ns()
        self.state.save_container(ctr)
        self._watch_exit(ctr, sandbox)
        if self.metrics is not None:
            self.metrics.container_started(ctr.pod_id, time.monotonic() - started)
            self.metrics.container_phases(started_info.timings)
        log.info("container=%s started %s", ctr.id[:12], _phases(started_info.timings))
        self.publish(api_pb2.CONTAINER_STARTED_EVENT, ctr.id, self.state.pods.get(ctr.pod_id))

    def _mark_failed_start(self, ctr: ContainerRecord, message: str) -> None:
        now = time.time_ns()
        ctr.state = EXITED
        ctr.started_at_ns = ctr.started_at_ns or now
        ctr.finished_at_ns = now
        ctr.exit_code = 128
        ctr.reason = "StartError"
        ctr.message = message
        self.state.save_container(ctr)

    def _watch_exit(self, ctr: ContainerRecord, sandbox: Sandbox) -> None:
        io = self.io.get(ctr.id)
        task = self.spawn(self._wait_exit(ctr.id, sandbox), f"wait-{ctr.id[:12]}")
        if io is not None:
            io.waiter = task

    async def _wait_exit(self, cid: str, sandbox: Sandbox) -> None:
        try:
            status = await sandbox.wait_container(cid)
        except CodedError:
            return  # the VM went away: the pod's exit handler settles the container
        ctr = self.state.containers.get(cid)
        if ctr is None or ctr.state == EXITED:
            return
        reason = status.reason or ("Completed" if status.exit_code == 0 else "Error")
        self._mark_exited(ctr, status.exit_code, reason, "", status.finished_at_ns)
        if status.started_at_ns:
            ctr.started_at_ns = status.started_at_ns
            self.state.save_container(ctr)
        log.info("container=%s exited code=%d reason=%s", cid[:12], status.exit_code, reason)
        self.publish(api_pb2.CONTAINER_STOPPED_EVENT, cid, self.state.pods.get(ctr.pod_id))

    async def stop_container(self, container_id: str, timeout: int) -> None:
        ctr = self.state.find_container(container_id)
        if ctr is None:
            return  # idempotent, as CRI asks: nothing left to stop
        if ctr.state != RUNNING:
            return
        sandbox = self.sandboxes.get(ctr.pod_id)
        if sandbox is None or sandbox.state != SandboxState.READY:
            return
        config = ctr.container_config()
        sig = _signal_number(
            api_pb2.Signal.Name(config.stop_signal) if config.stop_signal else ctr.stop_signal
        )
        io = self.io.get(ctr.id)
        with contextlib.suppress(CodedError):
            if timeout > 0:
                await sandbox.signal_container(ctr.id, sig)
                try:
                    status = await sandbox.wait_container(ctr.id, timeout=timeout)
                    await self._settle(ctr, status.exit_code, status.reason, status.finished_at_ns)
                    return
                except CodedError as exc:
                    if exc.code != ErrorCode.DEADLINE_EXCEEDED:
                        raise
            await sandbox.signal_container(ctr.id, signal.SIGKILL, all_processes=True)
            status = await sandbox.wait_container(ctr.id, timeout=30)
            await self._settle(ctr, status.exit_code, status.reason, status.finished_at_ns)
        if io is not None and io.waiter is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(io.waiter), 5)

    async def _settle(self, ctr: ContainerRecord, code: int, reason: str, finished: int) -> None:
        if ctr.state == EXITED:
            return
        reason = reason or ("Completed" if code == 0 else "Error")
        self._mark_exited(ctr, code, reason, "", finished or time.time_ns())
        self.publish(api_pb2.CONTAINER_STOPPED_EVENT, ctr.id, self.state.pods.get(ctr.pod_id))

    async def remove_container(self, container_id: str) -> None:
        ctr = self.state.find_container(container_id)
        if ctr is None:
            return
        sandbox = self.sandboxes.get(ctr.pod_id)
        if sandbox is not None and sandbox.state == SandboxState.READY:
            try:
                await sandbox.delete_container(ctr.id, force=True)
            except CodedError as exc:
                if exc.code != ErrorCode.NOT_FOUND:
                    log.warning("container=%s delete in guest: %s", ctr.id[:12], exc)
        if sandbox is not None:
            count = len(ctr.container_config().mounts)
            await self._drop_volumes(sandbox, share_keys(ctr.id, count))
        io = self.io.pop(ctr.id, None)
        if io is not None:
            for task in (io.pump, io.waiter):
                if task is not None:
                    task.cancel()
            io.fan_out(None)
            io.log.close()
        self.state.delete_container(ctr.id)
        log.info("container=%s removed", ctr.id[:12])
        self.publish(api_pb2.CONTAINER_DELETED_EVENT, ctr.id, self.state.pods.get(ctr.pod_id))

    def container_status_message(self, ctr: ContainerRecord) -> api_pb2.ContainerStatus:
        config = ctr.container_config()
        status = api_pb2.ContainerStatus(
            id=ctr.id,
            metadata=ctr.metadata(),
            state=ctr.state,  # type: ignore[arg-type]
            created_at=ctr.created_at_ns,
            started_at=ctr.started_at_ns,
            finished_at=ctr.finished_at_ns,
            exit_code=ctr.exit_code,
            image=api_pb2.ImageSpec(image=ctr.image, user_specified_image=ctr.image),
            image_ref=ctr.image_ref,
            image_id=ctr.image_id,
            reason=ctr.reason,
            message=ctr.message,
            labels=ctr.labels,
            annotations=ctr.annotations,
            log_path=ctr.log_path,
        )
        for mount in config.mounts:
            status.mounts.append(mount)
        if ctr.resources:
            res = api_pb2.LinuxContainerResources()
            res.ParseFromString(base64.b64decode(ctr.resources))
            status.resources.linux.CopyFrom(res)
        status.user.linux.uid = ctr.user_uid
        status.user.linux.gid = ctr.user_gid
        # the process's groups, as the kernel reports them: the primary one included
        status.user.linux.supplemental_groups.extend(
            [ctr.user_gid] + [g for g in ctr.user_gids if g != ctr.user_gid]
        )
        return status

    def container_status(self, container_id: str, verbose: bool) -> api_pb2.ContainerStatusResponse:
        ctr = self.get_container(container_id)
        response = api_pb2.ContainerStatusResponse(status=self.container_status_message(ctr))
        if verbose:
            response.info["info"] = json.dumps(
                {"sandboxID": ctr.pod_id, "imageID": ctr.image_id, "logPath": ctr.log_path}
            )
        return response

    def list_containers(self, flt: api_pb2.ContainerFilter | None) -> list[api_pb2.Container]:
        out = []
        for ctr in self.state.containers.values():
            if flt is not None:
                if not container_matches(ctr, flt.id, flt.pod_sandbox_id, flt.label_selector):
                    continue
                if flt.HasField("state") and ctr.state != flt.state.state:
                    continue
            out.append(
                api_pb2.Container(
                    id=ctr.id,
                    pod_sandbox_id=ctr.pod_id,
                    metadata=ctr.metadata(),
                    image=api_pb2.ImageSpec(image=ctr.image),
                    image_ref=ctr.image_ref,
                    image_id=ctr.image_id,
                    state=ctr.state,  # type: ignore[arg-type]
                    created_at=ctr.created_at_ns,
                    labels=ctr.labels,
                    annotations=ctr.annotations,
                )
            )
        return out

    async def update_resources(
        self, container_id: str, resources: api_pb2.LinuxContainerResources
    ) -> None:
        ctr = self.get_container(container_id)
        problem = convert.check_resources(resources)
        if problem:
            raise InvalidArgument(f"container {ctr.name}: {problem}")
        if ctr.state not in (CREATED, RUNNING):
            raise FailedPrecondition(f"container {ctr.id} has exited; nothing to update")
        sandbox = self.running_sandbox(ctr.pod_id)
        values = convert.cgroup_values(resources)
        if not values.empty:
            try:
                await sandbox.update_container(ctr.id, values)
            except CodedError as exc:
                raise in_context(exc, f"update resources of {ctr.name}") from exc
        ctr.resources = encode_proto(resources)
        self.state.save_container(ctr)

    def reopen_log(self, container_id: str) -> None:
        ctr = self.get_container(container_id)
        if ctr.state != RUNNING:
            raise FailedPrecondition(f"container {ctr.id} is not running; its log is closed")
        io = self.io.get(ctr.id)
        if io is None:
            raise FailedPrecondition(f"container {ctr.id} has no open log")
        try:
            io.log.reopen()
        except OSError as exc:
            raise FailedPrecondition(f"cannot reopen {ctr.log_path}: {exc}") from exc

    async def exec_sync(
        self, container_id: str, cmd: list[str], timeout: int
    ) -> api_pb2.ExecSyncResponse:
        ctr = self.get_container(container_id)
        if not cmd:
            raise InvalidArgument("exec needs a command")
        if ctr.state != RUNNING:
            raise FailedPrecondition(f"container {ctr.id} is not running")
        sandbox = self.running_sandbox(ctr.pod_id)
        try:
            result = await sandbox.exec_sync(
                ctr.id,
                cmd,
                timeout=float(timeout) if timeout > 0 else None,
                max_output=EXEC_OUTPUT_LIMIT,
            )
        except CodedError as exc:
            raise in_context(exc, f"exec in {ctr.name}") from exc
        if result.timed_out:
            raise DeadlineExceeded(
                f"command {cmd!r} did not finish within {timeout} s and was killed"
            )
        return api_pb2.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    # streaming backend hooks ----------------------------------------------------

    async def streaming_container_source(self, container_id: str) -> Sandbox:
        ctr = self.get_container(container_id)
        if ctr.state != RUNNING:
            raise BackendError(f"container {ctr.id} is not running")
        try:
            return self.running_sandbox(ctr.pod_id)
        except CodedError as exc:
            raise BackendError(str(exc)) from exc

    async def streaming_pod_source(self, sandbox_id: str) -> Sandbox:
        try:
            return self.running_sandbox(self.get_pod(sandbox_id).id)
        except CodedError as exc:
            raise BackendError(str(exc)) from exc

    def attach_source(
        self, container_id: str
    ) -> tuple[AsyncIterable[tuple[int, bytes]], Callable[[], None]] | None:
        """The container's live output for one attach session (the log keeps its own)."""
        io = self.io.get(container_id)
        if io is None:
            return None
        queue = io.subscribe()
        return queue_chunks(queue), lambda: io.unsubscribe(queue)

    async def recover_containers(self, pod: PodRecord, sandbox: Sandbox) -> None:
        try:
            infos = {info.id: info for info in await sandbox.list_containers()}
        except CodedError as exc:
            log.warning("pod=%s cannot list containers: %s", pod.id[:12], exc)
            return
        now = time.time_ns()
        for ctr in self.state.pod_containers(pod.id):
            info = infos.get(ctr.id)
            if info is None:
                if ctr.state != EXITED:
                    self._mark_exited(ctr, 255, "Error", "lost while the daemon was down", now)
                continue
            if info.state == "exited" and info.exit_status is not None:
                status = info.exit_status
                if ctr.state != EXITED:
                    self._mark_exited(
                        ctr,
                        status.exit_code,
                        status.reason or "Error",
                        "",
                        status.finished_at_ns or now,
                    )
                continue
            self._open_io(ctr, sandbox)
            if info.state == "running":
                if ctr.state != RUNNING:
                    ctr.state = RUNNING
                    ctr.started_at_ns = ctr.started_at_ns or now
                    self.state.save_container(ctr)
                self._watch_exit(ctr, sandbox)


def _phases(timings: dict[str, float]) -> str:
    """``step=0.123s ...`` for a log line."""
    return " ".join(f"{step}={seconds:.3f}s" for step, seconds in timings.items())
