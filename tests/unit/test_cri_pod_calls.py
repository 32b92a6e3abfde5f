"""RunPodSandbox, StopPodSandbox, RemovePodSandbox and ExecSync through the real CRI
servicer and runtime, with fake sandboxes in place of VMs (``Runtime.kinds``): the error
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
from cri.config import Config
from cri.runtime.service import Runtime, RuntimeService
from cri.runtime.state import RUNNING, ContainerRecord, RuntimeState
from cri.store import Store
from sandbox.api import SandboxState
from sandbox.network import NetworkConfig
from sandbox.pod import BootTimes, SandboxConfig, SandboxError, SandboxExhausted, SandboxNotFound


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Context:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


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
        self.network_result = None
        self.boot = BootTimes()
        self.start_error = start_error
        self.calls: list[str] = []
        self.exit_callbacks: list[Callable[[Any], None]] = []

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

    async def exec_sync(self, container_id: str, args: list[str], **options: Any) -> ExecResult:
        self.calls.append(f"exec_sync {' '.join(args)}")
        if self.exec_answer is not None and not isinstance(self.exec_answer, ExecResult):
            raise self.exec_answer
        return self.exec_answer or ExecResult(0, b"", b"", False)


class FakeKinds:
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

    def create_vm(self, spec: Any) -> FakeSandbox:
        if self.create_error is not None:
            raise self.create_error
        sandbox = FakeSandbox(spec.sandbox_id, self.start_error, self.destroy_errors)
        self.made.append(sandbox)
        return sandbox

    create_host = create_vm

    async def adopt(self, sandbox_id: str) -> FakeSandbox:
        raise SandboxNotFound(sandbox_id)


def _service(tmp_path: Path, kinds: FakeKinds) -> tuple[RuntimeService, Runtime]:
    config = Config()
    config.daemon.state_dir = tmp_path / "state"
    config.daemon.run_dir = tmp_path / "run"
    config.daemon.log_dir = tmp_path / "log"
    config.vm = SandboxConfig(run_root=tmp_path / "run" / "sandboxes")
    config.vm.network = NetworkConfig(enabled=False)
    host: Any = SimpleNamespace(config=config.vm, accel="tcg")
    store = Store(tmp_path / "state.db")
    runtime = Runtime(config, RuntimeState(store), host, images=SimpleNamespace())  # type: ignore[arg-type]
    runtime.kinds = kinds  # type: ignore[assignment]
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
    kinds = FakeKinds()
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
        (SandboxError("invalid sandbox id"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_a_sandbox_that_cannot_be_made_is_refused(
    tmp_path: Path, error: SandboxError, code: grpc.StatusCode
) -> None:
    service, runtime = _service(tmp_path, FakeKinds(create_error=error))
    with pytest.raises(Aborted) as caught:
        _run(service, _pod_request())
    assert caught.value.code == code
    assert str(error) in caught.value.message
    assert runtime.state.pods == {}


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [
        (SandboxError("the VM did not boot"), grpc.StatusCode.UNAVAILABLE, "default/web"),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, "failed unexpectedly"),
    ],
)
def test_a_sandbox_that_fails_to_start_is_destroyed(
    tmp_path: Path, error: BaseException, code: grpc.StatusCode, says: str
) -> None:
    kinds = FakeKinds(start_error=error)
    service, runtime = _service(tmp_path, kinds)
    with pytest.raises(Aborted) as caught:
        _run(service, _pod_request())
    assert caught.value.code == code
    assert says in caught.value.message and str(error) in caught.value.message
    assert kinds.made[0].calls == ["start", "destroy"]
    assert runtime.state.pods == {}


def test_the_same_pod_twice_is_already_exists(tmp_path: Path) -> None:
    kinds = FakeKinds()
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
    kinds = FakeKinds()
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
    kinds = FakeKinds(destroy_errors=[SandboxError("CNI plugin bridge DEL failed")])
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
    service: RuntimeService, runtime: Runtime, kinds: FakeKinds
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
    kinds = FakeKinds()
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
    kinds = FakeKinds()
    service, runtime = _service(tmp_path, kinds)
    sandbox, cid = _running_container(service, runtime, kinds)
    sandbox.exec_answer = answer
    with pytest.raises(Aborted) as caught:
        _exec(service, cid, "true")
    assert caught.value.code == code
    assert "main" in caught.value.message or "within 1 s" in caught.value.message


def test_exec_sync_refusals_need_no_vm(tmp_path: Path) -> None:
    kinds = FakeKinds()
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
