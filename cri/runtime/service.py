"""The CRI RuntimeService over grpc.aio: requests in, domain calls, errors as gRPC codes."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from agent.errors import AgentError
from cri.metrics import list_pod_sandbox_metrics, metric_descriptors
from cri.runtime.containers import ContainerOps
from cri.runtime.errors import CriError, InvalidArgument, Unimplemented, status_for
from cri.runtime.pods import PodOps
from cri.runtime.stats import StatsOps
from cri.streaming.errors import StreamingError
from sandbox.handlers import HOST_HANDLER, VM_HANDLER
from sandbox.network import NetworkError
from sandbox.pod import SandboxError

log = logging.getLogger("clearcri.cri")

RUNTIME_NAME = "clearcri"
RUNTIME_VERSION = "0.1.0"
CRI_VERSION = "v1"

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


class Runtime(PodOps, ContainerOps, StatsOps):
    """The whole runtime: pods, containers, exec, stats, events."""


def cri_call(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Run a servicer method; turn domain errors into gRPC status codes, log the call."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except (CriError, StreamingError) as exc:
            code = exc.code
            await context.abort(exc.code, str(exc))
        except (SandboxError, AgentError) as exc:
            # what no call site translated: the error's own code says why
            code = status_for(exc.code)
            await context.abort(code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly: {exc}"
            )
        finally:
            observer = getattr(self, "observe", None)
            if observer is not None:
                observer(method.__name__, code.name, time.perf_counter() - started)
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, runtime: Runtime, streaming: Any = None) -> None:
        self.runtime = runtime
        self.streaming = streaming
        self.observe: Callable[[str, str, float], None] | None = None
        self.network_ready: Callable[[], tuple[bool, str]] = self._network_ready

    def _network_ready(self) -> tuple[bool, str]:
        status = self.runtime.host.network.status()
        return status.ready, status.message

    @cri_call
    async def Version(
        self, request: api_pb2.VersionRequest, context: Context
    ) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=RUNTIME_VERSION,
            runtime_api_version=CRI_VERSION,
        )

    @cri_call
    async def Status(
        self, request: api_pb2.StatusRequest, context: Context
    ) -> api_pb2.StatusResponse:
        net_ok, net_reason = self.network_ready()
        runtime_cond = api_pb2.RuntimeCondition(type="RuntimeReady", status=True)
        net_cond = api_pb2.RuntimeCondition(
            type="NetworkReady",
            status=net_ok,
            reason="" if net_ok else "NetworkPluginNotReady",
            message=net_reason,
        )
        response = api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=[runtime_cond, net_cond])
        )
        # crun makes "rro" binds read-only with every submount and creates pod user
        # namespaces (mode POD), in the VM and on the host
        names = ["", VM_HANDLER] + ([HOST_HANDLER] if self.runtime.config.daemon.host_pods else [])
        for name in names:
            features = response.runtime_handlers.add(name=name).features
            features.recursive_read_only_mounts = True
            features.user_namespaces = True
        response.features.supplemental_groups_policy = True
        if request.verbose:
            host = self.runtime.host
            response.info["accelerator"] = f"{host.accel} ({host.accel_reason})"
            response.info["guest"] = host.assets.version
        return response

    @cri_call
    async def RuntimeConfig(
        self, request: api_pb2.RuntimeConfigRequest, context: Context
    ) -> api_pb2.RuntimeConfigResponse:
        driver = (
            api_pb2.SYSTEMD
            if self.runtime.config.daemon.cgroup_driver == "systemd"
            else api_pb2.CGROUPFS
        )
        return api_pb2.RuntimeConfigResponse(
            linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver)
        )

    @cri_call
    async def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest, context: Context
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr:
            try:
                self.runtime.host.network.update_pod_cidr(cidr)
            except NetworkError as exc:
                raise InvalidArgument(str(exc)) from exc
            self.runtime.pod_cidr = cidr
        return api_pb2.UpdateRuntimeConfigResponse()

    @cri_call
    async def RunPodSandbox(
        self, request: api_pb2.RunPodSandboxRequest, context: Context
    ) -> api_pb2.RunPodSandboxResponse:
        if not request.HasField("config"):
            raise InvalidArgument("RunPodSandbox needs a config")
        pod_id = await self.runtime.run_pod_sandbox(request.config, request.runtime_handler)
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)

    @cri_call
    async def StopPodSandbox(
        self, request: api_pb2.StopPodSandboxRequest, context: Context
    ) -> api_pb2.StopPodSandboxResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is empty")
        await self.runtime.stop_pod_sandbox(request.pod_sandbox_id)
        return api_pb2.StopPodSandboxResponse()

    @cri_call
    async def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest, context: Context
    ) -> api_pb2.RemovePodSandboxResponse:
        if not request.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id is empty")
        await self.runtime.remove_pod_sandbox(request.pod_sandbox_id)
        return api_pb2.RemovePodSandboxResponse()

    @cri_call
    async def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest, context: Context
    ) -> api_pb2.PodSandboxStatusResponse:
        return self.runtime.pod_status(request.pod_sandbox_id, request.verbose)

    @cri_call
    async def ListPodSandbox(
        self, request: api_pb2.ListPodSandboxRequest, context: Context
    ) -> api_pb2.ListPodSandboxResponse:
        flt = request.filter if request.HasField("filter") else None
        return api_pb2.ListPodSandboxResponse(items=self.runtime.list_pods(flt))

    @cri_call
    async def CreateContainer(
        self, request: api_pb2.CreateContainerRequest, context: Context
    ) -> api_pb2.CreateContainerResponse:
        if not request.HasField("config"):
            raise InvalidArgument("CreateContainer needs a config")
        pod_config = request.sandbox_config if request.HasField("sandbox_config") else None
        cid = await self.runtime.create_container(
            request.pod_sandbox_id, request.config, pod_config
        )
        return api_pb2.CreateContainerResponse(container_id=cid)

    @cri_call
    async def StartContainer(
        self, request: api_pb2.StartContainerRequest, context: Context
    ) -> api_pb2.StartContainerResponse:
        await self.runtime.start_container(request.container_id)
        return api_pb2.StartContainerResponse()

    @cri_call
    async def StopContainer(
        self, request: api_pb2.StopContainerRequest, context: Context
    ) -> api_pb2.StopContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id is empty")
        await self.runtime.stop_container(request.container_id, request.timeout)
        return api_pb2.StopContainerResponse()

    @cri_call
    async def RemoveContainer(
        self, request: api_pb2.RemoveContainerRequest, context: Context
    ) -> api_pb2.RemoveContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id is empty")
        await self.runtime.remove_container(request.container_id)
        return api_pb2.RemoveContainerResponse()

    @cri_call
    async def ListContainers(
        self, request: api_pb2.ListContainersRequest, context: Context
    ) -> api_pb2.ListContainersResponse:
        flt = request.filter if request.HasField("filter") else None
        return api_pb2.ListContainersResponse(containers=self.runtime.list_containers(flt))

    @cri_call
    async def ContainerStatus(
        self, request: api_pb2.ContainerStatusRequest, context: Context
    ) -> api_pb2.ContainerStatusResponse:
        return self.runtime.container_status(request.container_id, request.verbose)

    @cri_call
    async def UpdateContainerResources(
        self, request: api_pb2.UpdateContainerResourcesRequest, context: Context
    ) -> api_pb2.UpdateContainerResourcesResponse:
        await self.runtime.update_resources(request.container_id, request.linux)
        return api_pb2.UpdateContainerResourcesResponse()

    @cri_call
    async def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest, context: Context
    ) -> api_pb2.ReopenContainerLogResponse:
        self.runtime.reopen_log(request.container_id)
        return api_pb2.ReopenContainerLogResponse()

    @cri_call
    async def ExecSync(
        self, request: api_pb2.ExecSyncRequest, context: Context
    ) -> api_pb2.ExecSyncResponse:
        return await self.runtime.exec_sync(
            request.container_id, list(request.cmd), request.timeout
        )

    def _streaming(self) -> Any:
        if self.streaming is None:
            raise Unimplemented("the streaming server is not enabled in this daemon")
        return self.streaming

    @cri_call
    async def Exec(self, request: api_pb2.ExecRequest, context: Context) -> api_pb2.ExecResponse:
        ctr = self.runtime.get_container(request.container_id)
        if ctr.state != api_pb2.CONTAINER_RUNNING:
            raise InvalidArgument(f"container {ctr.id} is not running")
        request.container_id = ctr.id
        try:
            url = self._streaming().url_for_exec(request)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        return api_pb2.ExecResponse(url=url)

    @cri_call
    async def Attach(
        self, request: api_pb2.AttachRequest, context: Context
    ) -> api_pb2.AttachResponse:
        ctr = self.runtime.get_container(request.container_id)
        if ctr.state != api_pb2.CONTAINER_RUNNING:
            raise InvalidArgument(f"container {ctr.id} is not running")
        request.container_id = ctr.id
        try:
            url = self._streaming().url_for_attach(request)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        return api_pb2.AttachResponse(url=url)

    @cri_call
    async def PortForward(
        self, request: api_pb2.PortForwardRequest, context: Context
    ) -> api_pb2.PortForwardResponse:
        pod = self.runtime.get_pod(request.pod_sandbox_id)
        self.runtime.running_sandbox(pod.id)
        request.pod_sandbox_id = pod.id
        try:
            url = self._streaming().url_for_port_forward(request)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        return api_pb2.PortForwardResponse(url=url)

    @cri_call
    async def ContainerStats(
        self, request: api_pb2.ContainerStatsRequest, context: Context
    ) -> api_pb2.ContainerStatsResponse:
        return api_pb2.ContainerStatsResponse(
            stats=await self.runtime.container_stats(request.container_id)
        )

    @cri_call
    async def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest, context: Context
    ) -> api_pb2.ListContainerStatsResponse:
        flt = request.filter if request.HasField("filter") else None
        return api_pb2.ListContainerStatsResponse(
            stats=await self.runtime.list_container_stats(flt)
        )

    @cri_call
    async def PodSandboxStats(
        self, request: api_pb2.PodSandboxStatsRequest, context: Context
    ) -> api_pb2.PodSandboxStatsResponse:
        return api_pb2.PodSandboxStatsResponse(
            stats=await self.runtime.pod_stats(request.pod_sandbox_id)
        )

    @cri_call
    async def ListPodSandboxStats(
        self, request: api_pb2.ListPodSandboxStatsRequest, context: Context
    ) -> api_pb2.ListPodSandboxStatsResponse:
        flt = request.filter if request.HasField("filter") else None
        return api_pb2.ListPodSandboxStatsResponse(stats=await self.runtime.list_pod_stats(flt))

    async def GetContainerEvents(
        self, request: api_pb2.GetEventsRequest, context: Context
    ) -> AsyncIterator[api_pb2.ContainerEventResponse]:
        async for event in self.runtime.events.subscribe():
            yield event

    @cri_call
    async def ListMetricDescriptors(
        self, request: api_pb2.ListMetricDescriptorsRequest, context: Context
    ) -> api_pb2.ListMetricDescriptorsResponse:
        return api_pb2.ListMetricDescriptorsResponse(descriptors=metric_descriptors())

    @cri_call
    async def ListPodSandboxMetrics(
        self, request: api_pb2.ListPodSandboxMetricsRequest, context: Context
    ) -> api_pb2.ListPodSandboxMetricsResponse:
        return api_pb2.ListPodSandboxMetricsResponse(
            pod_metrics=await list_pod_sandbox_metrics(self.runtime)
        )

    @cri_call
    async def CheckpointContainer(
        self, request: api_pb2.CheckpointContainerRequest, context: Context
    ) -> api_pb2.CheckpointContainerResponse:
        raise Unimplemented(
            "CheckpointContainer is not supported: pod VMs cannot be checkpointed per "
            "container by this runtime"
        )

    @cri_call
    async def UpdatePodSandboxResources(
        self, request: api_pb2.UpdatePodSandboxResourcesRequest, context: Context
    ) -> api_pb2.UpdatePodSandboxResourcesResponse:
        self.runtime.get_pod(request.pod_sandbox_id)
        # The VM is sized at boot; QEMU 7.2 cannot resize it. Container-level limits
        # still apply through UpdateContainerResources.
        return api_pb2.UpdatePodSandboxResourcesResponse()
