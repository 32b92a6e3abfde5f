"""RunPodSandbox, StopPodSandbox, RemovePodSandbox and ExecSync through the real CRI
servicer and runtime, with fake sandboxes in place of VMs (a fake ``SandboxProvider``): the error
paths that otherwise need a VM to fail, in milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from agent.client import ExecResult
from agent.errors import AgentTimeout, AgentUnavailable
from agent.protocol import ContainerInfo, ExitStatus, Mount
from cri.config import Config
from cri.runtime.service import Runtime, RuntimeService
from cri.runtime.state import RUNNING, ContainerRecord, RuntimeState
from cri.store import Store
from sandbox.api import (
    BootTimes,
    HostPathMount,
    NetworkStatus,
    SandboxError,
    SandboxExhausted,
    SandboxNotFound,
    SandboxRefused,
    SandboxState,
    SandboxUnavailable,
)
from sandbox.network import NetworkConfig
from sandbox.node import SandboxConfig


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Context:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


class FakeOutput:
    """A container's output stream that ends at once."""

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> tuple[int, bytes]:
        raise StopAsyncIteration


class FakeSandbox:
    """What the runtime uses of a sandbox, and a record of what it was asked."""

    def __init__(
        self,
        sandbox_id: str,
        start_error: BaseException | None = None,
        destroy_errors: list[SandboxError] | None = None,
    ) -> None:
        self.id = sandbox_id
        self.destroy_errors = destroy_errors or []
        #: what exec_sync answers: a result, or an error it raises
        self.exec_answer: ExecResult | BaseException | None = None
        self.pid = 4242
        self.state = SandboxState.CREATED
        self.pod_ips: list[str] = []
        self.exit_reason = ""
        self.boot = BootTimes()
        self.start_error = start_error
        self.calls: list[str] = []
        self.exit_callbacks: list[Callable[[Any], None]] = []
        self.fail: dict[str, BaseException] = {}
        #: the container's process exits on SIGKILL only (else on any signal)
        self.ignores_sigterm = False
        self.exited = asyncio.Event()

    async def start(self) -> BootTimes:
        self.calls.append("start")
        if self.start_error is not None:
            raise self.start_error
        self.state = SandboxState.READY
        return self.boot

    async def stop(self, timeout: float | None = None) -> None:
        self.calls.append("stop")
        self.state = SandboxState.STOPPED

    async def destroy(self) -> None:
        self.calls.append("destroy")
        if self.destroy_errors:
            raise self.destroy_errors.pop(0)
        self.state = SandboxState.REMOVED

    async def close(self) -> None:
        self.calls.append("close")

    def on_exit(self, callback: Callable[[Any], None]) -> None:
        self.exit_callbacks.append(callback)

    # containers: each records its call; ``fail`` makes the named operation raise

    def _op(self, name: str, detail: str = "") -> None:
        self.calls.append(f"{name} {detail}".rstrip())
        error = self.fail.pop(name, None)
        if error is not None:
            raise error

    async def create_container(self, container_id: str, spec: Any, image: Any = None) -> Any:
        self._op("create_container", image.image_id if image is not None else "")
        return ContainerInfo(
            id=container_id,
            state="created",
            timings={"image_attach": 0.25, "crun_create": 0.5},
        )

    async def start_container(self, container_id: str) -> Any:
        self._op("start_container")
        return ContainerInfo(id=container_id, state="running", timings={"crun_start": 0.125})

    async def signal_container(
        self, container_id: str, signal: int, *, all_processes: bool = False, **_: Any
    ) -> None:
        self._op("signal_container", str(signal))
        if signal == 9 or not self.ignores_sigterm:
            self.exited.set()

    async def wait_container(self, container_id: str, *, timeout: float | None = None) -> Any:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            raise AgentTimeout(f"{container_id} still runs after {timeout} s") from None
        return ExitStatus(exit_code=137 if self.ignores_sigterm else 0, reason="Error")

    async def delete_container(self, container_id: str, *, force: bool = False) -> None:
        self._op("delete_container")

    def subscribe_output(self, container_id: str) -> Any:
        return FakeOutput()

    async def host_path_mount(self, request: HostPathMount) -> Mount:
        self._op("host_path_mount", request.destination)
        return Mount(destination=request.destination, source=str(request.host_path))

    async def unshare_host_paths(self, keys: list[str]) -> None:
        self.calls.append(f"unshare_host_paths {len(keys)}")

    async def exec_sync(self, container_id: str, args: list[str], **options: Any) -> ExecResult:
        self.calls.append(f"exec_sync {' '.join(args)}")
        if self.exec_answer is not None and not isinstance(self.exec_answer, ExecResult):
            raise self.exec_answer
        return self.exec_answer or ExecResult(0, b"", b"", False)


