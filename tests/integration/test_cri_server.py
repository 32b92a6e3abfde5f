"""`clearcri serve` end to end over its gRPC socket, with real VMs and a real registry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from sandbox.mounts import remove_tree
from sandbox.procfs import pid_alive
from tests.integration.conftest import GUEST_DIR
from tests.integration.cri_daemon import CriDaemon
from tests.registry import RegistryServer, busybox_layer, push_image, registry  # noqa: F401
from tests.unit.test_image_ref_field import image_ref_of

pytestmark = pytest.mark.vm

LOG_LINE = re.compile(rb"^\S+Z (stdout|stderr) (F|P) (.*)$")


@pytest.fixture(scope="module")
def image_ref(registry: RegistryServer) -> str:  # noqa: F811
    asyncio.run(push_image(registry.host, "library/busybox", ["1"], [busybox_layer()]))
    return f"{registry.host}/library/busybox:1"


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriDaemon]:
    root = Path(f"/tmp/cc-cri-{os.getpid()}-{os.urandom(3).hex()}")
    root.mkdir()
    d = CriDaemon(root, GUEST_DIR)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        # a test that failed half-way may leave pods: remove them with a fresh daemon
        leftovers = list((root / "run" / "sandboxes").glob("*/state.json"))
        if leftovers:
            d.start()
            asyncio.run(_remove_all(d))
            d.stop()

        remove_tree(root)


async def _remove_all(d: CriDaemon) -> None:
    async with d.channel() as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        pods = await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())
        for pod in pods.items:
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


@pytest.fixture
async def stubs(
    daemon: CriDaemon,
) -> AsyncIterator[tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub]]:
    async with daemon.channel() as channel:
        yield (
            api_pb2_grpc.RuntimeServiceStub(channel),  # type: ignore[no-untyped-call]
            api_pb2_grpc.ImageServiceStub(channel),  # type: ignore[no-untyped-call]
        )


def pod_config(name: str, log_dir: Path) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"),
        hostname=name,
        log_directory=str(log_dir),
        labels={"app": name},
        dns_config=api_pb2.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"]),
    )


def container_config(name: str, image: str, *cmd: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=image),
        command=list(cmd),
        log_path=f"{name}.log",
        labels={"c": name},
    )


async def _wait_state(
    rt: api_pb2_grpc.RuntimeServiceStub, cid: str, state: int, timeout: float = 60
) -> api_pb2.ContainerStatus:
    deadline = time.monotonic() + timeout
    while True:
        response = await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))
        status: api_pb2.ContainerStatus = response.status
        if status.state == state or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


async def test_pod_and_container_lifecycle(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    tmp_path: Path,
    daemon: CriDaemon,
) -> None:
    rt, images = stubs
    version = await rt.Version(api_pb2.VersionRequest())
    assert version.runtime_name == "clearcri" and version.runtime_api_version == "v1"
    status = await rt.Status(api_pb2.StatusRequest(verbose=True))
    assert {c.type: c.status for c in status.status.conditions}["RuntimeReady"]
    assert "clearcri" in [h.name for h in status.runtime_handlers]

    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    log_dir = tmp_path / "logs"
    pod_id = (
        await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config("web", log_dir)))
    ).pod_sandbox_id
    pod = (await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))).status
    assert pod.state == api_pb2.SANDBOX_READY
    assert (pod.metadata.name, pod.metadata.namespace) == ("web", "default")
    assert pod.created_at > 0

    config = container_config(
        "app", image_ref, "sh", "-c", "echo started; echo oops >&2; exec sleep 1000"
    )
    config.envs.add(key="GREETING", value="hi")
    cid = (
        await rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                config=config,
                sandbox_config=pod_config("web", log_dir),
            )
        )
    ).container_id
    created = (await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))).status
    assert created.state == api_pb2.CONTAINER_CREATED
    await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    running = await _wait_state(rt, cid, api_pb2.CONTAINER_RUNNING)
    assert running.started_at >= running.created_at > 0
    assert running.image.image == image_ref
    assert running.image_ref and running.log_path == str(log_dir / "app.log")

    result = await rt.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo $GREETING; exit 4"])
    )
    assert (result.stdout, result.exit_code) == (b"hi\n", 4)
    resolv = await rt.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/resolv.conf"])
    )
    assert b"nameserver 10.96.0.10" in resolv.stdout
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    records = []
    for _ in range(50):
        lines = (log_dir / "app.log").read_bytes().splitlines()
        records = [LOG_LINE.match(line) for line in lines]
        if len(records) >= 2:
            break
        await asyncio.sleep(0.2)
    assert all(records)
    got = {(m.group(1), m.group(3)) for m in records if m}
    assert got == {(b"stdout", b"started"), (b"stderr", b"oops")}

    listed = await rt.ListContainers(
        api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(label_selector={"c": "app"}))
    )
    assert [c.id for c in listed.containers] == [cid]
    stats = await rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid))
    assert stats.stats.memory.working_set_bytes.value > 0
    pod_stats = await rt.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod_id))
    assert pod_stats.stats.linux.memory.working_set_bytes.value > 0

    # the pod shares one PID namespace (CRI's default, POD), so sleep is not PID 1 and
    # SIGTERM ends it
    await rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=5))
    stopped = await _wait_state(rt, cid, api_pb2.CONTAINER_EXITED)
    assert stopped.state == api_pb2.CONTAINER_EXITED
    assert stopped.exit_code == 128 + signal.SIGTERM and stopped.reason == "Error"
    assert stopped.finished_at >= stopped.started_at

    await rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
    await rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
    await rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    pod = (await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))).status
    assert pod.state == api_pb2.SANDBOX_NOTREADY
    await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items == []
    assert list((daemon.root / "run" / "sandboxes").iterdir()) == []


async def test_errors_carry_codes_and_reasons(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    tmp_path: Path,
) -> None:
    rt, _ = stubs

    async def code_of(call: object) -> grpc.StatusCode:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            assert exc.details(), "every error says what was wrong"
            return exc.code()
        return grpc.StatusCode.OK

    missing = "f" * 64
    assert (
        await code_of(rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=missing)))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=missing)))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=missing)))
        == grpc.StatusCode.OK
    )
    assert (
        await code_of(rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=missing)))
        == grpc.StatusCode.OK
    )
    assert (
        await code_of(
            rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig()))
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(
            rt.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(
                    config=pod_config("x", tmp_path), runtime_handler="nope"
                )
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    # names that cannot travel to CNI, files and cgroups are refused before anything is
    # made (a NUL once left a netns behind that crashed every later daemon start)
    for name in ("a\0b", "n" * (1 << 20), "a;b"):
        assert (
            await code_of(
                rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config(name, tmp_path)))
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    # a cgroup parent outside the tree or resources no container starts with: refused
    # before a VM is booted (they were UNAVAILABLE from deep inside once)
    outside = pod_config("cgroup-escape", tmp_path)
    outside.linux.cgroup_parent = "../.."
    tiny = pod_config("tiny", tmp_path)
    tiny.linux.resources.memory_limit_in_bytes = 1
    for bad in (outside, tiny):
        assert (
            await code_of(rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=bad)))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    assert (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items == []
    assert (
        await code_of(rt.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x")))
        == grpc.StatusCode.UNIMPLEMENTED
    )
    assert await code_of(rt.Version(api_pb2.VersionRequest())) == grpc.StatusCode.OK


async def test_daemon_restart_keeps_pods_and_notices_dead_vms(
    daemon: CriDaemon, image_ref: str, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    async with daemon.channel() as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
        pod_ids = []
        cids = []
        for name in ("keep", "doomed"):
            pod_id = (
                await rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=pod_config(name, log_dir / name))
                )
            ).pod_sandbox_id
            cfg = container_config(
                name, image_ref, "sh", "-c", "while true; do echo tick; sleep 1; done"
            )
            cid = (
                await rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pod_id,
                        config=cfg,
                        sandbox_config=pod_config(name, log_dir / name),
                    )
                )
            ).container_id
            await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
            pod_ids.append(pod_id)
            cids.append(cid)
        vm_pid = int(
            __import__("json").loads(
                (daemon.root / "run" / "sandboxes" / pod_ids[1] / "state.json").read_text()
            )["pid"]
        )

    daemon.stop(signal.SIGKILL)
    os.kill(vm_pid, signal.SIGKILL)  # one VM dies while no daemon watches it
    for _ in range(100):
        if not pid_alive(vm_pid):
            break
        await asyncio.sleep(0.05)
    daemon.start()

    async with daemon.channel() as channel:
        rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        keep = (
            await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_ids[0]))
        ).status
        assert keep.state == api_pb2.SANDBOX_READY
        status = (
            await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cids[0]))
        ).status
        assert status.state == api_pb2.CONTAINER_RUNNING
        result = await rt.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cids[0], cmd=["echo", "after restart"])
        )
        assert result.stdout == b"after restart\n"
        log_file = log_dir / "keep" / "keep.log"
        size = log_file.stat().st_size
        for _ in range(50):
            if log_file.stat().st_size > size:
                break
            await asyncio.sleep(0.2)
        assert log_file.stat().st_size > size, "logs keep flowing after a restart"

        doomed = (
            await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_ids[1]))
        ).status
        assert doomed.state == api_pb2.SANDBOX_NOTREADY
        dead = (
            await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cids[1]))
        ).status
        assert dead.state == api_pb2.CONTAINER_EXITED
        assert dead.reason == "Error" and dead.message

        for pod_id in pod_ids:
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert list((daemon.root / "run" / "sandboxes").iterdir()) == []


def test_second_daemon_refuses_to_start(daemon: CriDaemon) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "cri.cli", "serve", "--config", str(daemon.config_path)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 1
    assert b"another clearcri daemon" in second.stderr
    # the first daemon still serves
    with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        assert stub.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "clearcri"


async def test_pod_network_through_cri(image_ref: str, tmp_path: Path) -> None:
    from tests.integration.test_network import CniLab, _http_get

    lab = CniLab(tmp_path / "cni")
    lab.write(lab.conflist(v6=False, portmap=False))
    root = Path(f"/tmp/cc-crinet-{os.getpid()}")
    root.mkdir()
    daemon = CriDaemon(root, GUEST_DIR, network=lab.daemon_network())
    daemon.start()
    pod_id = ""
    try:
        async with daemon.channel() as channel:
            rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
            images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
            status = await rt.Status(api_pb2.StatusRequest())
            assert {c.type: c.status for c in status.status.conditions}["NetworkReady"]
            await images.PullImage(
                api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref))
            )
            config = pod_config("net", tmp_path / "logs")
            pod_id = (
                await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))
            ).pod_sandbox_id
            pod = (
                await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
            ).status
            assert pod.network.ip.startswith(lab.prefix4 + ".")
            cfg = container_config(
                "web", image_ref, "sh", "-c", "echo via-cni > /tmp/i; httpd -f -p 8080 -h /tmp"
            )
            cid = (
                await rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pod_id, config=cfg, sandbox_config=config
                    )
                )
            ).container_id
            await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
            assert await _http_get(f"http://{pod.network.ip}:8080/i") == b"via-cni\n"
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        assert lab.leftovers([pod_id]) == []
    finally:
        daemon.stop()
        lab.close()

        remove_tree(root)


async def test_missing_cni_config_is_reported(tmp_path: Path) -> None:
    root = Path(f"/tmp/cc-crinocni-{os.getpid()}")
    root.mkdir()
    empty = tmp_path / "empty-net.d"
    empty.mkdir()
    daemon = CriDaemon(root, GUEST_DIR, network=f'conf_dirs = ["{empty}"]')
    daemon.start()
    try:
        async with daemon.channel() as channel:
            rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
            status = await rt.Status(api_pb2.StatusRequest())
            net = {c.type: c for c in status.status.conditions}["NetworkReady"]
            assert not net.status and net.reason == "NetworkPluginNotReady" and net.message
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=pod_config("nocni", tmp_path))
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "CNI" in (err.value.details() or "")
            assert (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items == []
    finally:
        daemon.stop()

        remove_tree(root)


async def test_vm_runs_under_the_pod_cgroup_parent(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    tmp_path: Path,
    daemon: CriDaemon,
) -> None:
    from sandbox.cgroups import cgroups_of, hierarchies

    rt, _ = stubs
    parent = f"clearcri-test-{os.urandom(3).hex()}"
    config = pod_config("cg", tmp_path)
    config.linux.cgroup_parent = parent
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id
    state = (daemon.root / "run" / "sandboxes" / pod_id / "state.json").read_text()
    vm_pid = int(__import__("json").loads(state)["pid"])
    paths = cgroups_of(vm_pid)
    assert paths and all(p.startswith(f"/{parent}/clearcri-") for p in paths if p != "/"), paths
    await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    for root in hierarchies():
        # the parent did not exist (kubelet makes it first): the daemon made it for the
        # VM and removed it with the VM
        assert not (root / parent).exists()


async def _pod_with_sleeper(
    rt: api_pb2_grpc.RuntimeServiceStub,
    name: str,
    image_ref: str,
    log_dir: Path,
    script: str = "while true; do echo tick; sleep 0.2; done",
) -> tuple[str, str]:
    config = pod_config(name, log_dir)
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id
    cfg = container_config(name, image_ref, "sh", "-c", script)
    cid = (
        await rt.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg, sandbox_config=config)
        )
    ).container_id
    await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    return pod_id, cid


async def test_frozen_vm_never_hangs_cri_calls(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    tmp_path: Path,
    daemon: CriDaemon,
) -> None:
    rt, images = stubs
    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    pod_id, cid = await _pod_with_sleeper(rt, "frozen", image_ref, tmp_path)
    state = (daemon.root / "run" / "sandboxes" / pod_id / "state.json").read_text()
    vm_pid = int(__import__("json").loads(state)["pid"])
    os.kill(vm_pid, signal.SIGSTOP)  # the agent stops answering; so does QMP
    try:
        status = await asyncio.wait_for(
            rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid)), 10
        )
        assert status.status.state == api_pb2.CONTAINER_RUNNING
        # stats of an unresponsive guest come back (without guest figures), bounded
        await asyncio.wait_for(rt.ListContainerStats(api_pb2.ListContainerStatsRequest()), 30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(
                rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=2)),
                30,
            )
        assert err.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        # stopping the pod kills the frozen VM within bounded time
        await asyncio.wait_for(
            rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id)), 120
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm_pid, signal.SIGCONT)
    assert not pid_alive(vm_pid)
    dead = (await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))).status
    assert dead.state == api_pb2.CONTAINER_EXITED
    await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert list((daemon.root / "run" / "sandboxes").iterdir()) == []


async def test_full_log_disk_keeps_pod_and_daemon_running(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    daemon: CriDaemon,
    image_ref: str,
    tmp_path: Path,
) -> None:
    rt, images = stubs
    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    small = tmp_path / "small-logs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        line = "x" * 200
        pod_id, cid = await _pod_with_sleeper(
            rt, "chatty", image_ref, small, f"while true; do echo {line}; sleep 0.01; done"
        )
        log_file = small / "chatty.log"
        for _ in range(100):
            if shutil.disk_usage(small).free < 4096:
                break
            await asyncio.sleep(1)
        assert shutil.disk_usage(small).free < 4096, "the log disk never filled"
        await asyncio.sleep(2)  # writes now fail
        status = (await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))).status
        assert status.state == api_pb2.CONTAINER_RUNNING
        result = await rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["echo", "ok"]))
        assert result.stdout == b"ok\n"
        assert log_file.stat().st_size > 0
        await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        # the removed container's log is closed: nothing of the daemon's holds the disk
        assert daemon.proc is not None
        fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
        held = [os.readlink(fd) for fd in fd_dir.iterdir() if str(small) in os.readlink(fd)]
        assert held == []
    finally:
        if subprocess.run(["umount", str(small)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], check=False)


async def create_in_pod(
    rt: api_pb2_grpc.RuntimeServiceStub,
    pod_id: str,
    cfg: api_pb2.ContainerConfig,
    pod: api_pb2.PodSandboxConfig,
) -> str:
    response = await rt.CreateContainer(
        api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod)
    )
    return str(response.container_id)


async def exec_in(
    rt: api_pb2_grpc.RuntimeServiceStub, cid: str, *cmd: str
) -> api_pb2.ExecSyncResponse:
    response: api_pb2.ExecSyncResponse = await rt.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=30)
    )
    return response


async def test_pod_sysctls_added_capabilities_and_recursive_readonly(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    tmp_path: Path,
) -> None:
    """Pod sysctls reach the pod's IPC and network namespaces; a container given
    NET_ADMIN can build a bridge in the VM (the driver is in the guest); a recursive
    read-only mount is read-only and a malformed one is refused."""
    rt, images = stubs
    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    config = pod_config("sysctls", tmp_path)
    sysctls = {
        "kernel.shm_rmid_forced": "1",
        "fs.mqueue.msg_max": "100",
        "net.ipv4.ip_local_port_range": "20000\t30000",
    }
    config.linux.sysctls.update(sysctls)
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "f").write_text("x")
    cfg = container_config("netadmin", image_ref, "sleep", "1000")
    cfg.linux.security_context.capabilities.add_capabilities.append("NET_ADMIN")
    cfg.mounts.add(
        host_path=str(volume), container_path="/rro", readonly=True, recursive_read_only=True
    )
    try:
        cid = await create_in_pod(rt, pod_id, cfg, config)
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))

        for name, value in sysctls.items():
            result = await exec_in(rt, cid, "cat", "/proc/sys/" + name.replace(".", "/"))
            assert result.stdout.decode().strip() == value, (name, result)
        result = await exec_in(
            rt, cid, "sh", "-c", "brctl addbr br-test && cat /sys/class/net/br-test/type"
        )
        assert result.exit_code == 0 and result.stdout == b"1\n", result
        result = await exec_in(rt, cid, "touch", "/rro/new")
        assert result.exit_code != 0 and b"Read-only" in result.stderr, result
        assert (await exec_in(rt, cid, "cat", "/rro/f")).stdout == b"x"

        bad = container_config("bad", image_ref, "true")
        bad.mounts.add(host_path=str(volume), container_path="/rro", recursive_read_only=True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create_in_pod(rt, pod_id, bad, config)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "readonly" in str(err.value.details())
    finally:
        await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


async def test_image_volumes_and_supplemental_groups_policy(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    tmp_path: Path,
) -> None:
    """An image mounted read-only as a volume (whole or a sub path of it; a missing sub
    path or a writable image volume is refused), and the Merge/Strict supplemental
    groups policies, in a pod VM."""
    rt, images = stubs
    status = await rt.Status(api_pb2.StatusRequest())
    assert status.features.supplemental_groups_policy
    pulled = await images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref))
    )
    image_id = pulled.image_ref
    config = pod_config("imgvol", tmp_path)
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id

    try:
        cfg = container_config("vol", image_ref, "sleep", "1000")
        cfg.mounts.add(
            container_path="/img", readonly=True, image=api_pb2.ImageSpec(image=image_id)
        )
        cfg.mounts.add(
            container_path="/imgetc",
            readonly=True,
            image=api_pb2.ImageSpec(image=image_id),
            image_sub_path="etc",
        )
        cid = await create_in_pod(rt, pod_id, cfg, config)
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        assert (await exec_in(rt, cid, "/img/bin/busybox", "true")).exit_code == 0  # not noexec
        assert b"app:x:1000" in (await exec_in(rt, cid, "cat", "/imgetc/passwd")).stdout
        assert (await exec_in(rt, cid, "ls", "/imgetc/etc")).exit_code != 0
        result = await exec_in(rt, cid, "touch", "/img/new")
        assert result.exit_code != 0 and b"Read-only" in result.stderr, result
        mounts = (
            await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))
        ).status.mounts
        assert [m.image.image for m in mounts] == [image_id, image_id]
        assert [image_ref_of(m.image) for m in mounts] == [image_id, image_id]

        for sub, readonly, code in (
            ("not-there", True, grpc.StatusCode.INVALID_ARGUMENT),
            ("../etc", True, grpc.StatusCode.INVALID_ARGUMENT),
            ("", False, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            bad = container_config(f"bad-{sub.strip('./')}-{readonly}", image_ref, "true")
            bad.mounts.add(
                container_path="/img",
                readonly=readonly,
                image=api_pb2.ImageSpec(image=image_id),
                image_sub_path=sub,
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await create_in_pod(rt, pod_id, bad, config)
            assert err.value.code() == code, (sub, readonly, err.value.details())
        bad = container_config("bad-image", image_ref, "true")
        bad.mounts.add(
            container_path="/img",
            readonly=True,
            image=api_pb2.ImageSpec(image="sha256:" + "0" * 64),
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create_in_pod(rt, pod_id, bad, config)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # run as "app" (uid 1000, in group wheel=10 in the image) with group 1234 added
        for policy, want in ((api_pb2.Merge, [1000, 10, 1234]), (api_pb2.Strict, [1000, 1234])):
            groups = container_config(f"groups-{policy}", image_ref, "sleep", "1000")
            sec = groups.linux.security_context
            sec.run_as_user.value = 1000
            sec.supplemental_groups.append(1234)
            sec.supplemental_groups_policy = policy
            gid_cid = await create_in_pod(rt, pod_id, groups, config)
            await rt.StartContainer(api_pb2.StartContainerRequest(container_id=gid_cid))
            out = (await exec_in(rt, gid_cid, "id", "-G")).stdout.decode().split()
            assert sorted(int(g) for g in out) == sorted(want), (policy, out)
            user = (
                await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=gid_cid))
            ).status.user.linux
            assert (user.uid, user.gid) == (1000, 1000)
            assert sorted(user.supplemental_groups) == sorted(want)
    finally:
        await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


async def test_pod_user_namespace(
    stubs: tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    tmp_path: Path,
) -> None:
    """User namespace mode POD: the containers' root is the mapped id (for the first
    process and for exec); unsupported modes and mappings are refused up front."""
    rt, images = stubs
    status = await rt.Status(api_pb2.StatusRequest())
    assert all(h.features.user_namespaces for h in status.runtime_handlers)
    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    config = pod_config("userns", tmp_path)
    userns = config.linux.security_context.namespace_options.userns_options
    userns.mode = api_pb2.POD
    userns.uids.add(container_id=0, host_id=1000, length=65536)
    userns.gids.add(container_id=0, host_id=1000, length=65536)
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "owned").write_text("x")
    os.chown(volume / "owned", 1234, 1234)
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id
    try:
        cfg = container_config(
            "userns", image_ref, "sh", "-c", "cat /proc/self/uid_map; sleep 1000"
        )
        cfg.linux.security_context.namespace_options.CopyFrom(
            config.linux.security_context.namespace_options
        )
        cfg.mounts.add(host_path=str(volume), container_path="/vol")
        cid = await create_in_pod(rt, pod_id, cfg, config)
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        result = await exec_in(rt, cid, "sh", "-c", "id -u; cat /proc/self/gid_map")
        lines = result.stdout.decode().split("\n")
        assert lines[0] == "0" and lines[1].split() == ["0", "1000", "65536"], result
        # the image is the container root's own (idmapped), so it can write its rootfs
        result = await exec_in(
            rt, cid, "sh", "-c", "touch /etc/new && stat -c %u:%g /bin/busybox /etc/new"
        )
        assert result.stdout.split() == [b"0:0", b"0:0"], result
        # a volume keeps its owners' ids inside (the copy is written mapped)
        result = await exec_in(
            rt, cid, "sh", "-c", "touch /vol/new && stat -c %u /vol /vol/owned /vol/new"
        )
        assert result.stdout.split() == [b"0", b"1234", b"0"], result
        # the pod's containers share one user namespace
        other = container_config("userns-2", image_ref, "sleep", "1000")
        other.linux.security_context.namespace_options.CopyFrom(
            config.linux.security_context.namespace_options
        )
        other_id = await create_in_pod(rt, pod_id, other, config)
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=other_id))
        namespaces = set()
        for each in (cid, other_id):
            result = await exec_in(rt, each, "readlink", "/proc/self/ns/user")
            assert result.exit_code == 0, result
            namespaces.add(result.stdout)
        assert len(namespaces) == 1, namespaces
        log = tmp_path / "userns.log"
        for _ in range(50):
            if log.exists() and b"1000" in log.read_bytes():
                break
            await asyncio.sleep(0.2)
        assert log.read_text().split()[-3:] == ["0", "1000", "65536"]
    finally:
        await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    for mode in (api_pb2.CONTAINER, api_pb2.TARGET):
        bad = pod_config(f"userns-{mode}", tmp_path)
        bad.linux.security_context.namespace_options.userns_options.mode = mode
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not supported" in str(err.value.details())
    pods = (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items
    assert [p.metadata.name for p in pods if p.metadata.name.startswith("userns")] == []
