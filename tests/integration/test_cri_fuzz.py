"""Random CRI requests may only get OK or a proper error code: never INTERNAL or
UNKNOWN, never a dead daemon, never a leftover VM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.mounts import remove_tree
from tests.integration.conftest import GUEST_DIR, qemu_processes
from tests.integration.cri_daemon import CriDaemon

pytestmark = pytest.mark.vm

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: Strings that once made trouble or could: NUL, control characters, separators of CNI
#: args and env, traversals, host paths that block when read, unicode, and a huge one.
HOSTILE = [
    "\0",
    "a\0b",
    "\n",
    "a;b=c",
    "../../..",
    "/proc",
    "/proc/kmsg",
    "/dev/null",
    "/",
    "é∂ƒ漢",
    "x" * (1 << 16),
]
text = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
    st.sampled_from(HOSTILE),
)
ids = st.one_of(st.just(""), st.text(alphabet="0123456789abcdef", min_size=1, max_size=64), text)
labels = st.dictionaries(text, text, max_size=3)
#: Numbers at and past the edges of every range a resource field has.
huge = st.sampled_from([0, -1, 1, 2, 1000, 2**31, 2**62, -(2**62)])


@st.composite
def pod_configs(draw: st.DrawFn) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(
            name=draw(text), namespace=draw(text), uid=draw(text), attempt=draw(st.integers(0, 3))
        ),
        hostname=draw(text),
        labels=draw(labels),
        annotations=draw(labels),
    )
    config.dns_config.servers.extend(draw(st.lists(text, max_size=2)))
    config.linux.security_context.namespace_options.network = draw(
        st.sampled_from([api_pb2.POD, api_pb2.CONTAINER, api_pb2.NODE])
    )
    config.linux.security_context.privileged = draw(st.booleans())
    config.linux.resources.memory_limit_in_bytes = draw(st.sampled_from([0, -1, 1, 2**40]))
    config.linux.resources.cpu_quota = draw(st.sampled_from([0, -1, 50_000, 10**9]))
    config.linux.resources.cpu_period = draw(st.sampled_from([0, 100_000]))
    config.linux.resources.cpu_shares = draw(huge)
    config.linux.cgroup_parent = draw(st.one_of(st.just(""), text))
    return config


@st.composite
def container_configs(draw: st.DrawFn) -> api_pb2.ContainerConfig:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=draw(text)),
        image=api_pb2.ImageSpec(image=draw(st.one_of(text, st.just("busybox")))),
        command=draw(st.lists(text, max_size=3)),
        working_dir=draw(text),
        log_path=draw(text),
    )
    for key in draw(st.lists(text, max_size=2)):
        config.envs.add(key=key, value=draw(text))
    for path in draw(st.lists(text, max_size=2)):
        config.mounts.add(
            container_path=path,
            host_path=draw(text),
            readonly=draw(st.booleans()),
            propagation=draw(
                st.sampled_from(
                    [
                        api_pb2.PROPAGATION_PRIVATE,
                        api_pb2.PROPAGATION_HOST_TO_CONTAINER,
                        api_pb2.PROPAGATION_BIDIRECTIONAL,
                    ]
                )
            ),
        )
    if draw(st.booleans()):
        config.devices.add(container_path=draw(text), host_path=draw(text), permissions="rwm")
    resources = config.linux.resources
    resources.memory_limit_in_bytes = draw(huge)
    resources.cpu_shares = draw(huge)
    resources.cpu_period = draw(huge)
    resources.cpu_quota = draw(huge)
    config.linux.security_context.capabilities.add_capabilities.extend(
        draw(st.lists(st.sampled_from(["NET_ADMIN", "ALL", "BOGUS", ""]), max_size=2))
    )
    return config


#: Pods that really start (a VM from the template), so that a kill lands mid-boot.
valid_pods = st.builds(
    lambda n: api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=f"fuzz{n}", namespace="fuzz", uid=f"u{n}")
    ),
    st.integers(0, 10**6),
)

requests = st.one_of(
    st.builds(
        lambda c, h: ("RunPodSandbox", api_pb2.RunPodSandboxRequest(config=c, runtime_handler=h)),
        st.one_of(pod_configs(), valid_pods),
        st.sampled_from(["", "clearcri", "nope", "host"]),
    ),
    st.builds(lambda i: ("StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=i)), ids),
    st.builds(
        lambda i: ("RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=i)), ids
    ),
    st.builds(
        lambda i, v: (
            "PodSandboxStatus",
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=i, verbose=v),
        ),
        ids,
        st.booleans(),
    ),
    st.builds(
        lambda i, c: (
            "CreateContainer",
            api_pb2.CreateContainerRequest(pod_sandbox_id=i, config=c),
        ),
        ids,
        container_configs(),
    ),
    st.builds(lambda i: ("StartContainer", api_pb2.StartContainerRequest(container_id=i)), ids),
    st.builds(
        lambda i, t: ("StopContainer", api_pb2.StopContainerRequest(container_id=i, timeout=t)),
        ids,
        st.integers(-5, 5),
    ),
    st.builds(lambda i: ("RemoveContainer", api_pb2.RemoveContainerRequest(container_id=i)), ids),
    st.builds(lambda i: ("ContainerStatus", api_pb2.ContainerStatusRequest(container_id=i)), ids),
    st.builds(
        lambda i, c, t: ("ExecSync", api_pb2.ExecSyncRequest(container_id=i, cmd=c, timeout=t)),
        ids,
        st.lists(text, max_size=2),
        st.integers(-1, 2),
    ),
    st.builds(
        lambda i, c: ("Exec", api_pb2.ExecRequest(container_id=i, cmd=c, stdout=True)),
        ids,
        st.lists(text, max_size=2),
    ),
    st.builds(
        lambda i, p: ("PortForward", api_pb2.PortForwardRequest(pod_sandbox_id=i, port=p)),
        ids,
        st.lists(st.integers(-1, 70000), max_size=2),
    ),
    st.builds(lambda i: ("ContainerStats", api_pb2.ContainerStatsRequest(container_id=i)), ids),
    st.builds(lambda i: ("PodSandboxStats", api_pb2.PodSandboxStatsRequest(pod_sandbox_id=i)), ids),
    st.builds(
        lambda i: ("ReopenContainerLog", api_pb2.ReopenContainerLogRequest(container_id=i)), ids
    ),
    st.builds(
        lambda i: (
            "UpdateContainerResources",
            api_pb2.UpdateContainerResourcesRequest(container_id=i),
        ),
        ids,
    ),
    st.builds(
        lambda f: (
            "ListPodSandbox",
            api_pb2.ListPodSandboxRequest(filter=api_pb2.PodSandboxFilter(id=f)),
        ),
        ids,
    ),
    st.builds(
        lambda f: (
            "ListContainers",
            api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(pod_sandbox_id=f)),
        ),
        ids,
    ),
)


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[CriDaemon]:
    root = Path(f"/tmp/cc-fuzz-{os.getpid()}")
    root.mkdir()
    # with the default standby pool (one VM, one more of a base after its pod found none
    # ready):
    # kills land while pods take them over and while the pool starts them
    daemon = CriDaemon(root, GUEST_DIR, standby=1, standby_burst=1)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        # a failed example leaves its pods' VMs running (a stopped daemon keeps them for
        # the next): they go with the root
        for pid, _ in _qemus_of(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_tree(root)


async def _call(daemon: CriDaemon, method: str, request: object) -> grpc.StatusCode:
    async with daemon.channel() as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            await getattr(stub, method)(request, timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def _cleanup(daemon: CriDaemon) -> None:
    async with daemon.channel() as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        for pod in (await stub.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items:
            await stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


@settings(
    max_examples=int(os.environ.get("CLEARCRI_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    calls=st.lists(requests, min_size=1, max_size=4),
    kill_after=st.one_of(st.none(), st.floats(0.0, 3.0)),
)
def test_random_requests_get_proper_codes(
    fuzz_daemon: CriDaemon, calls: list[tuple[str, object]], kill_after: float | None
) -> None:
    """With ``kill_after`` the daemon is SIGKILLed that many seconds into the calls
    (wherever they are: booting a VM, calling CNI, unpacking) and started again: what the
    calls left must not stop it from starting, serving and removing every pod."""
    killed = False

    async def run() -> None:
        for method, request in calls:
            code = await _call(fuzz_daemon, method, request)
            if killed:
                return
            assert code in ALLOWED, f"{method} gave {code.name} for {request}"

    async def run_and_kill() -> None:
        nonlocal killed
        task = asyncio.ensure_future(run())
        if kill_after is not None:
            done, _ = await asyncio.wait({task}, timeout=kill_after)
            if not done:
                killed = True
                fuzz_daemon.stop(signal.SIGKILL)
        await task

    try:
        asyncio.run(run_and_kill())
    finally:
        if killed:
            fuzz_daemon.start()
        asyncio.run(_cleanup(fuzz_daemon))
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None, "daemon died"
    assert list((fuzz_daemon.root / "run" / "sandboxes").iterdir()) == []
    _assert_only_the_standby_runs(fuzz_daemon)


@settings(
    max_examples=int(os.environ.get("CLEARCRI_KILL_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    pods=valid_pods.map(lambda c: [c]) | st.lists(valid_pods, min_size=2, max_size=3),
    kill_after=st.floats(0.0, 2.5),
)
def test_kills_at_random_moments_leave_nothing(
    fuzz_daemon: CriDaemon, pods: list[api_pb2.PodSandboxConfig], kill_after: float
) -> None:
    """Pods being started (VM boot, template clone, agent handshake) when the daemon is
    SIGKILLed: the restarted daemon serves, and removing its pods leaves no sandbox and
    no qemu behind."""

    async def start_all() -> None:
        await asyncio.gather(
            *(
                _call(fuzz_daemon, "RunPodSandbox", api_pb2.RunPodSandboxRequest(config=c))
                for c in pods
            )
        )

    async def run_and_kill() -> None:
        task = asyncio.ensure_future(start_all())
        await asyncio.wait({task}, timeout=kill_after)
        fuzz_daemon.stop(signal.SIGKILL)
        await task

    asyncio.run(run_and_kill())
    fuzz_daemon.start()
    asyncio.run(_cleanup(fuzz_daemon))
    assert list((fuzz_daemon.root / "run" / "sandboxes").iterdir()) == []
    _assert_only_the_standby_runs(fuzz_daemon)


#: the most standby VMs the fuzz daemon keeps: standby + standby_burst of the default
#: base, standby_burst of the smallest VM's (its pods with tiny memory limits)
STANDBY_VMS = 3


def _assert_only_the_standby_runs(daemon: CriDaemon) -> None:
    """What runs under the daemon's root is its standby VMs (one, and one more of each
    base of which a pod found none ready), once its pool has removed those a killed
    daemon left (sandbox/standby.py)."""
    standby_dir = daemon.root / "run" / "standby"
    deadline = time.monotonic() + 120
    while True:
        left = _qemus_of(daemon.root)
        dirs = sorted(standby_dir.iterdir()) if standby_dir.exists() else []
        own = len(dirs) <= STANDBY_VMS and all(
            any(cwd.startswith(f"{d}/") for d in dirs) for _, cwd in left
        )
        if own and len(left) <= STANDBY_VMS:
            return
        assert time.monotonic() < deadline, f"left behind: {left}, standby VMs {dirs}"
        time.sleep(0.5)


def _qemus_of(root: Path) -> list[tuple[int, str]]:
    """qemu processes whose run directory is below ``root`` (templates excluded), with
    that directory."""
    return [(pid, cwd) for pid, _, cwd in qemu_processes() if cwd.startswith(str(root))]