class FakeProvider:
    """A node whose sandboxes are fakes (``sandbox.api.SandboxProvider``)."""

    handlers = ("clearcri", "host")
    networking = False

    def __init__(
        self,
        *,
        create_error: SandboxError | None = None,
        start_error: BaseException | None = None,
        destroy_errors: list[SandboxError] | None = None,
    ) -> None:
        self.create_error = create_error
        self.start_error = start_error
        self.destroy_errors = destroy_errors
        self.made: list[FakeSandbox] = []

    def create(self, handler: str, spec: Any) -> FakeSandbox:
        if self.create_error is not None:
            raise self.create_error
        sandbox = FakeSandbox(spec.sandbox_id, self.start_error, self.destroy_errors)
        self.made.append(sandbox)
        return sandbox

    async def adopt(self, sandbox_id: str) -> FakeSandbox:
        raise SandboxNotFound(sandbox_id)

    async def remove_leftover(self, sandbox_id: str) -> None:
        pass

    def sandbox_ids(self) -> list[str]:
        return [s.id for s in self.made if s.state != SandboxState.REMOVED]

    def node_info(self) -> dict[str, str]:
        return {"accelerator": "tcg"}

    def network_status(self) -> NetworkStatus:
        return NetworkStatus(True)

    def update_pod_cidr(self, cidr: str) -> None:
        pass

    def memory_budget(self, cgroup_parent: str, driver: str, limit: int, overhead: int) -> int:
        return 0

    def cgroup_parent_problem(self, parent: str, driver: str) -> str | None:
        return None


def _service(tmp_path: Path, kinds: FakeProvider) -> tuple[RuntimeService, Runtime]:
    config = Config()
    config.daemon.state_dir = tmp_path / "state"
    config.daemon.run_dir = tmp_path / "run"
    config.daemon.log_dir = tmp_path / "log"
    config.vm = SandboxConfig(run_root=tmp_path / "run" / "sandboxes")
    config.vm.network = NetworkConfig(enabled=False)
    store = Store(tmp_path / "state.db")
    runtime = Runtime(config, RuntimeState(store), kinds, images=SimpleNamespace())  # type: ignore[arg-type]
    return RuntimeService(runtime), runtime


def _pod_request(name: str = "web") -> api_pb2.RunPodSandboxRequest:
    return api_pb2.RunPodSandboxRequest(
        config=api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}")
        )
    )


def _run(service: RuntimeService, request: Any) -> Any:
    return asyncio.run(service.RunPodSandbox(request, Context()))  # type: ignore[arg-type]


