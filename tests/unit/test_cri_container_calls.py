"""CreateContainer, StartContainer, StopContainer and RemoveContainer through the real
CRI servicer and runtime, against fake sandboxes and a fake image store: the error paths
that otherwise need a VM to fail, in milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from agent.client import AgentError
from cri.images.manifest import ImageConfig
from cri.images.users import ImageUser
from cri.runtime.service import Runtime, RuntimeService
from cri.runtime.state import CREATED, EXITED, RUNNING
from sandbox.api import SandboxExhausted, SandboxRefused, SandboxState
from tests.unit.test_cri_pod_calls import Aborted, Context, FakeProvider, FakeSandbox, _service

IMAGE_ID = "sha256:" + "1" * 64


class FakeImages:
    """One image, busybox, present; its rootfs file an attachable record."""

    root = Path("/nonexistent")

    def get(self, ref: str) -> Any:
        if ref not in ("busybox", IMAGE_ID):
            return None
        return SimpleNamespace(
            id=IMAGE_ID, config=ImageConfig(cmd=("sh",)), repo_digests=(), repo_tags=("busybox",)
        )

    async def rootfs_image(self, image_id: str) -> Any:
        return SimpleNamespace(image_id="img-busybox", path=Path("/busybox.erofs"), size=4096)

    async def resolve_user(self, image_id: str, user: str | None = None) -> ImageUser:
        return ImageUser(uid=0, gid=0)


Scenario = Callable[[RuntimeService, Runtime, FakeSandbox, str], Awaitable[None]]


class PhaseSink:
    """A metrics sink that keeps the container phases it is given."""

    def __init__(self, phases: list[dict[str, float]]) -> None:
        self.phases = phases

    def sandbox_started(self, pod_id: str, boot: Any, seconds: float) -> None:
        pass

    def container_started(self, pod_id: str, seconds: float) -> None:
        pass

    def container_phases(self, timings: Mapping[str, float]) -> None:
        self.phases.append(dict(timings))

    def vm_crashed(self, reason: str) -> None:
        pass


def run(
    tmp_path: Path, scenario: Scenario, phases: list[dict[str, float]] | None = None
) -> FakeSandbox:
    """Start a pod on a fake sandbox, then play ``scenario`` in the same event loop."""
    provider = FakeProvider()
    service, runtime = _service(tmp_path, provider)
    runtime.images = FakeImages()  # type: ignore[assignment]
    runtime.metrics = PhaseSink(phases if phases is not None else [])

    async def play() -> None:
        pod = api_pb2.RunPodSandboxRequest(
            config=api_pb2.PodSandboxConfig(
                metadata=api_pb2.PodSandboxMetadata(name="web", namespace="default", uid="u")
            )
        )
        pod_id = (await service.RunPodSandbox(pod, Context())).pod_sandbox_id
        await scenario(service, runtime, provider.made[0], pod_id)
        for task in list(runtime.background):
            task.cancel()

    asyncio.run(play())
    return provider.made[0]


def create_request(pod_id: str, *mounts: api_pb2.Mount) -> api_pb2.CreateContainerRequest:
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id,
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="main"),
            image=api_pb2.ImageSpec(image="busybox"),
            mounts=list(mounts),
        ),
    )


async def call(service: RuntimeService, name: str, request: Any) -> Any:
    return await getattr(service, name)(request, Context())


async def refused(service: RuntimeService, name: str, request: Any) -> Aborted:
    with pytest.raises(Aborted) as caught:
        await call(service, name, request)
    return caught.value


def test_a_container_is_made_started_stopped_and_removed(tmp_path: Path) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        cid = (await call(service, "CreateContainer", create_request(pod_id))).container_id
        assert runtime.state.containers[cid].state == CREATED
        await call(service, "StartContainer", api_pb2.StartContainerRequest(container_id=cid))
        assert runtime.state.containers[cid].state == RUNNING
        stop = api_pb2.StopContainerRequest(container_id=cid, timeout=5)
        await call(service, "StopContainer", stop)
        assert runtime.state.containers[cid].state == EXITED
        await call(service, "StopContainer", stop)  # idempotent
        remove = api_pb2.RemoveContainerRequest(container_id=cid)
        await call(service, "RemoveContainer", remove)
        await call(service, "RemoveContainer", remove)  # idempotent
        assert runtime.state.containers == {}

    phases: list[dict[str, float]] = []
    sandbox = run(tmp_path, scenario, phases)
    # each call's steps reach the metrics
    assert phases == [{"image_attach": 0.25, "crun_create": 0.5}, {"crun_start": 0.125}]
    assert sandbox.calls[1:] == [
        "create_container img-busybox",
        "start_container",
        "signal_container 15",
        "delete_container",
        "unshare_host_paths 0",
    ]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        # a per-VM resource used up: kubelet backs off, it is not the request's fault
        (SandboxExhausted("all 4 image slots are used"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        # crun failed in the guest: the pod broke, kubelet retries
        (AgentError("crun create: exit 1"), grpc.StatusCode.UNAVAILABLE),
        (AgentError("no such image mount", code="FAILED_PRECONDITION"),
         grpc.StatusCode.FAILED_PRECONDITION),
    ],
)  # fmt: skip
def test_a_container_the_sandbox_cannot_make_leaves_nothing(
    tmp_path: Path, error: Exception, code: grpc.StatusCode
) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        sandbox.fail["create_container"] = error
        volume = api_pb2.Mount(container_path="/data", host_path=str(tmp_path))
        answer = await refused(service, "CreateContainer", create_request(pod_id, volume))
        assert answer.code == code
        assert "create container main" in answer.message and str(error) in answer.message
        assert runtime.state.containers == {}

    sandbox = run(tmp_path, scenario)
    # the volume the sandbox made for it is dropped again
    assert sandbox.calls[-2:] == ["create_container img-busybox", "unshare_host_paths 1"]


def test_a_mount_the_sandbox_refuses_is_invalid_argument(tmp_path: Path) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        sandbox.fail["host_path_mount"] = SandboxRefused("Bidirectional cannot work in a VM")
        volume = api_pb2.Mount(
            container_path="/data",
            host_path=str(tmp_path),
            propagation=api_pb2.PROPAGATION_BIDIRECTIONAL,
        )
        answer = await refused(service, "CreateContainer", create_request(pod_id, volume))
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
        assert answer.message.startswith("mount /data: ")
        assert runtime.state.containers == {}

    sandbox = run(tmp_path, scenario)
    assert not any(c.startswith("create_container") for c in sandbox.calls)


def test_a_container_that_fails_to_start_is_exited_with_why(tmp_path: Path) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        cid = (await call(service, "CreateContainer", create_request(pod_id))).container_id
        sandbox.fail["start_container"] = AgentError("exec: no such file", code="NOT_FOUND")
        start = api_pb2.StartContainerRequest(container_id=cid)
        answer = await refused(service, "StartContainer", start)
        assert answer.code == grpc.StatusCode.NOT_FOUND
        ctr = runtime.state.containers[cid]
        assert (ctr.state, ctr.reason, ctr.exit_code) == (EXITED, "StartError", 128)
        assert "no such file" in ctr.message
        # it cannot be started again, and says so
        again = await refused(service, "StartContainer", start)
        assert again.code == grpc.StatusCode.FAILED_PRECONDITION

    run(tmp_path, scenario)


def test_a_container_that_ignores_its_stop_signal_is_killed(tmp_path: Path) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        sandbox.ignores_sigterm = True
        cid = (await call(service, "CreateContainer", create_request(pod_id))).container_id
        await call(service, "StartContainer", api_pb2.StartContainerRequest(container_id=cid))
        stop = api_pb2.StopContainerRequest(container_id=cid, timeout=1)
        await call(service, "StopContainer", stop)
        ctr = runtime.state.containers[cid]
        assert (ctr.state, ctr.exit_code) == (EXITED, 137)

    sandbox = run(tmp_path, scenario)
    assert sandbox.calls[-2:] == ["signal_container 15", "signal_container 9"]


def test_a_container_gone_from_the_guest_is_still_removed(tmp_path: Path) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        cid = (await call(service, "CreateContainer", create_request(pod_id))).container_id
        sandbox.fail["delete_container"] = AgentError("no container", code="NOT_FOUND")
        await call(service, "RemoveContainer", api_pb2.RemoveContainerRequest(container_id=cid))
        assert runtime.state.containers == {}

    run(tmp_path, scenario)


def test_container_calls_on_a_pod_whose_vm_went_away_need_no_vm(tmp_path: Path) -> None:
    async def scenario(
        service: RuntimeService, runtime: Runtime, sandbox: FakeSandbox, pod_id: str
    ) -> None:
        cid = (await call(service, "CreateContainer", create_request(pod_id))).container_id
        sandbox.state = SandboxState.DEAD
        start = api_pb2.StartContainerRequest(container_id=cid)
        answer = await refused(service, "StartContainer", start)
        assert answer.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "not ready" in answer.message
        # stopping and removing need nothing from it
        stop = api_pb2.StopContainerRequest(container_id=cid, timeout=1)
        await call(service, "StopContainer", stop)
        await call(service, "RemoveContainer", api_pb2.RemoveContainerRequest(container_id=cid))
        assert runtime.state.containers == {}

    sandbox = run(tmp_path, scenario)
    assert sandbox.calls[-1] == "unshare_host_paths 0"
    assert "start_container" not in sandbox.calls