def test_a_pod_starts_and_is_recorded(tmp_path: Path) -> None:
    kinds = FakeProvider()
    service, runtime = _service(tmp_path, kinds)
    response = _run(service, _pod_request())
    (sandbox,) = kinds.made
    assert response.pod_sandbox_id == sandbox.id
    assert sandbox.calls == ["start"]
    assert runtime.state.pods[sandbox.id].vm_pid == 4242


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SandboxExhausted("no VMM id left"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            SandboxRefused("the pod's memory budget cannot hold a VM"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (SandboxError("cannot make its run directory"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_a_sandbox_that_cannot_be_made_is_refused(
    tmp_path: Path, error: SandboxError, code: grpc.StatusCode
) -> None:
    service, runtime = _service(tmp_path, FakeProvider(create_error=error))
    with pytest.raises(Aborted) as caught:
        _run(service, _pod_request())
    assert caught.value.code == code
    assert str(error) in caught.value.message
    assert runtime.state.pods == {}


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [
        (SandboxUnavailable("the VM did not boot"), grpc.StatusCode.UNAVAILABLE, "default/web"),
        (SandboxRefused("no such handler"), grpc.StatusCode.INVALID_ARGUMENT, "default/web"),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, "failed unexpectedly"),
    ],
)
def test_a_sandbox_that_fails_to_start_is_destroyed(
    tmp_path: Path, error: BaseException, code: grpc.StatusCode, says: str
) -> None:
    kinds = FakeProvider(start_error=error)
    service, runtime = _service(tmp_path, kinds)
    with pytest.raises(Aborted) as caught:
        _run(service, _pod_request())
    assert caught.value.code == code
    assert says in caught.value.message and str(error) in caught.value.message
    assert kinds.made[0].calls == ["start", "destroy"]
    assert runtime.state.pods == {}


def test_the_same_pod_twice_is_already_exists(tmp_path: Path) -> None:
    kinds = FakeProvider()
    service, _ = _service(tmp_path, kinds)

    async def twice() -> None:
        await service.RunPodSandbox(_pod_request(), Context())
        await service.RunPodSandbox(_pod_request(), Context())

    with pytest.raises(Aborted) as caught:
        asyncio.run(twice())
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert len(kinds.made) == 1


def _call(service: RuntimeService, name: str, request: Any) -> Any:
    return asyncio.run(getattr(service, name)(request, Context()))


def test_stop_then_remove_leaves_nothing_and_both_are_idempotent(tmp_path: Path) -> None:
    kinds = FakeProvider()
    service, runtime = _service(tmp_path, kinds)
    pod_id = _run(service, _pod_request()).pod_sandbox_id
    stop = api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id)
    remove = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
    _call(service, "StopPodSandbox", stop)
    assert runtime.state.pods[pod_id].state == api_pb2.SANDBOX_NOTREADY
    _call(service, "StopPodSandbox", stop)
    _call(service, "RemovePodSandbox", remove)
    _call(service, "RemovePodSandbox", remove)
    assert kinds.made[0].calls == ["start", "stop", "destroy"]
    assert runtime.state.pods == {} and runtime.sandboxes == {}


def test_a_removal_that_fails_is_kept_to_be_retried(tmp_path: Path) -> None:
    """A sandbox that cannot be destroyed (its CNI DEL fails) answers with why and
    keeps the pod, so that kubelet retries; the retry finishes it."""
    kinds = FakeProvider(destroy_errors=[SandboxError("CNI plugin bridge DEL failed")])
    service, runtime = _service(tmp_path, kinds)
    pod_id = _run(service, _pod_request()).pod_sandbox_id
    remove = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
    with pytest.raises(Aborted) as caught:
        _call(service, "RemovePodSandbox", remove)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "DEL failed" in caught.value.message
    assert pod_id in runtime.state.pods
    _call(service, "RemovePodSandbox", remove)
    assert runtime.state.pods == {}


def _running_container(
    service: RuntimeService, runtime: Runtime, kinds: FakeProvider
) -> tuple[FakeSandbox, str]:
    """A pod started on a fake sandbox, and a container recorded running in it."""
    pod_id = _run(service, _pod_request()).pod_sandbox_id
    ctr = ContainerRecord(
        id="c" * 64,
        pod_id=pod_id,
        name="main",
        attempt=0,
        created_at_ns=1,
        config="",
        image="busybox",
        image_id="sha256:" + "0" * 64,
        image_ref="sha256:" + "0" * 64,
        state=RUNNING,
    )
    runtime.state.save_container(ctr)
    return kinds.made[0], ctr.id


def _exec(service: RuntimeService, cid: str, *cmd: str) -> Any:
    request = api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=1)
    return _call(service, "ExecSync", request)


def test_exec_sync_answers_with_the_command_s_result(tmp_path: Path) -> None:
    kinds = FakeProvider()
    service, runtime = _service(tmp_path, kinds)
    sandbox, cid = _running_container(service, runtime, kinds)
    sandbox.exec_answer = ExecResult(3, b"out", b"err", False)
    response = _exec(service, cid, "sh", "-c", "exit 3")
    assert (response.exit_code, response.stdout, response.stderr) == (3, b"out", b"err")
    assert sandbox.calls[-1] == "exec_sync sh -c exit 3"


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        # kubelet counts only DEADLINE_EXCEEDED as a probe's timeout
        (ExecResult(-1, b"", b"", True), grpc.StatusCode.DEADLINE_EXCEEDED),
        (AgentTimeout("no answer within 1.0 s"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (AgentUnavailable("agent connection lost"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_exec_sync_failures_get_the_codes_kubelet_acts_on(
    tmp_path: Path, answer: ExecResult | BaseException, code: grpc.StatusCode
) -> None:
    kinds = FakeProvider()
    service, runtime = _service(tmp_path, kinds)
    sandbox, cid = _running_container(service, runtime, kinds)
    sandbox.exec_answer = answer
    with pytest.raises(Aborted) as caught:
        _exec(service, cid, "true")
    assert caught.value.code == code
    assert "main" in caught.value.message or "within 1 s" in caught.value.message


def test_exec_sync_refusals_need_no_vm(tmp_path: Path) -> None:
    kinds = FakeProvider()
    service, runtime = _service(tmp_path, kinds)
    sandbox, cid = _running_container(service, runtime, kinds)
    cases = [
        ("d" * 64, ("true",), grpc.StatusCode.NOT_FOUND),
        (cid, (), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for container_id, cmd, code in cases:
        with pytest.raises(Aborted) as caught:
            _exec(service, container_id, *cmd)
        assert caught.value.code == code, (container_id, cmd)
    sandbox.state = SandboxState.DEAD  # the VM went away
    with pytest.raises(Aborted) as caught:
        _exec(service, cid, "true")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not ready" in caught.value.message
    assert not any(call.startswith("exec_sync") for call in sandbox.calls)
